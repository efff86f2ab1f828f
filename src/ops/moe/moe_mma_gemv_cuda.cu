// The expert GEMV of decode-sized MoE steps on the tensor cores (ops/moe/moe_mma_gemv.h).
//
// Why: the CUDA-core register GEMV it replaces issued ~7 instructions a weight a lane (E2M1 decode, fp16 ->
// fp32 widening, one FMA) and ran Qwen3-30B-A3B's decode experts at 28% of copy bandwidth (ncu, H100: 0.39
// instructions issued a scheduler a cycle from ~3 warps a scheduler, DRAM 28% busy). Here mma.sync m16n8k16
// (fp16 inputs, fp32 accumulators) does the multiply-adds: a lane decodes 8 codes into four fp16 pairs,
// scales them by their block's E4M3 scale in fp16, and one mma takes 256 weights of the warp against up to 8
// columns.
//
// Exactness. A weight's codes decode to e2m1 * 2^-14 in fp16 (exact, +-0.5 as fp16 subnormals); times its
// E4M3 block scale (fp16, exact) the product is a multiple of 2^-24 below 0.17, so exact in fp16 as well: A
// holds the dequantized weights * 2^-14 with no rounding, the global scale and 2^14 come in the epilogue. B
// holds the inputs in fp16: each token's row is scaled by the power of two 2^s that puts its largest
// magnitude in [2^14, 2^15) (no overflow, 29 binades of normals below it), so BF16 inputs convert exactly;
// float32 inputs (down's h, or float32 activations) take two columns, hi = fp16(x 2^s) and lo = fp16(x 2^s -
// hi), which carry 22 of x's 24 significant bits. Products are exact and the sums run in fp32 in the tensor
// core.
//
// Layout. A warp owns 16 output rows (mma rows g and g + 8, g = lane / 4) and a range of k in spans of 128
// codes: lane t = lane % 4 of a row loads the span's 16-byte chunk t (32 codes and its 2 scale bytes), so the
// 4 lanes of a row read 64 contiguous bytes. A chunk's word w (8 codes of one block) feeds two mma: a lane's
// four k slots of an mma are codes {0, 2 | 1, 3} then {4, 6 | 5, 7} of the word (any assignment of k slots to
// positions works when B follows it), and the inputs are staged in shared memory in that order (x0 x2 x1 x3
// x4 x6 x5 x7 per 8), so one 16-byte shared load gives a lane both mma's B registers. Rows past n load zero
// codes; k past the end of a row gives zero A and zero B. All of a warp's weights (up to 16 chunks a lane)
// are loaded before any math, and the down instance issues them before pdl_wait, while up still runs (as the
// register GEMV did: moe_cuda.cu). Warps sharing a row group (k_splits > 1) add their fp32 partial sums
// through shared memory in a fixed order, so results do not depend on timing. Tokens of an expert pass in
// tiles of 8 columns (4 tokens hi + lo for float32 inputs), decoding the codes held in registers again for
// each tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>

#include "cuda/cuda_check.h"
#include "cuda/mma_sync.cuh"
#include "cuda/pdl.cuh"
#include "ops/linear/nvfp4_decode.cuh"
#include "ops/moe/moe_gemv_common.cuh"
#include "ops/moe/moe_mma_gemv.h"

namespace nibble::cuda {
namespace {

constexpr int kMaxWarps = 8;
constexpr int kSpanCodes = 128;        // a span: 4 lanes x one 16-byte chunk of 32 codes
constexpr int kColumns = 8;            // mma n: B rows per tile
constexpr size_t kStageBytes = 36864;  // shared memory for a tile's B rows (+ 8 KB of partial sums <= 48 KB)

__host__ __device__ constexpr int sets_of(Epilogue e) { return e == Epilogue::SwiGlu ? 2 : 1; }
// Spans a warp holds in registers, 2 rows x sets x spans 16-byte chunks a lane: SwiGLU 4 and down 8 (64
// registers, ~164 in all), relu^2's up 6 (48; <= 128 in all, so that 16 warps fit an SM).
__host__ __device__ constexpr int max_spans_of(Epilogue e) {
    return e == Epilogue::SwiGlu ? 4 : e == Epilogue::Relu2 ? 6 : 8;
}
// Fewer than 2 CTAs of 8 warps an SM for the 64-register variants (ptxas spills them at 128).
__host__ __device__ constexpr int min_ctas_of(Epilogue e) { return e == Epilogue::Relu2 ? 2 : 1; }

__device__ __forceinline__ uint32_t hmul2_bits(uint32_t a, __half2 s) {
    const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), s);
    return *reinterpret_cast<const uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) | (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}

