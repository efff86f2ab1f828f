// MoE kernels (ops/moe/moe_cuda.h).
//
// Routers: top-k as k rounds of an argmax with (score desc, id asc) order, which is a stable sort's first k:
// the CPU's choice. Up to 256 experts one warp per token, scores in registers, shuffle argmax rounds
// (softmax: a round is a max warp reduction over an order key of the scores, then a min over the ids
// holding it); above, one CTA of 128 threads per token, scores in shared memory, block argmax rounds (same
// arithmetic).
// Permutation: up to 1024 pairs (decode) one CTA does it all in one launch (shared-memory counts, a block
// scan, placement in pair order by one warp); above, one warp per expert, ballots over the pair ids in
// order (so token order inside an expert is kept without a sort), a count pass, then a place pass that also
// derives offsets and the active list.
// Grouped GEMV: CUDA cores, a warp per 32 / L output rows, the L lanes of a row over its 32-wide chunks of k
// (16 bytes of E2M1 codes + 2 E4M3 scales, the decode of ops/linear/nvfp4_decode.cuh), L the fewest lanes
// leaving each at most 4 chunks, all loaded before use; tokens in tiles of 8; the gate and up rows of a
// SwiGLU expert are read in the same pass and the activation is applied in the epilogue.
// Up to k = 4096 the GEMV keeps 2 (SwiGLU) or 4 rows a lane of weights in registers instead, loaded first,
// reads its inputs from swizzled shared memory (staged as float32, up to 8 rows at a time), and reuses the
// registers for every token of the expert: the same per-row arithmetic (moe_reg_gemv_nvfp4_kernel).
// Steps of 2+ tokens take the tensor-core GEMV of ops/moe/moe_mma_gemv_cuda.cu where it measured faster
// (moe_mma_gemv_preferred).
// Combine: CTAs over (token, column block), the choices ranked by expert id by one warp with shuffles.
// Grouped GEMM (prefill, MoeExpertKernel::Gemm): tensor cores over (expert, 64 positions, 128 weight rows)
// tiles, weights dequantized to BF16 in shared memory; see the comment above moe_gemm_nvfp4_kernel.
#include <cuda_bf16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/block_sum.cuh"
#include "cuda/cuda_check.h"
#include "cuda/mma_sync.cuh"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/linear/nvfp4_decode.cuh"
#include "ops/moe/moe_cuda.h"
#include "ops/moe/moe_gemv_common.cuh"
#include "ops/moe/moe_mma_gemv.h"
#include "ops/moe/moe_workspace.h"

namespace nibble::cuda {
namespace {

constexpr int kRouteThreads = 128;
constexpr int kMaxTopK = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// a ranks before b: larger score, then lower id; id < 0 is "none".
__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    if (ai < 0) return false;
    if (bi < 0) return true;
    return av > bv || (av == bv && ai < bi);
}

// The best (value, id) over the block; every thread gets the result. scratch_v/i [32].
__device__ __forceinline__ int block_argmax(float v, int id, float* scratch_v, int* scratch_i) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, id, o);
        if (ranks_before(ov, oi, v, id)) v = ov, id = oi;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // scratch free (an earlier call may still be reading it)
    if (lane == 0) scratch_v[warp] = v, scratch_i[warp] = id;
    __syncthreads();
    constexpr int kWarps = kRouteThreads / 32;
    v = lane < kWarps ? scratch_v[lane] : 0.0f;
    id = lane < kWarps ? scratch_i[lane] : -1;
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, id, o);
        if (ranks_before(ov, oi, v, id)) v = ov, id = oi;
    }
    return id;
}

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* scratch /* [32] */) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, ov) : v + ov;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    constexpr int kWarps = kRouteThreads / 32;
    v = lane < kWarps ? scratch[lane] : (is_max ? -INFINITY : 0.0f);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, ov) : v + ov;
    }
    return v;
}

// Shared memory of a router CTA: score [n_experts], aux [n_experts] (softmax: unused; sigmoid: s),
// taken [n_experts] flags, and for the sigmoid router group_score [n_group], group_taken [n_group].
template <class LT>
__global__ void __launch_bounds__(kRouteThreads)
    route_softmax_kernel(const LT* __restrict__ logits, int n_experts, int top_k, bool norm_topk_prob,
                         int32_t* __restrict__ ids, float* __restrict__ weights) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    extern __shared__ float smem[];
    __shared__ float scratch_v[32];
    __shared__ int scratch_i[32];
    __shared__ int chosen[kMaxTopK];
    float* score = smem;                                                        // [n_experts] logits
    unsigned char* taken = reinterpret_cast<unsigned char*>(smem + n_experts);  // [n_experts]
    const int64_t t = blockIdx.x;
    const LT* l = logits + t * n_experts;
    float mx = -INFINITY;
    for (int e = threadIdx.x; e < n_experts; e += kRouteThreads) {
        const float v = load1(l + e);
        score[e] = v;
        taken[e] = 0;
        mx = fmaxf(mx, v);
    }
    mx = block_reduce(mx, true, scratch_v);
    float sum = 0.0f;
    for (int e = threadIdx.x; e < n_experts; e += kRouteThreads) sum += expf(score[e] - mx);
    sum = block_reduce(sum, false, scratch_v);
    for (int j = 0; j < top_k; ++j) {
        float bv = 0.0f;
        int bi = -1;
        for (int e = threadIdx.x; e < n_experts; e += kRouteThreads)
            if (!taken[e] && ranks_before(score[e], e, bv, bi)) bv = score[e], bi = e;
        const int best = block_argmax(bv, bi, scratch_v, scratch_i);
        if (threadIdx.x == 0) {
            chosen[j] = best;
            taken[best] = 1;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float p[kMaxTopK];
        float total = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            p[j] = expf(score[chosen[j]] - mx) / sum;
            total += p[j];
        }
        for (int j = 0; j < top_k; ++j) {
            ids[t * top_k + j] = chosen[j];
            weights[t * top_k + j] = norm_topk_prob ? p[j] / total : p[j];
        }
    }
}

template <class LT>
__global__ void __launch_bounds__(kRouteThreads)
    route_sigmoid_kernel(const LT* __restrict__ logits, int n_experts, int top_k,
                         const float* __restrict__ correction_bias, int n_group, int topk_group,
                         bool norm_topk_prob, float routed_scaling_factor, int32_t* __restrict__ ids,
                         float* __restrict__ weights) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    extern __shared__ float smem[];
    __shared__ float scratch_v[32];
    __shared__ int scratch_i[32];
    __shared__ int chosen[kMaxTopK];
    float* choice = smem;                                                            // [n_experts] s + bias
    float* sig = smem + n_experts;                                                   // [n_experts] s
    float* group_score = sig + n_experts;                                            // [n_group]
    unsigned char* taken = reinterpret_cast<unsigned char*>(group_score + n_group);  // [n_experts]
    unsigned char* eligible = taken + n_experts;                                     // [n_group]
    const int per_group = n_experts / n_group;
    const int64_t t = blockIdx.x;
    const LT* l = logits + t * n_experts;
    for (int e = threadIdx.x; e < n_experts; e += kRouteThreads) {
        const float s = 1.0f / (1.0f + expf(-load1(l + e)));
        sig[e] = s;
        choice[e] = s + (correction_bias != nullptr ? correction_bias[e] : 0.0f);
        taken[e] = 0;
    }
    __syncthreads();
    // Group score: the sum of its two best choice values (the CPU's scan, tie to "second").
    for (int g = threadIdx.x; g < n_group; g += kRouteThreads) {
        float best = -INFINITY, second = -INFINITY;
        for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
            const float v = choice[e];
            if (v > best) {
                second = best;
                best = v;
            } else if (v > second) {
                second = v;
            }
        }
        group_score[g] = per_group >= 2 ? best + second : best;
        eligible[g] = 0;
    }
    __syncthreads();
    for (int i = 0; i < topk_group; ++i) {
        float bv = 0.0f;
        int bi = -1;
        for (int g = threadIdx.x; g < n_group; g += kRouteThreads)
            if (!eligible[g] && ranks_before(group_score[g], g, bv, bi)) bv = group_score[g], bi = g;
        const int best = block_argmax(bv, bi, scratch_v, scratch_i);
        if (threadIdx.x == 0) eligible[best] = 1;
        __syncthreads();
    }
    for (int j = 0; j < top_k; ++j) {
        float bv = 0.0f;
        int bi = -1;
        for (int e = threadIdx.x; e < n_experts; e += kRouteThreads)
            if (!taken[e] && eligible[e / per_group] && ranks_before(choice[e], e, bv, bi))
                bv = choice[e], bi = e;
        const int best = block_argmax(bv, bi, scratch_v, scratch_i);
        if (threadIdx.x == 0) {
            chosen[j] = best;
            taken[best] = 1;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int j = 0; j < top_k; ++j) total += sig[chosen[j]];
        const float denom = norm_topk_prob ? total + 1e-20f : 1.0f;
        for (int j = 0; j < top_k; ++j) {
            ids[t * top_k + j] = chosen[j];
            weights[t * top_k + j] = sig[chosen[j]] / denom * routed_scaling_factor;
        }
    }
}

// ---- warp routers (n_experts <= 256) ----
//
// One warp per token, expert e in lane e % 32, register slot e / 32: top_k rounds of a shuffle argmax
// instead of the block kernels' barrier rounds. The same float operations as the block kernels: the softmax
// sum adds, as the 128-thread CTA does, per virtual thread 32 w + lane its experts e and e + 128 (slots w and
// w + 4), butterflies each w's partials over the lanes in warp_sum's order and adds the four as the CTA's
// second butterfly does, (w0 + w2) + (w1 + w3); max, ranks and weights are order-free or kept in order.
// Ids and weights are then bit-identical to the block kernels'.
constexpr int kWarpRouteMaxExperts = 256;
constexpr int kWarpRouteSlots = kWarpRouteMaxExperts / 32;
constexpr int kWarpRouteWarps = 4;  // tokens per CTA

// The best (value, id) over the warp by ranks_before, aux travelling with it; every lane gets the result
// (ranks_before is a strict total order over distinct ids, so every lane picks the same one).
__device__ __forceinline__ void warp_argmax(float& v, int& id, float& aux) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, id, o);
        const float oa = __shfl_xor_sync(0xffffffffu, aux, o);
        if (ranks_before(ov, oi, v, id)) v = ov, id = oi, aux = oa;
    }
}

// An unsigned key in ranks_before's score order: larger score, larger key; equal scores (-0 and +0 alike:
// adding +0 turns -0 into +0), equal keys. NaN logits have no order in either (the CPU's is undefined too).
__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned u = __float_as_uint(v + 0.0f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// The score of a key (-0 comes back as +0: the same exp(score - max)).
__device__ __forceinline__ float order_key_value(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// One token's routing by the calling warp (all 32 lanes): lane j < top_k gets choice j's id and weight.
template <class LT>
__device__ __forceinline__ void route_softmax_warp_token(const LT* __restrict__ l, int n_experts, int top_k,
                                                         bool norm_topk_prob, int& id, float& weight) {
    const int lane = threadIdx.x & 31;
    float score[kWarpRouteSlots];  // logits of experts s * 32 + lane
    float mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < kWarpRouteSlots; ++s) {
        const int e = s * 32 + lane;
        score[s] = e < n_experts ? load1(l + e) : -INFINITY;
        if (e < n_experts) mx = fmaxf(mx, score[s]);
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float part[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        float p = 0.0f;
        if (w * 32 + lane < n_experts) p += expf(score[w] - mx);
        if ((w + 4) * 32 + lane < n_experts) p += expf(score[w + 4] - mx);
        part[w] = warp_sum(p);
    }
    const float sum = (part[0] + part[2]) + (part[1] + part[3]);
    // Each round: the largest score key over the warp (one redux), then the lowest id holding it (another):
    // ranks_before's order without its serial chain of compares and shuffles.
    unsigned key[kWarpRouteSlots];
#pragma unroll
    for (int s = 0; s < kWarpRouteSlots; ++s) key[s] = order_key(score[s]);
    unsigned open = 0;  // bit s: expert s * 32 + lane exists and is not chosen yet
#pragma unroll
    for (int s = 0; s < kWarpRouteSlots; ++s)
        if (s * 32 + lane < n_experts) open |= 1u << s;
    int my_id = -1;  // lane j < top_k: choice j
    float my_p = 0.0f, total = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        unsigned lane_best = 0;
#pragma unroll
        for (int s = 0; s < kWarpRouteSlots; ++s)
            if ((open >> s) & 1u) lane_best = max(lane_best, key[s]);
        const unsigned best = __reduce_max_sync(0xffffffffu, lane_best);
        int lane_id = 0x7fffffff;  // the lowest open id of this lane with the best key
#pragma unroll
        for (int s = kWarpRouteSlots - 1; s >= 0; --s)
            if (((open >> s) & 1u) && key[s] == best) lane_id = s * 32 + lane;
        const int bi = __reduce_min_sync(0xffffffffu, lane_id);
        if ((bi & 31) == lane) open &= ~(1u << (bi >> 5));
        const float bv = order_key_value(best);
        const float p = expf(bv - mx) / sum;
        total += p;
        if (lane == j) my_id = bi, my_p = p;
    }
    id = my_id;
    weight = norm_topk_prob ? my_p / total : my_p;
}

template <class LT>
__global__ void __launch_bounds__(kWarpRouteWarps * 32)
    route_softmax_warp_kernel(const LT* __restrict__ logits, int64_t m, int n_experts, int top_k,
                              bool norm_topk_prob, int32_t* __restrict__ ids, float* __restrict__ weights) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int lane = threadIdx.x & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpRouteWarps + (threadIdx.x >> 5);
    if (t >= m) return;  // the whole warp; no block barrier below
    int id;
    float weight;
    route_softmax_warp_token(logits + t * n_experts, n_experts, top_k, norm_topk_prob, id, weight);
    if (lane < top_k) ids[t * top_k + lane] = id, weights[t * top_k + lane] = weight;
}

