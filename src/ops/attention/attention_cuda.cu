// Paged attention and KV write kernels (CUDA cores; see attention_cuda.h for the contract).
//
// Attention CTA: 128 threads, one (sequence, KV head, query tile, key split). R = 4 * NJ rows (query token x
// query head of the group) live in shared memory as float, pre-multiplied by scale * k_layer_scale * log2(e)
// so softmax runs in base 2 and the quantized K needs no per-element layer scale. Keys go in tiles of 32:
// each thread loads its 16-byte chunks of the next tile's raw K/V rows into registers (one tile ahead, so the
// loads are in flight during the current tile's math), then dequantizes them into the shared tile as float
// (BF16 exactly; FP8 and NVFP4 as e4m3 and e2m1 * e4m3-scale, both exact in float; the layer scales are
// applied once, to q and to the output). Scores: lane = key, warp w owns rows w, w + 4, ...; the row max and
// sum are warp reductions. P.V: thread owns 4 output columns of R / (512 / head_dim) rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/attention/attention_cuda.h"
#include "ops/attention/kv_quant.cuh"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kKeyTile = 32;
constexpr float kLog2e = 1.4426950408889634f;

// Elements per 16-byte chunk of a stored row.
template <KvDtype KV>
constexpr int elems_per_chunk() {
    return KV == KvDtype::Bf16 ? 8 : KV == KvDtype::Fp8 ? 16 : 32;
}

// Dequantizes one 16-byte chunk into out[EPC] (without the layer scale). `scales` holds the chunk's two
// NVFP4 group scales (low byte: elements 0..15).
template <KvDtype KV>
__device__ __forceinline__ void dequant_chunk(const uint4& raw, uint32_t scales, float* out) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (KV == KvDtype::Bf16) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            out[2 * j] = __uint_as_float(w[j] << 16);
            out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
    } else if constexpr (KV == KvDtype::Fp8) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                    static_cast<__nv_fp8x2_storage_t>((w[j] >> (16 * h)) & 0xffffu), __NV_E4M3);
                const float2 f = __half22float2(__half2(r));
                out[4 * j + 2 * h] = f.x;
                out[4 * j + 2 * h + 1] = f.y;
            }
        }
    } else {
        // E2M1 nibble -> fp16 bits (sign << 15 | code << 9) is the value times 2^-14 exactly (code 1 lands on
        // the fp16 subnormal 2^-15); 2^14 goes into the scale, and e2m1 * scale is exact in float.
        const float s0 = e4m3_to_float_dev(static_cast<uint8_t>(scales & 0xffu)) * 16384.0f;
        const float s1 = e4m3_to_float_dev(static_cast<uint8_t>(scales >> 8)) * 16384.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int n = 0; n < 8; n += 2) {
                const uint32_t pair = w[j] >> (4 * n);  // nibbles n (low) and n + 1
                const uint32_t bits = ((pair & 0x8u) << 12) | ((pair & 0x7u) << 9) | ((pair & 0x80u) << 24) |
                                      ((pair & 0x70u) << 21);
                __half2_raw r;
                r.x = static_cast<unsigned short>(bits & 0xffffu);
                r.y = static_cast<unsigned short>(bits >> 16);
                const float2 f = __half22float2(__half2(r));
                const float sc = j < 2 ? s0 : s1;
                out[8 * j + n] = f.x * sc;
                out[8 * j + n + 1] = f.y * sc;
            }
        }
    }
}

struct AttnParams {
    const void* q;
    void* out;
    bool bf16;
    const uint8_t* k;
    const uint8_t* v;
    int64_t block_bytes;
    int block_size, n_kv_heads, n_heads, group, q_tile;
    int block_shift;  // log2(block_size) when it is a power of two (every cache nibble makes), else -1
    float qk_scale, v_scale;
    int sliding_window, keys_per_split, n_splits;
    const int32_t* q_start;
    const int32_t* start_pos;
    const int32_t* block_tables;
    int64_t max_blocks;
    int64_t n_tokens;
    float* part_o;  // [n_splits, n_tokens, n_heads, head_dim]
    float* part_m;  // [n_splits, n_tokens, n_heads]
    float* part_l;  // [n_splits, n_tokens, n_heads]
};

// Logical block of `key` and its slot in the block: a shift and a mask for power-of-two block sizes (a
// division by a runtime int is ~20 instructions, and the short-context decode kernels are instruction-latency
// bound: docs/perf.md, session 9), a division otherwise. decode_mma_kernel uses it (12 keys a lane a step).
// The pipelined decode kernel keeps its one division a lane a step: with key_slot its NVFP4 variant ran 6.7%
// slower at 64K keys (H100, same call), and the prefill and CUDA-core kernels address a key tile at a time.
struct KeySlot {
    int block, slot;
};
__device__ __forceinline__ KeySlot key_slot(const AttnParams& p, int key) {
    if (p.block_shift >= 0) return {key >> p.block_shift, key & (p.block_size - 1)};
    const int block = key / p.block_size;
    return {block, key - block * p.block_size};
}

template <int HD, int NJ>
constexpr size_t attn_smem_bytes() {
    constexpr int R = 4 * NJ;
    return sizeof(float) * (static_cast<size_t>(R) * HD + kKeyTile * (HD + 4) + kKeyTile * HD + R * kKeyTile + 3 * R);
}

template <KvDtype KV, int HD, int NJ>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const AttnParams p) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    constexpr int R = 4 * NJ;              // rows of the tile
    constexpr int ROW_BYTES = KV == KvDtype::Bf16 ? HD * 2 : KV == KvDtype::Fp8 ? HD : HD / 2;
    constexpr int SCALE_BYTES = KV == KvDtype::Nvfp4 ? HD / 16 : 0;
    // A chunk is 16 bytes of a stored row, or the whole row when shorter (NVFP4 with head_dim 16: 8 bytes,
    // one group, one scale byte); dequant_chunk always fills EPC_FULL values, of which the first EPC are real.
    constexpr int CHUNK_BYTES = ROW_BYTES < 16 ? ROW_BYTES : 16;
    constexpr int EPC_FULL = elems_per_chunk<KV>();
    constexpr int EPC = EPC_FULL * CHUNK_BYTES / 16;
    constexpr int CPR = HD / EPC;          // chunks per stored row
    constexpr int NCH = kKeyTile * CPR;    // chunks per key tile
    constexpr int ITER = (NCH + kThreads - 1) / kThreads;
    static_assert(CPR * EPC == HD && CPR * CHUNK_BYTES == ROW_BYTES && (CHUNK_BYTES == 16 || CHUNK_BYTES == 8),
                  "head_dim must split into whole 16-byte chunks, or be one 8-byte NVFP4 row");
    static_assert(HD % 4 == 0 && kThreads % (HD / 4) == 0, "P.V needs whole float4 column groups per CTA pass");
    constexpr int KS = HD + 4;             // padded K row: lanes reading different keys hit different banks
    constexpr int COLS = HD / 4;           // float4 column groups in P.V
    constexpr int ROWLANES = kThreads / COLS;
    constexpr int RPT = R >= ROWLANES ? R / ROWLANES : 1;

    extern __shared__ float smem[];
    float* sQ = smem;                      // [R][HD]
    float* sK = sQ + R * HD;               // [kKeyTile][KS]
    float* sV = sK + kKeyTile * KS;        // [kKeyTile][HD]
    float* sP = sV + kKeyTile * HD;        // [R][kKeyTile]
    float* sM = sP + R * kKeyTile;         // [R] running max (base 2)
    float* sL = sM + R;                    // [R] running sum
    float* sA = sL + R;                    // [R] rescale of this tile

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int seq = blockIdx.y;
    const int kvh = static_cast<int>(blockIdx.z) % p.n_kv_heads;
    const int split = static_cast<int>(blockIdx.z) / p.n_kv_heads;
    const int q0 = p.q_start[seq];
    const int n_q = p.q_start[seq + 1] - q0;
    const int tile_q0 = static_cast<int>(blockIdx.x) * p.q_tile;
    if (tile_q0 >= n_q) return;
    const int tile_nq = min(p.q_tile, n_q - tile_q0);
    const int nrows = tile_nq * p.group;
    const int pos_first = p.start_pos[seq] + tile_q0;  // position of the tile's first query token
    int lo = p.sliding_window > 0 ? max(0, pos_first - p.sliding_window + 1) : 0;
    int hi = pos_first + tile_nq;  // exclusive
    lo = max(lo, split * p.keys_per_split);
    hi = min(hi, (split + 1) * p.keys_per_split);
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;

    // Q rows, scaled; rows past the tile's tokens are zero (and masked below).
    for (int i = tid; i < R * HD; i += kThreads) {
        const int r = i / HD, d = i % HD;
        float val = 0.0f;
        if (r < nrows) {
            const int64_t token = q0 + tile_q0 + r / p.group;
            const int64_t idx = (token * p.n_heads + kvh * p.group + r % p.group) * HD + d;
            val = p.bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.q)[idx])
                         : static_cast<const float*>(p.q)[idx];
        }
        sQ[i] = val * p.qk_scale;
    }
    if (tid < R) {
        sM[tid] = -INFINITY;
        sL[tid] = 0.0f;
    }

    uint4 rk[ITER], rv[ITER];
    uint32_t sck[ITER], scv[ITER];
    auto load_tile = [&](int t0) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int ch = tid + it * kThreads;
            rk[it] = rv[it] = make_uint4(0, 0, 0, 0);
            sck[it] = scv[it] = 0;
            const int key = t0 + ch / CPR;
            if (ch < NCH && key < hi) {
                const int c = ch % CPR;
                const int64_t block = table[key / p.block_size];
                const int64_t row = static_cast<int64_t>(key % p.block_size) * p.n_kv_heads + kvh;
                const int64_t base = block * p.block_bytes;
                const int64_t off = base + row * ROW_BYTES + c * CHUNK_BYTES;
                if constexpr (CHUNK_BYTES == 16) {
                    rk[it] = __ldg(reinterpret_cast<const uint4*>(p.k + off));
                    rv[it] = __ldg(reinterpret_cast<const uint4*>(p.v + off));
                } else {  // an 8-byte row: the upper half of the chunk stays zero (dequantized, never stored)
                    const uint2 k8 = __ldg(reinterpret_cast<const uint2*>(p.k + off));
                    const uint2 v8 = __ldg(reinterpret_cast<const uint2*>(p.v + off));
                    rk[it] = make_uint4(k8.x, k8.y, 0, 0);
                    rv[it] = make_uint4(v8.x, v8.y, 0, 0);
                }
                if constexpr (KV == KvDtype::Nvfp4) {
                    // The chunk's group scales: two bytes for a 16-byte chunk, one for an 8-byte row.
                    const int64_t soff = base + static_cast<int64_t>(p.block_size) * p.n_kv_heads * ROW_BYTES +
                                         row * SCALE_BYTES + c * (CHUNK_BYTES / 8);
                    if constexpr (CHUNK_BYTES == 16) {
                        sck[it] = __ldg(reinterpret_cast<const unsigned short*>(p.k + soff));
                        scv[it] = __ldg(reinterpret_cast<const unsigned short*>(p.v + soff));
                    } else {
                        sck[it] = __ldg(p.k + soff);
                        scv[it] = __ldg(p.v + soff);
                    }
                }
            }
        }
    };

    const int n_tiles = hi > lo ? (hi - lo + kKeyTile - 1) / kKeyTile : 0;
    if (n_tiles > 0) load_tile(lo);

    const int c4 = tid % COLS, rl = tid / COLS;
    float o[RPT][4];
#pragma unroll
    for (int i = 0; i < RPT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

    for (int t = 0; t < n_tiles; ++t) {
        const int t0 = lo + t * kKeyTile;
        __syncthreads();  // the previous tile's shared K/V/P are no longer read (and sQ/sM are set)
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int ch = tid + it * kThreads;
            if (ch < NCH) {
                const int kk = ch / CPR, c = ch % CPR;
                float buf[EPC_FULL];
                dequant_chunk<KV>(rk[it], sck[it], buf);
#pragma unroll
                for (int e = 0; e < EPC; e += 4)
                    *reinterpret_cast<float4*>(sK + kk * KS + c * EPC + e) =
                        make_float4(buf[e], buf[e + 1], buf[e + 2], buf[e + 3]);
                dequant_chunk<KV>(rv[it], scv[it], buf);
#pragma unroll
                for (int e = 0; e < EPC; e += 4)
                    *reinterpret_cast<float4*>(sV + kk * HD + c * EPC + e) =
                        make_float4(buf[e], buf[e + 1], buf[e + 2], buf[e + 3]);
            }
        }
        __syncthreads();
        if (t + 1 < n_tiles) load_tile(t0 + kKeyTile);

        // Scores of key t0 + lane against rows warp + 4 j.
        float acc[NJ];
#pragma unroll
        for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
        const float* krow = sK + lane * KS;
#pragma unroll 8
        for (int d = 0; d < HD; d += 4) {
            const float4 kf = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float4 qf = *reinterpret_cast<const float4*>(sQ + (warp + 4 * j) * HD + d);
                acc[j] = fmaf(qf.x, kf.x, acc[j]);
                acc[j] = fmaf(qf.y, kf.y, acc[j]);
                acc[j] = fmaf(qf.z, kf.z, acc[j]);
                acc[j] = fmaf(qf.w, kf.w, acc[j]);
            }
        }
        const int key = t0 + lane;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int r = warp + 4 * j;
            if (r >= nrows) continue;  // uniform across the warp
            const int qpos = pos_first + r / p.group;
            const bool valid = key < hi && key <= qpos && (p.sliding_window <= 0 || key > qpos - p.sliding_window);
            const float sc = valid ? acc[j] : -INFINITY;
            float tmax = sc;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
            const float m_old = sM[r];
            const float m_new = fmaxf(m_old, tmax);
            const float pr = m_new == -INFINITY ? 0.0f : exp2f(sc - m_new);
            float psum = pr;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
            sP[r * kKeyTile + lane] = pr;
            __syncwarp();
            if (lane == 0) {
                const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_old - m_new);
                sM[r] = m_new;
                sL[r] = sL[r] * alpha + psum;
                sA[r] = alpha;
            }
        }
        __syncthreads();

        // o = o * alpha + P V
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int r = rl + ROWLANES * i;
            if (r < nrows) {
                const float a = sA[r];
                o[i][0] *= a, o[i][1] *= a, o[i][2] *= a, o[i][3] *= a;
            }
        }
