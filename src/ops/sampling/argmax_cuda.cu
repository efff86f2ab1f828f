#include <stdexcept>
#include <string>

#include "cuda/pdl.cuh"
#include "ops/sampling/argmax_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 512;

// (value, index) with the larger value winning and the smaller index breaking ties.
__device__ __forceinline__ void keep_better(float& v, int32_t& i, float ov, int32_t oi) {
    if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

// One block per row: a strided scan per thread, then a warp and a block reduction.
__global__ void argmax_kernel(const float* __restrict__ logits, int64_t vocab, int32_t* __restrict__ tokens) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
    float best = -__int_as_float(0x7f800000);  // -inf: NaN compares false and is never kept
    int32_t best_i = 0x7fffffff;
    for (int64_t c = threadIdx.x; c < vocab; c += kThreads) {
        const float v = row[c];
        if (v > best) best = v, best_i = static_cast<int32_t>(c);  // strided scan: first index per thread
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        keep_better(best, best_i, __shfl_xor_sync(0xffffffffu, best, off), __shfl_xor_sync(0xffffffffu, best_i, off));
    __shared__ float warp_v[kThreads / 32];
    __shared__ int32_t warp_i[kThreads / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_v[warp] = best, warp_i[warp] = best_i;
    __syncthreads();
    if (warp == 0) {
        best = lane < kThreads / 32 ? warp_v[lane] : -__int_as_float(0x7f800000);
        best_i = lane < kThreads / 32 ? warp_i[lane] : 0x7fffffff;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            keep_better(best, best_i, __shfl_xor_sync(0xffffffffu, best, off),
                        __shfl_xor_sync(0xffffffffu, best_i, off));
        if (lane == 0) tokens[blockIdx.x] = best_i == 0x7fffffff ? 0 : best_i;
    }
}

}  // namespace

void argmax_rows(const float* logits, int64_t n_rows, int64_t vocab, int32_t* tokens, cudaStream_t stream) {
    if (vocab <= 0 || vocab > 0x7fffffff) throw std::invalid_argument("argmax_rows: vocab = " + std::to_string(vocab));
    if (n_rows <= 0) return;
    launch_pdl(argmax_kernel, dim3(static_cast<unsigned>(n_rows)), dim3(kThreads), 0, stream, logits, vocab,
               tokens);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw std::runtime_error(std::string("argmax_rows: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace nibble::cuda