// One token's sigmoid routing by the calling warp (all 32 lanes): lane j < top_k gets choice j's id and
// weight. Group scores (when some groups are excluded) go through the warp's own shared memory (choice_sh,
// group_score, group_eligible: kWarpRouteMaxExperts each), computed by the block kernel's sequential scan
// with one lane per group.
struct SigmoidRouting {
    const float* correction_bias;
    int n_experts, top_k, n_group, topk_group;
    bool norm_topk_prob;
    float routed_scaling_factor;
};
struct SigmoidWarpScratch {
    float* choice_sh;
    float* group_score;
    unsigned char* group_eligible;
};
template <class LT>
__device__ __forceinline__ void route_sigmoid_warp_token(const LT* __restrict__ l, const SigmoidRouting& r,
                                                         const SigmoidWarpScratch& sh, int& id,
                                                         float& weight) {
    const int lane = threadIdx.x & 31;
    const int n_experts = r.n_experts, top_k = r.top_k, n_group = r.n_group, topk_group = r.topk_group;
    const float* __restrict__ correction_bias = r.correction_bias;
    float* const choice_sh = sh.choice_sh;
    float* const group_score = sh.group_score;
    unsigned char* const group_eligible = sh.group_eligible;
    const int per_group = n_experts / n_group;
    float choice[kWarpRouteSlots], sig[kWarpRouteSlots];  // of experts s * 32 + lane
    unsigned eligible = 0;                                // bit s: expert s * 32 + lane may be chosen
#pragma unroll
    for (int s = 0; s < kWarpRouteSlots; ++s) {
        const int e = s * 32 + lane;
        sig[s] = 0.0f;
        choice[s] = -INFINITY;
        if (e < n_experts) {
            const float v = 1.0f / (1.0f + expf(-load1(l + e)));
            sig[s] = v;
            choice[s] = v + (correction_bias != nullptr ? correction_bias[e] : 0.0f);
            eligible |= 1u << s;
        }
    }
    if (topk_group < n_group) {
#pragma unroll
        for (int s = 0; s < kWarpRouteSlots; ++s)
            if (s * 32 + lane < n_experts) choice_sh[s * 32 + lane] = choice[s];
        __syncwarp();
        for (int g = lane; g < n_group; g += 32) {  // the sum of its two best choice values, as the CPU scans
            float best = -INFINITY, second = -INFINITY;
            for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
                const float v = choice_sh[e];
                if (v > best) {
                    second = best;
                    best = v;
                } else if (v > second) {
                    second = v;
                }
            }
            group_score[g] = per_group >= 2 ? best + second : best;
            group_eligible[g] = 0;
        }
        __syncwarp();
        for (int i = 0; i < topk_group; ++i) {
            float bv = 0.0f, unused = 0.0f;
            int bi = -1;
            for (int g = lane; g < n_group; g += 32)
                if (!group_eligible[g] && ranks_before(group_score[g], g, bv, bi))
                    bv = group_score[g], bi = g;
            warp_argmax(bv, bi, unused);
            if (lane == 0) group_eligible[bi] = 1;
            __syncwarp();
        }
        eligible = 0;
#pragma unroll
        for (int s = 0; s < kWarpRouteSlots; ++s) {
            const int e = s * 32 + lane;
            if (e < n_experts && group_eligible[e / per_group]) eligible |= 1u << s;
        }
    }
    // Each round as the softmax router's: a max reduction over the choice keys, a min over the ids holding
    // it (the host checked that at least top_k experts are eligible: a round always finds one); its s comes
    // from the lane that holds it.
    unsigned key[kWarpRouteSlots];
#pragma unroll
    for (int s = 0; s < kWarpRouteSlots; ++s) key[s] = order_key(choice[s]);
    int my_id = -1;  // lane j < top_k: choice j and its s
    float my_sig = 0.0f, total = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        unsigned lane_best = 0;
#pragma unroll
        for (int s = 0; s < kWarpRouteSlots; ++s)
            if ((eligible >> s) & 1u) lane_best = max(lane_best, key[s]);
        const unsigned best = __reduce_max_sync(0xffffffffu, lane_best);
        int lane_id = 0x7fffffff;  // the lowest eligible id of this lane with the best key, and its s
        float lane_sig = 0.0f;
#pragma unroll
        for (int s = kWarpRouteSlots - 1; s >= 0; --s)
            if (((eligible >> s) & 1u) && key[s] == best) lane_id = s * 32 + lane, lane_sig = sig[s];
        const int bi = __reduce_min_sync(0xffffffffu, lane_id);
        const float bs = __shfl_sync(0xffffffffu, lane_sig, bi & 31);
        if ((bi & 31) == lane) eligible &= ~(1u << (bi >> 5));  // taken
        total += bs;
        if (lane == j) my_id = bi, my_sig = bs;
    }
    const float denom = r.norm_topk_prob ? total + 1e-20f : 1.0f;
    id = my_id;
    weight = my_sig / denom * r.routed_scaling_factor;
}

template <class LT>
__global__ void __launch_bounds__(kWarpRouteWarps * 32)
    route_sigmoid_warp_kernel(const LT* __restrict__ logits, int64_t m, const SigmoidRouting r,
                              int32_t* __restrict__ ids, float* __restrict__ weights) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ float choice_sh[kWarpRouteWarps][kWarpRouteMaxExperts];
    __shared__ float group_score[kWarpRouteWarps][kWarpRouteMaxExperts];
    __shared__ unsigned char group_eligible[kWarpRouteWarps][kWarpRouteMaxExperts];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpRouteWarps + warp;
    if (t >= m) return;  // the whole warp; no block barrier below
    int id;
    float weight;
    route_sigmoid_warp_token(logits + t * r.n_experts, r,
                             {choice_sh[warp], group_score[warp], group_eligible[warp]}, id, weight);
    if (lane < r.top_k) ids[t * r.top_k + lane] = id, weights[t * r.top_k + lane] = weight;
}

// ---- permutation ----

constexpr int kPermuteWarps = 4;

// counts[e] = pairs with id e; one warp per expert.
__global__ void __launch_bounds__(kPermuteWarps * 32)
    permute_count_kernel(const int32_t* __restrict__ ids, int n_pairs, int n_experts,
                         int32_t* __restrict__ counts) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int e = blockIdx.x * kPermuteWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= n_experts) return;
    int count = 0;
    for (int base = 0; base < n_pairs; base += 32) {
        const int i = base + lane;
        count += __popc(__ballot_sync(0xffffffffu, i < n_pairs && ids[i] == e));
    }
    if (lane == 0) counts[e] = count;
}

// Offsets, the active list and the sorted pairs; one warp per expert, pairs placed in index order.
__global__ void __launch_bounds__(kPermuteWarps * 32)
    permute_place_kernel(const int32_t* __restrict__ ids, int n_pairs, int n_experts,
                         const int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                         int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ pair_position,
                         int32_t* __restrict__ active_experts, int32_t* __restrict__ n_active) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int e = blockIdx.x * kPermuteWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= n_experts) return;
    int before = 0, active_before = 0;  // pairs and active experts with a lower id
    for (int i = lane; i < e; i += 32) {
        const int c = counts[i];
        before += c;
        active_before += c > 0 ? 1 : 0;
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        before += __shfl_xor_sync(0xffffffffu, before, o);
        active_before += __shfl_xor_sync(0xffffffffu, active_before, o);
    }
    const int count = counts[e];
    if (lane == 0) {
        offsets[e] = before;
        if (count > 0) active_experts[active_before] = e;
        if (e == n_experts - 1) {
            offsets[n_experts] = before + count;
            *n_active = active_before + (count > 0 ? 1 : 0);
        }
    }
    int placed = 0;
    for (int base = 0; base < n_pairs; base += 32) {
        const int i = base + lane;
        const bool mine = i < n_pairs && ids[i] == e;
        const unsigned mask = __ballot_sync(0xffffffffu, mine);
        if (mine) {
            const int pos = before + placed + __popc(mask & ((1u << lane) - 1u));
            sorted_pairs[pos] = i;
            pair_position[i] = pos;
        }
        placed += __popc(mask);
    }
}

// Small batches (decode: n_pairs <= kSmallPermutePairs) in one CTA, one launch: counts by shared atomics,
// a block scan (one thread per expert) for offsets and the active list, then warp 0 places the pairs in
// index order, 32 at a time (__match_any_sync ranks equal ids within the 32; a running per-expert fill
// carries across them), which keeps token order inside an expert.
constexpr int kSmallPermuteThreads = 1024;  // >= the 1024 experts moe_permute allows
constexpr int kSmallPermutePairs = 1024;

// The part after the counting, shared with the fused router (route_softmax_permute_kernel). On entry (after
// a barrier) id_sh[i] holds pair i's expert (-1: dropped) and count_sh[e] its pair count.
__device__ __forceinline__ void permute_small_from_shared(
    int* count_sh, const int* id_sh, int n_pairs, int n_experts, int32_t* __restrict__ counts,
    int32_t* __restrict__ offsets, int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ pair_position,
    int32_t* __restrict__ active_experts, int32_t* __restrict__ n_active) {
    __shared__ int warp_count[32], warp_active[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Exclusive scans of the counts and of the active flags over expert = tid.
    const int c = tid < n_experts ? count_sh[tid] : 0;
    const int a = c > 0 ? 1 : 0;
    int ic = c, ia = a;  // inclusive within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int xc = __shfl_up_sync(0xffffffffu, ic, o);
        const int xa = __shfl_up_sync(0xffffffffu, ia, o);
        if (lane >= o) ic += xc, ia += xa;
    }
    if (lane == 31) warp_count[warp] = ic, warp_active[warp] = ia;
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the 32 warp totals
        const int wc = warp_count[lane], wa = warp_active[lane];
        int sc = wc, sa = wa;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int xc = __shfl_up_sync(0xffffffffu, sc, o);
            const int xa = __shfl_up_sync(0xffffffffu, sa, o);
            if (lane >= o) sc += xc, sa += xa;
        }
        warp_count[lane] = sc - wc;
        warp_active[lane] = sa - wa;
    }
    __syncthreads();
    const int before = warp_count[warp] + ic - c, active_before = warp_active[warp] + ia - a;
    if (tid < n_experts) {
        counts[tid] = c;
        offsets[tid] = before;
        count_sh[tid] = before;  // only this thread read count_sh[tid] since the last barrier
        if (c > 0) active_experts[active_before] = tid;
        if (tid == n_experts - 1) {
            offsets[n_experts] = before + c;
            *n_active = active_before + a;
        }
    }
    __syncthreads();
    if (warp != 0) return;
    for (int base = 0; base < n_pairs; base += 32) {
        const int i = base + lane;
        const int e = i < n_pairs ? id_sh[i] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        if (e >= 0) {
            const int pos = count_sh[e] + rank;
            sorted_pairs[pos] = i;
            pair_position[i] = pos;
        }
        __syncwarp();  // every peer read the fill before its leader moves it
        if (e >= 0 && rank == 0) count_sh[e] += __popc(peers);
        __syncwarp();
    }
}

__global__ void __launch_bounds__(kSmallPermuteThreads)
    permute_small_kernel(const int32_t* __restrict__ ids, int n_pairs, int n_experts,
                         int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                         int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ pair_position,
                         int32_t* __restrict__ active_experts, int32_t* __restrict__ n_active) {
    pdl_enter();                                    // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ int count_sh[kSmallPermuteThreads];  // then: the next free sorted position of each expert
    __shared__ int id_sh[kSmallPermutePairs];
    const int tid = threadIdx.x;
    count_sh[tid] = 0;
    __syncthreads();
    for (int i = tid; i < n_pairs; i += kSmallPermuteThreads) {
        const int e = ids[i];
        const bool routed = e >= 0 && e < n_experts;  // others are dropped
        id_sh[i] = routed ? e : -1;
        if (routed) atomicAdd(&count_sh[e], 1);
    }
    __syncthreads();
    permute_small_from_shared(count_sh, id_sh, n_pairs, n_experts, counts, offsets, sorted_pairs,
                              pair_position, active_experts, n_active);
}

// A routed token's choice (lane < top_k: id in [0, n_experts)) into ids / weights and the fused kernels'
// shared permutation state (the ids and per-expert counts permute_small_from_shared reads).
__device__ __forceinline__ void store_choice(int t, int lane, int top_k, int id, float weight, int32_t* ids,
                                             float* weights, int* id_sh, int* count_sh) {
    if (lane >= top_k) return;
    const int i = t * top_k + lane;
    ids[i] = id;
    weights[i] = weight;
    id_sh[i] = id;
    atomicAdd(&count_sh[id], 1);
}

// Decode's router and permutation in one launch (n_experts <= kWarpRouteMaxExperts, m top_k <=
// kSmallPermutePairs): the 32 warps route the tokens (route_softmax_warp_token, as moe_route_softmax), the
// choices go to ids / weights and into the shared state of permute_small_kernel, which then runs as there.
template <class LT>
__global__ void __launch_bounds__(kSmallPermuteThreads)
    route_softmax_permute_kernel(const LT* __restrict__ logits, int m, int n_experts, int top_k,
                                 bool norm_topk_prob, int32_t* __restrict__ ids, float* __restrict__ weights,
                                 int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                 int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ pair_position,
                                 int32_t* __restrict__ active_experts, int32_t* __restrict__ n_active) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ int count_sh[kSmallPermuteThreads];
    __shared__ int id_sh[kSmallPermutePairs];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    count_sh[tid] = 0;
    __syncthreads();
    for (int t = warp; t < m; t += kSmallPermuteThreads / 32) {  // warp-uniform
        int id;
        float weight;
        route_softmax_warp_token(logits + static_cast<int64_t>(t) * n_experts, n_experts, top_k,
                                 norm_topk_prob, id, weight);
        store_choice(t, lane, top_k, id, weight, ids, weights, id_sh, count_sh);
    }
    __syncthreads();
    permute_small_from_shared(count_sh, id_sh, m * top_k, n_experts, counts, offsets, sorted_pairs,
                              pair_position, active_experts, n_active);
}