// Two E4M3 scales (low byte, next byte of s) as fp16 {low, high}: exact (every E4M3 value is an fp16).
__device__ __forceinline__ __half2 e4m3x2_to_half2(uint32_t s) {
    const __half2_raw r =
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(s & 0xffffu), __NV_E4M3);
    return __half2(r);
}

// 16-byte unit f of a staged B row lives at f ^ ((f >> 3) & 1), and rows are stride_units apart with
// stride_units = 2 (mod 8): the 8 lanes of a quarter warp (2 rows x 4 chunks, one word) then hit 8 distinct
// 16-byte bank groups.
__device__ __forceinline__ int b_swizzle(int f) { return f ^ ((f >> 3) & 1); }

// The power of two s that puts amax (bits of a non-negative float) in [2^14, 2^15); 0 for a zero row.
__device__ __forceinline__ int row_shift(uint32_t amax_bits) {
    const int e = static_cast<int>(amax_bits >> 23);  // biased exponent (sign is 0)
    if (amax_bits == 0) return 0;
    if (e == 0) return 126;  // subnormal largest value: as far up as a float32 factor goes
    return min(14 - (e - 127), 126);
}
__device__ __forceinline__ float pow2(int s) { return __int_as_float((s + 127) << 23); }  // s in [-126, 127]

// 8 consecutive inputs as float32 (coherent loads: see moe_cuda.cu's load4_float).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    const float4 a = __ldca(reinterpret_cast<const float4*>(p)),
                 b = __ldca(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 u = __ldca(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t wd = word_of(u, j);
        v[2 * j] = __uint_as_float(wd << 16), v[2 * j + 1] = __uint_as_float(wd & 0xffff0000u);
    }
}

// 8 fp16 values in the staged order x0 x2 x1 x3 x4 x6 x5 x7.
__device__ __forceinline__ uint4 staged_unit(const __half (&h)[8]) {
    return make_uint4(pack_half2(h[0], h[2]), pack_half2(h[1], h[3]), pack_half2(h[4], h[6]),
                      pack_half2(h[5], h[7]));
}

// Stages tokens p0 .. p0 + nb - 1 (sorted positions) of the expert as B rows (row i, or rows 2i / 2i + 1 for
// hi / lo), and factor[i] = 2^-s_i. Called by the whole CTA between barriers.
template <class XT, bool kGather>
__device__ __forceinline__ void stage_tile(const XT* __restrict__ x, int k, int top_k,
                                           const int32_t* __restrict__ sorted_pairs, int p0, int nb,
                                           uint4* b_sh, int stride_units, int32_t* src_sh, uint32_t* amax_sh,
                                           float* factor_sh) {
    constexpr bool kHiLo = std::is_same_v<XT, float>;
    const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, units = k >> 3;
    if (tid < nb) {
        src_sh[tid] = kGather ? __ldca(sorted_pairs + p0 + tid) / top_k : p0 + tid;
        amax_sh[tid] = 0u;
    }
    __syncthreads();
    for (int i = 0; i < nb; ++i) {
        const XT* row = x + static_cast<int64_t>(src_sh[i]) * k;
        float m = 0.0f;
        for (int f = tid; f < units; f += nthreads) {
            float v[8];
            load8(row + 8 * f, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
        }
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) atomicMax(amax_sh + i, __float_as_uint(m));
    }
    __syncthreads();
    for (int idx = tid; idx < nb * units; idx += nthreads) {
        const int i = idx / units, f = idx - i * units;
        const int s = row_shift(amax_sh[i]);
        const float up = pow2(s);
        float v[8];
        load8(x + static_cast<int64_t>(src_sh[i]) * k + 8 * f, v);
        __half hi[8], lo[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float scaled = v[j] * up;
            hi[j] = __float2half_rn(scaled);
            lo[j] = __float2half_rn(scaled - __half2float(hi[j]));
        }
        const int unit = b_swizzle(f);
        if constexpr (kHiLo) {
            b_sh[(2 * i) * stride_units + unit] = staged_unit(hi);
            b_sh[(2 * i + 1) * stride_units + unit] = staged_unit(lo);
        } else {
            b_sh[i * stride_units + unit] = staged_unit(hi);
        }
        if (f == 0) factor_sh[i] = pow2(-s);
    }
    __syncthreads();
}

