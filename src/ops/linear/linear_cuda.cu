// Decode GEMV kernels. NVFP4 weights: tensor cores (mma.sync m16n8k16, bf16 A/B, fp32 accumulation), 1..16
// activation rows per launch. BF16 weights: CUDA cores, float32 accumulation.
//
// NVFP4 (gemv_nvfp4_mma_kernel). A CTA owns 16 output rows (the M of the mma) and splits k over its 8 warps;
// the warps' partial sums meet in shared memory. The weights are the A operand, the activations (up to 8
// tokens, zero-padded) the B operand, so m = 1..8 costs one mma per 256 weights and m = 9..16 two: the
// work per weight is the decode, not the FMAs. Lane (g = lane / 4, t = lane % 4) loads 16 bytes (32 codes)
// of rows g and g + 8 at chunk t of each 4-chunk group, so the 4 lanes of a row read 64 contiguous bytes.
// The k order inside an mma is a free permutation shared by A and B: lane t's four k slots {2t, 2t+1,
// 2t+8, 2t+9} take codes (p, p+4) and (p+1, p+5) of one of its words (8 codes), which is the pairing the
// integer decode below produces with one shift-and-mask per 16-bit half; the activations are permuted to
// match (one byte permute per pair). Each A pair is multiplied by its block's E4M3 scale before the mma,
// so blocks of 16 need no separate accumulators and an mma may mix blocks.
//
// Why bf16 and not fp16 for A/B: the activations arrive as BF16 (or F32). BF16 B is the loaded words as
// they are; fp16 B would cost a conversion per activation and is exact only for 2^-14 <= |x| <= 65504, a
// range nothing guarantees (SwiGLU outputs of some models pass 65504; small activations lose bits), and
// an overflow is silent. On the weight side both are exact: an E2M1 value times a power of two has 2
// significant bits, times an E4M3 scale 6, within bf16's 8 (and fp16's 11), and bf16's exponent range
// holds every product below, so nothing rounds. The decode costs the same as the fp16 trick (~3 integer
// operations per pair, plus one bf16x2 multiply for the scale, which fp16 would need too). F32 activations
// enter as three bf16 parts x = hi + mid + lo (exact: 3 x 8 bits = float32's 24), three mmas into the same
// accumulators, so F32 outputs keep float32 accuracy.
//
// Exact values along the way (s = the E4M3 scale):
//   code s.eem placed as bf16 bits s.000000ee.m000000 = e2m1 * 2^-126 (0.5 is a bf16 subnormal, the rest
//   normal); the scale as bf16 s * 2^118; their product e2m1 * s * 2^-8 lies in [2^-18, 10.5], a normal
//   bf16 with <= 6 significant bits: exact (fma.rn.bf16x2 keeps subnormal inputs). The epilogue multiplies
//   by 2^8 * global_scale.
//
// NVFP4 on CUDA cores (gemv_nvfp4_kernel, the first version): still faster at m = 1 below 65536 rows
// (measured 12-15%, docs/perf.md), where gemv_nvfp4 sends it; integer E2M1 decode to fp16 bits, fp32 FMAs.
//
// BF16 weights (gemv_bf16_kernel): one warp owns R consecutive output rows and sweeps k with 16-byte
// streaming loads (evict-first), double-buffered; activations re-read through L1 per group of R rows.
//
// FP8 E4M3 weights (gemv_fp8_kernel): the BF16 kernel's structure with 16 weights per 16-byte load; each
// lane takes two loads (k steps 32 apart) a step so a row has as many bytes in flight as in the BF16 kernel.
// The codes widen to fp16 in hardware (cvt.rn.f16x2.e4m3x2, sm_89+; exact: every E4M3 value is an fp16
// normal or zero), then to float32; the per-tensor scale multiplies the float32 sum once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/mma_sync.cuh"
#include "cuda/pdl.cuh"
#include "ops/linear/gemv_common.cuh"
#include "ops/linear/linear_cuda.h"
#include "ops/linear/nvfp4_decode.cuh"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 128;  // small blocks spread a 4096-row matrix over all SMs
constexpr int kWarps = kThreads / 32;

// The warp's total of value `index` of acc (row-major: r * MT + mi), valid on the lanes with
// (lane & (32 / (MT R) - 1)) == 0 (reduce_scatter).
template <int MT, int R>
__device__ __forceinline__ float warp_total(float (&acc)[R][MT], int lane, int& index) {
    float flat[MT * R];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) flat[r * MT + mi] = acc[r][mi];
    return reduce_scatter<MT * R>(flat, lane, index);
}

template <int MT, int R, class XT>
__device__ __forceinline__ void reduce_and_store(float (&acc)[R][MT], int lane, int64_t row0, int m, int64_t n,
                                                 float out_scale, const float* __restrict__ bias,
                                                 XT* __restrict__ y) {
    constexpr int V = MT * R;
    int index = 0;
    const float total = warp_total(acc, lane, index);
    if ((lane & (32 / V - 1)) != 0) return;
    const int r = index / MT, mi = index % MT;
    const int64_t row = row0 + r;
    if (row >= n || mi >= m) return;
    float out = total * out_scale;
    if (bias) out += bias[row];
    store_y(y + static_cast<int64_t>(mi) * n + row, out);
}

// The CUDA-core GEMVs below request their first weights (constants) before pdl_wait and read activations only
// after it, through coherent loads (cuda/pdl.cuh, rule 1): a decode GEMV of a few MB is latency-bound, and
// its first DRAM round trip then overlaps the kernel before it (a norm, the routing). They fill the GPU, so
// they release their dependents only at exit. A warp with no rows still waits before it ends (rule 2).
__device__ __forceinline__ void early_wait(bool& waited) {
    if (!waited) pdl_wait(), waited = true;
}

// Sums of the CTA's KS warps for V values each, in warp order (the same bits every run): warps that split k
// (KS = kWarps) write their warp totals to part, and threads < V add them and store. Every thread of the CTA
// calls it (two barriers).
template <int MT, int R, int KS, class XT>
__device__ __forceinline__ void split_reduce_and_store(float (&acc)[R][MT], float (&part)[KS][MT * R],
                                                       int sub, int lane, int64_t row0, int m, int64_t n,
                                                       float out_scale, const float* __restrict__ bias,
                                                       XT* __restrict__ y) {
    constexpr int V = MT * R;
    int index = 0;
    const float total = warp_total(acc, lane, index);
    if ((lane & (32 / V - 1)) == 0) part[sub][index] = total;
    __syncthreads();
    if (threadIdx.x < V) {
        const int v = static_cast<int>(threadIdx.x), r = v / MT, mi = v % MT;
        float out = part[0][v];
#pragma unroll
        for (int s2 = 1; s2 < KS; ++s2) out += part[s2][v];
        const int64_t row = row0 + r;
        if (row < n && mi < m) {
            out *= out_scale;
            if (bias) out += bias[row];
            store_y(y + static_cast<int64_t>(mi) * n + row, out);
        }
    }
    __syncthreads();  // part is rewritten by the next row group
}

// y[m, n] = x[m, k] W^T, W NVFP4. Chunk c of a row: 16 bytes of codes (elements 32c..32c+31) and the
// 2 E4M3 scales of its two blocks. KS = 1: a warp owns R rows and all of k; KS = kWarps: the CTA's warps
// share R rows and split k (warp w takes chunks lane + 32 (w + KS i)), for matrices of few rows
// (gemv_bf16_kernel).
template <int MT, int R, class XT, int KS>
__global__ void __launch_bounds__(kThreads)
    gemv_nvfp4_kernel(const XT* __restrict__ x, int m, int64_t k, const uint4* __restrict__ wq,
                      const unsigned short* __restrict__ ws, float out_scale, const float* __restrict__ bias,
                      XT* __restrict__ y, int64_t n) {
    static_assert(KS == 1 || KS == kWarps, "a row group is one warp or the whole CTA");
    __shared__ float part[KS][MT * R];
    // The first row group's first chunks are constants: requested before pdl_wait (early_wait, below).
    bool waited = false;
    const int lane = threadIdx.x & 31;
    const int sub = KS > 1 ? static_cast<int>(threadIdx.x >> 5) : 0;  // this warp's share of k
    const int64_t chunks = k >> 5;
    const int64_t group = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / (32 * KS);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * (kWarps / KS) * R;
    const int64_t first = lane + 32 * sub, step = 32 * KS;
    // With KS > 1 every warp of the CTA runs the same rows, so the barriers of the reduction are reached by
    // all.
    for (int64_t row0 = group * R; row0 < n; row0 += stride) {
        int64_t base[R];  // chunk index of each row's start; rows past n repeat the last (not stored)
#pragma unroll
        for (int r = 0; r < R; ++r) base[r] = min(row0 + r, n - 1) * chunks;
        float acc[R][MT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

        uint4 q_next[R];
        uint32_t s_next[R];
        if (first < chunks) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                q_next[r] = __ldcs(wq + base[r] + first);
                s_next[r] = __ldcs(ws + base[r] + first);
            }
        }
        early_wait(waited);
        for (int64_t c = first; c < chunks; c += step) {
            uint4 q[R];
            uint32_t s[R];
#pragma unroll
            for (int r = 0; r < R; ++r) q[r] = q_next[r], s[r] = s_next[r];
            if (c + step < chunks) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    q_next[r] = __ldcs(wq + base[r] + c + step);
                    s_next[r] = __ldcs(ws + base[r] + c + step);
                }
            }
            const XT* xc = x + c * 32;
