// CUDA launcher for rotary position embedding, "rotate half" (NeoX / Hugging Face) pairing, as
// rope_apply_cpu computes it: angle = float(position) * inv_freq[i] in float32, then
//   v[i] = a cos - b sin, v[i + half] = b cos + a sin   for i < half = rotary_dim / 2.
// Plain C++ plus cuda_runtime.h types.
//   x         [m, n_heads, head_dim] F32 or BF16, rotated in place
//   positions [m] int64 (device)
//   inv_freq  [rotary_dim / 2] float32 (device), e.g. RopeTable::inv_freq uploaded
// Requires rotary_dim / 2 % 4 == 0, rotary_dim <= head_dim, head_dim % 4 == 0 (std::invalid_argument).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

void rope_apply(void* x, DType dtype, int64_t m, int64_t n_heads, int64_t head_dim, const int64_t* positions,
                const float* inv_freq, int64_t rotary_dim, cudaStream_t stream);

}  // namespace nibble::cuda
