// CUDA launcher of the shared-expert gate (ops/moe/shared_expert_gate.h holds the semantics and the CPU
// reference): rows[t, :] *= sigmoid(x[t, :] . gate), one warp per token (the dot product in float32, a warp
// sum), in place. Plain C++ plus cuda_runtime.h types: includable from host code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

// x, rows [m, n_embd] in dtype (F32 or BF16; rows may not alias x); gate [n_embd] BF16.
// Preconditions (std::invalid_argument): n_embd a positive multiple of 8, x, rows and gate 16-byte aligned,
// 0 <= m < 2^31.
void shared_expert_gate(const void* x, DType dtype, int64_t m, int64_t n_embd, const uint16_t* gate, void* rows,
                        cudaStream_t stream);

}  // namespace nibble::cuda