#pragma unroll
            for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 16
                float part[R][MT];
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) part[r][mi] = 0.0f;
#pragma unroll
                for (int j = 2 * b; j < 2 * b + 2; ++j) {  // words of 8 codes
                    float wf[R][8];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        e2m1x8_to_float(word_of(q[r], j), wf[r]);
                    }
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) {
                        if (mi >= m) break;  // warp-uniform
                        float xv[8];
                        load_x8<XLoad::Coherent>(xc + static_cast<int64_t>(mi) * k + 8 * j, xv);
#pragma unroll
                        for (int r = 0; r < R; ++r)
#pragma unroll
                            for (int e = 0; e < 8; ++e) part[r][mi] = fmaf(wf[r][e], xv[e], part[r][mi]);
                    }
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float sc = e4m3_exact(s[r] >> (8 * b));
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = fmaf(part[r][mi], sc, acc[r][mi]);
                }
            }
        }
        if constexpr (KS == 1)
            reduce_and_store<MT, R>(acc, lane, row0, m, n, out_scale, bias, y);
        else
            split_reduce_and_store<MT, R, KS>(acc, part, sub, lane, row0, m, n, out_scale, bias, y);
    }
    early_wait(waited);
}

// ---- NVFP4 on the tensor cores ----

constexpr int kMmaWarps = 8;  // warps splitting k for one 16-row tile
constexpr int kMmaThreads = kMmaWarps * 32;

// The 8 E2M1 codes of w (element e in bits 4e..4e+3) as 4 bf16x2 pairs (e, e + 4) for e = 0..3, each
// e2m1 * 2^-126 exactly: sign to bit 15, eem to bits 8..6 of each half (one shift and mask per part).
__device__ __forceinline__ void e2m1x8_to_bf16_pairs(uint32_t w, uint32_t (&p)[4]) {
    constexpr uint32_t kMag = 0x01c001c0u, kSign = 0x80008000u;
    p[0] = ((w << 6) & kMag) | ((w << 12) & kSign);
    p[1] = ((w << 2) & kMag) | ((w << 8) & kSign);
    p[2] = ((w >> 2) & kMag) | ((w << 4) & kSign);
    p[3] = ((w >> 6) & kMag) | (w & kSign);
}

// E4M3 code (low 8 bits of b) as a bf16x2 pair (s * 2^118, s * 2^118), exactly: float32 placement gives
// s * 2^-120 (subnormal codes too), two exact power-of-two multiplies give s * 2^118 (<= 2^127; zero stays
// zero), and the high half of that float is the bf16 (s has <= 4 significant bits).
__device__ __forceinline__ uint32_t e4m3_to_bf16x2_scaled(uint32_t b) {
    const float f = __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * 0x1p127f * 0x1p111f;
    const uint32_t u = __float_as_uint(f);
    return __byte_perm(u, 0u, 0x3232);
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

// bf16x2 of (lo, hi) rounded to nearest; and the floats a pair holds.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ float bf16_lo(uint32_t p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t p) { return __uint_as_float(p & 0xffff0000u); }

// Activation operand of one chunk (32 consecutive k) for one token: BF16 as loaded, F32 as loaded (split
// into bf16 parts when used). Coherent loads: the pipe kernel loads weights before its grid-dependency wait
// (gemv_common.cuh, XLoad).
template <class XT>
struct XChunk;
template <>
struct XChunk<__nv_bfloat16> {
    static constexpr int kParts = 1;
    uint4 v[4];
    __device__ __forceinline__ void load(const __nv_bfloat16* p) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = load_vector<XLoad::Coherent>(reinterpret_cast<const uint4*>(p) + i);
    }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = make_uint4(0, 0, 0, 0);
    }
    // B pairs (x_{8j+q}, x_{8j+q+4}) for q = 0..3 of word j, part 0.
    __device__ __forceinline__ void pairs(int j, uint32_t (&b)[kParts][4]) const {
        const uint4 u = v[j];
        b[0][0] = __byte_perm(u.x, u.z, 0x5410);
        b[0][1] = __byte_perm(u.x, u.z, 0x7632);
        b[0][2] = __byte_perm(u.y, u.w, 0x5410);
        b[0][3] = __byte_perm(u.y, u.w, 0x7632);
    }
};
template <>
struct XChunk<float> {
    static constexpr int kParts = 3;
    float4 v[8];
    __device__ __forceinline__ void load(const float* p) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = load_vector<XLoad::Coherent>(reinterpret_cast<const float4*>(p) + i);
    }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = make_float4(0, 0, 0, 0);
    }
    // x = hi + mid + lo exactly: each residual is exact in float32 and the last fits bf16's 8 bits.
    __device__ __forceinline__ void pairs(int j, uint32_t (&b)[kParts][4]) const {
        const float4 a = v[2 * j], c = v[2 * j + 1];
        const float xs[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float lo = xs[q], hi = xs[q + 4];
#pragma unroll
            for (int part = 0; part < 3; ++part) {
                const uint32_t p = pack_bf16x2(lo, hi);
                b[part][q] = p;
                lo -= bf16_lo(p), hi -= bf16_hi(p);
            }
        }
    }
};

// y[m, n] = x[m, k] W^T for one 16-row tile per CTA, m <= 8 * NT. Step s of a warp covers chunks 8s + t
// and 8s + 4 + t of rows g and g + 8 (lane t); the next step's weights load before this one's math.
template <int NT, class XT>
__global__ void __launch_bounds__(kMmaThreads)
    gemv_nvfp4_mma_kernel(const XT* __restrict__ x, int m, int64_t k, const uint4* __restrict__ wq,
                          const unsigned short* __restrict__ ws, float out_scale, const float* __restrict__ bias,
                          XT* __restrict__ y, int64_t n) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    constexpr int P = XChunk<XT>::kParts;
    __shared__ float red[kMmaWarps][NT * 8][16];  // [warp][token][row]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t chunks = k >> 5;
    const int64_t steps = (chunks + 7) >> 3;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
    // Rows past n repeat the last row (loaded, never stored).
    const int64_t rb0 = min(row0 + g, n - 1) * chunks, rb1 = min(row0 + g + 8, n - 1) * chunks;

    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    struct Stage {
        uint4 q[2][2];        // [chunk][row g, g + 8]
        uint32_t s[2][2];     // 2 scale codes each
    };
    auto load_stage = [&](int64_t step, Stage& st) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t c = step * 8 + h * 4 + t;
            if (c < chunks) {
                st.q[h][0] = __ldcs(wq + rb0 + c), st.q[h][1] = __ldcs(wq + rb1 + c);
                st.s[h][0] = __ldcs(ws + rb0 + c), st.s[h][1] = __ldcs(ws + rb1 + c);
            } else {  // past k: zero codes (value 0) and zero scales
                st.q[h][0] = st.q[h][1] = make_uint4(0, 0, 0, 0);
                st.s[h][0] = st.s[h][1] = 0;
            }
        }
    };

    Stage cur, nxt;
    int64_t step = warp;
    if (step < steps) load_stage(step, cur);
    for (; step < steps; step += kMmaWarps) {
        if (step + kMmaWarps < steps) load_stage(step + kMmaWarps, nxt);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t c = step * 8 + h * 4 + t;
            XChunk<XT> xc[NT];
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                const int tok = i * 8 + g;
                if (c < chunks && tok < m) xc[i].load(x + static_cast<int64_t>(tok) * k + c * 32);
                else xc[i].zero();
            }
            uint32_t sc[2][2];  // [row][block of the chunk]
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                sc[r][0] = e4m3_to_bf16x2_scaled(cur.s[h][r]);
                sc[r][1] = e4m3_to_bf16x2_scaled(cur.s[h][r] >> 8);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {  // word j: codes 8j..8j+7, block j / 2
                uint32_t pa[2][4];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    e2m1x8_to_bf16_pairs(word_of(cur.q[h][r], j), pa[r]);
#pragma unroll
                    for (int q = 0; q < 4; ++q) pa[r][q] = bf16x2_mul(pa[r][q], sc[r][j >> 1]);
                }
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    if (i * 8 >= m) break;  // warp-uniform
                    uint32_t b[P][4];
                    xc[i].pairs(j, b);
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const uint32_t a[4] = {pa[0][2 * half], pa[1][2 * half], pa[0][2 * half + 1],
                                               pa[1][2 * half + 1]};