#pragma unroll 4
        for (int kk = 0; kk < kKeyTile; ++kk) {
            const float4 vf = *reinterpret_cast<const float4*>(sV + kk * HD + c4 * 4);
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const int r = rl + ROWLANES * i;
                if (r < R) {
                    const float pk = sP[r * kKeyTile + kk];  // rows >= nrows hold stale values: never stored
                    o[i][0] = fmaf(pk, vf.x, o[i][0]);
                    o[i][1] = fmaf(pk, vf.y, o[i][1]);
                    o[i][2] = fmaf(pk, vf.z, o[i][2]);
                    o[i][3] = fmaf(pk, vf.w, o[i][3]);
                }
            }
        }
    }
    __syncthreads();  // sM / sL final (also when this split had no keys)

#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int r = rl + ROWLANES * i;
        if (r >= nrows) continue;
        const int64_t token = q0 + tile_q0 + r / p.group;
        const int64_t hrow = token * p.n_heads + kvh * p.group + r % p.group;
        if (p.n_splits == 1) {
            const float inv = p.v_scale / sL[r];
            const float v0 = o[i][0] * inv, v1 = o[i][1] * inv, v2 = o[i][2] * inv, v3 = o[i][3] * inv;
            if (p.bf16) {
                const __nv_bfloat162 a = __floats2bfloat162_rn(v0, v1), b = __floats2bfloat162_rn(v2, v3);
                *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p.out) + hrow * HD + c4 * 4) =
                    make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
            } else {
                *reinterpret_cast<float4*>(static_cast<float*>(p.out) + hrow * HD + c4 * 4) =
                    make_float4(v0, v1, v2, v3);
            }
        } else {
            const int64_t prow = static_cast<int64_t>(split) * p.n_tokens * p.n_heads + hrow;
            *reinterpret_cast<float4*>(p.part_o + prow * HD + c4 * 4) =
                make_float4(o[i][0] * p.v_scale, o[i][1] * p.v_scale, o[i][2] * p.v_scale, o[i][3] * p.v_scale);
            if (c4 == 0) {
                p.part_m[prow] = sM[r];
                p.part_l[prow] = sL[r];
            }
        }
    }
}

// Merges the splits of each (token, head) row: one warp a row, lanes over splits for the weights and over
// float4 columns for the output.
template <int HD>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_m, const float* __restrict__ part_l,
                   int n_splits, int64_t n_rows, bool bf16, void* out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // warp-uniform
    // Lane j takes splits j, j + 32, ...: the row's maximum and weight sum are warp reductions, and the
    // output loop below gets each split's weight by a shuffle, so its loads are independent of each other
    // (a chain of dependent loads per split measured 4 us at 16 splits in a Qwen3 decode step).
    float m = -INFINITY;
    for (int s = lane; s < n_splits; s += 32) m = fmaxf(m, part_m[s * n_rows + row]);
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.0f;
    for (int s = lane; s < n_splits; s += 32) {
        const float ms = part_m[s * n_rows + row];
        if (ms != -INFINITY) l += part_l[s * n_rows + row] * exp2f(ms - m);
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    constexpr int kPasses = (HD + 127) / 128;  // float4 columns of a lane
    float4 acc[kPasses];
#pragma unroll
    for (int i = 0; i < kPasses; ++i) acc[i] = make_float4(0, 0, 0, 0);
    for (int s0 = 0; s0 < n_splits; s0 += 32) {
        float w = 0.0f;  // a split without keys (m = -inf) weighs 0 and its partial is never read
        if (s0 + lane < n_splits) {
            const float ms = part_m[(s0 + lane) * n_rows + row];
            if (ms != -INFINITY) w = exp2f(ms - m);
        }
        const int count = min(32, n_splits - s0);
#pragma unroll 4
        for (int j = 0; j < count; ++j) {
            const float wj = __shfl_sync(0xffffffffu, w, j);
            if (wj == 0.0f) continue;  // warp-uniform
            const float* po = part_o + ((s0 + j) * n_rows + row) * HD;
#pragma unroll
            for (int i = 0; i < kPasses; ++i) {
                const int d = lane * 4 + 128 * i;
                if (d >= HD) break;
                const float4 v = *reinterpret_cast<const float4*>(po + d);
                acc[i].x = fmaf(wj, v.x, acc[i].x), acc[i].y = fmaf(wj, v.y, acc[i].y);
                acc[i].z = fmaf(wj, v.z, acc[i].z), acc[i].w = fmaf(wj, v.w, acc[i].w);
            }
        }
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
        const int d = lane * 4 + 128 * i;
        if (d >= HD) break;
        const float v0 = acc[i].x * inv, v1 = acc[i].y * inv, v2 = acc[i].z * inv, v3 = acc[i].w * inv;
        if (bf16) {
            const __nv_bfloat162 a = __floats2bfloat162_rn(v0, v1), b = __floats2bfloat162_rn(v2, v3);
            *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(out) + row * HD + d) =
                make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
        } else {
            *reinterpret_cast<float4*>(static_cast<float*>(out) + row * HD + d) = make_float4(v0, v1, v2, v3);
        }
    }
}

// ---- Decode on the tensor cores (one query token per sequence, group <= 8) ----
//
// mma.sync m16n8k16 (fp32 accumulation), g = lane / 4, t = lane % 4. Scores S[row][key] = Q K^T: A = Q (rows
// 0..7 = the group's query heads), B = K^T for 8 keys; the head_dim order inside an mma is a
// free permutation, so lane (g, t) feeds key g with its own contiguous quarter of head_dim (dims t * HD/4 +
// 4 s .. + 3 in k-step s: one 16-byte load of NVFP4 for HD 128). P.V: A = P straight from the score
// accumulators (keys 2t, 2t+1, 8+2t, 9+2t of row g), B = V with output dim g * HD/8 + nt in n-tile nt, so a
// lane reads HD/8 contiguous dims of 4 keys. Dequantized K/V go to 16-bit registers exactly (BF16 cache: as
// stored, BF16 mma; FP8 and NVFP4: e4m3 and e2m1 * e4m3-scale are exact in fp16, fp16 mma). q and P are split
// into hi + lo 16-bit parts that go in as rows g (hi) and g + 8 (lo) of the A operand, the two result rows
// summed after: ~16 (BF16) or ~22 (fp16) bits of q and P in one mma, and no padding rows.
// Each of the 4 warps runs its own online softmax over 16-key steps of the CTA's key range; the warps merge
// through shared memory at the end, then write the output or the split's partial like the kernel above.
template <bool BF16MMA>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (BF16MMA)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a 16-bit pair (x in the low half) and the rounding residual as another pair.
template <bool BF16MMA>
__device__ __forceinline__ void split_pair(float x, float y, uint32_t& hi, uint32_t& lo) {
    if constexpr (BF16MMA) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
        const float2 hf = __bfloat1622float2(h);
        const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
        hi = *reinterpret_cast<const uint32_t*>(&h);
        lo = *reinterpret_cast<const uint32_t*>(&l);
    } else {
        const __half2 h = __floats2half2_rn(x, y);
        const float2 hf = __half22float2(h);
        const __half2 l = __floats2half2_rn(x - hf.x, y - hf.y);
        hi = *reinterpret_cast<const uint32_t*>(&h);
        lo = *reinterpret_cast<const uint32_t*>(&l);
    }
}

// Coherent = true: streaming loads (ld.global.cs), for a kernel that loads before its pdl_wait (cuda/pdl.cuh,
// rule 1); otherwise the non-coherent path.
template <int N, bool Coherent = false>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t (&w)[N]) {
    auto ld = [](const auto* q) {
        if constexpr (Coherent)
            return __ldcs(q);
        else
            return __ldg(q);
    };
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const uint4 u = ld(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
        }
    } else if constexpr (N == 2) {
        const uint2 u = ld(reinterpret_cast<const uint2*>(p));
        w[0] = u.x, w[1] = u.y;
    } else {
        w[0] = ld(reinterpret_cast<const unsigned int*>(p));
    }
}

// Stored word -> 16-bit pairs for the mma: BF16 as is; FP8 two pairs (cvt e4m3x2 -> f16x2); NVFP4 four pairs
// (nibble n of the word is element n), times the group's fp16 scale.
template <KvDtype KV>
__device__ __forceinline__ void word_to_pairs(uint32_t w, __half2 scale, uint32_t* out) {
    if constexpr (KV == KvDtype::Bf16) {
        out[0] = w;
    } else if constexpr (KV == KvDtype::Fp8) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const __half2_raw r =
                __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>((w >> (16 * h)) & 0xffffu), __NV_E4M3);
            out[h] = static_cast<uint32_t>(r.x) | static_cast<uint32_t>(r.y) << 16;
        }
    } else {
        const __half2 k16 = __float2half2_rn(16384.0f);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const uint32_t pair = w >> (8 * b);
            const uint32_t bits = ((pair & 0x8u) << 12) | ((pair & 0x7u) << 9) | ((pair & 0x80u) << 24) |
                                  ((pair & 0x70u) << 21);
            __half2 h = *reinterpret_cast<const __half2*>(&bits);  // e2m1 * 2^-14, exact
            h = __hmul2(__hmul2(h, k16), scale);                    // e2m1, then e2m1 * scale: exact
            out[b] = *reinterpret_cast<const uint32_t*>(&h);
        }
    }
}

__device__ __forceinline__ __half2 scale_h2(uint32_t code) {
    const __half_raw r = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code & 0xffu), __NV_E4M3);
    return __half2(__half(r), __half(r));
}

// This lane's quarter of q row `qrow` (HD / 4 contiguous dims from `first`) as float, in 16-byte loads; zeros
// when the row is past the group.
template <int HD>
__device__ __forceinline__ void load_q_quarter(const AttnParams& p, int64_t first, bool row_ok,
                                               float (&qv)[HD / 4]) {
    constexpr int KQ = HD / 4;
    if (!row_ok) {
#pragma unroll
        for (int i = 0; i < KQ; ++i) qv[i] = 0.0f;
        return;
    }
    if (p.bf16) {
        const uint4* src = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.q) + first);
#pragma unroll
        for (int c = 0; c < KQ / 8; ++c) {
            const uint4 u = src[c];
            const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                qv[8 * c + 2 * j] = __uint_as_float(w[j] << 16);
                qv[8 * c + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
            }
        }
    } else {
        const float4* src = reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + first);
#pragma unroll
        for (int c = 0; c < KQ / 4; ++c) {
            const float4 f = src[c];
            qv[4 * c] = f.x, qv[4 * c + 1] = f.y, qv[4 * c + 2] = f.z, qv[4 * c + 3] = f.w;
        }
    }
}

// The end of a decode CTA (decode_mma_kernel, decode_pipe_kernel): the 4 warps' running max, sum and
// unnormalized output of each query row (s_m, s_l, s_o, stored by the caller) merged into the output row
// (one split) or the split's partial. Each row's factors are worked out once, by thread r, in the warps'
// order (the arithmetic the per-element loop did before, once per row instead of per element), so the
// per-element loop is 4 shared loads and fmas, 8 dims a thread with 16-byte accesses. v_mul: what the output
// is multiplied by (the value scale, and NVFP4's placement).
template <int HD>
__device__ __forceinline__ void merge_decode_warps(const AttnParams& p, const float (&s_m)[4][8],
                                                   const float (&s_l)[4][8], const float (&s_o)[4][8][HD],
                                                   int q0, int kvh, int split, float v_mul) {
    __shared__ float s_f[4][8], s_out[8];
    const int tid = threadIdx.x;
    __syncthreads();  // s_m, s_l, s_o of every warp
    if (tid < p.group) {
        const int r = tid;
        float mm = -INFINITY;
#pragma unroll
        for (int w = 0; w < 4; ++w) mm = fmaxf(mm, s_m[w][r]);
        float ll = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float f = s_m[w][r] == -INFINITY ? 0.0f : exp2f(s_m[w][r] - mm);  // 0: a warp without keys
            s_f[w][r] = f;
            ll += s_l[w][r] * f;
        }
        s_out[r] = p.n_splits == 1 ? v_mul / ll : v_mul;
        if (p.n_splits > 1) {
            const int64_t prow = static_cast<int64_t>(split) * p.n_tokens * p.n_heads +
                                 static_cast<int64_t>(q0) * p.n_heads + kvh * p.group + r;
            p.part_m[prow] = mm;
            p.part_l[prow] = ll;
        }
    }
    __syncthreads();
    for (int i = tid * 8; i < p.group * HD; i += kThreads * 8) {  // 8 consecutive dims of one row a thread
        const int r = i / HD, d = i % HD;
        float val[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float f = s_f[w][r];
            const float4 a = *reinterpret_cast<const float4*>(&s_o[w][r][d]);
            const float4 b = *reinterpret_cast<const float4*>(&s_o[w][r][d + 4]);
            const float o8[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) val[e] += o8[e] * f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) val[e] *= s_out[r];
        const int64_t hrow = static_cast<int64_t>(q0) * p.n_heads + kvh * p.group + r;
        if (p.n_splits > 1)
            store8(p.part_o + (static_cast<int64_t>(split) * p.n_tokens * p.n_heads + hrow) * HD + d, val);
        else if (p.bf16)
            store8(static_cast<__nv_bfloat16*>(p.out) + hrow * HD + d, val);
        else
            store8(static_cast<float*>(p.out) + hrow * HD + d, val);
    }
}