// The same for the sigmoid router (route_sigmoid_warp_token, as moe_route_sigmoid): warps 0 ..
// kSigmoidPermuteWarps - 1 route the tokens (their group scratch is per warp, so not all 32 warps take
// tokens).
constexpr int kSigmoidPermuteWarps = 8;

template <class LT>
__global__ void __launch_bounds__(kSmallPermuteThreads)
    route_sigmoid_permute_kernel(const LT* __restrict__ logits, int m, const SigmoidRouting r,
                                 int32_t* __restrict__ ids, float* __restrict__ weights,
                                 int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                 int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ pair_position,
                                 int32_t* __restrict__ active_experts, int32_t* __restrict__ n_active) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ int count_sh[kSmallPermuteThreads];
    __shared__ int id_sh[kSmallPermutePairs];
    __shared__ float choice_sh[kSigmoidPermuteWarps][kWarpRouteMaxExperts];
    __shared__ float group_score[kSigmoidPermuteWarps][kWarpRouteMaxExperts];
    __shared__ unsigned char group_eligible[kSigmoidPermuteWarps][kWarpRouteMaxExperts];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    count_sh[tid] = 0;
    __syncthreads();
    if (warp < kSigmoidPermuteWarps) {
        for (int t = warp; t < m; t += kSigmoidPermuteWarps) {  // warp-uniform
            int id;
            float weight;
            route_sigmoid_warp_token(logits + static_cast<int64_t>(t) * r.n_experts, r,
                                     {choice_sh[warp], group_score[warp], group_eligible[warp]}, id, weight);
            store_choice(t, lane, r.top_k, id, weight, ids, weights, id_sh, count_sh);
        }
    }
    __syncthreads();
    permute_small_from_shared(count_sh, id_sh, m * r.top_k, r.n_experts, counts, offsets, sorted_pairs,
                              pair_position, active_experts, n_active);
}

// ---- grouped NVFP4 GEMV ----

constexpr int kGemvWarps = 4;
// Tokens of an expert per pass over its rows (kTokenTile, a template argument): 8, or 1 when the experts
// average at most one token (gemv_single_token_tile: the 8-token tile's registers, 148 for SwiGLU against
// 80, would halve the resident warps for nothing; a rarer expert with more tokens passes over its rows
// again, from L1).
constexpr int kGemvTokenTile = 8;
// 16-byte weight chunks a lane loads before it computes on them: rows are grouped per warp so that a lane
// gets about this many (gemv_lanes_per_row), all in flight together.
constexpr int kGemvChunksInFlight = 4;

