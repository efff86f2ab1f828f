// CUDA launchers for SwiGLU, out[i] = silu(gate[i]) * up[i] with silu(g) = g / (1 + e^-g), in float32
// (expf and IEEE division: no fast-math), and relu^2 (below). Plain C++ plus cuda_runtime.h types.
//   gate, up, out [n] F32 or BF16, one dtype; 16-byte aligned; out may alias gate or up.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

void silu_mul(const void* gate, const void* up, DType dtype, int64_t n, void* out, cudaStream_t stream);

// relu^2: out[i] = max(x[i], 0)^2 in float32 (relu2_cpu), rounded once to dtype. x, out [n] F32 or BF16,
// 16-byte aligned; out may alias x.
void relu2(const void* x, DType dtype, int64_t n, void* out, cudaStream_t stream);

}  // namespace nibble::cuda