// Decode: each warp's first tile of cached keys (positions below the new token's) is requested before
// pdl_wait: those rows were written by earlier steps, and the sequence tables are the host's, so only the new
// token's K/V row (the q/k/v preparation just before) and q wait. At the short contexts where decode
// attention is latency-bound the first DRAM round trip then overlaps the kernel before. Loads before the wait
// are coherent (cuda/pdl.cuh, rule 1); a CTA that returns early waits first (rule 2).
template <KvDtype KV, int HD>
__global__ void __launch_bounds__(kThreads, 3) decode_mma_kernel(const AttnParams p) {
    constexpr bool BF = KV == KvDtype::Bf16;
    constexpr int BITS = KV == KvDtype::Bf16 ? 16 : KV == KvDtype::Fp8 ? 8 : 4;
    constexpr int ROW_BYTES = HD * BITS / 8;
    constexpr int KQ = HD / 4;                  // dims of a K row a lane reads
    constexpr int VQ = HD / 8;                  // dims of a V row a lane reads
    constexpr int KW = KQ * BITS / 32;          // their words
    constexpr int VW = VQ * BITS / 32;
    constexpr int PPW = 32 / BITS / 2 > 0 ? 32 / BITS / 2 : 1;  // 16-bit pairs per stored word
    constexpr int KSTEPS = HD / 16;
    constexpr int NT = HD / 8;                  // P.V n-tiles

    __shared__ float s_m[4][8], s_l[4][8];
    __shared__ __align__(16) float s_o[4][8][HD];  // 16-byte reads in merge_decode_warps

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int seq = blockIdx.y;
    const int kvh = static_cast<int>(blockIdx.z) % p.n_kv_heads;
    const int split = static_cast<int>(blockIdx.z) / p.n_kv_heads;
    const int q0 = __ldca(p.q_start + seq);
    if (__ldca(p.q_start + seq + 1) - q0 < 1) {
        pdl_wait();
        return;
    }
    const int pos = __ldca(p.start_pos + seq);
    int lo = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
    int hi = pos + 1;
    lo = max(lo, split * p.keys_per_split);
    hi = min(hi, (split + 1) * p.keys_per_split);
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;
    const bool row_ok = g < p.group;
    const int64_t scale_area = static_cast<int64_t>(p.block_size) * p.n_kv_heads * ROW_BYTES;

    // Raw K/V words of the warp's tile at k0, for keys in [from, until) (others untouched): K of keys k0 + g
    // and k0 + 8 + g (quarter t); V of keys k0 + {2t, 2t+1, 8+2t, 9+2t} (slice g).
    uint32_t kr[2][KW], vr[4][VW];
    uint32_t ksc[2] = {0, 0}, vsc[4] = {0, 0, 0, 0};
    auto load_kv = [&](int k0, int from, int until) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int key = k0 + 8 * j + g;
            if (key >= from && key < until) {
                const KeySlot ks = key_slot(p, key);
                const int64_t base = static_cast<int64_t>(__ldca(table + ks.block)) * p.block_bytes;
                const int64_t row = static_cast<int64_t>(ks.slot) * p.n_kv_heads + kvh;
                load_words<KW, true>(p.k + base + row * ROW_BYTES + t * (KQ * BITS / 8), kr[j]);
                if constexpr (KV == KvDtype::Nvfp4) {
                    const uint8_t* sp = p.k + base + scale_area + row * (HD / 16) + t * (KQ / 16);
                    ksc[j] = KQ / 16 == 2 ? __ldcs(reinterpret_cast<const unsigned short*>(sp))
                                          : __ldcs(reinterpret_cast<const unsigned char*>(sp));
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int key = k0 + (j >> 1) * 8 + 2 * t + (j & 1);
            if (key >= from && key < until) {
                const KeySlot ks = key_slot(p, key);
                const int64_t base = static_cast<int64_t>(__ldca(table + ks.block)) * p.block_bytes;
                const int64_t row = static_cast<int64_t>(ks.slot) * p.n_kv_heads + kvh;
                load_words<VW, true>(p.v + base + row * ROW_BYTES + g * (VQ * BITS / 8), vr[j]);
                if constexpr (KV == KvDtype::Nvfp4)
                    vsc[j] = __ldcs(reinterpret_cast<const unsigned char*>(p.v + base + scale_area +
                                                                           row * (HD / 16) + (g * VQ) / 16));
            }
        }
    };
    auto zero_kv = [&]() {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            ksc[j] = 0;
#pragma unroll
            for (int i = 0; i < KW; ++i) kr[j][i] = 0;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            vsc[j] = 0;
#pragma unroll
            for (int i = 0; i < VW; ++i) vr[j][i] = 0;
        }
    };
    const int first_k0 = lo + 16 * warp;
    zero_kv();
    load_kv(first_k0, lo, min(hi, pos));  // cached keys only: not the new token's row
    pdl_wait();                           // fills the GPU: releases its dependents only at exit

    // Q fragments (row g, this lane's quarter of head_dim), hi and lo parts; rows 8..15 are zero.
    uint32_t qa_hi[KSTEPS][2], qa_lo[KSTEPS][2];
    {
        float qv[KQ];
        load_q_quarter<HD>(p, (static_cast<int64_t>(q0) * p.n_heads + kvh * p.group + g) * HD + t * KQ,
                           row_ok, qv);
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                split_pair<BF>(qv[4 * s + 2 * h], qv[4 * s + 2 * h + 1], qa_hi[s][h], qa_lo[s][h]);
    }

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int k0 = first_k0; k0 < hi; k0 += 64) {
        if (k0 == first_k0) {
            load_kv(k0, max(lo, pos), hi);  // the new token's row, if this tile holds it
        } else {
            zero_kv();
            load_kv(k0, lo, hi);
        }

        // Scores of rows g (hi and lo parts of q) against the 16 keys.
        float sc[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            uint32_t kp[KW * PPW];
#pragma unroll
            for (int i = 0; i < KW; ++i) {
                // NVFP4: word i holds dims 8i..8i+7 of the quarter: group (8i) / 16.
                const __half2 s2 = KV == KvDtype::Nvfp4 ? scale_h2(ksc[j] >> (8 * ((8 * i) / 16))) : __half2();
                word_to_pairs<KV>(kr[j][i], s2, kp + i * PPW);
            }
#pragma unroll
            for (int s = 0; s < KSTEPS; ++s) {
                const uint32_t a[4] = {qa_hi[s][0], qa_lo[s][0], qa_hi[s][1], qa_lo[s][1]};
                mma16816<BF>(sc[j], a, kp[2 * s], kp[2 * s + 1]);
            }
        }
        // Online softmax over this lane's 4 keys of row g (hi part + lo part); the row's 16 keys are spread
        // over the 4 lanes t.
        float sv[4] = {sc[0][0] + sc[0][2], sc[0][1] + sc[0][3], sc[1][0] + sc[1][2], sc[1][1] + sc[1][3]};
        float tmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int key = k0 + (i >> 1) * 8 + 2 * t + (i & 1);
            sv[i] = row_ok && key < hi ? sv[i] * p.qk_scale : -INFINITY;
            tmax = fmaxf(tmax, sv[i]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float m_new = fmaxf(m, tmax);
        const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
        float pr[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) pr[i] = m_new == -INFINITY ? 0.0f : exp2f(sv[i] - m_new);
        m = m_new;
        l = l * alpha + (pr[0] + pr[1]) + (pr[2] + pr[3]);
        uint32_t pa[4];  // rows g: hi parts, rows g + 8: lo parts
        split_pair<BF>(pr[0], pr[1], pa[0], pa[1]);
        split_pair<BF>(pr[2], pr[3], pa[2], pa[3]);

        // V pairs per key, then B fragments pairing keys (2t, 2t+1) and (8+2t, 9+2t) at each output dim.
        uint32_t vp[4][VW * PPW];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int i = 0; i < VW; ++i) word_to_pairs<KV>(vr[j][i], KV == KvDtype::Nvfp4 ? scale_h2(vsc[j]) : __half2(),
                                                           vp[j] + i * PPW);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            o[n][0] *= alpha, o[n][1] *= alpha, o[n][2] *= alpha, o[n][3] *= alpha;
            const int w = n >> 1;
            const uint32_t sel = (n & 1) ? 0x7632u : 0x5410u;  // high or low halves of the two keys' pairs
            const uint32_t b0 = __byte_perm(vp[0][w], vp[1][w], sel);
            const uint32_t b1 = __byte_perm(vp[2][w], vp[3][w], sel);
            mma16816<BF>(o[n], pa, b0, b1);
        }
    }

    // Merge the 4 warps: row g's sum over its lanes, then max / rescale across warps.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t == 0) {
        s_m[warp][g] = m;
        s_l[warp][g] = l;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        s_o[warp][g][(2 * t) * VQ + n] = o[n][0] + o[n][2];
        s_o[warp][g][(2 * t + 1) * VQ + n] = o[n][1] + o[n][3];
    }
    merge_decode_warps<HD>(p, s_m, s_l, s_o, q0, kvh, split, p.v_scale);
}

template <KvDtype KV>
void launch_decode_mma(int64_t hd, const AttnParams& p, dim3 grid, cudaStream_t stream) {
    if (hd == 64)
        launch_pdl(decode_mma_kernel<KV, 64>, dim3(grid), dim3(kThreads), 0, stream, p);
    else
        launch_pdl(decode_mma_kernel<KV, 128>, dim3(grid), dim3(kThreads), 0, stream, p);
}

// ---- Decode on the tensor cores, pipelined (FP8 / NVFP4 cache; DecodeKernel::Pipelined) ----
//
// Same CTA, fragments, hi + lo q/P parts and warp merge as decode_mma_kernel, but the loop is software
// pipelined: while a warp computes step i it already has step i + 1's raw K/V (and scales) in flight and
// step i + 2's block-table entries loaded, so each warp keeps one step of bytes outstanding at all times
// and the table -> row dependency is off the critical path (docs/perf.md: v2 waited for both each step).
// A warp step is 16 * NSUB keys (NVFP4: NSUB = 2, so a step moves ~4.6 KB, the bytes of a BF16 16-key
// step's K); one online-softmax update a step, and the accumulator rescale is skipped when no row's max
// moved (the common case deep in a long context). NVFP4 unpacking: codes (e, e + 4) of a word to an fp16
// pair by shift + mask (e2m1 * 2^-14), times the group scale * 2^7 in one HMUL2 (the product e2m1 * s *
// 2^-7 is exact in fp16: <= 6 significant bits, a multiple of 2^-17, at most 21); the 2^7 goes into the
// score factor and the output. The pair order permutes head_dim inside each 8-dim word: free for Q.K (q is
// loaded in the same order), undone when the output is stored.
// Resources per CTA (ptxas -v, sm_90a, CUDA 13.0, -O3): 128 threads, 16,800 B (HD 128) / 8,608 B (HD 64)
// static shared memory, 1 barrier; registers (HD 128 / HD 64; tests/tune/ptxas_resources.txt has every
// architecture's):
//   NVFP4 Pipelined   (NSUB 2, __launch_bounds__(128, 2)): 254 / 168 -> 2 / 3 CTAs per SM
//   NVFP4 Pipelined16 (NSUB 1, (128, 3)):                  168 / 126 -> 3 / 4 CTAs per SM
//   FP8   Pipelined   (NSUB 1, (128, 2)):                  198 / 124 -> 2 / 4 CTAs per SM
//   (FP8 at (128, 3) spilled 84 B at HD 128.) decode_mma_kernel (128, 3), for comparison: BF16 168 / 120,
//   FP8 158 / 113, NVFP4 161 / 125.
__device__ __forceinline__ void e2m1x8_to_f16_pairs(uint32_t w, __half2 scale, uint32_t* out) {
    constexpr uint32_t kMag = 0x0e000e00u, kSign = 0x80008000u;
    const uint32_t b[4] = {((w << 9) & kMag) | ((w << 12) & kSign), ((w << 5) & kMag) | ((w << 8) & kSign),
                           ((w << 1) & kMag) | ((w << 4) & kSign), ((w >> 3) & kMag) | (w & kSign)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __half2 h = __hmul2(*reinterpret_cast<const __half2*>(&b[i]), scale);
        out[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
}

// E4M3 code (low byte) times 2^7 as an fp16 pair (exact: <= 448 * 128 = 57344).
__device__ __forceinline__ __half2 scale_x128_h2(uint32_t code) {
    const __half_raw r = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code & 0xffu), __NV_E4M3);
    const __half h = __hmul(__half(r), __float2half_rn(128.0f));
    return __half2(h, h);
}

// Offset inside a lane's run of dims of element `half` of 16-bit pair P: natural order (2P, 2P + 1), or
// NVFP4's (e, e + 4) pairs of each 8-dim word.
template <bool PERM>
__device__ __forceinline__ constexpr int pair_dim(int P, int half) {
    return PERM ? 8 * (P >> 2) + (P & 3) + 4 * half : 2 * P + half;
}