// Sum over the `lanes` (a power of two) consecutive lanes of a segment; every lane of it gets the sum.
// All 32 lanes must call it. lanes = 32 adds in warp_sum's order.
__device__ __forceinline__ float segment_sum(float v, int lanes) {
    for (int o = lanes >> 1; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out[p, n] for the sorted positions p of one active expert (blockIdx.y = slot in the active list). A warp
// computes 32 / lanes_per_row consecutive output rows, each by a segment of lanes_per_row lanes striding
// over the row's 32-wide chunks of k (at small k one row per warp would leave lanes idle and each lane one
// load: the kernel would be all latency). Input row of position p: x[sorted_pairs[p] / top_k] when kGather
// (the token), else x[p]. SwiGlu reads w0 = gate and w1 = up; otherwise w1 alone.
template <class XT, bool kGather, Epilogue kEpi, int kTokenTile>
__device__ __forceinline__ void moe_gemv_nvfp4(const XT* __restrict__ x, int64_t k, int top_k,
                                               const Nvfp4DeviceWeight* __restrict__ w0s,
                                               const Nvfp4DeviceWeight* __restrict__ w1s, int64_t n,
                                               int lanes_per_row, const int32_t* __restrict__ offsets,
                                               const int32_t* __restrict__ sorted_pairs,
                                               const int32_t* __restrict__ active_experts,
                                               const int32_t* __restrict__ n_active,
                                               float* __restrict__ out) {
    constexpr bool kGated = kEpi == Epilogue::SwiGlu;
    // Both loads at once (gridDim.y <= n_experts keeps the slot in bounds; past n_active it is not used):
    // the prologue is a chain of dependent loads, and decode's step is short enough for it to show.
    const int active = *n_active;
    const int e = active_experts[blockIdx.y];
    if (static_cast<int>(blockIdx.y) >= active) return;
    const int lane = threadIdx.x & 31;
    const int rows_per_warp = 32 / lanes_per_row;
    const int sub = lane & (lanes_per_row - 1);  // lane within the row's segment
    const int64_t warp_row0 =
        (static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * rows_per_warp;
    if (warp_row0 >= n) return;  // the whole warp; no block barrier below
    const int64_t row = warp_row0 + lane / lanes_per_row;
    const bool row_ok = row < n;  // lanes past n load nothing but join the shuffles
    const int64_t wrow = row_ok ? row : warp_row0;
    const int begin = offsets[e], count = offsets[e + 1] - begin;
    const int64_t chunks = k >> 5;
    const Nvfp4DeviceWeight w1 = w1s[e];
    const uint4* q1 = reinterpret_cast<const uint4*>(w1.packed) + wrow * chunks;
    const unsigned short* s1 = reinterpret_cast<const unsigned short*>(w1.scales) + wrow * chunks;
    const uint4* q0 = nullptr;
    const unsigned short* s0 = nullptr;
    float scale0 = 0.0f;
    if constexpr (kGated) {
        const Nvfp4DeviceWeight w0 = w0s[e];
        q0 = reinterpret_cast<const uint4*>(w0.packed) + wrow * chunks;
        s0 = reinterpret_cast<const unsigned short*>(w0.scales) + wrow * chunks;
        scale0 = w0.global_scale * 16384.0f;  // 2^14 undoes the fp16 placement of the codes
    }
    const float scale1 = w1.global_scale * 16384.0f;
    const int64_t my_chunks = row_ok ? chunks : 0;

    for (int t0 = 0; t0 < count; t0 += kTokenTile) {
        const int nb = min(kTokenTile, count - t0);
        const XT* xr[kTokenTile];
#pragma unroll
        for (int i = 0; i < kTokenTile; ++i) {
            const int p = begin + t0 + min(i, nb - 1);
            const int64_t src = kGather ? sorted_pairs[p] / top_k : p;
            xr[i] = x + src * k;
        }
        float acc0[kTokenTile], acc1[kTokenTile];
#pragma unroll
        for (int i = 0; i < kTokenTile; ++i) acc0[i] = acc1[i] = 0.0f;
        for (int64_t c0 = sub; c0 < my_chunks;
             c0 += static_cast<int64_t>(kGemvChunksInFlight) * lanes_per_row) {
            // All of this lane's loads of the group first, then the arithmetic.
            uint4 qa[kGemvChunksInFlight], qb[kGemvChunksInFlight];
            uint32_t sa[kGemvChunksInFlight], sb[kGemvChunksInFlight];
#pragma unroll
            for (int u = 0; u < kGemvChunksInFlight; ++u) {
                const int64_t c = c0 + static_cast<int64_t>(u) * lanes_per_row;
                qa[u] = qb[u] = make_uint4(0, 0, 0, 0);
                sa[u] = sb[u] = 0;
                if (c < my_chunks) {
                    qa[u] = __ldg(q1 + c);
                    sa[u] = __ldg(s1 + c);
                    if constexpr (kGated) qb[u] = __ldg(q0 + c), sb[u] = __ldg(s0 + c);
                }
            }
#pragma unroll
            for (int u = 0; u < kGemvChunksInFlight; ++u) {
                const int64_t c = c0 + static_cast<int64_t>(u) * lanes_per_row;
                if (c >= my_chunks) break;  // the later ones are past the row too
#pragma unroll
                for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 16
                    float part0[kTokenTile], part1[kTokenTile];
#pragma unroll
                    for (int i = 0; i < kTokenTile; ++i) part0[i] = part1[i] = 0.0f;
#pragma unroll
                    for (int j = 2 * b; j < 2 * b + 2; ++j) {  // words of 8 codes
                        float wa[8], wb[8];
                        e2m1x8_to_float(word_of(qa[u], j), wa);
                        if constexpr (kGated) e2m1x8_to_float(word_of(qb[u], j), wb);
#pragma unroll
                        for (int i = 0; i < kTokenTile; ++i) {
                            if (i >= nb) break;  // warp-uniform
                            float xv[8];
                            load8(xr[i] + c * 32 + 8 * j, xv);
#pragma unroll
                            for (int q = 0; q < 8; ++q) {
                                part1[i] = fmaf(wa[q], xv[q], part1[i]);
                                if constexpr (kGated) part0[i] = fmaf(wb[q], xv[q], part0[i]);
                            }
                        }
                    }
                    const float sca = e4m3_exact(sa[u] >> (8 * b));
                    const float scb = kGated ? e4m3_exact(sb[u] >> (8 * b)) : 0.0f;
#pragma unroll
                    for (int i = 0; i < kTokenTile; ++i) {
                        acc1[i] = fmaf(part1[i], sca, acc1[i]);
                        if constexpr (kGated) acc0[i] = fmaf(part0[i], scb, acc0[i]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < kTokenTile; ++i) {
            if (i >= nb) break;  // warp-uniform
            const float u = segment_sum(acc1[i], lanes_per_row) * scale1;
            float v = u;
            if constexpr (kEpi == Epilogue::SwiGlu) {
                const float g = segment_sum(acc0[i], lanes_per_row) * scale0;
                v = g / (1.0f + expf(-g)) * u;
            } else if constexpr (kEpi == Epilogue::Relu2) {
                v = u > 0.0f ? u * u : 0.0f;
            }
            if (sub == 0 && row_ok) out[static_cast<int64_t>(begin + t0 + i) * n + row] = v;
        }
    }
}

// The 1-token tile as the compiler likes it (56-96 registers); the 8-token tile asks for 4 CTAs an SM
// (SwiGLU: 128 registers, no spills, instead of 148 and 3 CTAs). A minimum of blocks on the 1-token one
// would raise its registers instead.
template <class XT, bool kGather, Epilogue kEpi>
__global__ void __launch_bounds__(kGemvWarps * 32)
    moe_gemv_nvfp4_kernel_t1(const XT* __restrict__ x, int64_t k, int top_k,
                             const Nvfp4DeviceWeight* __restrict__ w0s,
                             const Nvfp4DeviceWeight* __restrict__ w1s, int64_t n, int lanes_per_row,
                             const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_pairs,
                             const int32_t* __restrict__ active_experts, const int32_t* __restrict__ n_active,
                             float* __restrict__ out) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    moe_gemv_nvfp4<XT, kGather, kEpi, 1>(x, k, top_k, w0s, w1s, n, lanes_per_row, offsets, sorted_pairs,
                                         active_experts, n_active, out);
}

template <class XT, bool kGather, Epilogue kEpi>
__global__ void __launch_bounds__(kGemvWarps * 32, 4)
    moe_gemv_nvfp4_kernel_t8(const XT* __restrict__ x, int64_t k, int top_k,
                             const Nvfp4DeviceWeight* __restrict__ w0s,
                             const Nvfp4DeviceWeight* __restrict__ w1s, int64_t n, int lanes_per_row,
                             const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_pairs,
                             const int32_t* __restrict__ active_experts, const int32_t* __restrict__ n_active,
                             float* __restrict__ out) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    moe_gemv_nvfp4<XT, kGather, kEpi, kGemvTokenTile>(x, k, top_k, w0s, w1s, n, lanes_per_row, offsets,
                                                      sorted_pairs, active_experts, n_active, out);
}

// ---- the register GEMV (k <= kRegGemvMaxK): weights in registers, inputs staged in shared memory ----
//
// The generic GEMV above loads, per 16-byte weight chunk, its 32 inputs from global memory at a chunk's
// stride across a row's lanes: with down's float32 h (128 bytes a chunk, 8 times the weight bytes) the L1
// wavefronts, not the weight bytes, bound it; an expert with two tokens also reads its rows twice. Here each
// lane keeps kRows rows' chunks of its k-columns in registers (kGemvChunksInFlight chunks of each, all
// loaded first, so the weights stream while the inputs are staged), reads each input float4 once from shared
// memory for all of them, and every token of the expert reuses the registers. Inputs are staged as float32
// (BF16 widens exactly), token_tile rows at a time. Rows of a warp: segment g (lanes_per_row lanes) holds
// rows warp_row0 + r * segments + g, r < kRows. Per row the same float operations in the same order as
// moe_gemv_nvfp4: outputs are bit-identical to it.
constexpr int kRegGemvWarps = 4;
constexpr int64_t kRegGemvMaxK = 32 * 32 * kGemvChunksInFlight;  // 32 lanes of kGemvChunksInFlight chunks
constexpr int kRegGemvTokenTile = 8;               // input rows staged at once (fewer at large k)
constexpr size_t kRegGemvSharedBytes = 48 * 1024;  // no opt-in needed
// Rows a lane: 4 (16 weight chunks in registers); SwiGLU 2 (gate and up: 16 as well).
constexpr int reg_gemv_rows(Epilogue epi) { return epi == Epilogue::SwiGlu ? 2 : 4; }

// Staged input rows: float4 f of a row (chunk f / 8, quarter f % 8) lives at f ^ (chunk % 8) within its
// chunk, so the 8 lanes of a quarter-warp, at 8 consecutive chunks and the same quarter, hit 8 distinct bank
// groups.
__device__ __forceinline__ int reg_gemv_swizzle(int f) { return f ^ ((f >> 3) & 7); }

// Coherent loads (ld.global.ca): the down instance loads before its pdl_wait, so its inputs must not take the
// non-coherent path ptxas may hoist above the wait (cuda/pdl.cuh, rule 1).
__device__ __forceinline__ float4 load4_float(const float* p) {
    return __ldca(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ float4 load4_float(const __nv_bfloat16* p) {
    const uint2 u = __ldca(reinterpret_cast<const uint2*>(p));
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

// out[p, n] for the sorted positions p of one active expert (blockIdx.y = slot in the active list); input
// row of p as in moe_gemv_nvfp4 (x[sorted_pairs[p] / top_k] when kGather, else x[p]); SwiGlu reads w0 = gate.
//
// Decode's down projection is latency-bound (7 MB in ~8 us on H100, docs/perf.md), so the down instance
// (!kGather) issues its weight loads before pdl_wait, while the up projection before it still runs: the up
// instance (kGather) releases its dependent as soon as its own weights are requested. Down reads the routing
// (offsets, active list) before its wait too: the routing comes from the kernel before up, and down can only
// be resident once up has passed its own pdl_wait, so that kernel has completed (cuda/pdl.cuh, rule 2: every
// kernel releases only after its wait). Every load before the wait is coherent (rule 1).
template <class XT, bool kGather, Epilogue kEpi>
__global__ void __launch_bounds__(kRegGemvWarps * 32)
    moe_reg_gemv_nvfp4_kernel(const XT* __restrict__ x, int k, int top_k,
                              const Nvfp4DeviceWeight* __restrict__ w0s,
                              const Nvfp4DeviceWeight* __restrict__ w1s, int n, int lanes_per_row,
                              int token_tile, int one_token, const int32_t* __restrict__ offsets,
                              const int32_t* __restrict__ sorted_pairs,
                              const int32_t* __restrict__ active_experts,
                              const int32_t* __restrict__ n_active, float* __restrict__ out) {
    constexpr bool kEarlyWeights = !kGather;
    if constexpr (!kEarlyWeights) pdl_wait();
    constexpr bool kGated = kEpi == Epilogue::SwiGlu;
    constexpr int kRows = reg_gemv_rows(kEpi);
    constexpr int kSets = kGated ? 2 : 1;  // weight matrices read: [0] = w1 (up / down), [1] = w0 (gate)
    extern __shared__ float4 x_sh[];       // [token_tile][k / 4], swizzled (reg_gemv_swizzle)
    // Both loads at once (slot < gridDim.y <= n_experts: in bounds; the expert is used only when active): one
    // round trip less before the weight loads.
    const int active = __ldca(n_active);
    const int e = __ldca(active_experts + blockIdx.y);
    if (static_cast<int>(blockIdx.y) >= active) {  // the whole CTA, before any barrier
        if constexpr (kEarlyWeights) pdl_wait();   // rule 2: no CTA ends before its predecessor
        return;
    }
    Nvfp4DeviceWeight w[kSets];
    w[0] = load_weight_coherent(w1s + e);
    if constexpr (kGated) w[1] = load_weight_coherent(w0s + e);
    const int begin = __ldca(offsets + e), count = __ldca(offsets + e + 1) - begin;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int segments = 32 / lanes_per_row;
    const int sub = lane & (lanes_per_row - 1), seg = lane / lanes_per_row;
    const int chunks = k >> 5, quads = k >> 2;
    const int64_t warp_row0 = (static_cast<int64_t>(blockIdx.x) * kRegGemvWarps + warp) * segments * kRows;
    const bool warp_has_rows = warp_row0 < n;  // warp-uniform; a warp without rows still stages and syncs

    // All weight loads first: kSets x kRows rows x kGemvChunksInFlight chunks (chunks sub + u * lanes).
    uint4 q[kSets][kRows][kGemvChunksInFlight];
    uint32_t sc[kSets][kRows][kGemvChunksInFlight];
#pragma unroll
    for (int m = 0; m < kSets; ++m)
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const int64_t row = warp_row0 + r * segments + seg;
            const bool row_ok = row < n;
            const uint4* qr = reinterpret_cast<const uint4*>(w[m].packed) + (row_ok ? row : 0) * chunks;
            const unsigned short* sr =
                reinterpret_cast<const unsigned short*>(w[m].scales) + (row_ok ? row : 0) * chunks;
#pragma unroll
            for (int u = 0; u < kGemvChunksInFlight; ++u) {
                const int c = sub + u * lanes_per_row;
                q[m][r][u] = make_uint4(0, 0, 0, 0);
                sc[m][r][u] = 0;
                if (row_ok && c < chunks) q[m][r][u] = __ldcs(qr + c), sc[m][r][u] = __ldcs(sr + c);
            }
        }
    if constexpr (kEarlyWeights) pdl_wait();        // the inputs (up's h) come from the kernel before
    else pdl_launch_dependents();                   // down may now request its weights beside ours
    float scale[kSets];  // 2^14 undoes the fp16 placement of the codes
#pragma unroll
    for (int m = 0; m < kSets; ++m) scale[m] = w[m].global_scale * 16384.0f;

    for (int t0 = 0; t0 < count; t0 += token_tile) {
        const int nb = min(token_tile, count - t0);
        __syncthreads();  // the previous tile's readers are done with x_sh
#pragma unroll 4
        for (int idx = threadIdx.x; idx < nb * quads; idx += kRegGemvWarps * 32) {
            const int i = idx / quads, f = idx - i * quads;
            const int p = begin + t0 + i;
            // A one-token step's pairs are all token 0: no round trip through sorted_pairs.
            const int64_t src = kGather ? (one_token ? 0 : __ldca(sorted_pairs + p) / top_k) : p;
            x_sh[i * quads + reg_gemv_swizzle(f)] = load4_float(x + src * k + 4 * f);
        }
        __syncthreads();
        if (!warp_has_rows) continue;  // warp-uniform: the shuffles below stay whole-warp
        for (int i = 0; i < nb; ++i) {
            const float4* xr = x_sh + i * quads;
            float acc[kSets][kRows];
#pragma unroll
            for (int m = 0; m < kSets; ++m)
#pragma unroll
                for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;
#pragma unroll
            for (int u = 0; u < kGemvChunksInFlight; ++u) {
                const int c = sub + u * lanes_per_row;
                if (c >= chunks) break;  // the later ones are past the row too
#pragma unroll
                for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 16
                    float part[kSets][kRows];
#pragma unroll
                    for (int m = 0; m < kSets; ++m)
#pragma unroll
                        for (int r = 0; r < kRows; ++r) part[m][r] = 0.0f;
#pragma unroll
                    for (int j = 2 * b; j < 2 * b + 2; ++j) {  // words of 8 codes
                        const float4 lo = xr[reg_gemv_swizzle(c * 8 + 2 * j)];
                        const float4 hi = xr[reg_gemv_swizzle(c * 8 + 2 * j + 1)];
                        const float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                        for (int m = 0; m < kSets; ++m)
#pragma unroll
                            for (int r = 0; r < kRows; ++r) {
                                // Opaque to the compiler, so it decodes per token instead of hoisting all
                                // decoded weights (hundreds of floats a lane) out of the token loop.
                                uint32_t codes = word_of(q[m][r][u], j);
                                asm volatile("" : "+r"(codes));
                                float wv[8];
                                e2m1x8_to_float(codes, wv);
#pragma unroll
                                for (int qq = 0; qq < 8; ++qq) part[m][r] = fmaf(wv[qq], xv[qq], part[m][r]);
                            }
                    }
#pragma unroll
                    for (int m = 0; m < kSets; ++m)
#pragma unroll
                        for (int r = 0; r < kRows; ++r)
                            acc[m][r] = fmaf(part[m][r], e4m3_exact(sc[m][r][u] >> (8 * b)), acc[m][r]);
                }
            }
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                const float up = segment_sum(acc[0][r], lanes_per_row) * scale[0];
                float v = up;
                if constexpr (kEpi == Epilogue::SwiGlu) {
                    const float g = segment_sum(acc[kSets - 1][r], lanes_per_row) * scale[kSets - 1];
                    v = g / (1.0f + expf(-g)) * up;
                } else if constexpr (kEpi == Epilogue::Relu2) {
                    v = up > 0.0f ? up * up : 0.0f;
                }
                const int64_t row = warp_row0 + r * segments + seg;
                if (sub == 0 && row < n) out[static_cast<int64_t>(begin + t0 + i) * n + row] = v;
            }
        }
    }
}

// Launches the register GEMV when k fits it; false otherwise (the caller runs moe_gemv_nvfp4's kernels).
// m: tokens of the step, the most rows one expert can get (a token picks an expert at most once), which
// bounds the staged rows: at decode one row of shared memory, not the 48 KB of a full tile, so more CTAs
// (down's early ones beside up's) fit an SM.
template <class XT, bool kGather, Epilogue kEpi>
bool launch_reg_gemv(const XT* x, int64_t k, int64_t top_k, const Nvfp4DeviceWeight* w0s,
                     const Nvfp4DeviceWeight* w1s, int64_t n, int64_t grid_y, int64_t m, const MoePermutation& perm,
                     float* out, cudaStream_t stream) {
    if (k > kRegGemvMaxK || n > 0x7fffffff) return false;
    const int64_t chunks = k / 32;
    int lanes = 1;  // as gemv_lanes_per_row: the fewest leaving each lane at most kGemvChunksInFlight chunks
    while (lanes < 32 && lanes * static_cast<int64_t>(kGemvChunksInFlight) < chunks) lanes *= 2;
    const int64_t rows_per_cta = static_cast<int64_t>(kRegGemvWarps) * (32 / lanes) * reg_gemv_rows(kEpi);
    const dim3 grid(static_cast<unsigned>((n + rows_per_cta - 1) / rows_per_cta),
                    static_cast<unsigned>(grid_y));
    const size_t row_bytes = static_cast<size_t>(k) * sizeof(float);
    const int token_tile = static_cast<int>(std::min<size_t>(
        {static_cast<size_t>(kRegGemvTokenTile), kRegGemvSharedBytes / row_bytes, static_cast<size_t>(std::max<int64_t>(1, m))}));
    launch_pdl(moe_reg_gemv_nvfp4_kernel<XT, kGather, kEpi>, dim3(grid), dim3(kRegGemvWarps * 32),
               token_tile * row_bytes, stream, x, static_cast<int>(k), static_cast<int>(top_k), w0s, w1s,
               static_cast<int>(n), lanes, token_tile, m == 1 ? 1 : 0, perm.offsets, perm.sorted_pairs,
               perm.active_experts, perm.n_active, out);
    return true;
}

// ---- grouped NVFP4 GEMM (prefill) ----
//
// One CTA of 4 warps computes a tile of 64 sorted positions of one expert by 128 weight rows: rows
// n0 .. n0 + 127 of W_up (Relu2, down: 128 output columns), or rows n0 .. n0 + 63 of W_gate and of W_up
// (SwiGlu: 64 output columns, the pair for a column lands in the same thread). The k loop steps by 32:
// each step's A tile [64][32] (rows of x gathered by sorted_pairs, or of h in place; converted to BF16)
// and B tile [128][32] (16 bytes of E2M1 codes and 2 E4M3 scales per weight row, dequantized to BF16) are
// loaded into registers one step ahead, while the tensor cores run on the other shared-memory stage; one
// __syncthreads a step. Warps tile 2 x 2: 32 positions by 64 weight rows each (2 x 8 mma tiles).
//
// Tiles are scheduled without a host sync: a 1-D grid over the worst-case tile count, sum over experts of
// ceil(count / 64) <= ceil(pairs / 64) + min(n_experts, pairs), times the column tiles; each CTA finds its
// (expert, first position) from the offsets (warp 0, a prefix sum of per-expert tile counts) and exits
// when its index is past the real count.
constexpr int kGemmRows = 64;      // sorted positions per CTA tile
constexpr int kGemmWRows = 128;    // weight rows per CTA tile
constexpr int kGemmK = 32;         // k per main-loop step
constexpr int kGemmThreads = 128;  // 4 warps
constexpr int kGemmStride =
    kGemmK + 8;  // BF16 per shared row: 80 bytes, so 8 ldmatrix rows hit 8 bank groups

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* p) {
    const auto a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (lo) is the low half
    return *reinterpret_cast<const uint32_t*>(&h);
}

// 16 consecutive activations of one A row, held in registers between the load and the shared store.
template <class XT>
struct ARowPart;
template <>
struct ARowPart<float> {
    float4 v[4];
    __device__ __forceinline__ void load(const float* p) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = __ldg(reinterpret_cast<const float4*>(p) + i);
    }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    __device__ __forceinline__ void store(__nv_bfloat16* s) const {  // 16-byte aligned shared
        uint4* d = reinterpret_cast<uint4*>(s);
        d[0] = make_uint4(pack_bf16x2(v[0].x, v[0].y), pack_bf16x2(v[0].z, v[0].w),
                          pack_bf16x2(v[1].x, v[1].y), pack_bf16x2(v[1].z, v[1].w));
        d[1] = make_uint4(pack_bf16x2(v[2].x, v[2].y), pack_bf16x2(v[2].z, v[2].w),
                          pack_bf16x2(v[3].x, v[3].y), pack_bf16x2(v[3].z, v[3].w));
    }
};
template <>
struct ARowPart<__nv_bfloat16> {
    uint4 v[2];
    __device__ __forceinline__ void load(const __nv_bfloat16* p) {
        v[0] = __ldg(reinterpret_cast<const uint4*>(p));
        v[1] = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    }
    __device__ __forceinline__ void zero() { v[0] = v[1] = make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ void store(__nv_bfloat16* s) const {
        reinterpret_cast<uint4*>(s)[0] = v[0];
        reinterpret_cast<uint4*>(s)[1] = v[1];
    }
};

// 32 E2M1 codes of one weight row (16 bytes) and their 2 E4M3 block scales -> 32 BF16 values in shared
// memory (code * block scale * 2^-14, exact in BF16; the epilogue's scale restores 2^14 * global scale).
__device__ __forceinline__ void dequant32_to_shared(const uint4& q, uint32_t scale_bytes, __nv_bfloat16* s) {
    uint4* d = reinterpret_cast<uint4*>(s);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // words of 8 codes; words 0, 1 use scale byte 0, words 2, 3 byte 1
        float v[8];
        e2m1x8_to_float(word_of(q, j), v);
        const float sc = e4m3_exact(scale_bytes >> (8 * (j >> 1)));
        d[j] = make_uint4(pack_bf16x2(v[0] * sc, v[1] * sc), pack_bf16x2(v[2] * sc, v[3] * sc),
                          pack_bf16x2(v[4] * sc, v[5] * sc), pack_bf16x2(v[6] * sc, v[7] * sc));
    }
}

// The weight row (of the 128 in a tile) whose n8 mma tile j (0..7) a warp of column group wn (0, 1)
// multiplies: SwiGlu's tiles 0..3 are gate rows and 4..7 the up rows of the same 32 output columns.
template <bool kGated>
__device__ __forceinline__ int gemm_b_row(int wn, int j) {
    if constexpr (kGated) return j < 4 ? wn * 32 + j * 8 : 64 + wn * 32 + (j - 4) * 8;
    return wn * 64 + j * 8;
}

// kBf16: the weights are BF16 matrices b0s / b1s [n_experts, n, k] (w0s / w1s unused), copied into shared
// memory as they are (64 bytes a row a step) and not scaled in the epilogue; else the NVFP4 tables.
template <class XT, bool kGather, Epilogue kEpi, bool kBf16 = false>
__global__ void __launch_bounds__(kGemmThreads, 4)
    moe_gemm_nvfp4_kernel(const XT* __restrict__ x, int k, int top_k,
                          const Nvfp4DeviceWeight* __restrict__ w0s,
                          const Nvfp4DeviceWeight* __restrict__ w1s, int n, int n_col_tiles,
                          const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_pairs,
                          int n_experts, float* __restrict__ out, const uint16_t* __restrict__ b0s,
                          const uint16_t* __restrict__ b1s) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    constexpr bool kGated = kEpi == Epilogue::SwiGlu;
    constexpr int kOutCols = kGated ? kGemmWRows / 2 : kGemmWRows;           // output columns per CTA tile
    __shared__ __align__(16) __nv_bfloat16 a_s[2][kGemmRows][kGemmStride];   // [stage][position][k]
    __shared__ __align__(16) __nv_bfloat16 b_s[2][kGemmWRows][kGemmStride];  // [stage][weight row][k]
    __shared__ int tile_expert, tile_begin;

    const int col_tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(n_col_tiles));
    const int row_tile = static_cast<int>(blockIdx.x / static_cast<unsigned>(n_col_tiles));
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    if (warp == 0) {  // which expert's which 64 positions: tile row_tile in expert order
        if (lane == 0) tile_expert = -1;
        __syncwarp();
        int before = 0;  // tiles of the experts below this 32-expert chunk
        for (int base = 0; base < n_experts; base += 32) {
            const int e = base + lane;
            const int tiles = e < n_experts ? (offsets[e + 1] - offsets[e] + kGemmRows - 1) / kGemmRows : 0;
            int incl = tiles;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            const int first = before + incl - tiles;
            const bool mine = row_tile >= first && row_tile < before + incl;  // false when tiles == 0
            if (mine) {
                tile_expert = e;
                tile_begin = offsets[e] + (row_tile - first) * kGemmRows;
            }
            if (__any_sync(0xffffffffu, mine)) break;
            before += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    __syncthreads();
    const int e = tile_expert;
    if (e < 0) return;  // past the real tile count: the whole CTA
    const int begin = tile_begin, end = offsets[e + 1];

    // This thread's A row part: position tid / 2, k half (tid % 2) * 16 of each step.
    const int a_row = tid >> 1, a_half = (tid & 1) * 16;
    const bool a_valid = begin + a_row < end;
    const XT* a_src = x;
    if (a_valid) {
        const int p = begin + a_row;
        const int64_t src = kGather ? sorted_pairs[p] / top_k : p;
        a_src = x + src * k + a_half;
    }
    // This thread's B row: weight row tid of the tile, clamped into the matrix at a column tail (the
    // columns it feeds are not stored).
    const int n0 = col_tile * kOutCols;
    const bool b_first = kGated && tid < kGemmWRows / 2;  // a gate row (matrix 0), else matrix 1
    const int b_local = kGated ? tid % (kGemmWRows / 2) : tid;
    const int64_t b_row = min(n0 + b_local, n - 1);
    const uint4* b_codes = nullptr;  // NVFP4: 16 bytes of codes a step; BF16: 4 x 16 bytes of values a step
    const unsigned short* b_scales = nullptr;
    if constexpr (kBf16) {
        const uint16_t* mat = (b_first ? b0s : b1s) + static_cast<int64_t>(e) * n * k;
        b_codes = reinterpret_cast<const uint4*>(mat + b_row * k);  // 64-byte aligned: k % 32 == 0
    } else {
        const Nvfp4DeviceWeight wb = (b_first ? w0s : w1s)[e];
        b_codes = reinterpret_cast<const uint4*>(wb.packed + b_row * (k / 2));
        b_scales = reinterpret_cast<const unsigned short*>(wb.scales + b_row * (k / 16));
    }

    const int steps = k / kGemmK;
    ARowPart<XT> a_next;
    uint4 b_next[kBf16 ? 4 : 1];
    uint32_t s_next = 0;
    auto load_step = [&](int step) {
        if (a_valid)
            a_next.load(a_src + step * kGemmK);
        else
            a_next.zero();
        if constexpr (kBf16) {
#pragma unroll
            for (int i = 0; i < 4; ++i) b_next[i] = __ldg(b_codes + step * 4 + i);
        } else {
            b_next[0] = __ldg(b_codes + step);
            s_next = __ldg(b_scales + step);
        }
    };
    auto store_step = [&](int stage) {
        a_next.store(&a_s[stage][a_row][a_half]);
        if constexpr (kBf16) {
            uint4* d = reinterpret_cast<uint4*>(&b_s[stage][tid][0]);  // 80-byte rows: 16-byte aligned
#pragma unroll
            for (int i = 0; i < 4; ++i) d[i] = b_next[i];
        } else {
            dequant32_to_shared(b_next[0], s_next, &b_s[stage][tid][0]);
        }
    };

    const int wm = warp & 1, wn = warp >> 1;
    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    load_step(0);
    store_step(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        if (step + 1 < steps) load_step(step + 1);
#pragma unroll
        for (int ks = 0; ks < kGemmK / 16; ++ks) {
            uint32_t af[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                ldmatrix_x4(af[i], &a_s[stage][wm * 32 + i * 16 + (lane & 15)][ks * 16 + (lane >> 4) * 8]);
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                // matrices: (tile j, k 0-7), (tile j, k 8-15), (tile j+1, k 0-7), (tile j+1, k 8-15)
                const int mat = lane >> 3;
                uint32_t bf[4];
                ldmatrix_x4(bf, &b_s[stage][gemm_b_row<kGated>(wn, j + (mat >> 1)) + (lane & 7)]
                                    [ks * 16 + (mat & 1) * 8]);
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    mma_bf16_16816(acc[i][j], af[i], bf[0], bf[1]);
                    mma_bf16_16816(acc[i][j + 1], af[i], bf[2], bf[3]);
                }
            }
        }
        if (step + 1 < steps) store_step(stage ^ 1);
        __syncthreads();
    }

    // Epilogue: accumulator c of mma tile (i, j) holds positions g, g (c < 2) or g + 8 (c >= 2), columns
    // 2 t + (c & 1), with g = lane / 4, t = lane % 4.
    // NVFP4: 2^14 undoes the fp16 placement of the codes; BF16 weights carry their own scale.
    const float scale1 = kBf16 ? 1.0f : w1s[e].global_scale * 16384.0f;
    const float scale0 = kBf16 ? 1.0f : kGated ? w0s[e].global_scale * 16384.0f : 0.0f;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int p = begin + wm * 32 + i * 16 + half * 8 + g;
            if (p >= end) continue;
            float* orow = out + static_cast<int64_t>(p) * n;
#pragma unroll
            for (int j = 0; j < (kGated ? 4 : 8); ++j) {
                const int col = n0 + (kGated ? wn * 32 : wn * 64) + j * 8 + t2;
                if (col >= n) continue;  // n is even: col + 1 < n too
                float v[2];
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float u = acc[i][kGated ? j + 4 : j][half * 2 + c] * scale1;
                    if constexpr (kEpi == Epilogue::SwiGlu) {
                        const float gv = acc[i][j][half * 2 + c] * scale0;
                        v[c] = gv / (1.0f + expf(-gv)) * u;
                    } else if constexpr (kEpi == Epilogue::Relu2) {
                        v[c] = u > 0.0f ? u * u : 0.0f;
                    } else {
                        v[c] = u;
                    }
                }
                *reinterpret_cast<float2*>(orow + col) = make_float2(v[0], v[1]);
            }
        }
}