#pragma unroll
                        for (int part = 0; part < P; ++part)
                            mma_bf16_16816(acc[i], a, b[part][2 * half], b[part][2 * half + 1]);
                    }
                }
            }
        }
        cur = nxt;
    }

    // Accumulator i: rows g (0, 1) and g + 8 (2, 3), tokens 8i + 2t (0, 2) and 8i + 2t + 1 (1, 3).
#pragma unroll
    for (int i = 0; i < NT; ++i) {
        red[warp][i * 8 + 2 * t][g] = acc[i][0];
        red[warp][i * 8 + 2 * t + 1][g] = acc[i][1];
        red[warp][i * 8 + 2 * t][g + 8] = acc[i][2];
        red[warp][i * 8 + 2 * t + 1][g + 8] = acc[i][3];
    }
    __syncthreads();
    if (threadIdx.x < NT * 8 * 16) {
        const int r = threadIdx.x & 15, tok = threadIdx.x >> 4;
        const int64_t row = row0 + r;
        if (tok < m && row < n) {
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < kMmaWarps; ++w) s += red[w][tok][r];
            float out = s * out_scale;
            if (bias) out += bias[row];
            store_y(y + static_cast<int64_t>(tok) * n + row, out);
        }
    }
}

// ---- NVFP4 on the tensor cores, version 3: one warp per tile, a register pipeline of D steps ----
//
// Same mma layout and decode as gemv_nvfp4_mma_kernel, organised against its measured latency bound
// (docs/perf.md, version 2): a warp owns a whole tile (or 1/KS of its k, KS = 1, 2, 4, chosen so the grid
// puts >= 8 warps on every SM) and walks k in steps of 4 chunks (lane t takes chunk 4s + t of its 2 rows:
// 1 KB of weights a warp-step, the 4 lanes of a row read 64 contiguous bytes). Each step's weights,
// scales AND activations are loaded D steps ahead into a ring of registers (D = 3 for BF16 at m <= 8,
// else 2), so up to D KB of weights per warp are in flight and no activation load sits on the critical path.
// KS = 1 has no barrier and no shared memory: the lane stores its accumulators directly. KS > 1 sums the
// k-parts in shared memory once (one barrier). The tile is either 16 rows of one projection (up to three
// projections with their own global scales, biases and outputs in one launch: q, k, v), or, for gate/up,
// 8 gate rows as mma rows 0..7 and the same 8 up rows as mma rows 8..15, so lane (g, t) holds gate and up
// of row g for tokens 2t, 2t + 1 and writes silu(gate) * up without any exchange.
//
// Resources of gemv_nvfp4_pipe_kernel<NT, KS, XT> (ptxas -v, CUDA 13.0, -O3, sm_90a; no spills, no stack):
//   registers  NT = 1: BF16 126 / 128 / 126 for KS = 1 / 2 / 4 (capped at 128: 4 CTAs an SM),
//                      F32 143 / 133 / 133
//              NT = 2: BF16 153 / 140 / 143, F32 210 / 204 / 204
//              the 4-stage alternative (BF16, NT = 1, DEEP): 162 / 157 / 157 (3 CTAs an SM)
//   static shared memory: 0 for KS = 1, NT * 2048 bytes for KS = 2, 4 (the k-part sums); 128 threads.
// Not yet in src/tune/registry.cpp: its tests pin the NVFP4 candidate count and want sm_120a ptxas figures
// too, so the winner is registered once measured.

constexpr int kPipeWarps = 4;
constexpr int kPipeThreads = kPipeWarps * 32;
constexpr int kMaxProjections = 3;

struct PipeProjection {
    const uint4* wq = nullptr;           // [n, k / 32] chunks of 32 codes
    const unsigned short* ws = nullptr;  // [n, k / 32] the 2 E4M3 scales of each chunk
    float out_scale = 1.0f;              // global scale * 2^8 (undoes the bf16 placement)
    const float* bias = nullptr;         // [n] or null
    void* y = nullptr;                   // [m, n], XT
    int64_t n = 0;
    int64_t tile_end = 0;  // tiles of all projections up to and including this one
};
struct PipeJob {
    PipeProjection proj[kMaxProjections];
    int64_t total_tiles = 0;
    bool gate_up = false;  // proj[0] = gate, proj[1] = up, 8-row tiles; proj[0].y gets silu(gate) * up
};

// BF16 at m <= 8 (the decode case): 3 stages of 26 registers, capped at 128 registers so 4 CTAs (16 warps)
// fit an SM: a 2-tile-per-SM grid (gate/up at 14336 rows: 1792 warps) then runs in one wave, not 1.1.
// F32 activations or m > 8: 2 stages (a stage holds 42-74 registers), no cap.
template <int NT, class XT>
constexpr int pipe_depth() {
    return NT == 1 && sizeof(XT) == 2 ? 3 : 2;
}
template <int NT, class XT>
constexpr int pipe_min_ctas() {
    return NT == 1 && sizeof(XT) == 2 ? 4 : 1;
}
// The alternative for measuring (gemv_nvfp4_pipelined_deep, BF16 at m <= 8 only): 4 stages, no register
// cap (ptxas: ~158 registers, 12 warps an SM), more bytes in flight per warp, fewer warps.
constexpr int kDeepPipeDepth = 4;

// One chunk (32 k) of rows g and g + 8 against NT groups of 8 tokens: decode, scale, mma into acc.
template <int NT, class XT>
__device__ __forceinline__ void mma_chunk(const uint4 (&q)[2], const uint32_t (&s)[2],
                                          const XChunk<XT> (&xc)[NT], int m, float (&acc)[NT][4]) {
    constexpr int P = XChunk<XT>::kParts;
    uint32_t sc[2][2];  // [row][block of the chunk]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        sc[r][0] = e4m3_to_bf16x2_scaled(s[r]);
        sc[r][1] = e4m3_to_bf16x2_scaled(s[r] >> 8);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j: codes 8j..8j+7, block j / 2
        uint32_t pa[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            e2m1x8_to_bf16_pairs(word_of(q[r], j), pa[r]);
#pragma unroll
            for (int p = 0; p < 4; ++p) pa[r][p] = bf16x2_mul(pa[r][p], sc[r][j >> 1]);
        }
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            if (i * 8 >= m) break;  // warp-uniform
            uint32_t b[P][4];
            xc[i].pairs(j, b);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const uint32_t a[4] = {pa[0][2 * half], pa[1][2 * half], pa[0][2 * half + 1],
                                       pa[1][2 * half + 1]};
#pragma unroll
                for (int part = 0; part < P; ++part)
                    mma_bf16_16816(acc[i], a, b[part][2 * half], b[part][2 * half + 1]);
            }
        }
    }
}

