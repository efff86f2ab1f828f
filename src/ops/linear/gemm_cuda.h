// CUDA prefill matmuls y[m, n] = x[m, k] W^T (+ bias) for many activation rows (a prefill chunk), with BF16
// activations and outputs and float32 accumulation on the tensor cores through cuBLASLt:
//   BF16 weights  go straight to cuBLASLt;
//   NVFP4 weights are dequantized to BF16 (e2m1 x e4m3 block scale, exact in BF16: a 2-bit by 4-bit
//                 significand product) into a scratch buffer, then multiplied with the FP32 global scale
//                 as cuBLASLt's alpha;
//   FP8 weights   likewise (e4m3 is exact in BF16), the per-tensor scale as alpha.
// Decode-sized batches use linear_cuda.h's GEMVs instead, which read the 4-bit weights once without
// the dequantized copy. Plain C++ plus cuda_runtime.h types: includable from host code.
//
// Layouts (device pointers, row-major): x [m, k] BF16, y [m, n] BF16, bias [n] float32 or null (added
// after the product is rounded to BF16: one more rounding than the GEMV path, documented here because the
// device test's tolerance accounts for it). Weight layouts as in linear_cuda.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "ops/linear/linear_cuda.h"

namespace nibble::cuda {

// Owns the cuBLASLt handle, its workspace, the per-shape algorithm choices and the scratch buffer that
// holds one dequantized weight. One per stream that runs prefill matmuls; not thread-safe.
class GemmContext {
public:
    // max_weight_elems: the largest n * k that will be dequantized (scratch of 2 bytes each).
    explicit GemmContext(int64_t max_weight_elems);
    ~GemmContext();
    GemmContext(const GemmContext&) = delete;
    GemmContext& operator=(const GemmContext&) = delete;

    struct Impl;
    Impl& impl() { return *impl_; }

private:
    std::unique_ptr<Impl> impl_;
};

void gemm_bf16(GemmContext& ctx, const void* x, int64_t m, const uint16_t* w, int64_t n, int64_t k, float alpha,
               const float* bias, void* y, cudaStream_t stream);
// y[m, n] float32 = x[m, k] W^T with BF16 x and W: every product is exact in float32 and the sums are float32,
// so this is the float32 linear of the widened operands (e.g. NemotronH's router, which transformers runs in
// float32 on BF16 hidden states), up to the order of the sums.
void gemm_bf16_f32(GemmContext& ctx, const void* x, int64_t m, const uint16_t* w, int64_t n, int64_t k, float* y,
                   cudaStream_t stream);
void gemm_nvfp4(GemmContext& ctx, const void* x, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                cudaStream_t stream);
void gemm_fp8(GemmContext& ctx, const void* x, int64_t m, const uint8_t* w, int64_t n, int64_t k, float scale,
              const float* bias, void* y, cudaStream_t stream);

// The dequantization steps alone (public for the device tests): out [n, k] BF16, without the global /
// per-tensor scale.
void dequantize_nvfp4_to_bf16(const Nvfp4DeviceWeight& w, uint16_t* out, cudaStream_t stream);
void dequantize_fp8_to_bf16(const uint8_t* w, int64_t n, int64_t k, uint16_t* out, cudaStream_t stream);

// y[m, n] += bias[n], BF16 y, float32 bias.
void add_bias_bf16(void* y, int64_t m, int64_t n, const float* bias, cudaStream_t stream);

}  // namespace nibble::cuda