// ---- the plain expert GEMV (moe_uses_plain_kernel): BF16 experts, or widths not a multiple of 32 ----
//
// One warp per (output row, sorted position): lanes stride over the row's 16-element blocks of k (NVFP4: 8
// bytes of codes and one E4M3 scale, rows only 8-byte aligned when k = 16 mod 32; BF16: 32 bytes), then a
// warp sum. Simple, not fast: only small test models come here. Plain (coherent) loads only, weights too, and
// nothing before the grid-dependency wait: no non-coherent load ptxas could hoist above it (cuda/pdl.cuh).
constexpr int kPlainWarps = 4;
constexpr int kPlainMaxGridY = 65535;

// Block blk (16 elements) of row `row` of one expert's matrix of k columns, dotted with the inputs x0 (its
// elements 0..7) and x1 (8..15). NVFP4: the block's sum times its E4M3 scale, in units of 2^-14 (the caller
// applies global_scale * 2^14); BF16: the plain sum.
__device__ __forceinline__ float nvfp4_block_dot(const Nvfp4DeviceWeight& w, int64_t row, int64_t k, int64_t blk,
                                                 const float (&x0)[8], const float (&x1)[8]) {
    const uint2 codes = reinterpret_cast<const uint2*>(w.packed + row * (k / 2))[blk];
    float lo[8], hi[8];
    e2m1x8_to_float(codes.x, lo);
    e2m1x8_to_float(codes.y, hi);
    float part = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) part = fmaf(lo[j], x0[j], part);
#pragma unroll
    for (int j = 0; j < 8; ++j) part = fmaf(hi[j], x1[j], part);
    return part * e4m3_exact(w.scales[row * (k / 16) + blk]);
}
__device__ __forceinline__ float bf16_block_dot(const uint16_t* w, int64_t row, int64_t k, int64_t blk,
                                                const float (&x0)[8], const float (&x1)[8]) {
    const uint4* p = reinterpret_cast<const uint4*>(w + row * k + blk * 16);  // 32-byte aligned: k % 16 == 0
    float part = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const uint4 u = p[h];
        const float(&xv)[8] = h == 0 ? x0 : x1;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t wd = word_of(u, j);
            part = fmaf(__uint_as_float(wd << 16), xv[2 * j], part);
            part = fmaf(__uint_as_float(wd & 0xffff0000u), xv[2 * j + 1], part);
        }
    }
    return part;
}

// out[p, row] for every sorted position p < offsets[n_experts] (grid.y strides over them) and the rows of
// this CTA's warps. Input row of position p: x[sorted_pairs[p] / top_k] when kGather, else x[p]. The
// expert of p: the last e with offsets[e] <= p. SwiGlu reads matrix 0 (gate) and 1 (up), the others 1.
// kBf16: b0s / b1s [n_experts, n, k] BF16; else w0s / w1s NVFP4 tables.
template <class XT, bool kGather, Epilogue kEpi, bool kBf16>
__global__ void __launch_bounds__(kPlainWarps * 32)
    moe_plain_gemv_kernel(const XT* x, int64_t k, int top_k, const Nvfp4DeviceWeight* w0s,
                          const Nvfp4DeviceWeight* w1s, const uint16_t* b0s, const uint16_t* b1s, int64_t n,
                          const int32_t* offsets,
                          const int32_t* sorted_pairs, int n_experts, float* out) {
    pdl_wait();  // the permutation and x come from the kernels before
    constexpr bool kGated = kEpi == Epilogue::SwiGlu;
    const int lane = threadIdx.x & 31;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kPlainWarps + (threadIdx.x >> 5);
    if (row >= n) return;  // the whole warp
    const int total = offsets[n_experts];  // routed pairs (dropped ids have no position)
    const int64_t blocks = k / 16;
    for (int p = static_cast<int>(blockIdx.y); p < total; p += static_cast<int>(gridDim.y)) {
        int lo = 0, hi = n_experts - 1;  // offsets[lo] <= p < offsets[hi + 1]
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (offsets[mid] <= p) lo = mid;
            else hi = mid - 1;
        }
        const int e = lo;
        const int64_t src = kGather ? sorted_pairs[p] / top_k : p;
        const XT* xr = x + src * k;
        float a0 = 0.0f, a1 = 0.0f;
        for (int64_t blk = lane; blk < blocks; blk += 32) {
            float x0[8], x1[8];
            load8(xr + blk * 16, x0);
            load8(xr + blk * 16 + 8, x1);
            if constexpr (kBf16) {
                const int64_t mat = static_cast<int64_t>(e) * n * k;  // expert e's matrix
                a1 += bf16_block_dot(b1s + mat, row, k, blk, x0, x1);
                if constexpr (kGated) a0 += bf16_block_dot(b0s + mat, row, k, blk, x0, x1);
            } else {
                a1 += nvfp4_block_dot(w1s[e], row, k, blk, x0, x1);
                if constexpr (kGated) a0 += nvfp4_block_dot(w0s[e], row, k, blk, x0, x1);
            }
        }
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) {
            a1 += __shfl_xor_sync(0xffffffffu, a1, o);
            if constexpr (kGated) a0 += __shfl_xor_sync(0xffffffffu, a0, o);
        }
        float u = a1, g = a0;
        if constexpr (!kBf16) {
            u *= w1s[e].global_scale * 16384.0f;  // 2^14 undoes the fp16 placement of the codes
            if constexpr (kGated) g *= w0s[e].global_scale * 16384.0f;
        }
        float v = u;
        if constexpr (kEpi == Epilogue::SwiGlu) v = g / (1.0f + expf(-g)) * u;
        else if constexpr (kEpi == Epilogue::Relu2) v = u > 0.0f ? u * u : 0.0f;
        if (lane == 0) out[static_cast<int64_t>(p) * n + row] = v;
    }
}

