// Device side of RoPE's arithmetic, shared by rope_kernel (rope_cuda.cu) and the fused q/k norm + RoPE + KV
// write (ops/attention/qkv_prepare_cuda.cu) so both store the same bits. Every product and sum is rounded on
// its own (__fmul_rn / __fadd_rn cannot be contracted into an fma, whose choice nvcc and ptxas would make per
// call site), which is also what rope_apply_cpu computes without contraction. For .cu files only.
#pragma once

#include <cuda_runtime.h>

namespace nibble::cuda {

// The angle of pair i at a position: float(position) * inv_freq[i] in float32.
__device__ __forceinline__ float rope_angle(float position, float inv_freq) { return __fmul_rn(position, inv_freq); }

// Pair (a, b) rotated by the angle whose cosine and sine are c, s: (a c - b s, b c + a s).
__device__ __forceinline__ void rope_rotate(float a, float b, float c, float s, float& na, float& nb) {
    na = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    nb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

}  // namespace nibble::cuda