// y = x W^T for the tiles of `job`, m <= 8 * NT tokens; KS warps share a tile's k, kPipeWarps / KS tiles
// make a CTA.
template <int NT, int KS, class XT, bool DEEP = false>
__global__ void __launch_bounds__(kPipeThreads, DEEP ? 1 : pipe_min_ctas<NT, XT>())
    gemv_nvfp4_pipe_kernel(const XT* __restrict__ x, int m, int64_t k, const PipeJob job) {
    constexpr int D = DEEP ? kDeepPipeDepth : pipe_depth<NT, XT>();
    constexpr int kTilesPerCta = kPipeWarps / KS;
    __shared__ float red[KS > 1 ? kPipeWarps : 1][NT * 8][16];  // [warp][token][row], k-parts 1..KS-1
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int k_part = warp % KS;
    const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTilesPerCta + warp / KS;
    const bool active = tile < job.total_tiles;  // inactive warps still reach the barrier

    // The tile's projection(s): ia for mma rows 0..7, ib for rows 8..15 (the same one unless gate/up).
    int ia = 0;
    int64_t tile_begin = 0;
#pragma unroll
    for (int i = 1; i < kMaxProjections; ++i)
        if (!job.gate_up && tile >= job.proj[i - 1].tile_end && job.proj[i].n > 0) {
            ia = i;
            tile_begin = job.proj[i - 1].tile_end;
        }
    const int ib = job.gate_up ? 1 : ia;
    const int64_t row0 = job.gate_up ? tile * 8 : (tile - tile_begin) * 16;
    const int64_t chunks = k >> 5;
    const uint4* __restrict__ qa;
    const uint4* __restrict__ qb;
    const unsigned short* __restrict__ sa;
    const unsigned short* __restrict__ sb;
    {
        const PipeProjection pa = pick_projection(job, ia), pb = pick_projection(job, ib);
        // Rows past n repeat the last row (loaded, never stored).
        const int64_t ra = min(row0 + g, pa.n - 1), rb = min(row0 + g + (job.gate_up ? 0 : 8), pb.n - 1);
        qa = pa.wq + ra * chunks, qb = pb.wq + rb * chunks;
        sa = pa.ws + ra * chunks, sb = pb.ws + rb * chunks;
    }

    const int64_t steps = (chunks + 3) >> 2;
    const int64_t per_part = (steps + KS - 1) / KS;
    const int64_t s_begin = min(steps, k_part * per_part);
    const int64_t s_end = active ? min(steps, s_begin + per_part) : s_begin;

    struct Stage {
        uint4 q[2];         // rows a, b: chunk 4 step + t
        uint32_t s[2];      // their 2 scale codes
        XChunk<XT> xc[NT];  // token 8 i + g at that chunk, zero past m
    };
    // Past the warp's range or past k: zero codes, zero scales, zero activations (adds exact zeros).
    auto load_weights = [&](int64_t step, Stage& st) {
        const int64_t c = step * 4 + t;
        if (step < s_end && c < chunks) {
            st.q[0] = __ldcs(qa + c), st.q[1] = __ldcs(qb + c);
            st.s[0] = __ldcs(sa + c), st.s[1] = __ldcs(sb + c);
        } else {
            st.q[0] = st.q[1] = make_uint4(0, 0, 0, 0);
            st.s[0] = st.s[1] = 0;
        }
    };
    auto load_acts = [&](int64_t step, Stage& st) {
        const int64_t c = step * 4 + t;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            const int tok = i * 8 + g;
            if (step < s_end && c < chunks && tok < m)
                st.xc[i].load(x + static_cast<int64_t>(tok) * k + c * 32);
            else
                st.xc[i].zero();
        }
    };

    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    Stage ring[D];
    // The weights are constants, so their first D steps load before waiting on the previous kernel in the
    // stream (cuda/pdl.cuh); x and y only after it.
#pragma unroll
    for (int d = 0; d < D; ++d) load_weights(s_begin + d, ring[d]);
    pdl_wait();
#pragma unroll
    for (int d = 0; d < D; ++d) load_acts(s_begin + d, ring[d]);
    for (int64_t base = s_begin; base < s_end; base += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (base + d < s_end)
                mma_chunk<NT, XT>(ring[d].q, ring[d].s, ring[d].xc, m, acc);  // warp-uniform
            load_weights(base + d + D, ring[d]);
            load_acts(base + d + D, ring[d]);
        }
    }
    // The loads are issued: the next kernel may be scheduled now (it still waits for this whole grid). Not
    // earlier: a dependent resident from the start takes SM slots this one-wave grid needs (cuda/pdl.cuh).
    pdl_launch_dependents();
    // Accumulator i: mma rows g (0, 1) and g + 8 (2, 3), tokens 8i + 2t (0, 2) and 8i + 2t + 1 (1, 3).
    if constexpr (KS > 1) {
        if (k_part != 0) {
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                red[warp][i * 8 + 2 * t][g] = acc[i][0];
                red[warp][i * 8 + 2 * t + 1][g] = acc[i][1];
                red[warp][i * 8 + 2 * t][g + 8] = acc[i][2];
                red[warp][i * 8 + 2 * t + 1][g + 8] = acc[i][3];
            }
        }
        __syncthreads();
        if (k_part != 0) return;
#pragma unroll
        for (int w = 1; w < KS; ++w)
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                acc[i][0] += red[warp + w][i * 8 + 2 * t][g];
                acc[i][1] += red[warp + w][i * 8 + 2 * t + 1][g];
                acc[i][2] += red[warp + w][i * 8 + 2 * t][g + 8];
                acc[i][3] += red[warp + w][i * 8 + 2 * t + 1][g + 8];
            }
    }
    if (!active) return;
    const PipeProjection pa = pick_projection(job, ia), pb = pick_projection(job, ib);
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int tok = i * 8 + 2 * t + e;
            if (tok >= m) continue;
            if (job.gate_up) {
                const int64_t row = row0 + g;
                if (row >= pa.n) continue;
                float gate = acc[i][e] * pa.out_scale, up = acc[i][2 + e] * pb.out_scale;
                if (pa.bias) gate += pa.bias[row];
                if (pb.bias) up += pb.bias[row];
                store_y(static_cast<XT*>(pa.y) + static_cast<int64_t>(tok) * pa.n + row,
                        gate / (1.0f + expf(-gate)) * up);
            } else {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int64_t row = row0 + g + 8 * half;
                    if (row >= pa.n) continue;
                    float out = acc[i][2 * half + e] * pa.out_scale;
                    if (pa.bias) out += pa.bias[row];
                    store_y(static_cast<XT*>(pa.y) + static_cast<int64_t>(tok) * pa.n + row, out);
                }
            }
        }
}

// y[m, n] = x[m, k] W^T, W BF16. Chunk c of a row: 32 bytes (elements 16c..16c+15) as two 16-byte loads.
// KS = 1: each warp owns R rows and sweeps all of k. KS = kWarps: the CTA's warps share R rows and split k
// (warp w takes chunks lane + 32 (w + KS i)), summed through shared memory: for matrices of few rows (MoE
// routers, 128 x 2048; narrow k/v projections), where one warp a row group leaves most SMs idle and each
// warp walks k alone (Qwen3-30B-A3B's router took 4.5 us for 0.5 MB, H100 kernel trace, docs/perf.md).
template <int MT, int R, class XT, int KS>
__global__ void __launch_bounds__(kThreads)
    gemv_bf16_kernel(const XT* __restrict__ x, int m, int64_t k, const uint4* __restrict__ w,
                     const float* __restrict__ bias, XT* __restrict__ y, int64_t n) {
    static_assert(KS == 1 || KS == kWarps, "a row group is one warp or the whole CTA");
    __shared__ float part[KS][MT * R];
    bool waited = false;  // first weights before pdl_wait (early_wait)
    const int lane = threadIdx.x & 31;
    const int sub = KS > 1 ? static_cast<int>(threadIdx.x >> 5) : 0;  // this warp's share of k
    const int64_t chunks = k >> 4;
    const int64_t group = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / (32 * KS);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * (kWarps / KS) * R;
    // With KS > 1 every warp of the CTA runs the same rows, so the barriers below are reached by all.
    for (int64_t row0 = group * R; row0 < n; row0 += stride) {
        int64_t base[R];  // uint4 index of each row's start
#pragma unroll
        for (int r = 0; r < R; ++r) base[r] = min(row0 + r, n - 1) * (k >> 3);
        float acc[R][MT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

        const int64_t first = lane + 32 * sub, step = 32 * KS;
        uint4 q_next[R][2];
        if (first < chunks) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                q_next[r][0] = __ldcs(w + base[r] + 2 * first);
                q_next[r][1] = __ldcs(w + base[r] + 2 * first + 1);
            }
        }
        early_wait(waited);
        for (int64_t c = first; c < chunks; c += step) {
            uint4 q[R][2];
#pragma unroll
            for (int r = 0; r < R; ++r) q[r][0] = q_next[r][0], q[r][1] = q_next[r][1];
            if (c + step < chunks) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    q_next[r][0] = __ldcs(w + base[r] + 2 * (c + step));
                    q_next[r][1] = __ldcs(w + base[r] + 2 * (c + step) + 1);
                }
            }
            const XT* xc = x + c * 16;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float wf[R][8];
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint32_t wd = word_of(q[r][h], j);
                        wf[r][2 * j] = __uint_as_float(wd << 16);
                        wf[r][2 * j + 1] = __uint_as_float(wd & 0xffff0000u);
                    }
#pragma unroll
                for (int mi = 0; mi < MT; ++mi) {
                    if (mi >= m) break;
                    float xv[8];
                    load_x8<XLoad::Coherent>(xc + static_cast<int64_t>(mi) * k + 8 * h, xv);
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r][mi] = fmaf(wf[r][e], xv[e], acc[r][mi]);
                }
            }
        }
        if constexpr (KS == 1)
            reduce_and_store<MT, R>(acc, lane, row0, m, n, 1.0f, bias, y);
        else
            split_reduce_and_store<MT, R, KS>(acc, part, sub, lane, row0, m, n, 1.0f, bias, y);
    }
    early_wait(waited);
}