// The plain GEMV over n output rows of k inputs for up to `pairs` sorted positions.
template <class XT, bool kGather, Epilogue kEpi>
void launch_plain_gemv(const XT* x, int64_t k, int64_t top_k, int64_t pairs, const MoeDeviceExperts& ex,
                       bool down, int64_t n, const MoePermutation& perm, float* out, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((n + kPlainWarps - 1) / kPlainWarps),
                    static_cast<unsigned>(std::min<int64_t>(pairs, kPlainMaxGridY)));
    const int tk = static_cast<int>(top_k), ne = static_cast<int>(ex.n_experts);
    if (ex.bf16_weights())
        launch_pdl(moe_plain_gemv_kernel<XT, kGather, kEpi, true>, grid, dim3(kPlainWarps * 32), 0, stream, x, k,
                   tk, nullptr, nullptr, down ? nullptr : ex.bf16_gate, down ? ex.bf16_down : ex.bf16_up, n,
                   perm.offsets, perm.sorted_pairs, ne, out);
    else
        launch_pdl(moe_plain_gemv_kernel<XT, kGather, kEpi, false>, grid, dim3(kPlainWarps * 32), 0, stream, x, k,
                   tk, down ? nullptr : ex.gate, down ? ex.down : ex.up, nullptr, nullptr, n, perm.offsets,
                   perm.sorted_pairs, ne, out);
}

constexpr int kCombineThreads = 256;
constexpr int kCombineTargetCtas = 264;  // two CTAs an SM of an H100: small m splits the columns

// Token t's kept choices (ids >= 0) ranked by (expert id, choice index), which is the order the insertion
// sort of a stable sort by id gives: their sorted positions and weights in that order, and how many. Warp 0
// (threads 0..31) calls it; the caller syncs before reading.
__device__ __forceinline__ void rank_choices(const int32_t* __restrict__ ids,
                                             const float* __restrict__ weights,
                                             const int32_t* __restrict__ pair_position, int64_t t, int top_k,
                                             int* order_pos, float* order_w, int* n_routed) {
    const int lane = threadIdx.x;
    int e = -1, pos = 0;
    float w = 0.0f;
    if (lane < top_k) {
        e = ids[t * top_k + lane];
        w = weights[t * top_k + lane];
        pos = pair_position[t * top_k + lane];  // a dropped choice's is unwritten: read, not used
    }
    const bool kept = e >= 0;  // a negative id was dropped by the permutation (another rank's expert)
    int rank = 0;
    for (int j = 0; j < top_k; ++j) {
        const int ej = __shfl_sync(0xffffffffu, e, j);
        if (ej >= 0 && (ej < e || (ej == e && j < lane))) ++rank;
    }
    if (kept) order_pos[rank] = pos, order_w[rank] = w;
    const unsigned kept_mask = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) *n_routed = __popc(kept_mask);
}

// y[t] over the columns of column block cb, grid (m * col_blocks): token t = blockIdx.x / col_blocks. Every
// column adds the token's ranked choices from zero (one fma each), then the shared expert's value.
template <class YT>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const float* __restrict__ o, const int32_t* __restrict__ ids,
                   const float* __restrict__ weights, const int32_t* __restrict__ pair_position, int top_k,
                   int64_t n_embd, int col_blocks, const YT* __restrict__ shared, YT* __restrict__ y) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ int order_pos[kMaxTopK];
    __shared__ float order_w[kMaxTopK];
    __shared__ int n_routed;
    const int64_t t = blockIdx.x / col_blocks;
    const int cb = static_cast<int>(blockIdx.x % col_blocks);
    if (threadIdx.x < 32) rank_choices(ids, weights, pair_position, t, top_k, order_pos, order_w, &n_routed);
    __syncthreads();
    const int n = n_routed;
    for (int64_t c = static_cast<int64_t>(cb) * kCombineThreads + threadIdx.x; c < n_embd;
         c += static_cast<int64_t>(kCombineThreads) * col_blocks) {
        float acc = 0.0f;
#pragma unroll 8
        for (int j = 0; j < n; ++j)
            acc = fmaf(order_w[j], o[static_cast<int64_t>(order_pos[j]) * n_embd + c], acc);
        if (shared != nullptr) acc += load1(shared + t * n_embd + c);
        store1(y + t * n_embd + c, acc);
    }
}

// The combine of token t = blockIdx.x followed by rmsnorm_residual's arithmetic on it, in rmsnorm_kernel's
// block shape (256 threads, 8 consecutive columns a thread per pass, the same fma chains and block_sum), so
// residual and out come out bit for bit as moe_combine then rmsnorm_residual would leave them: each column's
// sum rounded to T as moe_combine stores it, added to the residual and rounded again.
constexpr int kCombineNormThreads = 256;

template <class T>
__global__ void __launch_bounds__(kCombineNormThreads)
    combine_residual_rmsnorm_kernel(const float* __restrict__ o, const int32_t* __restrict__ ids,
                                    const float* __restrict__ weights,
                                    const int32_t* __restrict__ pair_position, int top_k, int64_t n_embd,
                                    const T* __restrict__ shared, T* residual,
                                    const float* __restrict__ norm_weight, float eps, T* __restrict__ out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ int order_pos[kMaxTopK];
    __shared__ float order_w[kMaxTopK];
    __shared__ int n_routed;
    __shared__ float scratch[32];
    const int64_t t = blockIdx.x;
    if (threadIdx.x < 32) rank_choices(ids, weights, pair_position, t, top_k, order_pos, order_w, &n_routed);
    __syncthreads();
    const int n = n_routed;
    T* const rr = residual + t * n_embd;
    float ss = 0.0f;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * 8; i < n_embd; i += kCombineNormThreads * 8) {
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 8
        for (int j = 0; j < n; ++j) {
            float oj[8];
            load8(o + static_cast<int64_t>(order_pos[j]) * n_embd + i, oj);
            const float w = order_w[j];
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = fmaf(w, oj[e], v[e]);
        }
        if (shared != nullptr) {
            float s[8];
            load8(shared + t * n_embd + i, s);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] += s[e];
        }
        float r[8];
        load8(rr + i, r);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = round_as(round_as(v[e], rr) + r[e], rr);
        store8(rr + i, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
    }
    ss = block_sum<kCombineNormThreads>(ss, scratch);
    const float inv = rsqrtf(ss / static_cast<float>(n_embd) + eps);
    T* const orow = out + t * n_embd;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * 8; i < n_embd; i += kCombineNormThreads * 8) {
        float v[8];
        load8(rr + i, v);  // this thread's own stores above
        const float4 w0 = reinterpret_cast<const float4*>(norm_weight + i)[0];
        const float4 w1 = reinterpret_cast<const float4*>(norm_weight + i)[1];
        const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = w[e] * (v[e] * inv);
        store8(orow + i, v);
    }
}

// ---- expert parallelism ----

constexpr int kLocalizeThreads = 256;

// local[i] = ids[i] - begin for ids in [begin, end), else -1 (dropped by moe_permute, skipped by the
// combine).
__global__ void __launch_bounds__(kLocalizeThreads)
    localize_ids_kernel(const int32_t* __restrict__ ids, int n_pairs, int begin, int end,
                        int32_t* __restrict__ local) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int i = blockIdx.x * kLocalizeThreads + threadIdx.x;
    if (i >= n_pairs) return;
    const int e = ids[i];
    local[i] = e >= begin && e < end ? e - begin : -1;
}

// ---- host side ----

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

void check_dtype(DType dtype, const char* what) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        bad(std::string(what) + ": activations must be F32 or BF16");
}

void check_router(DType dtype, int64_t m, int64_t n_experts, int64_t top_k, const char* what) {
    check_dtype(dtype, what);
    if (m < 0 || m > 0x7fffffff) bad(std::string(what) + ": m = " + std::to_string(m) + " out of range");
    if (n_experts < 1 || n_experts > 1024 || top_k < 1 || top_k > kMaxTopK || top_k > n_experts)
        bad(std::string(what) + ": top_k " + std::to_string(top_k) + " of " + std::to_string(n_experts) +
            " experts (need 1 <= top_k <= min(32, n_experts), n_experts <= 1024)");
}

void check_aligned(const void* p, const char* what, const char* name) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
        bad(std::string(what) + ": " + name + " must be 16-byte aligned");
}

unsigned grid_y_for(int64_t m, int64_t top_k, int64_t n_experts) {
    return static_cast<unsigned>(std::min<int64_t>(m * top_k, n_experts));
}

// Lanes per output row of the GEMV: the fewest (a power of two) that leave each lane at most
// kGemvChunksInFlight chunks of k (k = 768: 8 lanes, 4 rows a warp, 3 chunks a lane; k = 2048: 16 lanes).
int gemv_lanes_per_row(int64_t k) {
    const int64_t chunks = k / 32;
    int lanes = 1;
    while (lanes < 32 && lanes * static_cast<int64_t>(kGemvChunksInFlight) < chunks) lanes *= 2;
    return lanes;
}

// m = 1 (each expert then holds at most one token, localized ids included) or at most one token per
// expert on average.
bool gemv_single_token_tile(int64_t m, int64_t top_k, int64_t n_experts) {
    return m == 1 || m * top_k <= n_experts;
}

unsigned gemv_grid_x(int64_t n, int lanes_per_row) {
    const int64_t rows_per_cta = static_cast<int64_t>(kGemvWarps) * (32 / lanes_per_row);
    return static_cast<unsigned>((n + rows_per_cta - 1) / rows_per_cta);
}

bool use_gemm(MoeExpertKernel kernel, int64_t m, int64_t top_k, int64_t n_experts, DType activations) {
    return kernel == MoeExpertKernel::Gemm ||
           (kernel == MoeExpertKernel::Auto && moe_prefers_gemm(m, top_k, n_experts, activations));
}

// The grouped GEMM's 1-D grid: the worst-case count of 64-position tiles times the column tiles.
unsigned gemm_grid(int64_t m, int64_t top_k, const MoeDeviceExperts& ex, int64_t col_tiles,
                   const char* what) {
    if (ex.n_embd > (1 << 24) || ex.n_ff > (1 << 24))  // the kernel indexes rows and k in int
        bad(std::string(what) + ": n_embd " + std::to_string(ex.n_embd) + " or n_ff " +
            std::to_string(ex.n_ff) + " above 2^24");
    const int64_t pairs = m * top_k;
    const int64_t row_tiles = (pairs + kGemmRows - 1) / kGemmRows + std::min(ex.n_experts, pairs);
    const int64_t blocks = row_tiles * col_tiles;
    if (blocks > 0x7fffffff) bad(std::string(what) + ": " + std::to_string(blocks) + " GEMM tiles, too many");
    return static_cast<unsigned>(blocks);
}

void check_experts(const MoeDeviceExperts& ex, int64_t m, int64_t top_k, const char* what) {
    if (ex.n_experts < 1 || ex.n_experts > 1024) bad(std::string(what) + ": n_experts must be in 1..1024");
    // Multiples of 32 run the GEMV / GEMM, of 16 (whole NVFP4 blocks) the plain GEMV.
    if (ex.n_embd <= 0 || ex.n_embd % 16 != 0 || ex.n_ff <= 0 || ex.n_ff % 16 != 0)
        bad(std::string(what) + ": n_embd " + std::to_string(ex.n_embd) + " and n_ff " +
            std::to_string(ex.n_ff) + " must be positive multiples of 16");
    // top_k may exceed n_experts when the ids were localized (moe_localize_ids: a rank's few experts).
    if (top_k < 1 || top_k > kMaxTopK || m < 0 || m * top_k > 0x7fffffff)
        bad(std::string(what) + ": m " + std::to_string(m) + " x top_k " + std::to_string(top_k) +
            " out of range");
    if (ex.bf16_weights() || ex.bf16_down != nullptr || ex.bf16_gate != nullptr) {
        if (ex.bf16_up == nullptr || ex.bf16_down == nullptr || ex.up != nullptr || ex.down != nullptr ||
            ex.gate != nullptr)
            bad(std::string(what) + ": BF16 experts need bf16_up and bf16_down, and no NVFP4 arrays beside them");
        for (const uint16_t* p : {ex.bf16_gate, ex.bf16_up, ex.bf16_down}) check_aligned(p, what, "BF16 experts");
        return;
    }
    if (ex.up == nullptr || ex.down == nullptr) bad(std::string(what) + ": expert weight arrays missing");
}

}  // namespace

