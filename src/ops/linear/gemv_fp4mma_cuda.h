// W4A4 NVFP4 decode GEMV on Blackwell's FP4 tensor cores (sm_120a / sm_121a: RTX 50xx, RTX PRO 6000,
// GB10 / DGX Spark): y[m, n] = quantize(x)[m, k] W^T (+ bias), with
// `mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3`.
// The activations are quantized to NVFP4 at run time, each row with its own global scale from its amax
// (ops/linear/nvfp4_activation_quant.h says exactly how, and why per row); gemv_fp4mma.h is the CPU
// reference. This changes the layer's numerics against the weight-only GEMVs of linear_cuda.h (the
// activations lose precision), so nothing selects it implicitly (tune/registry.cpp says how it is listed).
//
// NOT MEASURED: no compute capability 12.x GPU was available when it was written; its numerics are
// tested by tests/device only where such a device is present, and its speed is unknown (docs/tuning.md).
//
// Layouts (device pointers, row-major):
//   x          [m, k]          F32 or BF16, finite
//   W          Nvfp4DeviceWeight: packed [n, k / 2], scales [n, k / 16] unsigned E4M3 (sign bit clear)
//   bias       [n] float32, or null
//   y          [m, n]          same dtype as x
//   workspace  fp4mma_workspace_bytes(m, k) bytes, 16-byte aligned: the quantized activations,
//              packed [m, k / 2] | scales [m, k / 16] | global scales [m] float (each part 16-byte aligned)
// Preconditions (std::invalid_argument): k a positive multiple of 64; x, y, workspace 16-byte aligned; W's
// packed and scales 4-byte aligned. On a device whose compute capability is not 12.x the launcher throws
// std::runtime_error before launching anything.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/linear/linear_cuda.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

// The quantized activations inside a workspace.
struct Fp4Activations {
    uint8_t* packed = nullptr;        // [m, k / 2] E2M1 pairs, element 2i in the low nibble
    uint8_t* scales = nullptr;        // [m, k / 16] E4M3
    float* global_scale = nullptr;    // [m]
};

size_t fp4mma_workspace_bytes(int64_t m, int64_t k);
Fp4Activations fp4mma_workspace_view(void* workspace, int64_t m, int64_t k);

// Whether the current device can run gemv_nvfp4_fp4mma (compute capability 12.x).
bool fp4mma_device_supported();

// The first half of gemv_nvfp4_fp4mma: x [m, k] (k % 16 == 0) quantized into the workspace. Portable (runs
// on any GPU nibble supports), so its numerics are tested on the H100 as well.
void fp4mma_quantize_activations(const void* x, DType dtype, int64_t m, int64_t k, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

// Quantizes x into the workspace, then runs the FP4 tensor-core GEMV: one 16-row tile of W per CTA of 4
// warps (the warps split k and add their partial sums in shared memory), 8 tokens a launch column.
void gemv_nvfp4_fp4mma(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace nibble::cuda