// The 4 E4M3 codes of wd (element e in byte e) as float32, exactly.
__device__ __forceinline__ void e4m3x4_to_float(uint32_t wd, float* v) {
    const __half2 lo = __half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(wd & 0xffffu), __NV_E4M3));
    const __half2 hi = __half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(wd >> 16), __NV_E4M3));
    const float2 a = __half22float2(lo), b = __half22float2(hi);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

// y[m, n] = (x[m, k] W^T) * scale (+ bias), W E4M3. Chunk c of a row: 16 bytes (elements 16c..16c+15), one
// 16-byte load; a lane's step takes chunks c and c + 32, and the next step's two are loaded a step ahead.
template <int MT, int R, class XT>
__global__ void __launch_bounds__(kThreads)
    gemv_fp8_kernel(const XT* __restrict__ x, int m, int64_t k, const uint4* __restrict__ w, float scale,
                    const float* __restrict__ bias, XT* __restrict__ y, int64_t n) {
    bool waited = false;  // first weights before pdl_wait (early_wait)
    constexpr int U = 2;  // chunks per lane and step
    const int lane = threadIdx.x & 31;
    const int64_t chunks = k >> 4;
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * R;
    for (int64_t row0 = warp * R; row0 < n; row0 += stride) {
        int64_t base[R];  // uint4 index of each row's start (rows past n re-read row n - 1, never stored)
#pragma unroll
        for (int r = 0; r < R; ++r) base[r] = min(row0 + r, n - 1) * chunks;
        float acc[R][MT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

        uint4 q_next[R][U];
        auto load_step = [&](int64_t c0) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int64_t c = c0 + 32 * u;
#pragma unroll
                for (int r = 0; r < R; ++r) q_next[r][u] = c < chunks ? __ldcs(w + base[r] + c) : make_uint4(0, 0, 0, 0);
            }
        };
        load_step(lane);
        early_wait(waited);
        for (int64_t c0 = lane; c0 < chunks; c0 += 32 * U) {
            uint4 q[R][U];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int u = 0; u < U; ++u) q[r][u] = q_next[r][u];
            if (c0 + 32 * U < chunks) load_step(c0 + 32 * U);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int64_t c = c0 + 32 * u;
                if (c >= chunks) break;
                const XT* xc = x + c * 16;
#pragma unroll
                for (int h = 0; h < 2; ++h) {  // elements 8h..8h+7 of the chunk: words 2h and 2h + 1
                    float wf[R][8];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        e4m3x4_to_float(word_of(q[r][u], 2 * h), wf[r]);
                        e4m3x4_to_float(word_of(q[r][u], 2 * h + 1), wf[r] + 4);
                    }
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) {
                        if (mi >= m) break;
                        float xv[8];
                        load_x8<XLoad::Coherent>(xc + static_cast<int64_t>(mi) * k + 8 * h, xv);
#pragma unroll
                        for (int r = 0; r < R; ++r)
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[r][mi] = fmaf(wf[r][e], xv[e], acc[r][mi]);
                    }
                }
            }
        }
        if constexpr (MT * R > 16) {  // 32 sums: one row at a time keeps the scatter in registers
#pragma unroll
            for (int r = 0; r < R; ++r)
                reduce_and_store<MT, 1>(reinterpret_cast<float(&)[1][MT]>(acc[r]), lane, row0 + r, m, n, scale, bias,
                                        y);
        } else {
            reduce_and_store<MT, R>(acc, lane, row0, m, n, scale, bias, y);
        }
    }
    early_wait(waited);
}

// gemv_fp8_mma: one block per 16-row tile, its 4 warps splitting k (64-wide chunks c, c + 4, ...). A lane
// (g = lane / 4, t = lane % 4) loads 16 weight bytes of rows g and g + 8 at k offset 64c + 16t and the 16
// activations of token g at the same offset; mma j (j = 0..3) takes bytes 4j..4j+3 as the logical k of its
// fragments (2t, 2t+1 | 2t+8, 2t+9), the same for A and B, so every product pairs a weight with its own
// activation. E4M3 enters as bf16 exactly: the code's bits placed as bf16 s.0000eeee.mmm0000 are
// e4m3 * 2^-120 (subnormals too), times 2^112 in a bf16x2 FMA gives e4m3 * 2^-8, a normal bf16 of <= 4
// significant bits; the epilogue multiplies by scale * 2^8.
constexpr int kFp8MmaWarps = 4;
constexpr int kFp8MmaChunksInFlight = 4;  // 64-wide chunks a lane loads before using them (128 weight bytes)

// Bytes (2p, 2p + 1) of w as the bf16x2 (e4m3 * 2^-8) pair, low half first.
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2_scaled(uint32_t w, int p) {
    const uint32_t t = __byte_perm(w, 0u, p == 0 ? 0x1404u : 0x3424u);  // byte 2p -> bits 8..15, 2p+1 -> 24..31
    const uint32_t placed = ((t >> 4) & 0x07f007f0u) | (t & 0x80008000u);
    return bf16x2_mul(placed, 0x77807780u);  // 2^112 in both halves
}

template <int NT>  // token tiles of 8
__global__ void __launch_bounds__(kFp8MmaWarps * 32)
    gemv_fp8_mma_kernel(const __nv_bfloat16* __restrict__ x, int m, int64_t k, const uint8_t* __restrict__ w,
                        float out_scale, const float* __restrict__ bias, __nv_bfloat16* __restrict__ y, int64_t n) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    __shared__ float partial[kFp8MmaWarps][NT][4][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
    const uint4* w_lo = reinterpret_cast<const uint4*>(w + min(row0 + g, n - 1) * k + 16 * t);
    const uint4* w_hi = reinterpret_cast<const uint4*>(w + min(row0 + g + 8, n - 1) * k + 16 * t);
    const uint4* xs[NT];
    bool token_ok[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
        const int token = 8 * i + g;
        token_ok[i] = token < m;
        xs[i] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(token, m - 1)) * k + 16 * t);
    }
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

    constexpr int U = kFp8MmaChunksInFlight;
    const int64_t chunks = k >> 6;  // a chunk is 64 bytes of a row: 4 uint4, one a lane
    for (int64_t c0 = warp; c0 < chunks; c0 += kFp8MmaWarps * U) {
        uint4 ql[U], qh[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t c = c0 + static_cast<int64_t>(kFp8MmaWarps) * u;
            ql[u] = c < chunks ? __ldcs(w_lo + 4 * c) : make_uint4(0, 0, 0, 0);
            qh[u] = c < chunks ? __ldcs(w_hi + 4 * c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t c = c0 + static_cast<int64_t>(kFp8MmaWarps) * u;
            if (c >= chunks) break;
            uint4 xb[NT][2];  // token 8i + g: 16 bf16 activations at k offset 64c + 16t
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                xb[i][0] = token_ok[i] ? __ldg(xs[i] + 8 * c) : make_uint4(0, 0, 0, 0);
                xb[i][1] = token_ok[i] ? __ldg(xs[i] + 8 * c + 1) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {  // bytes 4j..4j+3 of each row: activations 4j..4j+3 = words 2j, 2j+1
                const uint32_t lo = word_of(ql[u], j), hi = word_of(qh[u], j);
                const uint32_t a[4] = {e4m3x2_to_bf16x2_scaled(lo, 0), e4m3x2_to_bf16x2_scaled(hi, 0),
                                       e4m3x2_to_bf16x2_scaled(lo, 1), e4m3x2_to_bf16x2_scaled(hi, 1)};
#pragma unroll
                for (int i = 0; i < NT; ++i)
                    mma_bf16_16816(acc[i], a, word_of(xb[i][j >> 1], 2 * (j & 1)),
                                   word_of(xb[i][j >> 1], 2 * (j & 1) + 1));
            }
        }
    }
    // Sum the warps' k parts; acc[i] = rows (g, g, g + 8, g + 8) x tokens (8i + 2t, 8i + 2t + 1, same).
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) partial[warp][i][e][lane] = acc[i][e];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sum = 0.0f;
#pragma unroll
            for (int v = 0; v < kFp8MmaWarps; ++v) sum += partial[v][i][e][lane];
            const int64_t row = row0 + g + (e >= 2 ? 8 : 0);
            const int token = 8 * i + 2 * t + (e & 1);
            if (row >= n || token >= m) continue;
            float out = sum * out_scale;
            if (bias) out += bias[row];
            y[static_cast<int64_t>(token) * n + row] = __float2bfloat16_rn(out);
        }
}