template <class XT, bool kGather, Epilogue kEpi>
__global__ void __launch_bounds__(kMaxWarps * 32, min_ctas_of(kEpi))
    moe_mma_gemv_kernel(const XT* __restrict__ x, int k, int top_k, const Nvfp4DeviceWeight* __restrict__ w0s,
                        const Nvfp4DeviceWeight* __restrict__ w1s, int n, MoeMmaGemvLayout lay,
                        int tile_tokens, int stride_units, const int32_t* __restrict__ offsets,
                        const int32_t* __restrict__ sorted_pairs, const int32_t* __restrict__ active_experts,
                        const int32_t* __restrict__ n_active, float* __restrict__ out) {
    constexpr bool kEarlyWeights = !kGather;  // down: weights requested while up still runs (moe_cuda.cu)
    constexpr bool kHiLo = std::is_same_v<XT, float>;
    constexpr int kSets = sets_of(kEpi);  // [0] = w1 (up / down), [1] = w0 (gate)
    constexpr int kMaxSpans = max_spans_of(kEpi);
    extern __shared__ uint4 b_sh[];  // [tile rows][stride_units], then the k-split partial sums
    __shared__ int32_t src_sh[kColumns];
    __shared__ uint32_t amax_sh[kColumns];
    __shared__ float factor_sh[kColumns];
    if constexpr (!kEarlyWeights) pdl_wait();
    // Both loads at once (slot < gridDim.y <= n_experts: in bounds; the expert is used only when active).
    const int active = __ldca(n_active);
    const int e = __ldca(active_experts + blockIdx.y);
    if (static_cast<int>(blockIdx.y) >= active) {  // the whole CTA, before any barrier
        if constexpr (kEarlyWeights) pdl_wait();   // rule 2: no CTA ends before its predecessor
        return;
    }
    float* red =
        reinterpret_cast<float*>(b_sh + static_cast<size_t>(tile_tokens) * (kHiLo ? 2 : 1) * stride_units);
    Nvfp4DeviceWeight w[kSets];
    w[0] = load_weight_coherent(w1s + e);
    if constexpr (kSets == 2) w[1] = load_weight_coherent(w0s + e);
    const int begin = __ldca(offsets + e), count = __ldca(offsets + e + 1) - begin;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int row_group = warp / lay.k_splits, split = warp - row_group * lay.k_splits;
    const int row0 = (blockIdx.x * lay.row_groups + row_group) * 16;
    const int chunks = k >> 5, spans = (chunks + 3) >> 2;
    const int span0 = split * lay.spans_per_warp;
    const int my_spans = max(0, min(lay.spans_per_warp, spans - span0));  // warp-uniform

    // Every code chunk and scale pair first: sets x rows {g, g + 8} x spans.
    uint4 q[kSets][2][kMaxSpans];
    uint32_t sc[kSets][kMaxSpans];  // the chunk's 2 scale bytes of row g (low half) and of row g + 8 (high)
#pragma unroll
    for (int m = 0; m < kSets; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + g + 8 * r;
            const bool row_ok = row < n;
            const uint4* qr =
                reinterpret_cast<const uint4*>(w[m].packed) + static_cast<int64_t>(row_ok ? row : 0) * chunks;
            const unsigned short* sr = reinterpret_cast<const unsigned short*>(w[m].scales) +
                                       static_cast<int64_t>(row_ok ? row : 0) * chunks;
#pragma unroll
            for (int u = 0; u < kMaxSpans; ++u) {
                const int c = (span0 + u) * 4 + t;
                if (r == 0) sc[m][u] = 0;
                q[m][r][u] = make_uint4(0, 0, 0, 0);
                if (row_ok && u < my_spans && c < chunks)
                    q[m][r][u] = __ldcs(qr + c), sc[m][u] |= static_cast<uint32_t>(__ldcs(sr + c))
                                                             << (16 * r);
            }
        }
    if constexpr (kEarlyWeights)
        pdl_wait();  // the inputs (up's h) come from the kernel before
    else
        pdl_launch_dependents();  // down may now request its weights beside ours
    float scale[kSets];           // 2^14 undoes the fp16 placement of the codes
#pragma unroll
    for (int m = 0; m < kSets; ++m) scale[m] = w[m].global_scale * 16384.0f;

    for (int t0 = 0; t0 < count; t0 += tile_tokens) {
        const int nb = min(tile_tokens, count - t0);
        __syncthreads();  // the previous tile's readers are done with b_sh, red and the per-token arrays
        stage_tile<XT, kGather>(x, k, top_k, sorted_pairs, begin + t0, nb, b_sh, stride_units, src_sh,
                                amax_sh, factor_sh);
        // This lane's B row (its mma column g); columns past the tile read a valid row, their sums unused.
        const int b_rows = nb * (kHiLo ? 2 : 1);
        const int brow = g < b_rows ? g : (kHiLo ? (g & 1) : 0);
        const uint4* bp = b_sh + brow * stride_units;
        float acc[kSets][4];
#pragma unroll
        for (int m = 0; m < kSets; ++m)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[m][j] = 0.0f;
#pragma unroll
        for (int u = 0; u < kMaxSpans; ++u) {
            if (u >= my_spans) break;  // warp-uniform
            const int c = (span0 + u) * 4 + t;
            const bool in_k = c < chunks;
#pragma unroll
            for (int wd = 0; wd < 4; ++wd) {
                const uint4 b = in_k ? bp[b_swizzle(c * 4 + wd)] : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int m = 0; m < kSets; ++m) {
                    // Opaque to the compiler, so it decodes per tile instead of keeping all decoded halves.
                    uint32_t cg = word_of(q[m][0][u], wd), ch = word_of(q[m][1][u], wd);
                    asm volatile("" : "+r"(cg), "+r"(ch));
                    uint32_t hg[4], hh[4];
                    e2m1x8_to_half2(cg, hg);
                    e2m1x8_to_half2(ch, hh);
                    // The word's block scale for row g (low) and row g + 8 (high).
                    const __half2 s = e4m3x2_to_half2(__byte_perm(sc[m][u], 0u, wd < 2 ? 0x20 : 0x31));
                    const __half2 sg = __low2half2(s), sh = __high2half2(s);
                    const uint32_t a0[4] = {hmul2_bits(hg[0], sg), hmul2_bits(hh[0], sh),
                                            hmul2_bits(hg[2], sg), hmul2_bits(hh[2], sh)};
                    mma_f16_16816(acc[m], a0, b.x, b.y);
                    const uint32_t a1[4] = {hmul2_bits(hg[1], sg), hmul2_bits(hh[1], sh),
                                            hmul2_bits(hg[3], sg), hmul2_bits(hh[3], sh)};
                    mma_f16_16816(acc[m], a1, b.z, b.w);
                }
            }
        }
        // The k splits of a row group add up in split order.
        if (lay.k_splits > 1) {
#pragma unroll
            for (int m = 0; m < kSets; ++m)
#pragma unroll
                for (int j = 0; j < 4; ++j) red[((warp * kSets + m) * 4 + j) * 32 + lane] = acc[m][j];
            __syncthreads();
            if (split == 0)
#pragma unroll
                for (int m = 0; m < kSets; ++m)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        float v = red[((warp * kSets + m) * 4 + j) * 32 + lane];
                        for (int s = 1; s < lay.k_splits; ++s)
                            v += red[(((warp + s) * kSets + m) * 4 + j) * 32 + lane];
                        acc[m][j] = v;
                    }
        }
        if (split != 0) continue;
            // acc[m][2r + j]: row g + 8r, column 2t + j.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + g + 8 * r;
            if (row >= n) continue;
