// Device helpers shared by the CUDA-core decode GEMVs (linear_cuda.cu, gemv_stream_cuda.cu): activation loads,
// output stores and the warp reduce-scatter of per-lane partial sums. For .cu files only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/linear/nvfp4_decode.cuh"

namespace nibble::cuda {

// How a GEMV reads its activations. ReadOnly: the non-coherent path (__ldg, ld.global.nc), for a grid that waits
// for its predecessor before its first load. Coherent: through L1 (ld.global.ca), required in a grid that loads
// anything before griddepcontrol.wait: ptxas treats ld.global.nc as reading memory constant for the grid's
// lifetime and moved such activation loads above the wait (SASS of gemv_nvfp4_pipe_kernel, cuda 13.0: LDG.CONSTANT
// before ACQBULK), so they read the previous layer's x (cuda/pdl.cuh).
enum class XLoad { ReadOnly, Coherent };

template <XLoad L, class V>
__device__ __forceinline__ V load_vector(const V* p) {
    if constexpr (L == XLoad::ReadOnly)
        return __ldg(p);
    else
        return __ldca(p);
}

// 8 consecutive activations as float32.
template <XLoad L = XLoad::ReadOnly>
__device__ __forceinline__ void load_x8(const float* p, float (&v)[8]) {
    const float4 a = load_vector<L>(reinterpret_cast<const float4*>(p));
    const float4 b = load_vector<L>(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <XLoad L = XLoad::ReadOnly>
__device__ __forceinline__ void load_x8(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 u = load_vector<L>(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t wd = word_of(u, j);
        v[2 * j] = __uint_as_float(wd << 16);
        v[2 * j + 1] = __uint_as_float(wd & 0xffff0000u);
    }
}

__device__ __forceinline__ void store_y(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_y(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// job.proj[i] (a fused launch's projection) for a runtime i through static indices only, so the fields stay
// in the parameter bank and are re-read where used instead of held in registers through the main loop.
template <class Job>
__device__ __forceinline__ auto pick_projection(const Job& job, int i) {
    constexpr int kCount = static_cast<int>(sizeof(job.proj) / sizeof(job.proj[0]));
    auto p = job.proj[0];
#pragma unroll
    for (int j = 1; j < kCount; ++j)
        if (i == j) p = job.proj[j];
    return p;
}

// Butterfly reduce-scatter of V sums over the warp: at each of the first log2(V) levels a lane keeps half of
// its values (the upper half where its lane bit is set) and adds its partner's copy of that half, so the
// traffic halves each level; the last levels add whole sums. Lanes with (lane & (32 / V - 1)) == 0 end with
// the warp total of value `index`, whose bits, highest first, are lane bits 4, 3, ... (V - 1 + log2(32 / V)
// shuffles instead of 5 V).
template <int V, int LIVE>
__device__ __forceinline__ void reduce_scatter_level(float (&v)[V], int lane, int& index) {
    if constexpr (LIVE > 1) {  // compile-time levels: every index of v stays static (no local memory)
        constexpr int half = LIVE / 2, offset = 16 * LIVE / V;
        const bool upper = (lane & offset) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float mine = upper ? v[i + half] : v[i];
            const float theirs = upper ? v[i] : v[i + half];
            v[i] = mine + __shfl_xor_sync(0xffffffffu, theirs, offset);
        }
        if (upper) index += half;
        reduce_scatter_level<V, half>(v, lane, index);
    }
}
template <int V>
__device__ __forceinline__ float reduce_scatter(float (&v)[V], int lane, int& index) {
    static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V must be a power of two up to 32");
    index = 0;
    reduce_scatter_level<V, V>(v, lane, index);
    float total = v[0];
#pragma unroll
    for (int offset = 16 / V; offset >= 1; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
    return total;
}

}  // namespace nibble::cuda