// Rows per warp for an M tile: activation re-reads cost MT * 2 (BF16) or MT * 4 (F32) / R bytes of L1
// and MT / R widening ops per weight element, but a larger R leaves fewer warps (n / R) to hide latency:
// R = 4 at m = 1 measured 34% of copy bandwidth at 4096x4096 against 87% at 128256x4096 (docs/perf.md).
template <int MT>
constexpr int rows_per_warp() {
    return MT <= 8 ? 2 : 1;
}

int grid_for(int64_t n, int rows, int device_sms) {
    const int64_t needed = (n + static_cast<int64_t>(rows) * kWarps - 1) / (static_cast<int64_t>(rows) * kWarps);
    return static_cast<int>(std::min<int64_t>(needed, static_cast<int64_t>(device_sms) * 16));
}

int current_sm_count() {
    int device = 0, sms = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

template <int MT, class XT>
void launch_nvfp4(const XT* x, int m, const Nvfp4DeviceWeight& w, const float* bias, XT* y, int sms,
                  cudaStream_t stream) {
    constexpr int R = rows_per_warp<MT>();
    // 2^14 undoes the fp16 placement of the E2M1 codes (exact: a power of two).
    const float out_scale = w.global_scale * 16384.0f;
    // Few rows (Qwen3-30B-A3B's o_proj, 2048 x 4096): the CTA's warps split k, one 32-chunk step a lane each.
    if ((w.n + R - 1) / R < 2LL * kWarps * sms && (w.k >> 5) >= 32 * kWarps) {
        const int grid =
            static_cast<int>(std::min<int64_t>((w.n + R - 1) / R, static_cast<int64_t>(sms) * 16));
        launch_pdl(gemv_nvfp4_kernel<MT, R, XT, kWarps>, dim3(grid), dim3(kThreads), 0, stream, x, m, w.k,
                   reinterpret_cast<const uint4*>(w.packed),
                   reinterpret_cast<const unsigned short*>(w.scales), out_scale, bias, y, w.n);
        return;
    }
    launch_pdl(gemv_nvfp4_kernel<MT, R, XT, 1>, dim3(grid_for(w.n, R, sms)), dim3(kThreads), 0, stream, x, m,
               w.k, reinterpret_cast<const uint4*>(w.packed),
               reinterpret_cast<const unsigned short*>(w.scales), out_scale, bias, y, w.n);
}

template <int NT, class XT>
void launch_nvfp4_mma(const XT* x, int m, const Nvfp4DeviceWeight& w, const float* bias, XT* y, cudaStream_t stream) {
    // 2^8 undoes the bf16 placement (e2m1 * 2^-126 times s * 2^118); exact, a power of two.
    const float out_scale = w.global_scale * 256.0f;
    const int64_t tiles = (w.n + 15) / 16;
    if (tiles > 0x7fffffff) throw std::invalid_argument("gemv_nvfp4: n = " + std::to_string(w.n) + " is too large");
    launch_pdl(gemv_nvfp4_mma_kernel<NT, XT>, dim3(static_cast<unsigned>(tiles)), dim3(kMmaThreads), 0,
               stream, x, m, w.k, reinterpret_cast<const uint4*>(w.packed),
               reinterpret_cast<const unsigned short*>(w.scales), out_scale, bias, y, w.n);
}

template <int NT, int KS, class XT, bool DEEP = false>
void launch_pipe(const XT* x, int m, int64_t k, const PipeJob& job, cudaStream_t stream) {
    constexpr int kTilesPerCta = kPipeWarps / KS;
    const int64_t ctas = (job.total_tiles + kTilesPerCta - 1) / kTilesPerCta;
    if (ctas > 0x7fffffff) throw std::invalid_argument("gemv_nvfp4 (pipelined): too many rows");
    launch_pdl(gemv_nvfp4_pipe_kernel<NT, KS, XT, DEEP>, dim3(static_cast<unsigned>(ctas)),
               dim3(kPipeThreads), 0, stream, x, m, k, job);
}

// Warps per tile along k: 1 unless the tiles alone leave fewer than 12 warps an SM (BF16 at m <= 8 holds 16,
// so 4096 rows take 4 and 14336 rows 2, each in one wave), and never fewer than 4 steps (4 KB of a tile's
// weights) per warp. (8 steps, the earlier floor, kept Qwen3's q/k/v, 5120 x 2048, at 2 warps: 6.7 us against
// 6.1 at 4, nibble-kernel-bench qkv, H100.)
int pipe_k_split(int64_t tiles, int64_t k, int requested, const char* what) {
    if (requested != 0 && requested != 1 && requested != 2 && requested != 4)
        throw std::invalid_argument(std::string(what) + ": k_split = " + std::to_string(requested) +
                                    ", expected 0 (auto), 1, 2 or 4");
    if (requested != 0) return requested;
    const int64_t steps = (k / 32 + 3) / 4;
    // The SM count per device, cached: the small launches are a few microseconds, host time counts.
    thread_local int cached_device = -1, cached_sms = 0;
    int device = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    if (device != cached_device) cached_sms = current_sm_count(), cached_device = device;
    const int64_t wanted_warps = 12LL * cached_sms;
    int ks = 1;
    while (ks < 4 && tiles * ks < wanted_warps && steps >= 8LL * ks) ks *= 2;
    return ks;
}

// Runs `job` (outputs at token 0) over m in launches of up to 16 tokens.
// deep: the 4-stage alternative where it exists (BF16, m <= 8), the default kernel elsewhere.
void run_pipe(const void* x, DType dtype, int64_t m, int64_t k, const PipeJob& job, int k_split,
              const char* what, cudaStream_t stream, bool deep = false) {
    const int ks = pipe_k_split(job.total_tiles, k, k_split, what);
    auto body = [&]<class XT>() {
        const auto* xt = static_cast<const XT*>(x);
        for (int64_t m0 = 0; m0 < m; m0 += 16) {
            const int mt = static_cast<int>(std::min<int64_t>(16, m - m0));
            PipeJob jt = job;
            for (auto& p : jt.proj)
                if (p.y) p.y = static_cast<XT*>(p.y) + m0 * p.n;
            auto go = [&]<int NT>() {
                if constexpr (NT == 1 && sizeof(XT) == 2) {
                    if (deep) {
                        if (ks == 1)
                            launch_pipe<1, 1, XT, true>(xt + m0 * k, mt, k, jt, stream);
                        else if (ks == 2)
                            launch_pipe<1, 2, XT, true>(xt + m0 * k, mt, k, jt, stream);
                        else
                            launch_pipe<1, 4, XT, true>(xt + m0 * k, mt, k, jt, stream);
                        return;
                    }
                }
                if (ks == 1)
                    launch_pipe<NT, 1, XT>(xt + m0 * k, mt, k, jt, stream);
                else if (ks == 2)
                    launch_pipe<NT, 2, XT>(xt + m0 * k, mt, k, jt, stream);
                else
                    launch_pipe<NT, 4, XT>(xt + m0 * k, mt, k, jt, stream);
            };
            if (mt <= 8)
                go.template operator()<1>();
            else
                go.template operator()<2>();
        }
    };
    if (dtype == DType::F32)
        body.template operator()<float>();
    else
        body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

PipeProjection pipe_projection(const Nvfp4DeviceWeight& w, const float* bias, void* y) {
    PipeProjection p;
    p.wq = reinterpret_cast<const uint4*>(w.packed);
    p.ws = reinterpret_cast<const unsigned short*>(w.scales);
    p.out_scale = w.global_scale * 256.0f;  // 2^8 undoes the bf16 placement, exactly
    p.bias = bias;
    p.y = y;
    p.n = w.n;
    return p;
}

// Splitting k over a CTA's warps pays when one warp per row group would leave the SMs short of warps (fewer
// than two CTAs' worth an SM) and k gives every warp of the CTA at least one 32-byte chunk a lane.
bool bf16_split_k(int64_t n, int64_t k, int rows, int sms) {
    const int64_t groups = (n + rows - 1) / rows;
    return groups < 2LL * kWarps * sms && k >= 16 * 32 * kWarps / 2;
}

template <int MT, class XT>
void launch_bf16(const XT* x, int m, const uint16_t* w, int64_t n, int64_t k, const float* bias, XT* y, int sms,
                 cudaStream_t stream) {
    constexpr int R = rows_per_warp<MT>();
    if (bf16_split_k(n, k, R, sms)) {  // one row group a CTA
        const int grid = static_cast<int>(std::min<int64_t>((n + R - 1) / R, static_cast<int64_t>(sms) * 16));
        launch_pdl(gemv_bf16_kernel<MT, R, XT, kWarps>, dim3(grid), dim3(kThreads), 0, stream, x, m, k,
                   reinterpret_cast<const uint4*>(w), bias, y, n);
        return;
    }
    launch_pdl(gemv_bf16_kernel<MT, R, XT, 1>, dim3(grid_for(n, R, sms)), dim3(kThreads), 0, stream, x, m, k,
               reinterpret_cast<const uint4*>(w), bias, y, n);
}

// FP8 keeps 2 rows a warp at m = 16 too (the BF16 kernel drops to 1 there): each activation load then serves
// 16 weights instead of 8, and at 16 tokens the L1 re-reads of x, not the weight stream, bound the kernel.
template <int MT>
constexpr int fp8_rows_per_warp() {
    return 2;
}

template <int MT, class XT>
void launch_fp8(const XT* x, int m, const uint8_t* w, int64_t n, int64_t k, float scale, const float* bias, XT* y,
                int sms, cudaStream_t stream) {
    constexpr int R = fp8_rows_per_warp<MT>();
    launch_pdl(gemv_fp8_kernel<MT, R, XT>, dim3(grid_for(n, R, sms)), dim3(kThreads), 0, stream, x, m, k,
               reinterpret_cast<const uint4*>(w), scale, bias, y, n);
}

// Calls f.template operator()<MT>() for the smallest M tile that holds m (m in 1..16).
template <class F>
void dispatch_m_tile(int m, F&& f) {
    if (m <= 1) f.template operator()<1>();
    else if (m <= 2) f.template operator()<2>();
    else if (m <= 4) f.template operator()<4>();
    else if (m <= 8) f.template operator()<8>();
    else f.template operator()<16>();
}

// ---- NVFP4 with k a multiple of 16 but not of 32 (small models' MLPs, e.g. a shared expert of width 48) ----
//
// The kernels above read 32-element chunks (16 bytes of codes, two scales) from 16-byte aligned rows; with
// k = 16 (mod 32) a row of k / 2 bytes starts only 8-byte aligned and ends in half a chunk. This one reads one
// 16-element block (8 bytes of codes, one E4M3 scale) per lane step: a warp per output row, lanes striding
// over the row's blocks, kBlockGemvTokens tokens per pass over the row (more tokens pass over it again, from
// L1/L2). Real models' widths are multiples of 32 and never come here. Plain (coherent) loads only and nothing
// before the grid-dependency wait: no non-coherent load ptxas could hoist above it (cuda/pdl.cuh).
constexpr int kBlockGemvWarps = 4;
constexpr int kBlockGemvTokens = 8;

//   x [m, k]; packed [n, k / 2]; scales [n, k / 16]; bias [n] or null; y [m, n]
template <class XT>
__global__ void __launch_bounds__(kBlockGemvWarps * 32)
    gemv_nvfp4_block16_kernel(const XT* x, int m, int64_t k, const uint8_t* packed, const uint8_t* scales,
                              float out_scale, const float* bias, XT* y, int64_t n) {
    pdl_wait();  // everything below may depend on the previous kernel's output (x)
    const int lane = threadIdx.x & 31;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kBlockGemvWarps + (threadIdx.x >> 5);
    if (row >= n) return;  // the whole warp
    const int64_t blocks = k / 16;
    const uint2* q = reinterpret_cast<const uint2*>(packed + row * (k / 2));  // 8-byte aligned: k / 2 % 8 == 0
    const uint8_t* s = scales + row * blocks;
    const float b = bias != nullptr ? bias[row] : 0.0f;
    for (int t0 = 0; t0 < m; t0 += kBlockGemvTokens) {
        const int nt = min(kBlockGemvTokens, m - t0);
        float acc[kBlockGemvTokens];
#pragma unroll
        for (int i = 0; i < kBlockGemvTokens; ++i) acc[i] = 0.0f;
        for (int64_t blk = lane; blk < blocks; blk += 32) {
            const uint2 codes = q[blk];
            float lo[8], hi[8];
            e2m1x8_to_float(codes.x, lo);  // elements 0..7 of the block (times 2^-14)
            e2m1x8_to_float(codes.y, hi);  // elements 8..15
            const float sc = e4m3_exact(s[blk]);
#pragma unroll
            for (int i = 0; i < kBlockGemvTokens; ++i) {
                if (i >= nt) break;  // warp-uniform
                const XT* xr = x + static_cast<int64_t>(t0 + i) * k + blk * 16;
                float xv[8];
                float part = 0.0f;
                load_x8<XLoad::Coherent>(xr, xv);
#pragma unroll
                for (int j = 0; j < 8; ++j) part = fmaf(lo[j], xv[j], part);
                load_x8<XLoad::Coherent>(xr + 8, xv);
#pragma unroll
                for (int j = 0; j < 8; ++j) part = fmaf(hi[j], xv[j], part);
                acc[i] = fmaf(part, sc, acc[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < kBlockGemvTokens; ++i) {
            if (i >= nt) break;  // warp-uniform
            float v = acc[i];
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) store_y(y + static_cast<int64_t>(t0 + i) * n + row, v * out_scale + b);
        }
    }
}

void launch_nvfp4_block16(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias,
                          void* y, cudaStream_t stream) {
    if (m > 0x7fffffff || (w.n + kBlockGemvWarps - 1) / kBlockGemvWarps > 0x7fffffff)
        throw std::invalid_argument("gemv_nvfp4: m = " + std::to_string(m) + ", n = " + std::to_string(w.n) +
                                    " too large for k = " + std::to_string(w.k));
    const dim3 grid(static_cast<unsigned>((w.n + kBlockGemvWarps - 1) / kBlockGemvWarps));
    // 2^14 undoes the fp16 placement of the E2M1 codes (exact: a power of two).
    const float out_scale = w.global_scale * 16384.0f;
    if (dtype == DType::F32)
        launch_pdl(gemv_nvfp4_block16_kernel<float>, grid, dim3(kBlockGemvWarps * 32), 0, stream,
                   static_cast<const float*>(x), static_cast<int>(m), w.k, w.packed, w.scales, out_scale, bias,
                   static_cast<float*>(y), w.n);
    else
        launch_pdl(gemv_nvfp4_block16_kernel<__nv_bfloat16>, grid, dim3(kBlockGemvWarps * 32), 0, stream,
                   static_cast<const __nv_bfloat16*>(x), static_cast<int>(m), w.k, w.packed, w.scales, out_scale,
                   bias, static_cast<__nv_bfloat16*>(y), w.n);
}

void check_common(const void* x, DType dtype, int64_t m, const void* y, int64_t n, int64_t k, const char* what) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument(std::string(what) + ": activations must be F32 or BF16");
    if (m < 0 || n < 0 || k < 0) throw std::invalid_argument(std::string(what) + ": negative dimension");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 != 0)
        throw std::invalid_argument(std::string(what) + ": x and y must be 16-byte aligned");
}

// k_multiple: 32 for the chunked kernels, 16 for the dispatcher (gemv_nvfp4 sends k = 16 mod 32 to the
// 16-element block kernel).
void check_nvfp4(const void* x, DType dtype, int64_t m, const void* y, const Nvfp4DeviceWeight& w,
                 int64_t k_multiple = 32) {
    check_common(x, dtype, m, y, w.n, w.k, "gemv_nvfp4");
    if (w.k % k_multiple != 0)
        throw std::invalid_argument("gemv_nvfp4: k = " + std::to_string(w.k) + " is not a multiple of " +
                                    std::to_string(k_multiple));
    if ((reinterpret_cast<uintptr_t>(w.packed) % 16) != 0 || (reinterpret_cast<uintptr_t>(w.scales) % 2) != 0)
        throw std::invalid_argument("gemv_nvfp4: packed weights must be 16-byte aligned, scales 2-byte aligned");
}

template <class XT, class Launch>
void run_tiles(const void* x, int64_t m, int64_t n, int64_t k, void* y, Launch&& launch) {
    const auto* xt = static_cast<const XT*>(x);
    auto* yt = static_cast<XT*>(y);
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
        const int mt = static_cast<int>(std::min<int64_t>(16, m - m0));
        launch(xt + m0 * k, mt, yt + m0 * n);
    }
}

}  // namespace

