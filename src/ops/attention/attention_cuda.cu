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
#include "ops/attention/attention_cuda.h"

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

__device__ __forceinline__ float e4m3_to_float_dev(uint8_t code) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
    return __half2float(__half(h));
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

template <int HD, int NJ>
constexpr size_t attn_smem_bytes() {
    constexpr int R = 4 * NJ;
    return sizeof(float) * (static_cast<size_t>(R) * HD + kKeyTile * (HD + 4) + kKeyTile * HD + R * kKeyTile + 3 * R);
}

template <KvDtype KV, int HD, int NJ>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const AttnParams p) {
    constexpr int R = 4 * NJ;              // rows of the tile
    constexpr int EPC = elems_per_chunk<KV>();
    constexpr int CPR = HD / EPC;          // chunks per stored row
    constexpr int NCH = kKeyTile * CPR;    // chunks per key tile
    constexpr int ITER = (NCH + kThreads - 1) / kThreads;
    constexpr int ROW_BYTES = KV == KvDtype::Bf16 ? HD * 2 : KV == KvDtype::Fp8 ? HD : HD / 2;
    constexpr int SCALE_BYTES = KV == KvDtype::Nvfp4 ? HD / 16 : 0;
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
                const int64_t off = base + row * ROW_BYTES + c * 16;
                rk[it] = __ldg(reinterpret_cast<const uint4*>(p.k + off));
                rv[it] = __ldg(reinterpret_cast<const uint4*>(p.v + off));
                if constexpr (KV == KvDtype::Nvfp4) {
                    const int64_t soff =
                        base + static_cast<int64_t>(p.block_size) * p.n_kv_heads * ROW_BYTES + row * SCALE_BYTES + c * 2;
                    sck[it] = __ldg(reinterpret_cast<const unsigned short*>(p.k + soff));
                    scv[it] = __ldg(reinterpret_cast<const unsigned short*>(p.v + soff));
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
                float buf[EPC];
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

// Merges the splits of each (token, head) row: one warp a row, lanes over float4 columns.
template <int HD>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_m, const float* __restrict__ part_l,
                   int n_splits, int64_t n_rows, bool bf16, void* out) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    float m = -INFINITY;
    for (int s = 0; s < n_splits; ++s) m = fmaxf(m, part_m[s * n_rows + row]);
    float l = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const float ms = part_m[s * n_rows + row];
        if (ms != -INFINITY) l += part_l[s * n_rows + row] * exp2f(ms - m);
    }
    for (int d = lane * 4; d < HD; d += 128) {
        float4 acc = make_float4(0, 0, 0, 0);
        for (int s = 0; s < n_splits; ++s) {
            const float ms = part_m[s * n_rows + row];
            if (ms == -INFINITY) continue;
            const float w = exp2f(ms - m);
            const float4 po = *reinterpret_cast<const float4*>(part_o + (s * n_rows + row) * HD + d);
            acc.x = fmaf(w, po.x, acc.x), acc.y = fmaf(w, po.y, acc.y);
            acc.z = fmaf(w, po.z, acc.z), acc.w = fmaf(w, po.w, acc.w);
        }
        const float inv = 1.0f / l;
        const float v0 = acc.x * inv, v1 = acc.y * inv, v2 = acc.z * inv, v3 = acc.w * inv;
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

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
        }
    } else if constexpr (N == 2) {
        const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
        w[0] = u.x, w[1] = u.y;
    } else {
        w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
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
    __shared__ float s_o[4][8][HD];

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

    // Q fragments (row g, this lane's quarter of head_dim), hi and lo parts; rows 8..15 are zero.
    uint32_t qa_hi[KSTEPS][2], qa_lo[KSTEPS][2];
    {
        const int64_t qrow = (static_cast<int64_t>(q0) * p.n_heads + kvh * p.group + g) * HD + t * KQ;
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x = 0.0f, y = 0.0f;
                if (row_ok) {
                    const int64_t i = qrow + 4 * s + 2 * h;
                    if (p.bf16) {
                        x = __bfloat162float(static_cast<const __nv_bfloat16*>(p.q)[i]);
                        y = __bfloat162float(static_cast<const __nv_bfloat16*>(p.q)[i + 1]);
                    } else {
                        x = static_cast<const float*>(p.q)[i];
                        y = static_cast<const float*>(p.q)[i + 1];
                    }
                }
                split_pair<BF>(x, y, qa_hi[s][h], qa_lo[s][h]);
            }
        }
    }

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int64_t scale_area = static_cast<int64_t>(p.block_size) * p.n_kv_heads * ROW_BYTES;

    for (int k0 = lo + 16 * warp; k0 < hi; k0 += 64) {
        // Raw loads: K of keys k0 + g and k0 + 8 + g (quarter t); V of keys k0 + {2t, 2t+1, 8+2t, 9+2t} (slice g).
        uint32_t kr[2][KW], vr[4][VW];
        uint32_t ksc[2] = {0, 0}, vsc[4] = {0, 0, 0, 0};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int key = k0 + 8 * j + g;
#pragma unroll
            for (int i = 0; i < KW; ++i) kr[j][i] = 0;
            if (key < hi) {
                const int64_t base = static_cast<int64_t>(table[key / p.block_size]) * p.block_bytes;
                const int64_t row = static_cast<int64_t>(key % p.block_size) * p.n_kv_heads + kvh;
                load_words<KW>(p.k + base + row * ROW_BYTES + t * (KQ * BITS / 8), kr[j]);
                if constexpr (KV == KvDtype::Nvfp4) {
                    const uint8_t* sp = p.k + base + scale_area + row * (HD / 16) + t * (KQ / 16);
                    ksc[j] = KQ / 16 == 2 ? __ldg(reinterpret_cast<const unsigned short*>(sp)) : __ldg(sp);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int key = k0 + (j >> 1) * 8 + 2 * t + (j & 1);
#pragma unroll
            for (int i = 0; i < VW; ++i) vr[j][i] = 0;
            if (key < hi) {
                const int64_t base = static_cast<int64_t>(table[key / p.block_size]) * p.block_bytes;
                const int64_t row = static_cast<int64_t>(key % p.block_size) * p.n_kv_heads + kvh;
                load_words<VW>(p.v + base + row * ROW_BYTES + g * (VQ * BITS / 8), vr[j]);
                if constexpr (KV == KvDtype::Nvfp4) vsc[j] = __ldg(p.v + base + scale_area + row * (HD / 16) + (g * VQ) / 16);
            }
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
    __syncthreads();
    for (int i = tid; i < p.group * HD; i += kThreads) {
        const int r = i / HD, d = i % HD;
        float mm = -INFINITY;
#pragma unroll
        for (int w = 0; w < 4; ++w) mm = fmaxf(mm, s_m[w][r]);
        float ll = 0.0f, oo = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            if (s_m[w][r] == -INFINITY) continue;
            const float f = exp2f(s_m[w][r] - mm);
            ll += s_l[w][r] * f;
            oo += s_o[w][r][d] * f;
        }
        const int64_t hrow = static_cast<int64_t>(q0) * p.n_heads + kvh * p.group + r;
        if (p.n_splits == 1) {
            const float val = oo * (p.v_scale / ll);
            if (p.bf16)
                static_cast<__nv_bfloat16*>(p.out)[hrow * HD + d] = __float2bfloat16_rn(val);
            else
                static_cast<float*>(p.out)[hrow * HD + d] = val;
        } else {
            const int64_t prow = static_cast<int64_t>(split) * p.n_tokens * p.n_heads + hrow;
            p.part_o[prow * HD + d] = oo * p.v_scale;
            if (d == 0) {
                p.part_m[prow] = mm;
                p.part_l[prow] = ll;
            }
        }
    }
}

template <KvDtype KV>
void launch_decode_mma(int64_t hd, const AttnParams& p, dim3 grid, cudaStream_t stream) {
    if (hd == 64)
        decode_mma_kernel<KV, 64><<<grid, kThreads, 0, stream>>>(p);
    else
        decode_mma_kernel<KV, 128><<<grid, kThreads, 0, stream>>>(p);
}

template <KvDtype KV, int HD, int NJ>
void launch_attention(const AttnParams& p, dim3 grid, cudaStream_t stream) {
    constexpr size_t smem = attn_smem_bytes<HD, NJ>();
    auto kernel = paged_attention_kernel<KV, HD, NJ>;
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
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
    if (hd == 64)
        dispatch_nj<KV, 64>(nj, p, grid, stream);
    else
        dispatch_nj<KV, 128>(nj, p, grid, stream);
}

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
    if (kv.head_dim != 64 && kv.head_dim != 128)
        throw std::invalid_argument("paged attention: head_dim " + std::to_string(kv.head_dim) +
                                    " unsupported (64 or 128)");
    if (kv.n_kv_heads <= 0 || n_heads % kv.n_kv_heads != 0 || n_heads / kv.n_kv_heads > 32)
        throw std::invalid_argument("paged attention: " + std::to_string(n_heads) + " query heads over " +
                                    std::to_string(kv.n_kv_heads) + " KV heads (need a multiple, group <= 32)");
    if (kv.block_size <= 0 || kv.block_bytes % 16 != 0)
        throw std::invalid_argument("paged attention: bad block size / block bytes");
}

