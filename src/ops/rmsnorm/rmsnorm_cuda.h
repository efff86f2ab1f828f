// CUDA launchers for RMSNorm, alone and fused with the residual add. Activations F32 or BF16 (one dtype
// for inputs and outputs), weight float32, sums in float32. Plain C++ plus cuda_runtime.h types.
//   x, residual, out [m, d] (d % 8 == 0, 16-byte aligned rows); weight [d]
// Throws std::invalid_argument for an unsupported dtype or shape.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

// out = x / sqrt(mean(x^2) + eps) * weight, per row. out may alias x.
void rmsnorm(const void* x, DType dtype, int64_t m, int64_t d, const float* weight, float eps, void* out,
             cudaStream_t stream);

// residual = round(x + residual) (rounded to dtype); out = rmsnorm(residual) * weight. The norm sees the
// stored (rounded) sum, so it equals rmsnorm applied to the new residual.
void rmsnorm_residual(const void* x, void* residual, DType dtype, int64_t m, int64_t d, const float* weight,
                      float eps, void* out, cudaStream_t stream);

}  // namespace nibble::cuda