template <KvDtype KV, int HD, int NSUB, int MIN_CTAS>
__global__ void __launch_bounds__(kThreads, MIN_CTAS) decode_pipe_kernel(const AttnParams p) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    static_assert(KV != KvDtype::Bf16, "BF16 runs decode_mma_kernel");
    constexpr bool PERM = KV == KvDtype::Nvfp4;
    constexpr int BITS = KV == KvDtype::Fp8 ? 8 : 4;
    constexpr int ROW_BYTES = HD * BITS / 8;
    constexpr int KQ = HD / 4;          // dims of a K row a lane reads
    constexpr int VQ = HD / 8;          // dims of a V row a lane reads
    constexpr int KW = KQ * BITS / 32;  // their words
    constexpr int VW = VQ * BITS / 32;
    constexpr int PPW = 16 / BITS;      // 16-bit pairs per stored word
    constexpr int KSTEPS = HD / 16;
    constexpr int NT = HD / 8;
    constexpr int STEP = 16 * NSUB;     // keys of a warp step
    constexpr int STRIDE = 4 * STEP;    // keys of a CTA step
    constexpr float kUnplace = PERM ? 128.0f : 1.0f;
    static_assert(STEP <= 32 && KW * PPW == 2 * KSTEPS && VW * PPW * 2 == NT, "fragment shapes");

    __shared__ float s_m[4][8], s_l[4][8];
    __shared__ __align__(16) float s_o[4][8][HD];  // 16-byte reads in merge_decode_warps

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int seq = blockIdx.y;
    const int kvh = static_cast<int>(blockIdx.z) % p.n_kv_heads;
    const int split = static_cast<int>(blockIdx.z) / p.n_kv_heads;
    const int q0 = p.q_start[seq];
    if (p.q_start[seq + 1] - q0 < 1) return;
    const int pos = p.start_pos[seq];
    int lo = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
    int hi = pos + 1;
    lo = max(lo, split * p.keys_per_split);
    hi = min(hi, (split + 1) * p.keys_per_split);
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;
    const bool row_ok = g < p.group;
    const float qk_scale = p.qk_scale * kUnplace;

    // Q fragments (row g; pair P = 2s + h of this lane's quarter of head_dim), hi and lo parts.
    uint32_t qa_hi[KSTEPS][2], qa_lo[KSTEPS][2];
    {
        float qv[KQ];
        load_q_quarter<HD>(p, (static_cast<int64_t>(q0) * p.n_heads + kvh * p.group + g) * HD + t * KQ,
                           row_ok, qv);
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                split_pair<false>(qv[pair_dim<PERM>(2 * s + h, 0)], qv[pair_dim<PERM>(2 * s + h, 1)],
                                  qa_hi[s][h], qa_lo[s][h]);
    }

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int64_t scale_area = static_cast<int64_t>(p.block_size) * p.n_kv_heads * ROW_BYTES;

    // Raw bytes of one warp step: K of keys kb + 16u + 8j + g (quarter t), V of keys kb + 16u + 8(j >> 1) +
    // 2t + (j & 1) (slice g), and their NVFP4 scale bytes. Zeros for keys >= hi.
    struct Raw {
        uint32_t k[NSUB][2][KW], v[NSUB][4][VW], ks[NSUB][2], vs[NSUB][4];
    };
    // Lane L: the physical block of key kb + L % STEP and the key's row (slot * n_kv_heads + kvh) in it; the
    // lanes that read a key's bytes take both by shuffle (one division a lane a step, none a key).
    struct Where {
        int block, row;
    };
    auto load_table = [&](int kb) -> Where {
        const int key = kb + lane % STEP;
        const int logical = key / p.block_size;
        const int row = (key - logical * p.block_size) * p.n_kv_heads + kvh;
        return {key < hi ? __ldg(table + logical) : 0, row};
    };
    auto load_raw = [&](Raw& r, int kb, const Where& where) {
#pragma unroll
        for (int u = 0; u < NSUB; ++u) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int kk = 16 * u + 8 * j + g, key = kb + kk;
                const int block = __shfl_sync(0xffffffffu, where.block, kk);
                const int64_t row = __shfl_sync(0xffffffffu, where.row, kk);
#pragma unroll
                for (int i = 0; i < KW; ++i) r.k[u][j][i] = 0;
                r.ks[u][j] = 0;
                if (key < hi) {
                    const int64_t base = static_cast<int64_t>(block) * p.block_bytes;
                    load_words<KW>(p.k + base + row * ROW_BYTES + t * (KQ * BITS / 8), r.k[u][j]);
                    if constexpr (PERM) {
                        const uint8_t* sp = p.k + base + scale_area + row * (HD / 16) + t * (KQ / 16);
                        r.ks[u][j] = KQ / 16 == 2 ? __ldg(reinterpret_cast<const unsigned short*>(sp)) : __ldg(sp);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int kk = 16 * u + (j >> 1) * 8 + 2 * t + (j & 1), key = kb + kk;
                const int block = __shfl_sync(0xffffffffu, where.block, kk);
                const int64_t row = __shfl_sync(0xffffffffu, where.row, kk);
#pragma unroll
                for (int i = 0; i < VW; ++i) r.v[u][j][i] = 0;
                r.vs[u][j] = 0;
                if (key < hi) {
                    const int64_t base = static_cast<int64_t>(block) * p.block_bytes;
                    load_words<VW>(p.v + base + row * ROW_BYTES + g * (VQ * BITS / 8), r.v[u][j]);
                    if constexpr (PERM) r.vs[u][j] = __ldg(p.v + base + scale_area + row * (HD / 16) + (g * VQ) / 16);
                }
            }
        }
    };
    auto to_pairs = [&](uint32_t w, uint32_t scale_byte, uint32_t* out) {
        if constexpr (PERM)
            e2m1x8_to_f16_pairs(w, scale_x128_h2(scale_byte), out);
        else
            word_to_pairs<KvDtype::Fp8>(w, __half2(), out);
    };
    auto compute = [&](const Raw& r, int kb) {
        // Scores of row g against this lane's 4 keys of each sub-step.
        float sv[NSUB][4];
        float tmax = -INFINITY;
#pragma unroll
        for (int u = 0; u < NSUB; ++u) {
            float sc[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
                uint32_t kp[KW * PPW];
#pragma unroll
                for (int i = 0; i < KW; ++i) to_pairs(r.k[u][j][i], r.ks[u][j] >> (8 * (i / 2)), kp + i * PPW);
#pragma unroll
                for (int s = 0; s < KSTEPS; ++s) {
                    const uint32_t a[4] = {qa_hi[s][0], qa_lo[s][0], qa_hi[s][1], qa_lo[s][1]};
                    mma16816<false>(sc[j], a, kp[2 * s], kp[2 * s + 1]);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = kb + 16 * u + (i >> 1) * 8 + 2 * t + (i & 1);
                const float x = sc[i >> 1][i & 1] + sc[i >> 1][(i & 1) + 2];
                sv[u][i] = row_ok && key < hi ? x * qk_scale : -INFINITY;
                tmax = fmaxf(tmax, sv[u][i]);
            }
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float m_new = fmaxf(m, tmax);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing attended yet
        // 1 for a row with nothing attended (rows past the group: never a rescale), 0 on its first keys.
        const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
        m = m_new;
        float psum = 0.0f;
#pragma unroll
        for (int u = 0; u < NSUB; ++u)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                sv[u][i] = exp2f(sv[u][i] - m_use);
                psum += sv[u][i];
            }
        l = l * alpha + psum;
        if (__any_sync(0xffffffffu, alpha != 1.0f)) {
#pragma unroll
            for (int n = 0; n < NT; ++n) o[n][0] *= alpha, o[n][1] *= alpha, o[n][2] *= alpha, o[n][3] *= alpha;
        }
        // O += P V, one 16-key sub-step at a time.
#pragma unroll
        for (int u = 0; u < NSUB; ++u) {
            uint32_t pa[4];  // rows g: hi parts, rows g + 8: lo parts
            split_pair<false>(sv[u][0], sv[u][1], pa[0], pa[1]);
            split_pair<false>(sv[u][2], sv[u][3], pa[2], pa[3]);
            uint32_t vp[4][VW * PPW];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int i = 0; i < VW; ++i) to_pairs(r.v[u][j][i], r.vs[u][j], vp[j] + i * PPW);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int w = n >> 1;
                const uint32_t sel = (n & 1) ? 0x7632u : 0x5410u;
                const uint32_t b0 = __byte_perm(vp[0][w], vp[1][w], sel);
                const uint32_t b1 = __byte_perm(vp[2][w], vp[3][w], sel);
                mma16816<false>(o[n], pa, b0, b1);
            }
        }
    };

    if (lo < hi) {  // uniform over the CTA
        int kb = lo + STEP * warp;
        Where where = load_table(kb);
        Raw cur;
        load_raw(cur, kb, where);
        where = load_table(kb + STRIDE);
        for (; kb < hi; kb += STRIDE) {  // uniform over the warp
            Raw nxt;
            load_raw(nxt, kb + STRIDE, where);  // zeros (nothing read) past hi
            where = load_table(kb + 2 * STRIDE);
            compute(cur, kb);
            cur = nxt;
        }
    }

    // Merge the 4 warps as decode_mma_kernel does.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t == 0) {
        s_m[warp][g] = m;
        s_l[warp][g] = l;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int d = pair_dim<PERM>(n >> 1, n & 1);
        s_o[warp][g][(2 * t) * VQ + d] = o[n][0] + o[n][2];
        s_o[warp][g][(2 * t + 1) * VQ + d] = o[n][1] + o[n][3];
    }
    merge_decode_warps<HD>(p, s_m, s_l, s_o, q0, kvh, split, p.v_scale * kUnplace);
}

// Pipelined: NVFP4 NSUB 2 (32-key warp steps), FP8 NSUB 1 (its 16-key step already moves 4 KB), both at
// 2 CTAs per SM. Pipelined16 (NVFP4 only; FP8 takes Pipelined): 16-key steps at 3 CTAs per SM, more warps
// with half the bytes each in flight, kept to measure which hides the latency better.
template <KvDtype KV>
void launch_decode_pipe(int64_t hd, bool narrow, const AttnParams& p, dim3 grid, cudaStream_t stream) {
    if constexpr (KV == KvDtype::Nvfp4) {
        if (narrow) {
            if (hd == 64)
                launch_pdl(decode_pipe_kernel<KV, 64, 1, 3>, dim3(grid), dim3(kThreads), 0, stream, p);
            else
                launch_pdl(decode_pipe_kernel<KV, 128, 1, 3>, dim3(grid), dim3(kThreads), 0, stream, p);
            return;
        }
    }
    constexpr int NSUB = KV == KvDtype::Nvfp4 ? 2 : 1;
    if (hd == 64)
        launch_pdl(decode_pipe_kernel<KV, 64, NSUB, 2>, dim3(grid), dim3(kThreads), 0, stream, p);
    else
        launch_pdl(decode_pipe_kernel<KV, 128, NSUB, 2>, dim3(grid), dim3(kThreads), 0, stream, p);
}

// ---- Prefill on the tensor cores (flash-attention-2 style; BF16 q) ----
//
// CTA: 8 warps, one (sequence, KV head, tile of kPfRows = 128 rows, key split); a row is (query token, query
// head of the KV head's group), token-major, so each K/V tile is read once for the whole group and 128 /
// group tokens share a CTA (rows past tokens x group are padding, never stored). Warp w owns rows 16w ..
// 16w + 15 for the whole key range: S = Q K^T and O += P V with mma.sync m16n8k16, fp32 accumulation, online
// softmax in fp32 (base 2) on the accumulators (a row's 64 keys of a tile live on the 4 lanes of a quad).
// Keys go in tiles of kPfKeys = 64, aligned to multiples of 64; keys outside the CTA's range (causal end,
// sliding window start, split bounds) are loaded as zeros and masked only in tiles that straddle a bound.
// K/V tiles are 16-bit [64][HD] in shared memory, 16-byte chunks XOR-swizzled by row % 8 so ldmatrix (K) and
// ldmatrix.trans (V) are free of bank conflicts; two stages, one __syncthreads a tile:
//   BF16 cache: cp.async of tile t+1 into the other stage while tile t is computed; BF16 mma (q as is, P
//     rounded to BF16).
//   FP8 / NVFP4: the raw bytes of tile t+1 are loaded into registers one tile ahead and dequantized into
//     the other stage during tile t (every element once per CTA, between the two mma phases so the ALU
//     work overlaps the tensor cores); fp16 mma: e4m3 and e2m1 * e4m3-scale are exact in fp16, q is
//     converted BF16 -> fp16 (exact for 2^-14 <= |q| < 65504), P rounded to fp16. The layer scales go into
//     the score factor and the output, once. NVFP4 words are unpacked as pairs (n_j, n_j+4) of nibbles (no
//     nibble spreading), so each 8-dim chunk of K, V and Q is stored in the order 0,4,1,5,2,6,3,7: the
//     Q.K sum is order-free, the output undoes it when stored.
// Q is staged through the second stage's memory (ldmatrix into registers once) before the first tile lands
// there.
// Resources per block (ptxas -v, sm_90a, CUDA 13.0, -O3): 256 threads, dynamic shared memory
// prefill_smem_bytes<HD>() = 64 KiB (HD 128) / 32 KiB (HD 64), no static shared memory, 1 barrier, no
// spills; registers BF16 / FP8 / NVFP4: 222 / 252 / 248 (HD 128), 174 / 190 / 194 (HD 64). So one CTA
// (8 warps) per SM, register-bound.
constexpr int kPfWarps = 8;
constexpr int kPfThreads = 32 * kPfWarps;
constexpr int kPfRows = 16 * kPfWarps;
constexpr int kPfKeys = 64;
// A batch takes the prefill kernel when some sequence has at least this many rows (tokens x group): one
// m16 row block. Fewer rows (decode, a few speculative tokens with a small group) stay on the decode /
// CUDA-core kernels, where a 128-row tile would be mostly padding.
constexpr int64_t kPfMinRows = 16;

