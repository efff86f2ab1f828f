// RoPE kernel: one thread per (token, head, 4 consecutive pair indices). Rotate half: the 4 "a" values and
// the 4 "b" values (half a rotary dimension apart) are each one vector access (16 bytes in F32, 8 in BF16);
// interleaved: the 4 pairs are 8 consecutive values, two such accesses.
// sincosf is the accurate version (2 ulp over the whole range; no fast-math), so large positions work.
#include <cuda_bf16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "ops/rope/rope_cuda.h"
#include "ops/rope/rope_rotate.cuh"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xffff0000u);
}
__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, const float (&v)[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<uint2*>(p) =
        make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}

template <class T, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(T* __restrict__ x, int64_t m, int64_t n_heads, int64_t head_dim,
                const int64_t* __restrict__ positions, const float* __restrict__ inv_freq, int64_t half) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t quads = half / 4;
    const int64_t total = m * n_heads * quads;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total;
         t += static_cast<int64_t>(gridDim.x) * kThreads) {
        const int64_t q = t % quads, th = t / quads;  // th = token * n_heads + head
        const int64_t token = th / n_heads;
        const float pos = static_cast<float>(positions[token]);
        // Rotate half: a = v[4q + e], b = v[half + 4q + e]. Interleaved: pairs 4q..4q+3 are elements
        // 8q..8q+7, loaded as lo = 8q..8q+3 and hi = 8q+4..8q+7, then regrouped into a (even) and b (odd).
        T* const v = x + th * head_dim + q * (INTERLEAVED ? 8 : 4);
        T* const w = INTERLEAVED ? v + 4 : v + half;
        float lo[4], hi[4], a[4], b[4];
        load4(v, lo);
        load4(w, hi);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if constexpr (INTERLEAVED) {
                a[e] = e < 2 ? lo[2 * e] : hi[2 * e - 4];
                b[e] = e < 2 ? lo[2 * e + 1] : hi[2 * e - 3];
            } else {
                a[e] = lo[e], b[e] = hi[e];
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float angle = rope_angle(pos, inv_freq[q * 4 + e]);
            float s, c;
            sincosf(angle, &s, &c);
            rope_rotate(a[e], b[e], c, s, a[e], b[e]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if constexpr (INTERLEAVED) {
                if (e < 2) lo[2 * e] = a[e], lo[2 * e + 1] = b[e];
                else hi[2 * e - 4] = a[e], hi[2 * e - 3] = b[e];
            } else {
                lo[e] = a[e], hi[e] = b[e];
            }
        }
        store4(v, lo);
        store4(w, hi);
    }
}

}  // namespace

void rope_apply(void* x, DType dtype, int64_t m, int64_t n_heads, int64_t head_dim, const int64_t* positions,
                const float* inv_freq, int64_t rotary_dim, cudaStream_t stream, bool interleaved) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument("rope_apply: activations must be F32 or BF16");
    if (rotary_dim <= 0 || rotary_dim % 8 != 0 || rotary_dim > head_dim || head_dim % 4 != 0)
        throw std::invalid_argument("rope_apply: rotary_dim " + std::to_string(rotary_dim) + " / head_dim " +
                                    std::to_string(head_dim) + " unsupported (rotary_dim % 8, head_dim % 4)");
    const int64_t total = m * n_heads * (rotary_dim / 8);
    if (total == 0) return;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
    auto launch = [&]<class T>() {
        T* const xt = static_cast<T*>(x);
        if (interleaved)
            launch_pdl(rope_kernel<T, true>, dim3(blocks), dim3(kThreads), 0, stream, xt, m, n_heads,
                       head_dim, positions, inv_freq, rotary_dim / 2);
        else
            launch_pdl(rope_kernel<T, false>, dim3(blocks), dim3(kThreads), 0, stream, xt, m, n_heads,
                       head_dim, positions, inv_freq, rotary_dim / 2);
    };
    if (dtype == DType::F32) launch.template operator()<float>();
    else launch.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