// ---- KV write ----

// E2M1 of x rounded to nearest, ties to even, saturating to +-6 (what cuda_fp4.h's host conversion and
// float_formats.h's e2m1_from_float do; sm_90 has no cvt for it). The grid is {0, .5, 1, 1.5, 2, 3, 4, 6};
// the midpoints .25, 1.25, 2.5 and 5 go down to the even code, .75, 1.75 and 3.5 up.
__device__ __forceinline__ uint32_t e2m1_rne(float x) {
    const float a = fabsf(x);
    const uint32_t code = a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
                        : a <= 2.5f  ? 4u : a < 3.5f  ? 5u : a <= 5.0f  ? 6u : 7u;
    return code | ((__float_as_uint(x) >> 28) & 0x8u);
}

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
                for (int i = 0; i < 4; ++i)
                    word |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(x[i] / ls, __NV_SATFINITE, __NV_E4M3))
                            << (8 * i);
                *reinterpret_cast<uint32_t*>(block + row * head_dim + quad * 4) = word;
            }
        } else {
            // nvfp4_quantize_row's recipe, operation for operation (IEEE division, no contraction).
            float amax = fmaxf(fmaxf(fabsf(x[0]), fabsf(x[1])), fmaxf(fabsf(x[2]), fabsf(x[3])));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            if (slot >= 0) {
                const float six_global = __fmul_rn(6.0f, ls);
                uint32_t scale = 0x38;  // E4M3 1.0 for an all-zero group
                if (amax > 0.0f) {
                    scale = __nv_cvt_float_to_fp8(__fdiv_rn(amax, six_global), __NV_SATFINITE, __NV_E4M3);
                    if (scale == 0) scale = 0x01;  // at least the smallest subnormal
                }
                const float denom = __fmul_rn(e4m3_to_float_dev(static_cast<uint8_t>(scale)), ls);
                uint32_t codes = 0;
#pragma unroll
                for (int i = 0; i < 4; ++i) codes |= e2m1_rne(__fdiv_rn(x[i], denom)) << (4 * i);
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
            kv_write_kernel<T, KvDtype::Bf16><<<blocks, 256, 0, stream>>>(kt, vt, n_tokens, slots, kv.k, kv.v,
                                                                         kv.block_bytes, bs, nkv, hd, kv.k_scale, kv.v_scale);
            break;
        case KvDtype::Fp8:
            kv_write_kernel<T, KvDtype::Fp8><<<blocks, 256, 0, stream>>>(kt, vt, n_tokens, slots, kv.k, kv.v,
                                                                        kv.block_bytes, bs, nkv, hd, kv.k_scale, kv.v_scale);
            break;
        default:
            kv_write_kernel<T, KvDtype::Nvfp4><<<blocks, 256, 0, stream>>>(kt, vt, n_tokens, slots, kv.k, kv.v,
                                                                          kv.block_bytes, bs, nkv, hd, kv.k_scale, kv.v_scale);
            break;
    }
}

}  // namespace