template <int HD>
constexpr size_t prefill_smem_bytes() {
    return 2 * 2 * static_cast<size_t>(kPfKeys) * HD * 2;  // 2 stages x (K, V) x [64][HD] 16-bit
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `ch` of row `row` in a [rows][HD] 16-bit tile.
template <int HD>
__device__ __forceinline__ uint32_t swizzled(int row, int ch) {
    return static_cast<uint32_t>(row * (HD * 2) + ((ch ^ (row & 7)) << 4));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t (&r)[2]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// 16 bytes global -> shared; zeros (nothing read) when !valid.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// 2^x in one MUFU op (exp2f adds range fix-ups for results below 2^-126, which only P could reach: it
// flushes them to 0, an error of < 2^-126 in units of the row max).
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

template <bool BF16MMA>
__device__ __forceinline__ uint32_t pack_pair(float x, float y) {  // x in the low half
    if constexpr (BF16MMA) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<const uint32_t*>(&h);
    } else {
        const __half2 h = __floats2half2_rn(x, y);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
}

// 8 BF16 q values (one 16-byte chunk) -> 8 fp16 values, in the order 0,4,1,5,2,6,3,7 when PERM.
template <bool PERM>
__device__ __forceinline__ uint4 q_chunk_to_f16(const uint4& raw) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    float e[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        e[2 * j] = __uint_as_float(w[j] << 16);
        e[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
    uint32_t h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = PERM ? pack_pair<false>(e[j], e[j + 4]) : pack_pair<false>(e[2 * j], e[2 * j + 1]);
    return make_uint4(h[0], h[1], h[2], h[3]);
}

// Dequantizes raw chunk `c` (16 bytes) of key row `kk` into the fp16 tile (layer scale not applied).
// FP8: 16 elements, dims 16c .. 16c + 15 -> 16-bit chunks 2c, 2c + 1. NVFP4: 32 elements, dims 32c .. 32c + 31
// -> chunks 4c .. 4c + 3, word i -> chunk 4c + i in the order 0,4,1,5,2,6,3,7; `scales` holds the two group
// scales (low byte: dims 32c .. 32c + 15).
template <KvDtype KV, int HD>
__device__ __forceinline__ void dequant_to_tile(const uint4& raw, uint32_t scales, uint8_t* tile, int kk, int c) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (KV == KvDtype::Fp8) {
        uint32_t h[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                    static_cast<__nv_fp8x2_storage_t>((w[j] >> (16 * half)) & 0xffffu), __NV_E4M3);
                h[2 * j + half] = static_cast<uint32_t>(r.x) | static_cast<uint32_t>(r.y) << 16;
            }
        }
        *reinterpret_cast<uint4*>(tile + swizzled<HD>(kk, 2 * c)) = make_uint4(h[0], h[1], h[2], h[3]);
        *reinterpret_cast<uint4*>(tile + swizzled<HD>(kk, 2 * c + 1)) = make_uint4(h[4], h[5], h[6], h[7]);
    } else {
        // Nibbles j and j + 4 of a word sit at bits 4j and 16 + 4j of (word >> 4j): magnitude to fp16 bits
        // 9..11 and sign to bit 15 of each half gives e2m1 * 2^-14 exactly (code 1 is the subnormal 2^-15),
        // then * 2^14 and * the group scale, both exact in fp16 (as the decode kernel does).
        const __half2 k16 = __float2half2_rn(16384.0f);
        const __half2 s_lo = scale_h2(scales), s_hi = scale_h2(scales >> 8);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint32_t h[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t s = w[i] >> (4 * j);
                const uint32_t bits = ((s << 9) & 0x0e000e00u) | ((s << 12) & 0x80008000u);
                __half2 v = *reinterpret_cast<const __half2*>(&bits);
                v = __hmul2(__hmul2(v, k16), i < 2 ? s_lo : s_hi);
                h[j] = *reinterpret_cast<const uint32_t*>(&v);
            }
            *reinterpret_cast<uint4*>(tile + swizzled<HD>(kk, 4 * c + i)) = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

// ---- Pieces both tensor-core prefill kernels share ----

// One prefill CTA's work: (sequence, KV head, tile of query rows, key split) from the grid, the tile's rows
// (query tokens x the group) and the key range [lo, hi) they attend, walked in kPfKeys tiles from k_first.
// Keys in [full_lo, full_hi) are attended by every row of the tile: tiles inside need no mask.
struct PrefillCta {
    int seq, kvh, split, q0, tile_q0, nrows, pos_first, lo, hi, k_first, n_tiles, full_lo, full_hi;
    const int32_t* table;
};
// False when the CTA's query tile lies past its sequence's tokens (nothing to do).
__device__ __forceinline__ bool prefill_cta(const AttnParams& p, PrefillCta& c) {
    c.seq = blockIdx.y;
    c.kvh = static_cast<int>(blockIdx.z) % p.n_kv_heads;
    c.split = static_cast<int>(blockIdx.z) / p.n_kv_heads;
    c.q0 = p.q_start[c.seq];
    const int n_q = p.q_start[c.seq + 1] - c.q0;
    c.tile_q0 = static_cast<int>(blockIdx.x) * p.q_tile;
    if (c.tile_q0 >= n_q) return false;
    const int tile_nq = min(p.q_tile, n_q - c.tile_q0);
    c.nrows = tile_nq * p.group;
    c.pos_first = p.start_pos[c.seq] + c.tile_q0;  // position of the tile's first query token
    const int pos_last = c.pos_first + tile_nq - 1;
    const int window = p.sliding_window;
    c.lo = max(window > 0 ? max(0, c.pos_first - window + 1) : 0, c.split * p.keys_per_split);
    c.hi = min(pos_last + 1, (c.split + 1) * p.keys_per_split);  // exclusive
    c.k_first = c.lo < c.hi ? c.lo / kPfKeys * kPfKeys : 0;
    c.n_tiles = c.lo < c.hi ? (c.hi - c.k_first + kPfKeys - 1) / kPfKeys : 0;
    c.full_lo = max(c.lo, window > 0 ? pos_last - window + 1 : 0);
    c.full_hi = min(c.hi, c.pos_first + 1);
    c.table = p.block_tables + static_cast<int64_t>(c.seq) * p.max_blocks;
    return true;
}
// The keys row `row` of the tile attends: [lo, hi).
__device__ __forceinline__ void prefill_row_keys(const AttnParams& p, const PrefillCta& c, int row, int& lo, int& hi) {
    const int qpos = c.pos_first + row / p.group;
    lo = max(c.lo, p.sliding_window > 0 ? qpos - p.sliding_window + 1 : 0);
    hi = min(c.hi, qpos + 1);
}
// The tile's q rows into a [ROWS][HD] 16-bit shared tile (swizzled; zeros past nrows): BF16 as stored for the
// BF16 cache, fp16 for FP8 / NVFP4 (NVFP4: each 8-dim chunk in the order 0,4,1,5,2,6,3,7).
template <int HD, int ROWS, int THREADS, bool BF, bool PERM>
__device__ __forceinline__ void stage_q_rows(const AttnParams& p, const PrefillCta& c, uint8_t* dst) {
    constexpr int CH = HD / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += THREADS) {
        const int r = i / CH, ch = i % CH;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < c.nrows) {
            const int64_t token = c.q0 + c.tile_q0 + r / p.group;
            const int64_t src = (token * p.n_heads + c.kvh * p.group + r % p.group) * HD + ch * 8;
            val = __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.q) + src));
            if constexpr (!BF) val = q_chunk_to_f16<PERM>(val);
        }
        *reinterpret_cast<uint4*>(dst + swizzled<HD>(r, ch)) = val;
    }
}
// Scores of keys outside each row's range to -inf, in a tile at k0 that straddles a bound: s[j] holds rows
// g (e = 0, 1) and g + 8 (2, 3) of a 16-row block, keys k0 + 8j + 2t (+1); row_lo/hi: those two rows' ranges.
template <int KT>
__device__ __forceinline__ void mask_scores(float (&s)[KT][4], int k0, int t, const int (&row_lo)[2],
                                            const int (&row_hi)[2]) {
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = k0 + 8 * j + 2 * t + (e & 1);
            if (key < row_lo[e >> 1] || key >= row_hi[e >> 1]) s[j][e] = -INFINITY;
        }
}
// Online softmax of one 16-row block's scores for a key tile (base 2, scores times qk_scale > 0 so the max
// commutes with the scaling): s becomes P, m and l the rows' running max and sum, alpha their rescale factor.
template <int KT>
__device__ __forceinline__ void online_softmax(float (&s)[KT][4], float (&m)[2], float (&l)[2], float qk_scale,
                                               float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < KT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[i], mx * qk_scale);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // rows with nothing attended yet
        alpha[i] = exp2_ftz(m[i] - m_use);
        m[i] = m_new;
        float rs = 0.0f;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
#pragma unroll
            for (int e = 2 * i; e < 2 * i + 2; ++e) {
                s[j][e] = exp2_ftz(fmaf(s[j][e], qk_scale, -m_use));
                rs += s[j][e];
            }
        }
        l[i] = l[i] * alpha[i] + rs;
    }
}
// Row `row` of the tile (lane t's half i of a 16-row block: o[n][2i], o[n][2i + 1]) to the output, or to this
// split's partial with the row's max and sum (l: its quad-reduced sum). v_scale: the output's factor.
template <int HD, bool PERM>
__device__ __forceinline__ void store_prefill_row(const AttnParams& p, const PrefillCta& c, int row, int i, int t,
                                                  const float (&o)[HD / 8][4], float m, float l, float v_scale) {
    constexpr int NT = HD / 8;
    const int64_t token = c.q0 + c.tile_q0 + row / p.group;
    const int64_t hrow = token * p.n_heads + c.kvh * p.group + row % p.group;
    // Dims of o[n][2i], o[n][2i + 1]: 8n + 2t, + 1, or 8n + t, + 4 in the NVFP4 order.
    const int d0 = PERM ? t : 2 * t, d1 = PERM ? t + 4 : 2 * t + 1;
    if (p.n_splits == 1) {
        const float inv = l > 0.0f ? v_scale / l : 0.0f;
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + hrow * HD;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            if constexpr (PERM) {
                out[8 * n + d0] = __float2bfloat16_rn(o[n][2 * i] * inv);
                out[8 * n + d1] = __float2bfloat16_rn(o[n][2 * i + 1] * inv);
            } else {
                *reinterpret_cast<__nv_bfloat162*>(out + 8 * n + d0) =
                    __floats2bfloat162_rn(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
            }
        }
    } else {
        const int64_t prow = static_cast<int64_t>(c.split) * p.n_tokens * p.n_heads + hrow;
        float* po = p.part_o + prow * HD;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            po[8 * n + d0] = o[n][2 * i] * v_scale;
            po[8 * n + d1] = o[n][2 * i + 1] * v_scale;
        }
        if (t == 0) {
            p.part_m[prow] = m;
            p.part_l[prow] = l;
        }
    }
}

template <KvDtype KV, int HD>
__global__ void __launch_bounds__(kPfThreads, 1) prefill_mma_kernel(const AttnParams p) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    constexpr bool BF = KV == KvDtype::Bf16;
    constexpr bool PERM = KV == KvDtype::Nvfp4;
    constexpr int CH = HD / 8;                  // 16-byte chunks of a 16-bit row
    constexpr int KSTEPS = HD / 16;             // k-steps of Q K^T
    constexpr int NT = HD / 8;                  // n-tiles of the output
    constexpr int KT = kPfKeys / 8;             // n-tiles of S
    constexpr int TILE = kPfKeys * HD * 2;      // bytes of the K (or V) tile of a stage
    constexpr int ROW_BYTES = KV == KvDtype::Bf16 ? HD * 2 : KV == KvDtype::Fp8 ? HD : HD / 2;
    constexpr int CPR = ROW_BYTES / 16;         // raw 16-byte chunks of a stored row
    constexpr int NCH = kPfKeys * CPR;          // raw chunks of a K (or V) tile
    constexpr int ITER = (NCH + kPfThreads - 1) / kPfThreads;
    static_assert(kPfRows * HD * 2 <= 2 * TILE, "Q is staged in one stage");
    static_assert(KSTEPS % 2 == 0 && NT % 2 == 0, "x4 ldmatrix pairs");

    extern __shared__ __align__(16) uint8_t pf_smem[];  // [2 stages][K, V][kPfKeys][HD] 16-bit
    uint8_t* const stage0 = pf_smem;
    uint8_t* const stage1 = pf_smem + 2 * TILE;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    PrefillCta c;
    if (!prefill_cta(p, c)) return;
    const int lo = c.lo, hi = c.hi, k_first = c.k_first, n_tiles = c.n_tiles, kvh = c.kvh;
    const int32_t* table = c.table;

    // This lane's rows (g and g + 8 of the warp's 16): their key bounds.
    int row_lo[2], row_hi[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) prefill_row_keys(p, c, 16 * warp + g + 8 * i, row_lo[i], row_hi[i]);

    // Raw K/V of one tile in registers (FP8 / NVFP4): chunk tid + 256 it of each; zeros outside [lo, hi).
    uint4 rk[ITER], rv[ITER];
    uint32_t sk[ITER], sv[ITER];
    auto load_raw = [&](int k0) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int ch = tid + it * kPfThreads;
            const int key = k0 + ch / CPR;
            rk[it] = rv[it] = make_uint4(0, 0, 0, 0);
            sk[it] = sv[it] = 0;
            if (ch < NCH && key >= lo && key < hi) {
                const int64_t base = static_cast<int64_t>(table[key / p.block_size]) * p.block_bytes;
                const int64_t row = static_cast<int64_t>(key % p.block_size) * p.n_kv_heads + kvh;
                const int64_t off = base + row * ROW_BYTES + (ch % CPR) * 16;
                rk[it] = __ldg(reinterpret_cast<const uint4*>(p.k + off));
                rv[it] = __ldg(reinterpret_cast<const uint4*>(p.v + off));
                if constexpr (KV == KvDtype::Nvfp4) {
                    const int64_t soff = base + static_cast<int64_t>(p.block_size) * p.n_kv_heads * ROW_BYTES +
                                         row * (HD / 16) + (ch % CPR) * 2;
                    sk[it] = __ldg(reinterpret_cast<const unsigned short*>(p.k + soff));
                    sv[it] = __ldg(reinterpret_cast<const unsigned short*>(p.v + soff));
                }
            }
        }
    };
    auto dequant_raw = [&](uint8_t* stage) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int ch = tid + it * kPfThreads;
            if (ch < NCH) {
                dequant_to_tile<KV, HD>(rk[it], sk[it], stage, ch / CPR, ch % CPR);
                dequant_to_tile<KV, HD>(rv[it], sv[it], stage + TILE, ch / CPR, ch % CPR);
            }
        }
    };
    // BF16 K/V of one tile straight into a stage.
    auto load_bf16 = [&](int k0, uint8_t* stage) {
#pragma unroll
        for (int i = tid; i < kPfKeys * CH; i += kPfThreads) {
            const int kk = i / CH, ch = i % CH, key = k0 + kk;
            const bool ok = key >= lo && key < hi;
            int64_t off = 0;
            if (ok) {
                const int64_t row = static_cast<int64_t>(key % p.block_size) * p.n_kv_heads + kvh;
                off = static_cast<int64_t>(table[key / p.block_size]) * p.block_bytes + row * (HD * 2) + ch * 16;
            }
            cp_async16(smem_addr(stage + swizzled<HD>(kk, ch)), p.k + off, ok);
            cp_async16(smem_addr(stage + TILE + swizzled<HD>(kk, ch)), p.v + off, ok);
        }
        cp_async_commit();
    };

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    if (n_tiles > 0) {  // uniform over the CTA
        // Q rows into stage 1 (zeros past nrows), the first tile into stage 0.
        stage_q_rows<HD, kPfRows, kPfThreads, BF, PERM>(p, c, stage1);
        if constexpr (BF) {
            load_bf16(k_first, stage0);
            cp_async_wait_all();
        } else {
            load_raw(k_first);
            dequant_raw(stage0);
        }
        __syncthreads();
        uint32_t qa[KSTEPS][4];
        {
            const int row = 16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
            for (int s = 0; s < KSTEPS; ++s) ldsm_x4(smem_addr(stage1 + swizzled<HD>(row, 2 * s + (lane >> 4))), qa[s]);
        }
        __syncthreads();  // stage 1 is free for tile 1
        if constexpr (!BF) {
            if (n_tiles > 1) load_raw(k_first + kPfKeys);
        }

        for (int tt = 0; tt < n_tiles; ++tt) {
            const int k0 = k_first + tt * kPfKeys;
            uint8_t* const cur = (tt & 1) ? stage1 : stage0;
            uint8_t* const nxt = (tt & 1) ? stage0 : stage1;
            if constexpr (BF) {
                if (tt + 1 < n_tiles) load_bf16(k0 + kPfKeys, nxt);
            }

            // S = Q K^T: lane (g, t) holds rows g (s[j][0..1]) and g + 8 (s[j][2..3]), keys 8j + 2t, + 1.
            float s[KT][4];
#pragma unroll
            for (int j = 0; j < KT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            const uint32_t kbase = smem_addr(cur);
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ks += 2) {
#pragma unroll
                for (int j = 0; j < KT; ++j) {
                    uint32_t kb[4];  // keys 8j .. 8j + 7, chunks 2ks .. 2ks + 3 (k-steps ks and ks + 1)
                    ldsm_x4(kbase + swizzled<HD>(8 * j + (lane & 7), 2 * ks + (lane >> 3)), kb);
                    mma16816<BF>(s[j], qa[ks], kb[0], kb[1]);
                    mma16816<BF>(s[j], qa[ks + 1], kb[2], kb[3]);
                }
            }

            // The next tile's raw bytes -> the other stage (read by nobody since the last barrier), then the
            // raw loads of the tile after it.
            if constexpr (!BF) {
                if (tt + 1 < n_tiles) {
                    dequant_raw(nxt);
                    if (tt + 2 < n_tiles) load_raw(k0 + 2 * kPfKeys);
                }
            }

            if (k0 < c.full_lo || k0 + kPfKeys > c.full_hi) mask_scores(s, k0, t, row_lo, row_hi);
            float alpha[2];
            online_softmax(s, m, l, p.qk_scale, alpha);
            // Once the row maxima settle (most tiles of a long context) alpha is 1 for the whole warp: skip
            // the rescale of the accumulators (exact either way).
            if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    o[n][0] *= alpha[0], o[n][1] *= alpha[0];
                    o[n][2] *= alpha[1], o[n][3] *= alpha[1];
                }
            }

            // O += P V: P as the A operand straight from the accumulators (k-step kk = keys 16kk .. 16kk + 15).
            const uint32_t vbase = kbase + TILE;
