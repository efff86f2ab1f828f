// The sum of one float per thread over a CTA of THREADS threads: an xor tree inside each warp, the warps'
// sums through shared memory, then the same tree over them. Every thread gets the same float, and any two
// kernels that call it with the same THREADS and the same per-thread values get the same bits (the RMSNorm
// kernels rely on this to agree with one another). For .cu files only.
#pragma once

namespace nibble::cuda {

template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch /* [32] */) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps, at most 32 of them");
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

}  // namespace nibble::cuda