void moe_route_softmax(const void* logits, DType dtype, int64_t m, int64_t n_experts, int64_t top_k,
                       bool norm_topk_prob, int32_t* ids, float* weights, cudaStream_t stream) {
    check_router(dtype, m, n_experts, top_k, "moe_route_softmax");
    if (m == 0) return;
    const int ne = static_cast<int>(n_experts), k = static_cast<int>(top_k);
    if (n_experts <= kWarpRouteMaxExperts) {
        const auto blocks = static_cast<unsigned>((m + kWarpRouteWarps - 1) / kWarpRouteWarps);
        if (dtype == DType::F32)
            launch_pdl(route_softmax_warp_kernel<float>, dim3(blocks), dim3(kWarpRouteWarps * 32), 0, stream,
                       static_cast<const float*>(logits), m, ne, k, norm_topk_prob, ids, weights);
        else
            launch_pdl(route_softmax_warp_kernel<__nv_bfloat16>, dim3(blocks), dim3(kWarpRouteWarps * 32), 0,
                       stream, static_cast<const __nv_bfloat16*>(logits), m, ne, k, norm_topk_prob, ids,
                       weights);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    const size_t smem = static_cast<size_t>(n_experts) * 5;
    if (dtype == DType::F32)
        launch_pdl(route_softmax_kernel<float>, dim3(static_cast<unsigned>(m)), dim3(kRouteThreads), smem,
                   stream, static_cast<const float*>(logits), ne, k, norm_topk_prob, ids, weights);
    else
        launch_pdl(route_softmax_kernel<__nv_bfloat16>, dim3(static_cast<unsigned>(m)), dim3(kRouteThreads),
                   smem, stream, static_cast<const __nv_bfloat16*>(logits), ne, k, norm_topk_prob, ids,
                   weights);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

namespace {

void check_sigmoid_router(DType dtype, int64_t m, int64_t n_experts, int64_t top_k, int64_t n_group,
                          int64_t topk_group, const char* what) {
    check_router(dtype, m, n_experts, top_k, what);
    if (n_group < 1 || n_experts % n_group != 0 || topk_group < 1 || topk_group > n_group)
        bad(std::string(what) + ": " + std::to_string(n_experts) + " experts in " + std::to_string(n_group) +
            " groups, keeping " + std::to_string(topk_group));
    if (top_k > topk_group * (n_experts / n_group))
        bad(std::string(what) + ": top_k " + std::to_string(top_k) + " of " +
            std::to_string(topk_group * (n_experts / n_group)) + " eligible experts");
}

}  // namespace

void moe_route_sigmoid(const void* logits, DType dtype, int64_t m, int64_t n_experts, int64_t top_k,
                       const float* correction_bias, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                       float routed_scaling_factor, int32_t* ids, float* weights, cudaStream_t stream) {
    check_sigmoid_router(dtype, m, n_experts, top_k, n_group, topk_group, "moe_route_sigmoid");
    if (m == 0) return;
    const int ne = static_cast<int>(n_experts), k = static_cast<int>(top_k);
    const int ng = static_cast<int>(n_group), kg = static_cast<int>(topk_group);
    if (n_experts <= kWarpRouteMaxExperts) {
        const auto blocks = static_cast<unsigned>((m + kWarpRouteWarps - 1) / kWarpRouteWarps);
        const SigmoidRouting r{correction_bias, ne, k, ng, kg, norm_topk_prob, routed_scaling_factor};
        if (dtype == DType::F32)
            launch_pdl(route_sigmoid_warp_kernel<float>, dim3(blocks), dim3(kWarpRouteWarps * 32), 0, stream,
                       static_cast<const float*>(logits), m, r, ids, weights);
        else
            launch_pdl(route_sigmoid_warp_kernel<__nv_bfloat16>, dim3(blocks), dim3(kWarpRouteWarps * 32), 0,
                       stream, static_cast<const __nv_bfloat16*>(logits), m, r, ids, weights);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    // choice, sig [n_experts] float; group_score [n_group] float; taken [n_experts], eligible [n_group] bytes
    const size_t smem = static_cast<size_t>(n_experts) * 9 + static_cast<size_t>(n_group) * 5;
    if (dtype == DType::F32)
        launch_pdl(route_sigmoid_kernel<float>, dim3(static_cast<unsigned>(m)), dim3(kRouteThreads), smem,
                   stream, static_cast<const float*>(logits), ne, k, correction_bias, ng, kg, norm_topk_prob,
                   routed_scaling_factor, ids, weights);
    else
        launch_pdl(route_sigmoid_kernel<__nv_bfloat16>, dim3(static_cast<unsigned>(m)), dim3(kRouteThreads),
                   smem, stream, static_cast<const __nv_bfloat16*>(logits), ne, k, correction_bias, ng, kg,
                   norm_topk_prob, routed_scaling_factor, ids, weights);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_permute(const int32_t* ids, int64_t m, int64_t top_k, int64_t n_experts, const MoePermutation& perm,
                 cudaStream_t stream) {
    if (n_experts < 1 || n_experts > 1024 || top_k < 1 || m < 0 || m * top_k > 0x7fffffff)
        bad("moe_permute: m " + std::to_string(m) + ", top_k " + std::to_string(top_k) + ", n_experts " +
            std::to_string(n_experts) + " out of range");
    const int n_pairs = static_cast<int>(m * top_k), ne = static_cast<int>(n_experts);
    if (n_pairs <= kSmallPermutePairs) {
        launch_pdl(permute_small_kernel, dim3(1), dim3(kSmallPermuteThreads), 0, stream, ids, n_pairs, ne,
                   perm.counts, perm.offsets, perm.sorted_pairs, perm.pair_position, perm.active_experts,
                   perm.n_active);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    const unsigned blocks = static_cast<unsigned>((n_experts + kPermuteWarps - 1) / kPermuteWarps);
    launch_pdl(permute_count_kernel, dim3(blocks), dim3(kPermuteWarps * 32), 0, stream, ids, n_pairs, ne,
               perm.counts);
    launch_pdl(permute_place_kernel, dim3(blocks), dim3(kPermuteWarps * 32), 0, stream, ids, n_pairs, ne,
               perm.counts, perm.offsets, perm.sorted_pairs, perm.pair_position, perm.active_experts,
               perm.n_active);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

bool moe_prefers_gemm(int64_t m, int64_t top_k, int64_t n_experts, DType activations) {
    return activations == DType::BF16 && m * top_k >= kMoeGemmMinTokensPerExpert * n_experts;
}

bool moe_uses_plain_kernel(const MoeDeviceExperts& experts, bool gemm_chosen) {
    return experts.n_embd % 32 != 0 || experts.n_ff % 32 != 0 || (experts.bf16_weights() && !gemm_chosen);
}

namespace {

// Calls launch.template operator()<XT, kEpi>() for the activation dtype (F32 or BF16) and the up projection's
// epilogue (SwiGLU or relu^2): the one dispatch of the up kernels, GEMM and GEMV alike.
template <class Launch>
void launch_up_variant(DType dtype, bool swiglu, const Launch& launch) {
    if (dtype == DType::F32) {
        if (swiglu)
            launch.template operator()<float, Epilogue::SwiGlu>();
        else
            launch.template operator()<float, Epilogue::Relu2>();
    } else {
        if (swiglu)
            launch.template operator()<__nv_bfloat16, Epilogue::SwiGlu>();
        else
            launch.template operator()<__nv_bfloat16, Epilogue::Relu2>();
    }
}

}  // namespace

void moe_experts_up_nvfp4(const void* x, DType dtype, int64_t m, int64_t top_k,
                          const MoeDeviceExperts& experts, MoeActivation act, const MoePermutation& perm,
                          float* h, cudaStream_t stream, MoeExpertKernel kernel) {
    const char* what = "moe_experts_up_nvfp4";
    check_dtype(dtype, what);
    check_experts(experts, m, top_k, what);
    check_aligned(x, what, "x");
    check_aligned(h, what, "h");
    if (act == MoeActivation::SwiGlu &&
        (experts.bf16_weights() ? experts.bf16_gate == nullptr : experts.gate == nullptr))
        bad("moe_experts_up_nvfp4: SwiGLU needs gate weights");
    if (m == 0) return;
    const bool swiglu = act == MoeActivation::SwiGlu;
    const bool gemm = use_gemm(kernel, m, top_k, experts.n_experts, dtype);
    if (moe_uses_plain_kernel(experts, gemm)) {
        auto launch = [&]<class XT, Epilogue kEpi>() {
            launch_plain_gemv<XT, true, kEpi>(static_cast<const XT*>(x), experts.n_embd, top_k, m * top_k, experts,
                                              /*down=*/false, experts.n_ff, perm, h, stream);
        };
        launch_up_variant(dtype, swiglu, launch);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    if (gemm) {
        const int64_t out_cols = swiglu ? kGemmWRows / 2 : kGemmWRows;
        const int64_t col_tiles = (experts.n_ff + out_cols - 1) / out_cols;
        const unsigned blocks = gemm_grid(m, top_k, experts, col_tiles, what);
        auto launch = [&]<class XT, Epilogue kEpi>() {
            if (experts.bf16_weights())
                launch_pdl(moe_gemm_nvfp4_kernel<XT, true, kEpi, true>, dim3(blocks), dim3(kGemmThreads), 0, stream,
                           static_cast<const XT*>(x), static_cast<int>(experts.n_embd), static_cast<int>(top_k),
                           nullptr, nullptr, static_cast<int>(experts.n_ff), static_cast<int>(col_tiles),
                           perm.offsets, perm.sorted_pairs, static_cast<int>(experts.n_experts), h,
                           experts.bf16_gate, experts.bf16_up);
            else
                launch_pdl(moe_gemm_nvfp4_kernel<XT, true, kEpi, false>, dim3(blocks), dim3(kGemmThreads), 0,
                           stream, static_cast<const XT*>(x), static_cast<int>(experts.n_embd),
                           static_cast<int>(top_k), experts.gate, experts.up, static_cast<int>(experts.n_ff),
                           static_cast<int>(col_tiles), perm.offsets, perm.sorted_pairs,
                           static_cast<int>(experts.n_experts), h, nullptr, nullptr);
        };
        launch_up_variant(dtype, swiglu, launch);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    const int lanes = gemv_lanes_per_row(experts.n_embd);
    const dim3 grid(gemv_grid_x(experts.n_ff, lanes), grid_y_for(m, top_k, experts.n_experts));
    const MoeGemvOp op = swiglu ? MoeGemvOp::SwiGlu : MoeGemvOp::Relu2;
    if (moe_mma_gemv_preferred(m, experts.n_embd, op) &&
        moe_mma_gemv(x, dtype, op, experts.n_embd, top_k, experts.gate, experts.up, experts.n_ff, grid.y, m,
                     perm, h, stream)) {
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    const int k = static_cast<int>(top_k);
    auto launch = [&]<class XT, Epilogue kEpi>() {
        if (launch_reg_gemv<XT, true, kEpi>(static_cast<const XT*>(x), experts.n_embd, top_k, experts.gate,
                                            experts.up, experts.n_ff, grid.y, m, perm, h, stream))
            return;
        if (gemv_single_token_tile(m, top_k, experts.n_experts))
            launch_pdl(moe_gemv_nvfp4_kernel_t1<XT, true, kEpi>, dim3(grid), dim3(kGemvWarps * 32), 0, stream,
                       static_cast<const XT*>(x), experts.n_embd, k, experts.gate, experts.up, experts.n_ff,
                       lanes, perm.offsets, perm.sorted_pairs, perm.active_experts, perm.n_active, h);
        else
            launch_pdl(moe_gemv_nvfp4_kernel_t8<XT, true, kEpi>, dim3(grid), dim3(kGemvWarps * 32), 0, stream,
                       static_cast<const XT*>(x), experts.n_embd, k, experts.gate, experts.up, experts.n_ff,
                       lanes, perm.offsets, perm.sorted_pairs, perm.active_experts, perm.n_active, h);
    };
    launch_up_variant(dtype, swiglu, launch);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_experts_down_nvfp4(const float* h, int64_t m, int64_t top_k, const MoeDeviceExperts& experts,
                            const MoePermutation& perm, float* o, cudaStream_t stream,
                            MoeExpertKernel kernel) {
    const char* what = "moe_experts_down_nvfp4";
    check_experts(experts, m, top_k, what);
    check_aligned(h, what, "h");
    check_aligned(o, what, "o");
    if (m == 0) return;
    const bool gemm = use_gemm(kernel, m, top_k, experts.n_experts, DType::BF16);
    if (moe_uses_plain_kernel(experts, gemm)) {
        launch_plain_gemv<float, false, Epilogue::None>(h, experts.n_ff, top_k, m * top_k, experts, /*down=*/true,
                                                        experts.n_embd, perm, o, stream);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    if (gemm) {
        const int64_t col_tiles = (experts.n_embd + kGemmWRows - 1) / kGemmWRows;
        const dim3 grid(gemm_grid(m, top_k, experts, col_tiles, what));
        if (experts.bf16_weights())
            launch_pdl(moe_gemm_nvfp4_kernel<float, false, Epilogue::None, true>, grid, dim3(kGemmThreads), 0,
                       stream, h, static_cast<int>(experts.n_ff), static_cast<int>(top_k), nullptr, nullptr,
                       static_cast<int>(experts.n_embd), static_cast<int>(col_tiles), perm.offsets,
                       perm.sorted_pairs, static_cast<int>(experts.n_experts), o, nullptr, experts.bf16_down);
        else
            launch_pdl(moe_gemm_nvfp4_kernel<float, false, Epilogue::None, false>, grid, dim3(kGemmThreads), 0,
                       stream, h, static_cast<int>(experts.n_ff), static_cast<int>(top_k), nullptr, experts.down,
                       static_cast<int>(experts.n_embd), static_cast<int>(col_tiles), perm.offsets,
                       perm.sorted_pairs, static_cast<int>(experts.n_experts), o, nullptr, nullptr);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    const int lanes = gemv_lanes_per_row(experts.n_ff);
    if (moe_mma_gemv_preferred(m, experts.n_ff, MoeGemvOp::Down) &&
        moe_mma_gemv(h, DType::F32, MoeGemvOp::Down, experts.n_ff, top_k, nullptr, experts.down,
                     experts.n_embd, grid_y_for(m, top_k, experts.n_experts), m, perm, o, stream)) {
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    if (launch_reg_gemv<float, false, Epilogue::None>(h, experts.n_ff, top_k, nullptr, experts.down,
                                                      experts.n_embd, grid_y_for(m, top_k, experts.n_experts), m,
                                                      perm, o, stream)) {
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    const dim3 grid(gemv_grid_x(experts.n_embd, lanes), grid_y_for(m, top_k, experts.n_experts));
    if (gemv_single_token_tile(m, top_k, experts.n_experts))
        launch_pdl(moe_gemv_nvfp4_kernel_t1<float, false, Epilogue::None>, dim3(grid), dim3(kGemvWarps * 32),
                   0, stream, h, experts.n_ff, static_cast<int>(top_k), nullptr, experts.down, experts.n_embd,
                   lanes, perm.offsets, perm.sorted_pairs, perm.active_experts, perm.n_active, o);
    else
        launch_pdl(moe_gemv_nvfp4_kernel_t8<float, false, Epilogue::None>, dim3(grid), dim3(kGemvWarps * 32),
                   0, stream, h, experts.n_ff, static_cast<int>(top_k), nullptr, experts.down, experts.n_embd,
                   lanes, perm.offsets, perm.sorted_pairs, perm.active_experts, perm.n_active, o);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_combine(const float* o, const int32_t* ids, const float* weights, const int32_t* pair_position,
                 int64_t m, int64_t top_k, int64_t n_embd, const void* shared, DType dtype, void* y,
                 cudaStream_t stream) {
    check_dtype(dtype, "moe_combine");
    if (top_k < 1 || top_k > kMaxTopK || n_embd <= 0 || m < 0 || m > 0x7fffffff)
        bad("moe_combine: m " + std::to_string(m) + ", top_k " + std::to_string(top_k) + ", n_embd " +
            std::to_string(n_embd) + " out of range");
    if (m == 0) return;
    const int k = static_cast<int>(top_k);
    // Column blocks per token: enough CTAs to fill the card at small m, one per token from m = 264.
    const int64_t col_blocks = std::clamp<int64_t>((kCombineTargetCtas + m - 1) / m, 1,
                                                   (n_embd + kCombineThreads - 1) / kCombineThreads);
    const auto blocks = static_cast<unsigned>(m * col_blocks);  // <= max(m, 2 * 264)
    const int cbs = static_cast<int>(col_blocks);
    if (dtype == DType::F32)
        launch_pdl(combine_kernel<float>, dim3(blocks), dim3(kCombineThreads), 0, stream, o, ids, weights,
                   pair_position, k, n_embd, cbs, static_cast<const float*>(shared), static_cast<float*>(y));
    else
        launch_pdl(combine_kernel<__nv_bfloat16>, dim3(blocks), dim3(kCombineThreads), 0, stream, o, ids,
                   weights, pair_position, k, n_embd, cbs, static_cast<const __nv_bfloat16*>(shared),
                   static_cast<__nv_bfloat16*>(y));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_combine_residual_rmsnorm(const float* o, const int32_t* ids, const float* weights,
                                  const int32_t* pair_position, int64_t m, int64_t top_k, int64_t n_embd,
                                  const void* shared, DType dtype, const MoeResidualNorm& norm,
                                  cudaStream_t stream) {
    const char* what = "moe_combine_residual_rmsnorm";
    check_dtype(dtype, what);
    if (top_k < 1 || top_k > kMaxTopK || n_embd <= 0 || n_embd % 8 != 0 || m < 0 || m > 0x7fffffff)
        bad(std::string(what) + ": m " + std::to_string(m) + ", top_k " + std::to_string(top_k) +
            ", n_embd " + std::to_string(n_embd) +
            " out of range (n_embd a positive multiple of 8, top_k 1.." + std::to_string(kMaxTopK) + ")");
    if (norm.residual == nullptr || norm.weight == nullptr || norm.out == nullptr)
        bad(std::string(what) + ": residual, weight and out are required");
    check_aligned(norm.residual, what, "residual");
    check_aligned(norm.out, what, "out");
    if (m == 0) return;
    const auto blocks = static_cast<unsigned>(m);
    const int k = static_cast<int>(top_k);
    if (dtype == DType::F32)
        launch_pdl(combine_residual_rmsnorm_kernel<float>, dim3(blocks), dim3(kCombineNormThreads), 0, stream,
                   o, ids, weights, pair_position, k, n_embd, static_cast<const float*>(shared),
                   static_cast<float*>(norm.residual), norm.weight, norm.eps, static_cast<float*>(norm.out));
    else
        launch_pdl(combine_residual_rmsnorm_kernel<__nv_bfloat16>, dim3(blocks), dim3(kCombineNormThreads), 0,
                   stream, o, ids, weights, pair_position, k, n_embd,
                   static_cast<const __nv_bfloat16*>(shared), static_cast<__nv_bfloat16*>(norm.residual),
                   norm.weight, norm.eps, static_cast<__nv_bfloat16*>(norm.out));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_localize_ids(const int32_t* ids, int64_t n_pairs, int64_t begin, int64_t end, int32_t* local_ids,
                      cudaStream_t stream) {
    if (n_pairs < 0 || n_pairs > 0x7fffffff || begin < 0 || begin >= end || end > 1024)
        bad("moe_localize_ids: " + std::to_string(n_pairs) + " pairs, experts [" + std::to_string(begin) +
            ", " + std::to_string(end) + ") (need a non-empty range inside 0..1024)");
    if (n_pairs == 0) return;
    const int n = static_cast<int>(n_pairs);
    launch_pdl(
        localize_ids_kernel, dim3(static_cast<unsigned>((n + kLocalizeThreads - 1) / kLocalizeThreads)),
        dim3(kLocalizeThreads), 0, stream, ids, n, static_cast<int>(begin), static_cast<int>(end), local_ids);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

size_t moe_workspace_bytes(int64_t m, int64_t top_k, int64_t n_experts, int64_t n_embd, int64_t n_ff) {
    if (m < 0 || top_k < 1 || n_experts < 1 || n_embd < 1 || n_ff < 1)
        bad("moe_workspace_bytes: m " + std::to_string(m) + ", top_k " + std::to_string(top_k) +
            ", n_experts " + std::to_string(n_experts) + ", n_embd " + std::to_string(n_embd) + ", n_ff " +
            std::to_string(n_ff));
    return moe_workspace_layout(m, top_k, n_experts, n_embd, n_ff).total;
}

namespace {

// The permutation carved from moe_experts_nvfp4's workspace.
MoePermutation workspace_permutation(void* workspace, const MoeWorkspaceLayout& l) {
    auto* base = static_cast<unsigned char*>(workspace);
    return MoePermutation{
        reinterpret_cast<int32_t*>(base + l.counts), reinterpret_cast<int32_t*>(base + l.offsets),
        reinterpret_cast<int32_t*>(base + l.sorted), reinterpret_cast<int32_t*>(base + l.position),
        reinterpret_cast<int32_t*>(base + l.active), reinterpret_cast<int32_t*>(base + l.n_active)};
}

// What the fused router + permutation launchers check of their experts and workspace, and the permutation
// they fill (moe_experts_nvfp4's workspace layout).
MoePermutation fused_route_permutation(int64_t m, int64_t top_k, const MoeDeviceExperts& experts,
                                       void* workspace, const char* what) {
    if (experts.n_embd < 1 || experts.n_ff < 1)  // the workspace layout needs them; the weights are not read
        bad(std::string(what) + ": n_embd " + std::to_string(experts.n_embd) + " and n_ff " +
            std::to_string(experts.n_ff) + " must be positive");
    check_aligned(workspace, what, "workspace");
    return workspace_permutation(
        workspace, moe_workspace_layout(m, top_k, experts.n_experts, experts.n_embd, experts.n_ff));
}

}  // namespace

void moe_route_softmax_permute(const void* logits, DType dtype, int64_t m, int64_t top_k, bool norm_topk_prob,
                               const MoeDeviceExperts& experts, int32_t* ids, float* weights, void* workspace,
                               cudaStream_t stream) {
    const char* what = "moe_route_softmax_permute";
    check_router(dtype, m, experts.n_experts, top_k, what);
    const MoePermutation perm = fused_route_permutation(m, top_k, experts, workspace, what);
    if (m == 0) return;
    if (experts.n_experts > kWarpRouteMaxExperts || m * top_k > kSmallPermutePairs) {
        moe_route_softmax(logits, dtype, m, experts.n_experts, top_k, norm_topk_prob, ids, weights, stream);
        moe_permute(ids, m, top_k, experts.n_experts, perm, stream);
        return;
    }
    const int mm = static_cast<int>(m), ne = static_cast<int>(experts.n_experts), k = static_cast<int>(top_k);
    if (dtype == DType::F32)
        launch_pdl(route_softmax_permute_kernel<float>, dim3(1), dim3(kSmallPermuteThreads), 0, stream,
                   static_cast<const float*>(logits), mm, ne, k, norm_topk_prob, ids, weights, perm.counts,
                   perm.offsets, perm.sorted_pairs, perm.pair_position, perm.active_experts, perm.n_active);
    else
        launch_pdl(route_softmax_permute_kernel<__nv_bfloat16>, dim3(1), dim3(kSmallPermuteThreads), 0,
                   stream, static_cast<const __nv_bfloat16*>(logits), mm, ne, k, norm_topk_prob, ids, weights,
                   perm.counts, perm.offsets, perm.sorted_pairs, perm.pair_position, perm.active_experts,
                   perm.n_active);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_route_sigmoid_permute(const void* logits, DType dtype, int64_t m, int64_t top_k,
                               const float* correction_bias, int64_t n_group, int64_t topk_group,
                               bool norm_topk_prob, float routed_scaling_factor,
                               const MoeDeviceExperts& experts, int32_t* ids, float* weights, void* workspace,
                               cudaStream_t stream) {
    const char* what = "moe_route_sigmoid_permute";
    check_sigmoid_router(dtype, m, experts.n_experts, top_k, n_group, topk_group, what);
    const MoePermutation perm = fused_route_permutation(m, top_k, experts, workspace, what);
    if (m == 0) return;
    if (experts.n_experts > kWarpRouteMaxExperts || m * top_k > kSmallPermutePairs) {
        moe_route_sigmoid(logits, dtype, m, experts.n_experts, top_k, correction_bias, n_group, topk_group,
                          norm_topk_prob, routed_scaling_factor, ids, weights, stream);
        moe_permute(ids, m, top_k, experts.n_experts, perm, stream);
        return;
    }
    const SigmoidRouting r{
        correction_bias,           static_cast<int>(experts.n_experts), static_cast<int>(top_k),
        static_cast<int>(n_group), static_cast<int>(topk_group),        norm_topk_prob,
        routed_scaling_factor};
    const int mm = static_cast<int>(m);
    if (dtype == DType::F32)
        launch_pdl(route_sigmoid_permute_kernel<float>, dim3(1), dim3(kSmallPermuteThreads), 0, stream,
                   static_cast<const float*>(logits), mm, r, ids, weights, perm.counts, perm.offsets,
                   perm.sorted_pairs, perm.pair_position, perm.active_experts, perm.n_active);
    else
        launch_pdl(route_sigmoid_permute_kernel<__nv_bfloat16>, dim3(1), dim3(kSmallPermuteThreads), 0,
                   stream, static_cast<const __nv_bfloat16*>(logits), mm, r, ids, weights, perm.counts,
                   perm.offsets, perm.sorted_pairs, perm.pair_position, perm.active_experts, perm.n_active);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void moe_experts_nvfp4_permuted(const void* x, DType dtype, int64_t m, const int32_t* ids,
                                const float* weights, int64_t top_k, const MoeDeviceExperts& experts,
                                MoeActivation act, const void* shared, void* workspace, void* y,
                                cudaStream_t stream, MoeExpertKernel kernel,
                                const MoeResidualNorm* then_norm) {
    check_experts(experts, m, top_k, "moe_experts_nvfp4");
    check_aligned(workspace, "moe_experts_nvfp4", "workspace");
    if (m == 0) return;
    const MoeWorkspaceLayout l =
        moe_workspace_layout(m, top_k, experts.n_experts, experts.n_embd, experts.n_ff);
    const MoePermutation perm = workspace_permutation(workspace, l);
    auto* base = static_cast<unsigned char*>(workspace);
    float* h = reinterpret_cast<float*>(base + l.h);
    float* o = reinterpret_cast<float*>(base + l.o);
    if (kernel == MoeExpertKernel::Auto)  // one choice for both, from the activations' dtype
        kernel = moe_prefers_gemm(m, top_k, experts.n_experts, dtype) ? MoeExpertKernel::Gemm
                                                                      : MoeExpertKernel::Gemv;
    moe_experts_up_nvfp4(x, dtype, m, top_k, experts, act, perm, h, stream, kernel);
    moe_experts_down_nvfp4(h, m, top_k, experts, perm, o, stream, kernel);
    if (then_norm != nullptr)
        moe_combine_residual_rmsnorm(o, ids, weights, perm.pair_position, m, top_k, experts.n_embd, shared,
                                     dtype, *then_norm, stream);
    else
        moe_combine(o, ids, weights, perm.pair_position, m, top_k, experts.n_embd, shared, dtype, y, stream);
}

void moe_experts_nvfp4(const void* x, DType dtype, int64_t m, const int32_t* ids, const float* weights,
                       int64_t top_k, const MoeDeviceExperts& experts, MoeActivation act, const void* shared,
                       void* workspace, void* y, cudaStream_t stream, MoeExpertKernel kernel,
                       const MoeResidualNorm* then_norm) {
    check_experts(experts, m, top_k, "moe_experts_nvfp4");
    check_aligned(workspace, "moe_experts_nvfp4", "workspace");
    if (m == 0) return;
    moe_permute(ids, m, top_k, experts.n_experts,
                workspace_permutation(workspace, moe_workspace_layout(m, top_k, experts.n_experts,
                                                                      experts.n_embd, experts.n_ff)),
                stream);
    moe_experts_nvfp4_permuted(x, dtype, m, ids, weights, top_k, experts, act, shared, workspace, y, stream,
                               kernel, then_norm);
}

}  // namespace nibble::cuda