#pragma unroll
            for (int kk = 0; kk < kPfKeys / 16; ++kk) {
                const uint32_t pa[4] = {pack_pair<BF>(s[2 * kk][0], s[2 * kk][1]),
                                        pack_pair<BF>(s[2 * kk][2], s[2 * kk][3]),
                                        pack_pair<BF>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack_pair<BF>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                const int vrow = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                for (int n = 0; n < NT; n += 2) {
                    uint32_t vb[4];  // keys 16kk .. 16kk + 15 of dims 8n .. 8n + 15
                    ldsm_x4_trans(vbase + swizzled<HD>(vrow, n + (lane >> 4)), vb);
                    mma16816<BF>(o[n], pa, vb[0], vb[1]);
                    mma16816<BF>(o[n + 1], pa, vb[2], vb[3]);
                }
            }
            if constexpr (BF) cp_async_wait_all();
            __syncthreads();  // the next stage has landed; this one may be overwritten
        }
    }

    // Row sums over the quad, then the output (one split) or this split's partial.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = 16 * warp + g + 8 * i;
        if (r < c.nrows) store_prefill_row<HD, PERM>(p, c, r, i, t, o, m[i], l[i], p.v_scale);
    }
}

// ---- Prefill on the tensor cores, wide warps (flash-attention-2's tiling; the default) ----
//
// The kernel above gives each of its 8 warps 16 rows, so every warp reads the whole K and V tile from shared
// memory for 16 rows of mma work: 64 ldmatrix.x4 per 128 mma a warp, 256 KB of shared-memory reads per
// 128 x 64 tile, which alone take ~2,000 cycles at 128 B/clk, about the tile's tensor-core time; both were
// at ~50% in its trace (~210 TFLOP/s). Here a CTA has 4 warps of 32 rows (two m16 row blocks): each K/V
// fragment feeds both row blocks, Q is re-read from shared memory per tile instead of held in registers
// (80 ldmatrix.x4 per 256 mma: 160 KB a tile), and two CTAs share an SM. K and V are single-buffered and
// refilled as soon as the warps are done with them.
// BF16 cache: two stages of K and V; tile t+1 goes by cp.async into the other stage while tile t is
// computed, one barrier a tile (single-buffered refills after each mma phase, flash-attention-2's order,
// measured 0.8x the narrow kernel: the cp.async latency was exposed).
// FP8 / NVFP4: one K and one V tile, two barriers a tile:
//   QK^T(K), dequantize V (tile t) | barrier | softmax, P.V(V), dequantize K (tile t+1) | barrier
// (NVFP4: each dequantization a chunk per mma k-step, so its integer work sits between the same warp's mma;
// FP8: whole tiles, V before Q K^T and K right after the barrier), and
// the raw bytes of tile t+2 go by cp.async into one of two raw stages while tile t is computed (NVFP4:
// e2m1 * 2^-14 by shift and mask times the group scale * 2^7 in one HMUL2, exact in fp16 as the decode
// kernel's; 2^-7 goes into the score factor and the output).
// Layout per CTA (dynamic shared memory): Q [128][HD], K [64][HD], V [64][HD] 16-bit, swizzled as above;
// then BF16: a second K and V; FP8 / NVFP4: 2 raw stages of K codes [64][row bytes], V codes, and (NVFP4)
// K and V scales [64][HD / 16].
// Resources: see prefill_wide_smem_bytes and the registry (src/tune/registry.cpp).
constexpr int kPwWarps = 4;
constexpr int kPwThreads = 32 * kPwWarps;
constexpr int kPwRows = 32 * kPwWarps;  // = kPfRows: same q tiles, grid and splits
constexpr int kPwCtasPerSm = 2;
static_assert(kPwRows == kPfRows, "both prefill kernels tile the queries alike");

template <KvDtype KV, int HD>
constexpr int pw_row_bytes() {
    return KV == KvDtype::Fp8 ? HD : HD / 2;
}
template <KvDtype KV, int HD>
constexpr int pw_raw_stage_bytes() {  // K codes, V codes, (NVFP4) K scales, V scales of one key tile
    return KV == KvDtype::Bf16
               ? 0
               : 2 * kPfKeys * (pw_row_bytes<KV, HD>() + (KV == KvDtype::Nvfp4 ? HD / 16 : 0));
}
template <KvDtype KV, int HD>
constexpr size_t prefill_wide_smem_bytes() {
    // BF16: two stages of K and V; FP8 / NVFP4: one K and V, and two raw stages.
    const size_t kv_stages = KV == KvDtype::Bf16 ? 2 : 1;
    return static_cast<size_t>(kPwRows + 2 * kv_stages * kPfKeys) * HD * 2 +
           2 * static_cast<size_t>(pw_raw_stage_bytes<KV, HD>());
}

// cp.async of 4 or 8 bytes (through L1; .cg takes only 16); zeros when !valid.
template <int BYTES>
__device__ __forceinline__ void cp_async_small(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(BYTES),
                 "r"(valid ? BYTES : 0)
                 : "memory");
}

template <KvDtype KV, int HD>
__global__ void __launch_bounds__(kPwThreads, kPwCtasPerSm) prefill_wide_kernel(const AttnParams p) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    constexpr bool BF = KV == KvDtype::Bf16;
    constexpr bool PERM = KV == KvDtype::Nvfp4;
    constexpr int CH = HD / 8;       // 16-byte chunks of a 16-bit row
    constexpr int KSTEPS = HD / 16;  // k-steps of Q K^T
    constexpr int NT = HD / 8;       // n-tiles of the output
    constexpr int KT = kPfKeys / 8;  // n-tiles of S
    constexpr int TILE = kPfKeys * HD * 2;
    constexpr int RB = pw_row_bytes<KV, HD>();
    constexpr int CPR = BF ? CH : RB / 16;  // 16-byte chunks of a stored row
    constexpr int NCH = kPfKeys * CPR;      // ... of a K (or V) tile
    constexpr int ITER = NCH / kPwThreads;
    constexpr int SROW = HD / 16;  // NVFP4 scale bytes of a row
    constexpr float kUnplace = PERM ? 128.0f : 1.0f;
    // NVFP4 dequantizes a chunk per mma k-step (measured 4% faster at 64K keys); FP8, whose 4 chunks a tile
    // spilled more registers that way (8% slower), a whole tile at the start of each phase.
    constexpr bool INTERLEAVE = PERM;
    static_assert(NCH % kPwThreads == 0 && KSTEPS % 2 == 0 && NT % 2 == 0, "tile shapes");
    static_assert(!PERM || kPfKeys * 2 == kPwThreads, "one NVFP4 scale row of K or V per thread");

    extern __shared__ __align__(16) uint8_t pw_smem[];
    uint8_t* const sq = pw_smem;
    uint8_t* const sk = sq + kPwRows * HD * 2;
    uint8_t* const sv = sk + TILE;
    uint8_t* const raw0 = sv + TILE;  // FP8 / NVFP4: raw stage s at raw0 + s * pw_raw_stage_bytes
    // BF16: K and V of stage s at sk + 2 s TILE and sv + 2 s TILE (stage 1 where the raw stages would be).

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    PrefillCta c;
    if (!prefill_cta(p, c)) return;
    const int lo = c.lo, hi = c.hi, k_first = c.k_first, n_tiles = c.n_tiles, kvh = c.kvh;
    const int32_t* table = c.table;
    const float qk_scale = p.qk_scale * kUnplace;

    // Where key `key`'s row lies (K and V alike): its block's byte offset and its row in the block.
    auto row_offset = [&](int key, int64_t& base, int64_t& row) {
        base = static_cast<int64_t>(table[key / p.block_size]) * p.block_bytes;
        row = static_cast<int64_t>(key % p.block_size) * p.n_kv_heads + kvh;
    };
    // BF16: K or V rows of the tile at k0 straight into `dst` (swizzled).
    auto fetch_bf16 = [&](const uint8_t* src, uint8_t* dst, int k0) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int ch = tid + it * kPwThreads, kk = ch / CH, col = ch % CH, key = k0 + kk;
            const bool ok = key >= lo && key < hi;
            int64_t off = 0;
            if (ok) {
                int64_t base, row;
                row_offset(key, base, row);
                off = base + row * (HD * 2) + col * 16;
            }
            cp_async16(smem_addr(dst + swizzled<HD>(kk, col)), src + off, ok);
        }
        cp_async_commit();
    };
    // FP8 / NVFP4: the raw bytes of K and V of the tile at k0 into raw stage `stage`.
    auto fetch_raw = [&](int k0, int stage) {
        uint8_t* const r = raw0 + stage * pw_raw_stage_bytes<KV, HD>();
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int ch = tid + it * kPwThreads, kk = ch / CPR, col = ch % CPR, key = k0 + kk;
            const bool ok = key >= lo && key < hi;
            int64_t off = 0;
            if (ok) {
                int64_t base, row;
                row_offset(key, base, row);
                off = base + row * RB + col * 16;
            }
            cp_async16(smem_addr(r + kk * RB + col * 16), p.k + off, ok);
            cp_async16(smem_addr(r + kPfKeys * RB + kk * RB + col * 16), p.v + off, ok);
        }
        if constexpr (PERM) {  // thread tid: the scale row of key tid % 64 of K (tid < 64) or V
            const int kk = tid % kPfKeys, key = k0 + kk;
            const bool ok = key >= lo && key < hi;
            int64_t off = 0;
            if (ok) {
                int64_t base, row;
                row_offset(key, base, row);
                off = base + static_cast<int64_t>(p.block_size) * p.n_kv_heads * RB + row * SROW;
            }
            const uint8_t* src = (tid < kPfKeys ? p.k : p.v) + off;
            const uint32_t dst =
                smem_addr(r + 2 * kPfKeys * RB + (tid < kPfKeys ? 0 : kPfKeys * SROW) + kk * SROW);
            cp_async_small<SROW>(dst, src, ok);
        }
        cp_async_commit();
    };
    // FP8 / NVFP4: this thread's chunk `it` of raw stage `stage`'s K (which = 0) or V (1) into `dst` as fp16
    // (NVFP4 times 2^-7).
    auto dequant_raw_chunk = [&](int stage, int which, uint8_t* dst, int it) {
        const uint8_t* const r = raw0 + stage * pw_raw_stage_bytes<KV, HD>();
        const uint8_t* const codes = r + which * kPfKeys * RB;
        {
            const int ch = tid + it * kPwThreads, kk = ch / CPR, col = ch % CPR;
            const uint4 raw = *reinterpret_cast<const uint4*>(codes + kk * RB + col * 16);
            const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
            if constexpr (KV == KvDtype::Fp8) {
                uint32_t h[8];
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const __half2_raw cv = __nv_cvt_fp8x2_to_halfraw2(
                            static_cast<__nv_fp8x2_storage_t>((w[j] >> (16 * half)) & 0xffffu), __NV_E4M3);
                        h[2 * j + half] = static_cast<uint32_t>(cv.x) | static_cast<uint32_t>(cv.y) << 16;
                    }
                *reinterpret_cast<uint4*>(dst + swizzled<HD>(kk, 2 * col)) =
                    make_uint4(h[0], h[1], h[2], h[3]);
                *reinterpret_cast<uint4*>(dst + swizzled<HD>(kk, 2 * col + 1)) =
                    make_uint4(h[4], h[5], h[6], h[7]);
            } else {
                const uint8_t* const sc = r + 2 * kPfKeys * RB + which * kPfKeys * SROW + kk * SROW + 2 * col;
                const __half2 s_lo = scale_x128_h2(sc[0]), s_hi = scale_x128_h2(sc[1]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    uint32_t h[4];
                    e2m1x8_to_f16_pairs(w[i], i < 2 ? s_lo : s_hi, h);
                    *reinterpret_cast<uint4*>(dst + swizzled<HD>(kk, 4 * col + i)) =
                        make_uint4(h[0], h[1], h[2], h[3]);
                }
            }
        }
    };

    float o[2][NT][4];
#pragma unroll
    for (int rb = 0; rb < 2; ++rb)