void gemv_nvfp4(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                cudaStream_t stream) {
    check_nvfp4(x, dtype, m, y, w, 16);
    if (m == 0 || w.n == 0) return;
    if (w.k % 32 != 0) {  // only k = 16 (mod 32): small test models; the kernels below take whole 32-chunks
        launch_nvfp4_block16(x, dtype, m, w, bias, y, stream);
        NIBBLE_CUDA_CHECK(cudaGetLastError());
        return;
    }
    // m = 1 below 65536 rows: the CUDA-core kernel measured 12-15% faster (docs/perf.md, version 2);
    // the tensor-core kernel wins at lm_head size and at every m >= 4.
    if (m == 1 && w.n < 65536) {
        gemv_nvfp4_cuda_core(x, dtype, m, w, bias, y, stream);
        return;
    }
    gemv_nvfp4_mma(x, dtype, m, w, bias, y, stream);
}

void gemv_nvfp4_mma(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                    cudaStream_t stream) {
    check_nvfp4(x, dtype, m, y, w);
    if (m == 0 || w.n == 0) return;
    auto body = [&]<class XT>() {
        run_tiles<XT>(x, m, w.n, w.k, y, [&](const XT* xt, int mt, XT* yt) {
            if (mt <= 8) launch_nvfp4_mma<1, XT>(xt, mt, w, bias, yt, stream);
            else launch_nvfp4_mma<2, XT>(xt, mt, w, bias, yt, stream);
        });
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gemv_nvfp4_cuda_core(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias,
                          void* y, cudaStream_t stream) {
    check_nvfp4(x, dtype, m, y, w);
    if (m == 0 || w.n == 0) return;
    const int sms = current_sm_count();
    auto body = [&]<class XT>() {
        run_tiles<XT>(x, m, w.n, w.k, y, [&](const XT* xt, int mt, XT* yt) {
            dispatch_m_tile(mt, [&]<int MT>() { launch_nvfp4<MT, XT>(xt, mt, w, bias, yt, sms, stream); });
        });
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gemv_nvfp4_pipelined(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w,
                          const float* bias, void* y, cudaStream_t stream, int k_split) {
    const Nvfp4Projection p{w, bias, y};
    gemv_nvfp4_fused(x, dtype, m, &p, 1, stream, k_split);
}

void gemv_nvfp4_pipelined_deep(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w,
                               const float* bias, void* y, cudaStream_t stream, int k_split) {
    check_nvfp4(x, dtype, m, y, w);
    if (m == 0 || w.n == 0) return;
    PipeJob job;
    job.total_tiles = (w.n + 15) / 16;
    job.proj[0] = pipe_projection(w, bias, y);
    job.proj[0].tile_end = job.total_tiles;
    for (int i = 1; i < kMaxProjections; ++i) job.proj[i].tile_end = job.total_tiles;  // n = 0: never chosen
    run_pipe(x, dtype, m, w.k, job, k_split, "gemv_nvfp4_pipelined_deep", stream, true);
}

void gemv_nvfp4_fused(const void* x, DType dtype, int64_t m, const Nvfp4Projection* projections, int count,
                      cudaStream_t stream, int k_split) {
    if (count < 1 || count > kMaxProjections || !projections)
        throw std::invalid_argument("gemv_nvfp4_fused: 1 to 3 projections, got " + std::to_string(count));
    PipeJob job;
    int used = 0;
    for (int i = 0; i < count; ++i) {
        const Nvfp4Projection& p = projections[i];
        check_nvfp4(x, dtype, m, p.y, p.w);
        if (p.w.k != projections[0].w.k)
            throw std::invalid_argument("gemv_nvfp4_fused: projection " + std::to_string(i) +
                                        " has k = " + std::to_string(p.w.k) + ", projection 0 has " +
                                        std::to_string(projections[0].w.k));
        if (p.w.n == 0) continue;  // nothing to compute or store
        job.total_tiles += (p.w.n + 15) / 16;
        job.proj[used] = pipe_projection(p.w, p.bias, p.y);
        job.proj[used].tile_end = job.total_tiles;
        ++used;
    }
    if (m == 0 || used == 0) return;
    for (int i = used; i < kMaxProjections; ++i)
        job.proj[i].tile_end = job.total_tiles;  // n = 0: never chosen
    run_pipe(x, dtype, m, projections[0].w.k, job, k_split, "gemv_nvfp4_fused", stream);
}

void gemv_nvfp4_gate_up_silu(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& gate,
                             const float* gate_bias, const Nvfp4DeviceWeight& up, const float* up_bias,
                             void* h, cudaStream_t stream, int k_split) {
    check_nvfp4(x, dtype, m, h, gate);
    check_nvfp4(x, dtype, m, h, up);
    if (gate.n != up.n || gate.k != up.k)
        throw std::invalid_argument("gemv_nvfp4_gate_up_silu: gate is " + std::to_string(gate.n) + "x" +
                                    std::to_string(gate.k) + ", up is " + std::to_string(up.n) + "x" +
                                    std::to_string(up.k) + "; they must match");
    if (m == 0 || gate.n == 0) return;
    PipeJob job;
    job.gate_up = true;
    job.total_tiles = (gate.n + 7) / 8;
    job.proj[0] = pipe_projection(gate, gate_bias, h);
    job.proj[1] = pipe_projection(up, up_bias, nullptr);
    for (auto& p : job.proj) p.tile_end = job.total_tiles;
    run_pipe(x, dtype, m, gate.k, job, k_split, "gemv_nvfp4_gate_up_silu", stream);
}

void gemv_bf16(const void* x, DType dtype, int64_t m, const uint16_t* w, int64_t n, int64_t k, const float* bias,
               void* y, cudaStream_t stream) {
    check_common(x, dtype, m, y, n, k, "gemv_bf16");
    if (k % 16 != 0) throw std::invalid_argument("gemv_bf16: k = " + std::to_string(k) + " is not a multiple of 16");
    if (reinterpret_cast<uintptr_t>(w) % 16 != 0) throw std::invalid_argument("gemv_bf16: w must be 16-byte aligned");
    if (m == 0 || n == 0) return;
    const int sms = current_sm_count();
    auto body = [&]<class XT>() {
        run_tiles<XT>(x, m, n, k, y, [&](const XT* xt, int mt, XT* yt) {
            dispatch_m_tile(mt, [&]<int MT>() { launch_bf16<MT, XT>(xt, mt, w, n, k, bias, yt, sms, stream); });
        });
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gemv_fp8(const void* x, DType dtype, int64_t m, const uint8_t* w, int64_t n, int64_t k, float scale,
              const float* bias, void* y, cudaStream_t stream) {
    check_common(x, dtype, m, y, n, k, "gemv_fp8");
    if (k % 16 != 0) throw std::invalid_argument("gemv_fp8: k = " + std::to_string(k) + " is not a multiple of 16");
    if (reinterpret_cast<uintptr_t>(w) % 16 != 0) throw std::invalid_argument("gemv_fp8: w must be 16-byte aligned");
    if (m == 0 || n == 0) return;
    const int sms = current_sm_count();
    auto body = [&]<class XT>() {
        run_tiles<XT>(x, m, n, k, y, [&](const XT* xt, int mt, XT* yt) {
            dispatch_m_tile(mt, [&]<int MT>() { launch_fp8<MT, XT>(xt, mt, w, n, k, scale, bias, yt, sms, stream); });
        });
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gemv_fp8_mma(const void* x, DType dtype, int64_t m, const uint8_t* w, int64_t n, int64_t k, float scale,
                  const float* bias, void* y, cudaStream_t stream) {
    check_common(x, dtype, m, y, n, k, "gemv_fp8_mma");
    if (dtype != DType::BF16) throw std::invalid_argument("gemv_fp8_mma: activations must be BF16");
    if (k % 64 != 0)
        throw std::invalid_argument("gemv_fp8_mma: k = " + std::to_string(k) + " is not a multiple of 64");
    if (reinterpret_cast<uintptr_t>(w) % 16 != 0)
        throw std::invalid_argument("gemv_fp8_mma: w must be 16-byte aligned");
    if (m == 0 || n == 0) return;
    const int64_t tiles = (n + 15) / 16;
    if (tiles > 0x7fffffff) throw std::invalid_argument("gemv_fp8_mma: n = " + std::to_string(n) + " is too large");
    const float out_scale = scale * 256.0f;  // 2^8 undoes the bf16 placement, exactly
    run_tiles<__nv_bfloat16>(x, m, n, k, y, [&](const __nv_bfloat16* xt, int mt, __nv_bfloat16* yt) {
        if (mt <= 8)
            launch_pdl(gemv_fp8_mma_kernel<1>, dim3(static_cast<unsigned>(tiles)), dim3(kFp8MmaWarps * 32), 0,
                       stream, xt, mt, k, w, out_scale, bias, yt, n);
        else
            launch_pdl(gemv_fp8_mma_kernel<2>, dim3(static_cast<unsigned>(tiles)), dim3(kFp8MmaWarps * 32), 0,
                       stream, xt, mt, k, w, out_scale, bias, yt, n);
    });
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