#pragma unroll
            for (int j = 0; j < (kHiLo ? 1 : 2); ++j) {
                const int i = kHiLo ? t : 2 * t + j;  // token of the tile
                if (i >= nb) continue;
                float v[kSets];
#pragma unroll
                for (int m = 0; m < kSets; ++m) {
                    const float sum = kHiLo ? acc[m][2 * r] + acc[m][2 * r + 1] : acc[m][2 * r + j];
                    v[m] = sum * factor_sh[i] * scale[m];
                }
                float y = v[0];
                if constexpr (kEpi == Epilogue::SwiGlu) {
                    const float gate = v[1];
                    y = gate / (1.0f + expf(-gate)) * v[0];
                } else if constexpr (kEpi == Epilogue::Relu2) {
                    y = v[0] > 0.0f ? v[0] * v[0] : 0.0f;
                }
                out[static_cast<int64_t>(begin + t0 + i) * n + row] = y;
            }
        }
    }
}

template <class XT, bool kGather, Epilogue kEpi>
void launch_variant(const void* x, int64_t k, int64_t top_k, const Nvfp4DeviceWeight* w0s,
                    const Nvfp4DeviceWeight* w1s, int64_t n, int64_t grid_y, int64_t m,
                    const MoeMmaGemvLayout& lay, const MoePermutation& perm, float* out,
                    cudaStream_t stream) {
    constexpr int kRowsPerToken = std::is_same_v<XT, float> ? 2 : 1;
    const int64_t units = k / 8;
    const int64_t stride_units = units + (((2 - units) % 8) + 8) % 8;  // = 2 (mod 8)
    const size_t row_bytes = static_cast<size_t>(stride_units) * 16;
    const int64_t tile = std::min<int64_t>({kColumns / kRowsPerToken, std::max<int64_t>(1, m),
                                            static_cast<int64_t>(kStageBytes / (row_bytes * kRowsPerToken))});
    const size_t red_bytes =
        lay.k_splits > 1 ? static_cast<size_t>(lay.warps) * sets_of(kEpi) * 4 * 32 * sizeof(float) : 0;
    const size_t smem = static_cast<size_t>(tile) * kRowsPerToken * row_bytes + red_bytes;
    const int64_t rows_per_cta = 16 * static_cast<int64_t>(lay.row_groups);
    const dim3 grid(static_cast<unsigned>((n + rows_per_cta - 1) / rows_per_cta),
                    static_cast<unsigned>(grid_y));
    launch_pdl(moe_mma_gemv_kernel<XT, kGather, kEpi>, grid, dim3(lay.warps * 32), smem, stream,
               static_cast<const XT*>(x), static_cast<int>(k), static_cast<int>(top_k), w0s, w1s,
               static_cast<int>(n), lay, static_cast<int>(tile), static_cast<int>(stride_units), perm.offsets,
               perm.sorted_pairs, perm.active_experts, perm.n_active, out);
}

}  // namespace