#pragma unroll
        for (int n = 0; n < NT; ++n) o[rb][n][0] = o[rb][n][1] = o[rb][n][2] = o[rb][n][3] = 0.0f;
    float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};

    if (n_tiles > 0) {  // uniform over the CTA
        stage_q_rows<HD, kPwRows, kPwThreads, BF, PERM>(p, c, sq);
        if constexpr (BF) {
            fetch_bf16(p.k, sk, k_first);
            fetch_bf16(p.v, sv, k_first);
            cp_async_wait_all();
        } else {
            fetch_raw(k_first, 0);
            if (n_tiles > 1) fetch_raw(k_first + kPfKeys, 1);
            if (n_tiles > 1)
                asm volatile("cp.async.wait_group 1;\n" ::: "memory");
            else
                cp_async_wait_all();
            __syncthreads();
#pragma unroll
            for (int it = 0; it < ITER; ++it)
                dequant_raw_chunk(0, 0, sk, it);  // V of tile 0: during its Q K^T
        }
        __syncthreads();

        const uint32_t qbase = smem_addr(sq);
        const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;  // ldmatrix row of an m16 A fragment
        for (int tt = 0; tt < n_tiles; ++tt) {
            const int k0 = k_first + tt * kPfKeys;
            const int stage_off = BF ? 2 * TILE * (tt & 1) : 0;
            const uint32_t kbase = smem_addr(sk + stage_off), vbase = smem_addr(sv + stage_off);
            if constexpr (BF) {  // tile t+1 into the other stage, waited for at the end of this tile
                if (tt + 1 < n_tiles) {
                    fetch_bf16(p.k, sk + 2 * TILE - stage_off, k0 + kPfKeys);
                    fetch_bf16(p.v, sv + 2 * TILE - stage_off, k0 + kPfKeys);
                }
            }

            // S = Q K^T: s[rb][j] holds rows 16 rb + g (0, 1) and + 8 (2, 3), keys 8j + 2t, + 1.
            if constexpr (!BF && !INTERLEAVE) {
#pragma unroll
                for (int it = 0; it < ITER; ++it) dequant_raw_chunk(tt & 1, 1, sv, it);
            }
            float s[2][KT][4];
#pragma unroll
            for (int rb = 0; rb < 2; ++rb)
#pragma unroll
                for (int j = 0; j < KT; ++j) s[rb][j][0] = s[rb][j][1] = s[rb][j][2] = s[rb][j][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                uint32_t qa[2][4];  // [row block]
#pragma unroll
                for (int rb = 0; rb < 2; ++rb)
                    ldsm_x4(qbase + swizzled<HD>(32 * warp + 16 * rb + a_row, 2 * ks + (lane >> 4)), qa[rb]);
#pragma unroll
                for (int j = 0; j < KT; ++j) {
                    uint32_t kb[2];  // keys 8j .. 8j + 7, k-step ks
                    ldsm_x2(kbase + swizzled<HD>(8 * j + (lane & 7), 2 * ks + ((lane >> 3) & 1)), kb);
#pragma unroll
                    for (int rb = 0; rb < 2; ++rb) mma16816<BF>(s[rb][j], qa[rb], kb[0], kb[1]);
                }
                // FP8 / NVFP4: V of this tile (V is free since the last tile's barrier 2), a chunk per k-step
                // so its integer work interleaves with the mma.
                if constexpr (!BF && INTERLEAVE) {
                    if (ks < ITER) dequant_raw_chunk(tt & 1, 1, sv, ks);
                }
            }
            static_assert(BF || ITER <= KSTEPS, "one V chunk a k-step");

            // FP8 / NVFP4, barrier 1: every warp is done with K and this tile's raw stage, V is in place, the
            // next raw stage has landed; the stage just read takes the raw bytes of tile t+2.
            if constexpr (!BF) {
                cp_async_wait_all();
                __syncthreads();
                if (tt + 2 < n_tiles) fetch_raw(k0 + 2 * kPfKeys, tt & 1);
                if constexpr (!INTERLEAVE) {
                    if (tt + 1 < n_tiles) {
#pragma unroll
                        for (int it = 0; it < ITER; ++it) dequant_raw_chunk((tt + 1) & 1, 0, sk, it);
                    }
                }
            }

            if (k0 < c.full_lo || k0 + kPfKeys > c.full_hi) {  // this lane's rows: 32 warp + 16 rb + g + 8 i
#pragma unroll
                for (int rb = 0; rb < 2; ++rb) {
                    int row_lo[2], row_hi[2];
#pragma unroll
                    for (int i = 0; i < 2; ++i) prefill_row_keys(p, c, 32 * warp + 16 * rb + g + 8 * i, row_lo[i], row_hi[i]);
                    mask_scores(s[rb], k0, t, row_lo, row_hi);
                }
            }
            float alpha[2][2];
#pragma unroll
            for (int rb = 0; rb < 2; ++rb) online_softmax(s[rb], m[rb], l[rb], qk_scale, alpha[rb]);
            if (__any_sync(0xffffffffu, alpha[0][0] != 1.0f || alpha[0][1] != 1.0f || alpha[1][0] != 1.0f ||
                                            alpha[1][1] != 1.0f)) {
#pragma unroll
                for (int rb = 0; rb < 2; ++rb)
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        o[rb][n][0] *= alpha[rb][0], o[rb][n][1] *= alpha[rb][0];
                        o[rb][n][2] *= alpha[rb][1], o[rb][n][3] *= alpha[rb][1];
                    }
            }

            // O += P V (k-step kk = keys 16 kk .. 16 kk + 15), each V fragment into both row blocks.
#pragma unroll
            for (int kk = 0; kk < kPfKeys / 16; ++kk) {
                uint32_t pa[2][4];
#pragma unroll
                for (int rb = 0; rb < 2; ++rb) {
                    pa[rb][0] = pack_pair<BF>(s[rb][2 * kk][0], s[rb][2 * kk][1]);
                    pa[rb][1] = pack_pair<BF>(s[rb][2 * kk][2], s[rb][2 * kk][3]);
                    pa[rb][2] = pack_pair<BF>(s[rb][2 * kk + 1][0], s[rb][2 * kk + 1][1]);
                    pa[rb][3] = pack_pair<BF>(s[rb][2 * kk + 1][2], s[rb][2 * kk + 1][3]);
                }
                const int vrow = 16 * kk + a_row;
#pragma unroll
                for (int n = 0; n < NT; n += 2) {
                    uint32_t vb[4];  // keys 16 kk .. 16 kk + 15 of dims 8n .. 8n + 15
                    ldsm_x4_trans(vbase + swizzled<HD>(vrow, n + (lane >> 4)), vb);
#pragma unroll
                    for (int rb = 0; rb < 2; ++rb) {
                        mma16816<BF>(o[rb][n], pa[rb], vb[0], vb[1]);
                        mma16816<BF>(o[rb][n + 1], pa[rb], vb[2], vb[3]);
                    }
                }
                // FP8 / NVFP4: K of the next tile (K is free since barrier 1), interleaved with the mma.
                if constexpr (!BF && INTERLEAVE) {
#pragma unroll
                    for (int it = kk; it < ITER; it += kPfKeys / 16)
                        if (tt + 1 < n_tiles) dequant_raw_chunk((tt + 1) & 1, 0, sk, it);
                }
            }

            // Barrier 2: every warp is done with this tile's V (and, BF16, K); BF16: the next stage has
            // landed; FP8 / NVFP4: K of the next tile is in place.
            if constexpr (BF) cp_async_wait_all();
            __syncthreads();
        }
    }

    // Row sums over the quad, then the output (one split) or this split's partial.
#pragma unroll
    for (int rb = 0; rb < 2; ++rb)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[rb][i] += __shfl_xor_sync(0xffffffffu, l[rb][i], 1);
            l[rb][i] += __shfl_xor_sync(0xffffffffu, l[rb][i], 2);
        }
    const float v_scale = p.v_scale * kUnplace;
#pragma unroll
    for (int rb = 0; rb < 2; ++rb)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = 32 * warp + 16 * rb + g + 8 * i;
            if (r < c.nrows) store_prefill_row<HD, PERM>(p, c, r, i, t, o[rb], m[rb][i], l[rb][i], v_scale);
        }
}

template <KvDtype KV, int HD>
void launch_prefill_wide_hd(const AttnParams& p, dim3 grid, cudaStream_t stream) {
    constexpr size_t smem = prefill_wide_smem_bytes<KV, HD>();
    auto kernel = prefill_wide_kernel<KV, HD>;
    NIBBLE_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    launch_pdl(kernel, dim3(grid), dim3(kPwThreads), smem, stream, p);
}

template <KvDtype KV, int HD>
void launch_prefill_mma_hd(const AttnParams& p, dim3 grid, cudaStream_t stream) {
    constexpr size_t smem = prefill_smem_bytes<HD>();
    auto kernel = prefill_mma_kernel<KV, HD>;
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    launch_pdl(kernel, dim3(grid), dim3(kPfThreads), smem, stream, p);
}

template <KvDtype KV>
void launch_prefill_mma(int64_t hd, bool wide, const AttnParams& p, dim3 grid, cudaStream_t stream) {
    if (wide) {
        if (hd == 64)
            launch_prefill_wide_hd<KV, 64>(p, grid, stream);
        else
            launch_prefill_wide_hd<KV, 128>(p, grid, stream);
    } else if (hd == 64) {
        launch_prefill_mma_hd<KV, 64>(p, grid, stream);
    } else {
        launch_prefill_mma_hd<KV, 128>(p, grid, stream);
    }
}

// Whether a batch's prefill can take the tensor-core kernel (q BF16 and a positive scale also needed:
// paged_attention checks those).
bool prefill_rows_enough(int64_t group, int64_t max_q_len) {
    return max_q_len > 1 && max_q_len * group >= kPfMinRows;
}

template <KvDtype KV, int HD, int NJ>
void launch_attention(const AttnParams& p, dim3 grid, cudaStream_t stream) {
    constexpr size_t smem = attn_smem_bytes<HD, NJ>();
    auto kernel = paged_attention_kernel<KV, HD, NJ>;
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    launch_pdl(kernel, dim3(grid), dim3(kThreads), smem, stream, p);
}

template <KvDtype KV, int HD>
void dispatch_nj(int nj, const AttnParams& p, dim3 grid, cudaStream_t stream) {
    switch (nj) {
        case 1: launch_attention<KV, HD, 1>(p, grid, stream); break;
        case 2: launch_attention<KV, HD, 2>(p, grid, stream); break;
        case 4: launch_attention<KV, HD, 4>(p, grid, stream); break;
        default: launch_attention<KV, HD, 8>(p, grid, stream); break;
    }
}

template <KvDtype KV>
void dispatch_hd(int64_t hd, int nj, const AttnParams& p, dim3 grid, cudaStream_t stream) {
    switch (hd) {
        case 16: dispatch_nj<KV, 16>(nj, p, grid, stream); break;
        case 32: dispatch_nj<KV, 32>(nj, p, grid, stream); break;
        case 64: dispatch_nj<KV, 64>(nj, p, grid, stream); break;
        case 128: dispatch_nj<KV, 128>(nj, p, grid, stream); break;
        default: dispatch_nj<KV, 256>(nj, p, grid, stream); break;  // check_common admits no other
    }
}

// The head sizes the tensor-core prefill and decode kernels are built for; the others take the CUDA-core
// kernel on every path.
bool tensor_core_head_dim(int64_t hd) { return hd == 64 || hd == 128; }

// Rows a CTA holds: NJ = rows / 4. Decode (one query token): the group, rounded up to a power of two >= 4;
// prefill: 32 rows, 32 / group query tokens.
int rows_per_warp(int64_t group, int64_t max_q_len) {
    if (max_q_len > 1) return 8;
    int nj = 1;
    while (4 * nj < group) nj *= 2;
    return nj;
}

void check_common(DType dtype, const PagedKvLayer& kv, int64_t n_heads) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument("paged attention: q/out must be F32 or BF16");
    if (kv.dtype == KvDtype::F32) throw std::invalid_argument("paged attention: the F32 KV cache is host-only");
    if (!paged_attention_head_dim_supported(kv.head_dim))
        throw std::invalid_argument("paged attention: head_dim " + std::to_string(kv.head_dim) +
                                    " unsupported (16, 32, 64, 128 or 256)");
    if (kv.n_kv_heads <= 0 || n_heads % kv.n_kv_heads != 0 || n_heads / kv.n_kv_heads > 32)
        throw std::invalid_argument("paged attention: " + std::to_string(n_heads) + " query heads over " +
                                    std::to_string(kv.n_kv_heads) + " KV heads (need a multiple, group <= 32)");
    if (kv.block_size <= 0 || kv.block_bytes % 16 != 0)
        throw std::invalid_argument("paged attention: bad block size / block bytes");
}

// ---- KV write ----

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xffff0000u);
}

// One thread per 4 consecutive elements of a (token, head) row of K or V; 4 neighbouring lanes form an
// NVFP4 group of 16. Warps loop uniformly so the group shuffles always have every lane.
template <class T, KvDtype KV>
__global__ void __launch_bounds__(256)
    kv_write_kernel(const T* __restrict__ k, const T* __restrict__ v, int64_t n_tokens,
                    const int64_t* __restrict__ slots, uint8_t* kc, uint8_t* vc, int64_t block_bytes, int block_size,
                    int n_kv_heads, int head_dim, float k_scale, float v_scale) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int quads = head_dim / 4;
    const int64_t per_tensor = n_tokens * n_kv_heads * quads;
    const int64_t total = 2 * per_tensor;
    const int lane = threadIdx.x & 31;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < total;
         base += stride) {
        const int64_t t = base + lane;
        const bool active = t < total;
        const bool is_v = t >= per_tensor;
        const int64_t e = active ? (is_v ? t - per_tensor : t) : 0;
        const int quad = static_cast<int>(e % quads);
        const int64_t th = e / quads;  // token * n_kv_heads + head
        const int64_t token = th / n_kv_heads;
        const int head = static_cast<int>(th % n_kv_heads);
        float x[4] = {0, 0, 0, 0};
        if (active) load4((is_v ? v : k) + th * head_dim + quad * 4, x);
        const float ls = is_v ? v_scale : k_scale;
        const int64_t slot = active ? slots[token] : -1;
        uint8_t* block = (is_v ? vc : kc) + (slot >= 0 ? (slot / block_size) * block_bytes : 0);
        const int64_t row = (slot >= 0 ? slot % block_size : 0) * n_kv_heads + head;
        if constexpr (KV == KvDtype::Bf16) {
            if (slot >= 0) {
                const __nv_bfloat162 a = __floats2bfloat162_rn(x[0], x[1]), b = __floats2bfloat162_rn(x[2], x[3]);
                *reinterpret_cast<uint2*>(block + row * head_dim * 2 + quad * 8) =
                    make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
            }
        } else if constexpr (KV == KvDtype::Fp8) {
            if (slot >= 0) {
                uint32_t word = 0;
#pragma unroll
                for (int i = 0; i < 4; ++i) word |= kv_fp8_code(x[i], ls) << (8 * i);
                *reinterpret_cast<uint32_t*>(block + row * head_dim + quad * 4) = word;
            }
        } else {
            // nvfp4_quantize_row's recipe (ops/attention/kv_quant.cuh).
            float amax = fmaxf(fmaxf(fabsf(x[0]), fabsf(x[1])), fmaxf(fabsf(x[2]), fabsf(x[3])));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            if (slot >= 0) {
                const uint32_t scale = nvfp4_scale_code(amax, ls);
                const float divisor = nvfp4_divisor(scale, ls);
                uint32_t codes = 0;
#pragma unroll
                for (int i = 0; i < 4; ++i) codes |= nvfp4_code(x[i], divisor) << (4 * i);
                *reinterpret_cast<uint16_t*>(block + row * (head_dim / 2) + quad * 2) = static_cast<uint16_t>(codes);
                if (quad % 4 == 0)
                    block[static_cast<int64_t>(block_size) * n_kv_heads * (head_dim / 2) + row * (head_dim / 16) +
                          quad / 4] = static_cast<uint8_t>(scale);
            }
        }
    }
}

template <class T>
void launch_write(const void* k, const void* v, int64_t n_tokens, const int64_t* slots, const PagedKvLayer& kv,
                  cudaStream_t stream) {
    const int64_t total = 2 * n_tokens * kv.n_kv_heads * (kv.head_dim / 4);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 8192));
    const int bs = static_cast<int>(kv.block_size), nkv = static_cast<int>(kv.n_kv_heads),
              hd = static_cast<int>(kv.head_dim);
    const T* kt = static_cast<const T*>(k);
    const T* vt = static_cast<const T*>(v);
    switch (kv.dtype) {
        case KvDtype::Bf16:
            launch_pdl(kv_write_kernel<T, KvDtype::Bf16>, dim3(blocks), dim3(256), 0, stream, kt, vt,
                       n_tokens, slots, kv.k, kv.v, kv.block_bytes, bs, nkv, hd, kv.k_scale, kv.v_scale);
            break;
        case KvDtype::Fp8:
            launch_pdl(kv_write_kernel<T, KvDtype::Fp8>, dim3(blocks), dim3(256), 0, stream, kt, vt, n_tokens,
                       slots, kv.k, kv.v, kv.block_bytes, bs, nkv, hd, kv.k_scale, kv.v_scale);
            break;
        default:
            launch_pdl(kv_write_kernel<T, KvDtype::Nvfp4>, dim3(blocks), dim3(256), 0, stream, kt, vt,
                       n_tokens, slots, kv.k, kv.v, kv.block_bytes, bs, nkv, hd, kv.k_scale, kv.v_scale);
            break;
    }
}

}  // namespace

