// CUDA launchers for the decode-side linear layer y[m, n] = x[m, k] W^T (+ bias): weight-only GEMV /
// skinny GEMM for 1..16 activation rows (NVFP4 on the tensor cores) (larger m runs in tiles of 16, streaming the weights again).
// Activations and outputs share one dtype, F32 or BF16; accumulation is float32. Plain C++ plus
// cuda_runtime.h types: includable from host code.
//
// Layouts (device pointers, row-major, the checkpoint's own byte order):
//   x     [m, k]            F32 or BF16
//   NVFP4 packed [n, k / 2] E2M1 pairs, element 2i in the low nibble; scales [n, k / 16] E4M3;
//         value = e2m1 * e4m3 * global_scale (see tensor/nvfp4.h)
//   BF16  w [n, k]
//   FP8   w [n, k] E4M3 (float8_e4m3fn); value = e4m3 * scale (the per-tensor weight_scale)
//   bias  [n] float32, or null
//   y     [m, n]            same dtype as x
// Preconditions (checked, std::invalid_argument): NVFP4 k % 32 == 0 (gemv_nvfp4 itself: k % 16 == 0, sending
// k = 16 mod 32 to a plain kernel of 16-element blocks), BF16 and FP8 k % 16 == 0; 16-byte aligned
// x, W and scale rows follow from those when the base pointers are 16-byte aligned (cudaMalloc's are).
// E4M3 scale and FP8 weight codes 0x7f/0xff (NaN) are not detected: checkpoints never hold them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

struct Nvfp4DeviceWeight {
    const uint8_t* packed = nullptr;  // [n, k / 2]
    const uint8_t* scales = nullptr;  // [n, k / 16]
    float global_scale = 1.0f;
    int64_t n = 0, k = 0;
};

// k % 32 == 0: the kernels below (unchanged dispatch); k = 16 (mod 32), which no real model has (a small
// test model's shared expert of width 48): a CUDA-core kernel of one 16-element block a lane step, a warp a row.
void gemv_nvfp4(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                cudaStream_t stream);

// gemv_nvfp4 picks one of these two (same contract): the tensor-core kernel, and the CUDA-core kernel,
// which measured faster only at m = 1 below lm_head size (docs/perf.md). Public for tests and the bench.
void gemv_nvfp4_mma(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                    cudaStream_t stream);
void gemv_nvfp4_cuda_core(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias,
                          void* y, cudaStream_t stream);

// Version 3 (same contract as gemv_nvfp4, candidates to replace its kernels once measured): the tensor-core
// kernel with one warp per 16-row tile (k split over k_split = 1, 2 or 4 warps; 0 picks from the shape) and
// weights, scales and activations loaded 2-3 steps ahead in registers (linear_cuda.cu explains).
// With programmatic launch built in (cuda/pdl.cuh, NIBBLE_PROGRAMMATIC_LAUNCH) the v3 kernels start loading
// their weights while the previous kernel in the stream finishes, and read x / write y only once it has
// completed. Precondition: that previous kernel does not write the weights or scales.
void gemv_nvfp4_pipelined(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w,
                          const float* bias, void* y, cudaStream_t stream, int k_split = 0);

// For measuring against gemv_nvfp4_pipelined (same contract): at BF16 and m <= 8 a 4-stage ring without the
// 128-register cap (12 warps an SM instead of 16); elsewhere the same kernel as gemv_nvfp4_pipelined.
void gemv_nvfp4_pipelined_deep(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w,
                               const float* bias, void* y, cudaStream_t stream, int k_split = 0);

// One projection of a fused launch: y[m, w.n] = x W^T (+ bias), y in the activations' dtype.
struct Nvfp4Projection {
    Nvfp4DeviceWeight w;
    const float* bias = nullptr;  // [w.n] or null
    void* y = nullptr;            // [m, w.n]
};
// 1..3 projections of the same x (same k; each its own global scale, bias and output) in one launch, e.g.
// q, k and v. Projections with n = 0 are skipped.
void gemv_nvfp4_fused(const void* x, DType dtype, int64_t m, const Nvfp4Projection* projections, int count,
                      cudaStream_t stream, int k_split = 0);
// SwiGLU MLP input in one launch: h[m, n] = silu(x gate^T + gate_bias) * (x up^T + up_bias), silu(g) =
// g / (1 + e^-g) in float32, h in the activations' dtype; gate and up [n, k] NVFP4 (own global scales).
void gemv_nvfp4_gate_up_silu(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& gate,
                             const float* gate_bias, const Nvfp4DeviceWeight& up, const float* up_bias,
                             void* h, cudaStream_t stream, int k_split = 0);

//   w [n, k] BF16
void gemv_bf16(const void* x, DType dtype, int64_t m, const uint16_t* w, int64_t n, int64_t k, const float* bias,
               void* y, cudaStream_t stream);

//   w [n, k] FP8 E4M3, y = (x W_codes^T) * scale (+ bias): the weights streamed once per 16-row tile and
//   widened in registers (no dequantized copy), float32 accumulation on the CUDA cores. Needs sm_89+.
void gemv_fp8(const void* x, DType dtype, int64_t m, const uint8_t* w, int64_t n, int64_t k, float scale,
              const float* bias, void* y, cudaStream_t stream);
// The same on the tensor cores (mma.sync m16n8k16, the E4M3 codes widened to bf16 exactly in registers),
// BF16 activations only, k % 64 == 0: a candidate for m >= 4, where the CUDA-core kernel's float32 FMAs and
// activation re-reads bound it. Measured faster from m = 3-4 (nibble-kernel-bench fp8); the decoder forward
// picks it there (gpu/decoder_forward.cpp), gemv_fp8 itself does not call it.
void gemv_fp8_mma(const void* x, DType dtype, int64_t m, const uint8_t* w, int64_t n, int64_t k, float scale,
                  const float* bias, void* y, cudaStream_t stream);

}  // namespace nibble::cuda
