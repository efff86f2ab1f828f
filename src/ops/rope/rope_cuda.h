// CUDA launcher for rotary position embedding, as rope_apply_cpu computes it: angle = float(position) *
// inv_freq[i] in float32, then pair i = (a, b) becomes (a cos - b sin, b cos + a sin) for i < rotary_dim / 2,
// the pair being (v[i], v[i + rotary_dim / 2]) ("rotate half", NeoX / Llama) or, with interleaved,
// (v[2i], v[2i + 1]) (GPT-J; RopeConfig::interleaved).
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
                const float* inv_freq, int64_t rotary_dim, cudaStream_t stream, bool interleaved = false);

}  // namespace nibble::cuda