bool paged_attention_head_dim_supported(int64_t head_dim) {
    return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}

namespace {
// Tensor-core prefill: few CTAs, each long. Pick the split count s that minimizes the waves per split,
// ceil(ctas s / slots) / s (the busiest SM's share of the work), plus 1% a split for the partials and the
// combine; at least 512 keys a split, at most 16 splits. per_sm: the kernel's resident CTAs per SM.
int prefill_splits(const AttentionBatch& b, int64_t n_kv_heads, int64_t group, int sm_count, int per_sm) {
    const int64_t q_tile = std::max<int64_t>(1, kPfRows / group);
    const int64_t ctas = b.n_seqs * n_kv_heads * ((b.max_q_len + q_tile - 1) / q_tile);
    const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(sm_count) * per_sm);
    const int64_t most = std::clamp<int64_t>(b.max_kv_len / 512, 1, 16);
    int best = 1;
    double best_cost = 1e30;
    for (int64_t s = 1; s <= most; ++s) {
        const double cost =
            static_cast<double>((ctas * s + slots - 1) / slots) / static_cast<double>(s) + 0.01 * s;
        if (cost < best_cost) best_cost = cost, best = static_cast<int>(s);
    }
    return best;
}
// Resident CTAs per SM of the prefill kernel PrefillKernel::Auto runs for a cache dtype: the narrow kernel
// (BF16, register-bound __launch_bounds__(256, 1)) or the wide one.
int prefill_ctas_per_sm(KvDtype dtype) { return dtype == KvDtype::Bf16 ? 1 : kPwCtasPerSm; }
}  // namespace

int paged_attention_splits(const AttentionBatch& b, int64_t n_kv_heads, int64_t n_heads, int sm_count) {
    if (n_kv_heads <= 0 || b.n_seqs <= 0 || b.max_q_len <= 0) return 1;
    const int64_t group = n_heads / n_kv_heads;
    if (prefill_rows_enough(group, b.max_q_len))
        return prefill_splits(b, n_kv_heads, group, sm_count, kPwCtasPerSm);
    const int64_t q_tile = b.max_q_len > 1 ? std::max<int64_t>(1, 32 / group) : 1;
    const int64_t ctas = b.n_seqs * n_kv_heads * ((b.max_q_len + q_tile - 1) / q_tile);
    const int64_t want = (4 * static_cast<int64_t>(sm_count) + ctas - 1) / ctas;  // ~4 CTAs per SM
    const int64_t most = std::max<int64_t>(1, b.max_kv_len / 256);                 // >= 256 keys a split
    return static_cast<int>(std::clamp<int64_t>(std::min(want, most), 1, 256));
}

int paged_attention_splits(const AttentionBatch& b, const PagedKvLayer& kv, int64_t n_heads, int sm_count) {
    if (kv.n_kv_heads <= 0 || b.n_seqs <= 0 || b.max_q_len <= 0) return 1;
    const int64_t group = n_heads / kv.n_kv_heads;
    if (prefill_rows_enough(group, b.max_q_len) && tensor_core_head_dim(kv.head_dim))
        return prefill_splits(b, kv.n_kv_heads, group, sm_count, prefill_ctas_per_sm(kv.dtype));
    if (b.max_q_len > 1 || group > 8 || !tensor_core_head_dim(kv.head_dim))  // prefill, CUDA-core decode: by keys
        return paged_attention_splits(b, kv.n_kv_heads, n_heads, sm_count);
    // Decode: each split reads at least kMinSplitBytes of K + V (so a 4-bit split covers ~3.5x the keys of
    // a BF16 one); among those counts, the one with the fewest waves per split, ceil(ctas s / slots) / s
    // (the busiest SM's share), plus 0.05% a split for the partials and the combine. Slots: the decode
    // kernel's resident CTAs per SM (registers, listed above decode_pipe_kernel; Mma: 3).
    constexpr int64_t kMinSplitBytes = 64 * 1024;
    const int64_t ctas = b.n_seqs * kv.n_kv_heads;
    const int64_t per_sm = kv.dtype == KvDtype::Bf16  ? 3
                           : kv.head_dim == 128       ? 2
                           : kv.dtype == KvDtype::Fp8 ? 4
                                                      : 3;
    const int64_t slots = std::max<int64_t>(1, per_sm * sm_count);
    if (b.max_kv_len <= 8192) {
        // Short contexts are latency-bound: a split's CTA walks its keys in dependent steps, so the time
        // follows the keys per CTA, not the bytes. Measured (nibble-kernel-bench attention-short, H100, 32
        // query heads, 4 and 8 KV heads, depths 576-8192, every dtype): the best counts make ~64 CTAs and <=
        // ~352 keys a split, within 5-14% of the best everywhere and 1.1-1.3x faster than the bytes rule
        // below at 576-8192 keys. Never more than one wave (batches), never less than 48 keys a split.
        const int64_t by_ctas = (64 + ctas - 1) / ctas;
        const int64_t by_keys =
            std::min<int64_t>((b.max_kv_len + 351) / 352, std::max<int64_t>(1, slots / ctas));
        const int64_t most = std::max<int64_t>(1, b.max_kv_len / 48);
        return static_cast<int>(
            std::clamp<int64_t>(std::max(by_ctas, by_keys), 1, std::min<int64_t>(most, 256)));
    }
    const int64_t row_bytes = kv.dtype == KvDtype::Bf16 ? 2 * kv.head_dim
                            : kv.dtype == KvDtype::Fp8  ? kv.head_dim
                                                        : kv.head_dim / 2 + kv.head_dim / 16;
    const int64_t key_bytes = std::max<int64_t>(1, 2 * row_bytes);  // K and V
    const int64_t most = std::clamp<int64_t>(b.max_kv_len * key_bytes / kMinSplitBytes, 1, 256);
    int best = 1;
    double best_cost = 1e30;
    for (int64_t s = 1; s <= most; ++s) {
        const double cost = static_cast<double>((ctas * s + slots - 1) / slots) / static_cast<double>(s) + 0.0005 * s;
        if (cost < best_cost) best_cost = cost, best = static_cast<int>(s);
    }
    return best;
}

size_t paged_attention_workspace_bytes(int n_splits, int64_t n_tokens, int64_t n_heads, int64_t head_dim) {
    if (n_splits <= 1) return 0;
    return static_cast<size_t>(n_splits) * n_tokens * n_heads * (head_dim + 2) * sizeof(float);
}

void paged_attention(const void* q, DType dtype, const PagedKvLayer& kv, const AttentionBatch& b,
                     const AttentionArgs& args, int n_splits, void* workspace, size_t workspace_bytes, void* out,
                     cudaStream_t stream) {
    check_common(dtype, kv, args.n_heads);
    if (n_splits < 1) throw std::invalid_argument("paged attention: n_splits must be >= 1");
    if (workspace_bytes < paged_attention_workspace_bytes(n_splits, b.n_tokens, args.n_heads, kv.head_dim))
        throw std::invalid_argument("paged attention: workspace too small for " + std::to_string(n_splits) + " splits");
    if (b.n_seqs <= 0 || b.n_tokens <= 0 || b.max_q_len <= 0) return;
    const int64_t group = args.n_heads / kv.n_kv_heads;
    const int nj = rows_per_warp(group, b.max_q_len);
    // Prefill (some sequence with >= 16 rows of query tokens x group) with BF16 q runs on the tensor cores;
    // F32 q (the CPU-parity path) and a non-positive scale keep the CUDA-core kernel.
    const bool tensor_cores = tensor_core_head_dim(kv.head_dim);
    const bool prefill_mma =
        tensor_cores && dtype == DType::BF16 && args.scale > 0.0f && prefill_rows_enough(group, b.max_q_len);
    const int64_t q_tile = prefill_mma ? kPfRows / group : b.max_q_len > 1 ? (4 * nj) / group : 1;
    const int64_t key_align = prefill_mma ? kPfKeys : kKeyTile;  // splits start on key-tile boundaries

    AttnParams p{};
    p.q = q;
    p.out = out;
    p.bf16 = dtype == DType::BF16;
    p.k = kv.k;
    p.v = kv.v;
    p.block_bytes = kv.block_bytes;
    p.block_size = static_cast<int>(kv.block_size);
    p.block_shift = -1;
    if ((kv.block_size & (kv.block_size - 1)) == 0)
        for (int b = 0; b < 31; ++b)
            if ((int64_t{1} << b) == kv.block_size) p.block_shift = b;
    p.n_kv_heads = static_cast<int>(kv.n_kv_heads);
    p.n_heads = static_cast<int>(args.n_heads);
    p.group = static_cast<int>(group);
    p.q_tile = static_cast<int>(q_tile);
    p.qk_scale = args.scale * kv.k_scale * kLog2e;
    p.v_scale = kv.v_scale;
    p.sliding_window = static_cast<int>(args.sliding_window);
    const int64_t per_split = (b.max_kv_len + n_splits - 1) / n_splits;
    p.keys_per_split = static_cast<int>(std::max<int64_t>(key_align, (per_split + key_align - 1) / key_align * key_align));
    p.n_splits = n_splits;
    p.q_start = b.q_start;
    p.start_pos = b.start_pos;
    p.block_tables = b.block_tables;
    p.max_blocks = b.max_blocks;
    p.n_tokens = b.n_tokens;
    if (n_splits > 1) {
        float* ws = static_cast<float*>(workspace);
        const int64_t rows = static_cast<int64_t>(n_splits) * b.n_tokens * args.n_heads;
        p.part_o = ws;
        p.part_m = ws + rows * kv.head_dim;
        p.part_l = p.part_m + rows;
    }
    const dim3 grid(static_cast<unsigned>((b.max_q_len + q_tile - 1) / q_tile), static_cast<unsigned>(b.n_seqs),
                    static_cast<unsigned>(kv.n_kv_heads * n_splits));
    if (prefill_mma) {
        const bool wide = args.prefill_kernel == PrefillKernel::Wide ||
                          (args.prefill_kernel == PrefillKernel::Auto && kv.dtype != KvDtype::Bf16);
        switch (kv.dtype) {
            case KvDtype::Bf16:
                launch_prefill_mma<KvDtype::Bf16>(kv.head_dim, wide, p, grid, stream);
                break;
            case KvDtype::Fp8:
                launch_prefill_mma<KvDtype::Fp8>(kv.head_dim, wide, p, grid, stream);
                break;
            default:
                launch_prefill_mma<KvDtype::Nvfp4>(kv.head_dim, wide, p, grid, stream);
                break;
        }
    } else if (tensor_cores && b.max_q_len == 1 && group <= 8) {
        // Decode on the tensor cores: the pipelined kernel for FP8 / NVFP4 unless Mma is asked for.
        const bool pipelined = kv.dtype != KvDtype::Bf16 && args.decode_kernel != DecodeKernel::Mma;
        switch (kv.dtype) {
            case KvDtype::Bf16: launch_decode_mma<KvDtype::Bf16>(kv.head_dim, p, grid, stream); break;
            case KvDtype::Fp8:
                if (pipelined)
                    launch_decode_pipe<KvDtype::Fp8>(kv.head_dim, false, p, grid, stream);
                else
                    launch_decode_mma<KvDtype::Fp8>(kv.head_dim, p, grid, stream);
                break;
            default:
                if (pipelined)
                    launch_decode_pipe<KvDtype::Nvfp4>(kv.head_dim, args.decode_kernel == DecodeKernel::Pipelined16, p,
                                                       grid, stream);
                else
                    launch_decode_mma<KvDtype::Nvfp4>(kv.head_dim, p, grid, stream);
                break;
        }
    } else {
        switch (kv.dtype) {
            case KvDtype::Bf16: dispatch_hd<KvDtype::Bf16>(kv.head_dim, nj, p, grid, stream); break;
            case KvDtype::Fp8: dispatch_hd<KvDtype::Fp8>(kv.head_dim, nj, p, grid, stream); break;
            default: dispatch_hd<KvDtype::Nvfp4>(kv.head_dim, nj, p, grid, stream); break;
        }
    }
    NIBBLE_CUDA_CHECK(cudaGetLastError());
    if (n_splits > 1) {
        const int64_t n_rows = b.n_tokens * args.n_heads;
        const unsigned blocks = static_cast<unsigned>((n_rows + 3) / 4);
        auto combine = [&](auto kernel) {
            launch_pdl(kernel, dim3(blocks), dim3(kThreads), 0, stream, p.part_o, p.part_m, p.part_l, n_splits,
                       n_rows, p.bf16, out);
        };
        switch (kv.head_dim) {
            case 16: combine(combine_kernel<16>); break;
            case 32: combine(combine_kernel<32>); break;
            case 64: combine(combine_kernel<64>); break;
            case 128: combine(combine_kernel<128>); break;
            default: combine(combine_kernel<256>); break;
        }
        NIBBLE_CUDA_CHECK(cudaGetLastError());
    }
}

void kv_cache_write(const void* k, const void* v, DType dtype, int64_t n_tokens, const int64_t* slot_mapping,
                    const PagedKvLayer& kv, cudaStream_t stream) {
    if (dtype != DType::F32 && dtype != DType::BF16) throw std::invalid_argument("kv_cache_write: K/V must be F32 or BF16");
    if (kv.dtype == KvDtype::F32) throw std::invalid_argument("kv_cache_write: the F32 KV cache is host-only");
    // A multiple of 16: whole NVFP4 groups, each 4 neighbouring lanes of kv_write_kernel.
    if (kv.head_dim <= 0 || kv.head_dim % 16 != 0)
        throw std::invalid_argument("kv_cache_write: head_dim " + std::to_string(kv.head_dim) +
                                    " unsupported (a positive multiple of 16)");
    if (n_tokens <= 0) return;
    if (dtype == DType::F32)
        launch_write<float>(k, v, n_tokens, slot_mapping, kv, stream);
    else
        launch_write<__nv_bfloat16>(k, v, n_tokens, slot_mapping, kv, stream);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