MoeMmaGemvLayout moe_mma_gemv_layout(int64_t k, MoeGemvOp op) {
    MoeMmaGemvLayout lay;
    if (k <= 0 || k % 32 != 0) return lay;
    const int64_t spans = (k + kSpanCodes - 1) / kSpanCodes;
    // The fewest warps a row group (each holding up to max_spans): fewer, longer warps than the GPU can hold
    // at once would leave a second wave.
    const int max_spans = max_spans_of(op == MoeGemvOp::SwiGlu  ? Epilogue::SwiGlu
                                       : op == MoeGemvOp::Relu2 ? Epilogue::Relu2
                                                                : Epilogue::None);
    int splits = 1;
    while (splits < kMaxWarps && (spans + splits - 1) / splits > max_spans) splits *= 2;
    const int64_t per_warp = (spans + splits - 1) / splits;
    if (per_warp > max_spans) return lay;
    lay.supported = true;
    lay.k_splits = splits;
    lay.spans_per_warp = static_cast<int>(per_warp);
    lay.warps = std::max(4, splits);
    lay.row_groups = lay.warps / splits;
    return lay;
}

bool moe_mma_gemv_preferred(int64_t m, int64_t k, MoeGemvOp op) {
    const MoeMmaGemvLayout lay = moe_mma_gemv_layout(k, op);
    return m >= 2 && lay.supported;
}

bool moe_mma_gemv(const void* x, DType x_dtype, MoeGemvOp op, int64_t k, int64_t top_k,
                  const Nvfp4DeviceWeight* w0s, const Nvfp4DeviceWeight* w1s, int64_t n, int64_t grid_y,
                  int64_t m, const MoePermutation& perm, float* out, cudaStream_t stream) {
    const MoeMmaGemvLayout lay = moe_mma_gemv_layout(k, op);
    if (!lay.supported || n > 0x7fffffff || k > 0x7fffffff) return false;
    const bool f32 = x_dtype == DType::F32;
    switch (op) {
        case MoeGemvOp::Down:
            launch_variant<float, false, Epilogue::None>(x, k, top_k, w0s, w1s, n, grid_y, m, lay, perm, out,
                                                         stream);
            break;
        case MoeGemvOp::SwiGlu:
            if (f32)
                launch_variant<float, true, Epilogue::SwiGlu>(x, k, top_k, w0s, w1s, n, grid_y, m, lay, perm,
                                                              out, stream);
            else
                launch_variant<__nv_bfloat16, true, Epilogue::SwiGlu>(x, k, top_k, w0s, w1s, n, grid_y, m,
                                                                      lay, perm, out, stream);
            break;
        case MoeGemvOp::Relu2:
            if (f32)
                launch_variant<float, true, Epilogue::Relu2>(x, k, top_k, w0s, w1s, n, grid_y, m, lay, perm,
                                                             out, stream);
            else
                launch_variant<__nv_bfloat16, true, Epilogue::Relu2>(x, k, top_k, w0s, w1s, n, grid_y, m, lay,
                                                                     perm, out, stream);
            break;
    }
    return true;
}

}  // namespace nibble::cuda