int paged_attention_splits(const AttentionBatch& b, int64_t n_kv_heads, int64_t n_heads, int sm_count) {
    if (n_kv_heads <= 0 || b.n_seqs <= 0 || b.max_q_len <= 0) return 1;
    const int64_t group = n_heads / n_kv_heads;
    const int64_t q_tile = b.max_q_len > 1 ? std::max<int64_t>(1, 32 / group) : 1;
    const int64_t ctas = b.n_seqs * n_kv_heads * ((b.max_q_len + q_tile - 1) / q_tile);
    const int64_t want = (4 * static_cast<int64_t>(sm_count) + ctas - 1) / ctas;  // ~4 CTAs per SM
    const int64_t most = std::max<int64_t>(1, b.max_kv_len / 256);                 // >= 256 keys a split
    return static_cast<int>(std::clamp<int64_t>(std::min(want, most), 1, 256));
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
    const int64_t q_tile = b.max_q_len > 1 ? (4 * nj) / group : 1;

    AttnParams p{};
    p.q = q;
    p.out = out;
    p.bf16 = dtype == DType::BF16;
    p.k = kv.k;
    p.v = kv.v;
    p.block_bytes = kv.block_bytes;
    p.block_size = static_cast<int>(kv.block_size);
    p.n_kv_heads = static_cast<int>(kv.n_kv_heads);
    p.n_heads = static_cast<int>(args.n_heads);
    p.group = static_cast<int>(group);
    p.q_tile = static_cast<int>(q_tile);
    p.qk_scale = args.scale * kv.k_scale * kLog2e;
    p.v_scale = kv.v_scale;
    p.sliding_window = static_cast<int>(args.sliding_window);
    const int64_t per_split = (b.max_kv_len + n_splits - 1) / n_splits;
    p.keys_per_split = static_cast<int>(std::max<int64_t>(kKeyTile, (per_split + kKeyTile - 1) / kKeyTile * kKeyTile));
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
    if (b.max_q_len == 1 && group <= 8) {
        switch (kv.dtype) {  // decode on the tensor cores
            case KvDtype::Bf16: launch_decode_mma<KvDtype::Bf16>(kv.head_dim, p, grid, stream); break;
            case KvDtype::Fp8: launch_decode_mma<KvDtype::Fp8>(kv.head_dim, p, grid, stream); break;
            default: launch_decode_mma<KvDtype::Nvfp4>(kv.head_dim, p, grid, stream); break;
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
        if (kv.head_dim == 64)
            combine_kernel<64><<<blocks, kThreads, 0, stream>>>(p.part_o, p.part_m, p.part_l, n_splits, n_rows,
                                                                p.bf16, out);
        else
            combine_kernel<128><<<blocks, kThreads, 0, stream>>>(p.part_o, p.part_m, p.part_l, n_splits, n_rows,
                                                                 p.bf16, out);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
    }
}

void kv_cache_write(const void* k, const void* v, DType dtype, int64_t n_tokens, const int64_t* slot_mapping,
                    const PagedKvLayer& kv, cudaStream_t stream) {
    if (dtype != DType::F32 && dtype != DType::BF16) throw std::invalid_argument("kv_cache_write: K/V must be F32 or BF16");
    if (kv.dtype == KvDtype::F32) throw std::invalid_argument("kv_cache_write: the F32 KV cache is host-only");
    if (kv.head_dim <= 0 || kv.head_dim % 32 != 0)
        throw std::invalid_argument("kv_cache_write: head_dim " + std::to_string(kv.head_dim) +
                                    " unsupported (a multiple of 32)");
    if (n_tokens <= 0) return;
    if (dtype == DType::F32)
        launch_write<float>(k, v, n_tokens, slot_mapping, kv, stream);
    else
        launch_write<__nv_bfloat16>(k, v, n_tokens, slot_mapping, kv, stream);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
