// Mamba2 kernels (ops/ssm/ssm_cuda.h): conv1d (+ state shift), the selective scan, grouped gated RMSNorm.
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "cuda/block_sum.cuh"
#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/ssm/ssm_cuda.h"

namespace nibble::cuda {
namespace {

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }
// torch.nn.functional.softplus with threshold 20 (linear above it), as ssm_cpu.cpp.
__device__ __forceinline__ float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// The sequence holding token t: the largest s with seq_starts[s] <= t (empty sequences are skipped).
__device__ __forceinline__ int sequence_of(const int32_t* __restrict__ seq_starts, int n_seqs, int64_t t) {
    int lo = 0, hi = n_seqs;  // seq_starts[lo] <= t < seq_starts[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (seq_starts[mid] <= t)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

constexpr int kConvThreads = 256;
constexpr int kMaxConvKernel = 8;

// out[t, c] for every (token, channel); reads the conv states, never writes them.
template <class T>
__global__ void __launch_bounds__(kConvThreads)
    conv1d_kernel(const T* __restrict__ x, int64_t x_stride, int64_t n_tokens, int channels,
                  const int32_t* __restrict__ seq_starts, int n_seqs, const float* __restrict__ weight,
                  const float* __restrict__ bias, int kernel, float* const* __restrict__ states,
                  T* __restrict__ out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kConvThreads + threadIdx.x;
    if (idx >= n_tokens * channels) return;
    const int64_t t = idx / channels;
    const int c = static_cast<int>(idx - t * channels);
    const int s = sequence_of(seq_starts, n_seqs, t);
    const int64_t start = seq_starts[s], local = t - start;
    const float* state = states[s];
    float acc = bias != nullptr ? bias[c] : 0.0f;
    for (int j = 0; j < kernel; ++j) {
        const int64_t src = local - (kernel - 1) + j;  // < 0: from the state
        const float v =
            src >= 0 ? load1(x + (start + src) * x_stride + c) : state[(kernel - 1 + src) * channels + c];
        acc += weight[static_cast<int64_t>(c) * kernel + j] * v;
    }
    store1(out + t * channels + c, silu(acc));
}

// state <- the last kernel - 1 rows of (state ++ the sequence's inputs), per (sequence, channel). Rows are
// written in ascending order and row r reads row len + r >= r, so nothing is read after being overwritten.
template <class T>
__global__ void __launch_bounds__(kConvThreads)
    conv1d_state_kernel(const T* __restrict__ x, int64_t x_stride, int channels,
                        const int32_t* __restrict__ seq_starts, int n_seqs, int kernel,
                        float* const* states) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kConvThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(n_seqs) * channels) return;
    const int s = static_cast<int>(idx / channels), c = static_cast<int>(idx % channels);
    const int64_t start = seq_starts[s], len = seq_starts[s + 1] - start;
    if (len == 0) return;
    float* state = states[s];
    const int hist = kernel - 1;
    for (int r = 0; r < hist; ++r) {
        const int64_t q = len + r;  // index into (state rows ++ inputs)
        state[static_cast<int64_t>(r) * channels + c] =
            q < hist ? state[q * channels + c] : load1(x + (start + q - hist) * x_stride + c);
    }
}

// Coherent single loads (ld.global.ca) for a kernel that also loads before its pdl_wait (cuda/pdl.cuh, rule
// 1).
__device__ __forceinline__ float load1_coherent(const float* p) { return __ldca(p); }
__device__ __forceinline__ float load1_coherent(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<uint32_t>(__ldca(reinterpret_cast<const unsigned short*>(p))) << 16);
}

constexpr int kScanWarps = 4;
constexpr int kMaxStatePerLane = 8;  // state_size <= 256

__device__ __forceinline__ float load_state(const float* p) { return *p; }
__device__ __forceinline__ float load_state(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_state(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_state(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

struct ScanArgs {
    int n_heads, head_dim, state_size, heads_per_group, row_tiles;
    const float* A;
    const float* D;
    const float* dt_bias;
    float dt_min, dt_max;
    int64_t xbc_stride, dt_stride, b_off, c_off, d_inner;
};

// One warp per (sequence, head, head_dim row i); lane holds state[h, i, lane + 32 q].
template <class T, class ST>
__global__ void __launch_bounds__(kScanWarps * 32)
    scan_kernel(ScanArgs a, const int32_t* __restrict__ seq_starts, const T* __restrict__ xbc,
                const T* __restrict__ dt, void* const* __restrict__ states, T* __restrict__ y) {
    // The state is read before pdl_wait: the previous step's scan wrote it (and the engine's state copies
    // run before a step), so it is at least two launches back and complete (cuda/pdl.cuh, rule 2); the
    // sequence table is the host's. Its DRAM round trip then overlaps in_proj's tail (decode is
    // latency-bound: 2 MB a layer for Nemotron-3-Nano). Everything from in_proj (xbc, dt) is read after the
    // wait, coherently. Warps without work wait too before they end.
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.x / a.row_tiles;
    const int i = (blockIdx.x % a.row_tiles) * kScanWarps + (threadIdx.x >> 5);
    const int s = blockIdx.y;
    const int64_t begin = __ldca(seq_starts + s), end = __ldca(seq_starts + s + 1);
    if (i >= a.head_dim || begin == end) {  // the whole warp
        pdl_wait();
        return;
    }
    const int N = a.state_size, g = h / a.heads_per_group;
    ST* st = static_cast<ST*>(const_cast<void*>(reinterpret_cast<const void*>(
                 __ldca(reinterpret_cast<const unsigned long long*>(states + s))))) +
             (static_cast<int64_t>(h) * a.head_dim + i) * N;
    float hs[kMaxStatePerLane];
#pragma unroll
    for (int q = 0; q < kMaxStatePerLane; ++q) {
        const int k = lane + 32 * q;
        hs[q] = k < N ? load_state(st + k) : 0.0f;
    }
    pdl_wait();  // fills the GPU: releases its dependents only at exit
    const float A = a.A[h], Dh = a.D[h], bias = a.dt_bias[h];
    // Inputs of step t + 1 load while step t computes: the loads do not depend on the state, so the
    // dependent chain per token is the arithmetic and the reduction, not a memory round trip.
    float nx, ndt, nB[kMaxStatePerLane], nC[kMaxStatePerLane];
    auto fetch = [&](int64_t t) {
        const T* row = xbc + t * a.xbc_stride;
        nx = load1_coherent(row + static_cast<int64_t>(h) * a.head_dim + i);
        ndt = load1_coherent(dt + t * a.dt_stride + h);
        const T* B = row + a.b_off + static_cast<int64_t>(g) * N;
        const T* C = row + a.c_off + static_cast<int64_t>(g) * N;
#pragma unroll
        for (int q = 0; q < kMaxStatePerLane; ++q) {
            const int k = lane + 32 * q;
            nB[q] = k < N ? load1_coherent(B + k) : 0.0f;
            nC[q] = k < N ? load1_coherent(C + k) : 0.0f;
        }
    };
    fetch(begin);
    for (int64_t t = begin; t < end; ++t) {
        const float xv = nx, dt_raw = ndt;
        float Bq[kMaxStatePerLane], Cq[kMaxStatePerLane];
#pragma unroll
        for (int q = 0; q < kMaxStatePerLane; ++q) Bq[q] = nB[q], Cq[q] = nC[q];
        if (t + 1 < end) fetch(t + 1);
        const float d = fminf(fmaxf(softplus(dt_raw + bias), a.dt_min), a.dt_max);
        const float dA = expf(d * A);
        const float dx = d * xv;
        float acc = 0.0f;
#pragma unroll
        for (int q = 0; q < kMaxStatePerLane; ++q) {
            if (lane + 32 * q < N) {  // lanes past N hold zeros; the guard skips their work
                hs[q] = hs[q] * dA + dx * Bq[q];
                acc += hs[q] * Cq[q];
            }
        }
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) store1(y + t * a.d_inner + static_cast<int64_t>(h) * a.head_dim + i, acc + Dh * xv);
    }
#pragma unroll
    for (int q = 0; q < kMaxStatePerLane; ++q) {
        const int k = lane + 32 * q;
        if (k < N) store_state(st + k, hs[q]);
    }
}

// ---- Chunked (SSD) scan ----
// Per sequence, head h and chunk of kChunk tokens t0 .. t0 + Q - 1 (the last chunk may be shorter), with
// d_k the token's dt after softplus and clamping and cs_j = sum_{k <= j} d_k A (cs_j <= 0, non-increasing):
//   h_{t0 + j} = exp(cs_j) h_in + sum_{k <= j} exp(cs_j - cs_k) d_k x_k B_k^T
// which is the sequential recurrence unrolled (exp(cs_j - cs_k) = prod_{k < i <= j} dA_i). Hence
//   y_j       = exp(cs_j) C_j . h_in + sum_{k <= j} (C_j . B_k) exp(cs_j - cs_k) d_k x_k + D x_j
//   h_out     = exp(cs_last) h_in + S,  S = sum_k exp(cs_last - cs_k) d_k x_k B_k^T
// Four launches: chunk_state_kernel (S of every chunk, and exp(cs_last)), chunk_cb_kernel (C B^T of every
// chunk and group: the heads of a group share it), state_pass_kernel (sequential over a sequence's chunks,
// per state element: each chunk's S is replaced by the chunk's entering state, the final state goes to the
// slot) and chunk_output_kernel (y). Every exponent is <= 0: no overflow.
// Chunk slots: chunk c of sequence s lives in slot s + seq_starts[s] / kChunk + c; these ranges are
// disjoint across sequences and below n_seqs + ceil(n_tokens / kChunk) (see
// ssm_scan_chunked_workspace_bytes).
constexpr int kChunk = 64;          // tokens per chunk
constexpr int kChunkThreads = 256;  // 16 x 16 threads, each a 4 x 4 block of a 64 x 64 product
constexpr int kChunkNTile = 32;     // state columns per shared tile in chunk_output_kernel

struct ChunkArgs {
    int n_heads, head_dim, state_size, heads_per_group, n_seqs;
    const float* A;
    const float* D;
    const float* dt_bias;
    float dt_min, dt_max;
    int64_t xbc_stride, dt_stride, b_off, c_off, d_inner;
    float* chunk_states;  // [n_slots, n_heads, head_dim, state_size]
    float* chunk_decay;   // [n_slots, n_heads] exp(cs_last)
    float* chunk_cb;      // [n_slots, n_groups, kChunk, kChunk] C_j . B_k (shared by the group's heads)
};

// The chunk of blockIdx.x: its sequence, first token and token count; false for an unused slot.
__device__ __forceinline__ bool chunk_of_slot(const int32_t* __restrict__ seq_starts, int n_seqs,
                                              int64_t slot, int64_t& begin, int& count) {
    int lo = 0,
        hi = n_seqs;  // base(lo) <= slot < base(hi), base(s) = s + seq_starts[s] / kChunk (increasing)
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (mid + seq_starts[mid] / kChunk <= slot)
            lo = mid;
        else
            hi = mid;
    }
    const int64_t start = seq_starts[lo], end = seq_starts[lo + 1];
    const int64_t c = slot - (lo + start / kChunk);
    begin = start + c * kChunk;
    if (begin >= end) return false;
    count = static_cast<int>(min(static_cast<int64_t>(kChunk), end - begin));
    return true;
}

// d_s[k] = the token's dt (0 past the chunk's end), cs_s[k] = its cumulative d A (summed in token order,
// the same in both kernels that call this).
template <class T>
__device__ __forceinline__ void chunk_decays(const ChunkArgs& a, const T* __restrict__ dt, int64_t begin,
                                             int count, int h, float* d_s, float* cs_s) {
    const int k = threadIdx.x;
    if (k < kChunk) {
        float d = 0.0f;
        if (k < count) {
            const float v = load1(dt + (begin + k) * a.dt_stride + h) + a.dt_bias[h];
            d = fminf(fmaxf(softplus(v), a.dt_min), a.dt_max);
        }
        d_s[k] = d;
        cs_s[k] = d * a.A[h];  // the per-token log decay, summed below
    }
    __syncthreads();
    float cs = 0.0f;
    if (k < kChunk)
        for (int i = 0; i <= k; ++i) cs += cs_s[i];
    __syncthreads();
    if (k < kChunk) cs_s[k] = cs;
    __syncthreads();
}

// acc[i][j] += sum_{k < k_end} A[k][4 ty + i] B[k][4 tx + j] over two k-major shared tiles (row strides
// lda, ldb: multiples of 4 floats): the 64 x 64 product of a CTA, 4 x 4 per thread (ty = tid / 16,
// tx = tid % 16). Each k reads one float4 of A (two distinct per warp: a broadcast) and one of B (256
// contiguous bytes per warp): 2 shared wavefronts per 16 FMAs. Sums over a chunk's tokens stop at its
// token count rounded up to 8 (the rows past it are zeros): a short last chunk costs what it holds.
__device__ __forceinline__ void product_64x64(float (&acc)[4][4], const float* A, int lda, const float* B,
                                              int ldb, int k_end) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 8
    for (int k = 0; k < k_end; ++k) {
        const float4 av = *reinterpret_cast<const float4*>(A + k * lda + 4 * ty);
        const float4 bv = *reinterpret_cast<const float4*>(B + k * ldb + 4 * tx);
        const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
}

// S[p, n] = sum_k exp(cs_last - cs_k) d_k x_k[p] B_k[n] for one (chunk, head); grid (n_slots, n_heads).
template <class T>
__global__ void __launch_bounds__(kChunkThreads)
    chunk_state_kernel(ChunkArgs a, const int32_t* __restrict__ seq_starts, const T* __restrict__ xbc,
                       const T* __restrict__ dt) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    __shared__ float d_s[kChunk], cs_s[kChunk];
    __shared__ __align__(16) float w_s[kChunk * 64];  // [token k][p]: the decayed, dt-scaled x
    __shared__ __align__(16) float b_s[kChunk * 64];  // [token k][n]
    int64_t begin;
    int count;
    if (!chunk_of_slot(seq_starts, a.n_seqs, blockIdx.x, begin, count)) return;  // the whole CTA
    const int h = blockIdx.y, g = h / a.heads_per_group, P = a.head_dim, N = a.state_size;
    chunk_decays(a, dt, begin, count, h, d_s, cs_s);
    const float cs_last = cs_s[kChunk - 1];
    if (threadIdx.x == 0) a.chunk_decay[static_cast<int64_t>(blockIdx.x) * a.n_heads + h] = expf(cs_last);
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    float* S = a.chunk_states + (static_cast<int64_t>(blockIdx.x) * a.n_heads + h) * P * N;
    for (int p0 = 0; p0 < P; p0 += 64) {
        for (int e = threadIdx.x; e < kChunk * 64; e += kChunkThreads) {
            const int k = e >> 6, p = e & 63;
            float v = 0.0f;
            if (k < count && p0 + p < P)
                v = expf(cs_last - cs_s[k]) * d_s[k] *
                    load1(xbc + (begin + k) * a.xbc_stride + static_cast<int64_t>(h) * P + p0 + p);
            w_s[e] = v;
        }
        for (int n0 = 0; n0 < N; n0 += 64) {
            for (int e = threadIdx.x; e < kChunk * 64; e += kChunkThreads) {
                const int k = e >> 6, n = e & 63;
                b_s[e] = k < count && n0 + n < N ? load1(xbc + (begin + k) * a.xbc_stride + a.b_off +
                                                         static_cast<int64_t>(g) * N + n0 + n)
                                                 : 0.0f;
            }
            __syncthreads();
            float acc[4][4] = {};
            product_64x64(acc, w_s, 64, b_s, 64, (count + 7) & ~7);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int p = p0 + 4 * ty + i, n = n0 + 4 * tx + j;
                    if (p < P && n < N) S[static_cast<int64_t>(p) * N + n] = acc[i][j];
                }
            __syncthreads();  // b_s (and w_s after the last tile) are rewritten next
        }
    }
}

// Per (sequence, head, state element): h = the slot's state; for each chunk c: S_c <- h (the state entering
// chunk c), h = exp(cs_last_c) h + S_c; the slot <- h. Grid (ceil(P N / 256), n_heads, n_seqs).
template <class ST>
__global__ void __launch_bounds__(kChunkThreads)
    state_pass_kernel(ChunkArgs a, const int32_t* __restrict__ seq_starts, void* const* __restrict__ states) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    const int64_t PN = static_cast<int64_t>(a.head_dim) * a.state_size;
    const int64_t e = static_cast<int64_t>(blockIdx.x) * kChunkThreads + threadIdx.x;
    if (e >= PN) return;
    const int h = blockIdx.y, s = blockIdx.z;
    const int64_t start = seq_starts[s], len = seq_starts[s + 1] - start;
    if (len <= 0) return;
    const int64_t n_chunks = (len + kChunk - 1) / kChunk, base = s + start / kChunk;
    ST* st = static_cast<ST*>(states[s]) + h * PN + e;
    float state = load_state(st);
    auto at = [&](int64_t c) { return a.chunk_states + ((base + c) * a.n_heads + h) * PN + e; };
    // S and the decays of kAhead chunks load together (they do not depend on the state): one memory round
    // trip per kAhead chunks on the sequential path, not one per chunk.
    constexpr int kAhead = 8;
    for (int64_t c0 = 0; c0 < n_chunks; c0 += kAhead) {
        float S[kAhead], dec[kAhead];
#pragma unroll
        for (int q = 0; q < kAhead; ++q) {
            const bool in = c0 + q < n_chunks;
            S[q] = in ? *at(c0 + q) : 0.0f;
            dec[q] = in ? a.chunk_decay[(base + c0 + q) * a.n_heads + h] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < kAhead; ++q)
            if (c0 + q < n_chunks) {
                *at(c0 + q) = state;
                state = fmaf(dec[q], state, S[q]);
            }
    }
    store_state(st, state);
}

// Shared tiles of the kernels below are k-major (the summed index first) with rows kLd = 68 floats apart:
// float4-aligned, and the transposing stores from row-major global data conflict only 4-way.
constexpr int kLd = 68;

// CB[j][k] = C_j . B_k of one (chunk, group); grid (n_slots, n_groups).
template <class T>
__global__ void __launch_bounds__(kChunkThreads)
    chunk_cb_kernel(ChunkArgs a, int n_groups, const int32_t* __restrict__ seq_starts,
                    const T* __restrict__ xbc) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    __shared__ __align__(16) float ct_s[kChunkNTile * kLd];  // [n][j]
    __shared__ __align__(16) float bt_s[kChunkNTile * kLd];  // [n][k]
    int64_t begin;
    int count;
    if (!chunk_of_slot(seq_starts, a.n_seqs, blockIdx.x, begin, count)) return;  // the whole CTA
    const int g = blockIdx.y, N = a.state_size;
    const T* C_g = xbc + a.c_off + static_cast<int64_t>(g) * N;
    const T* B_g = xbc + a.b_off + static_cast<int64_t>(g) * N;
    float acc[4][4] = {};
    for (int n0 = 0; n0 < N; n0 += kChunkNTile) {
        for (int e = threadIdx.x; e < kChunk * kChunkNTile; e += kChunkThreads) {
            const int j = e / kChunkNTile, n = e % kChunkNTile;
            const bool in = j < count && n0 + n < N;
            ct_s[n * kLd + j] = in ? load1(C_g + (begin + j) * a.xbc_stride + n0 + n) : 0.0f;
            bt_s[n * kLd + j] = in ? load1(B_g + (begin + j) * a.xbc_stride + n0 + n) : 0.0f;
        }
        __syncthreads();
        product_64x64(acc, ct_s, kLd, bt_s, kLd, kChunkNTile);
        __syncthreads();
    }
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    float* CB = a.chunk_cb + (static_cast<int64_t>(blockIdx.x) * n_groups + g) * kChunk * kChunk;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        *reinterpret_cast<float4*>(CB + (4 * ty + i) * kChunk + 4 * tx) =
            make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

// y of one (chunk, head): exp(cs_j) C_j . h_in + sum_{k <= j} G[j, k] x_k + D x_j with
// G[j, k] = CB[j, k] exp(cs_j - cs_k) d_k; h_in from the chunk's slot. Grid (n_slots, n_heads).
template <class T>
__global__ void __launch_bounds__(kChunkThreads, 2)  // 2: room for 128 registers (64 spilled)
    chunk_output_kernel(ChunkArgs a, const int32_t* __restrict__ seq_starts, const T* __restrict__ xbc,
                        const T* __restrict__ dt, T* __restrict__ y) {
    pdl_wait();  // fills the GPU: releases its dependents only at exit (cuda/pdl.cuh)
    __shared__ float d_s[kChunk], cs_s[kChunk];
    __shared__ __align__(16) float gt_s[kChunk * kLd];  // [k][j]: G transposed
    // ct_s [n][j] (C, 32 state columns) and ot_s [n][k or p] (B or h_in), or later x_s [k][p] over both.
    __shared__ __align__(16) float tiles[2 * kChunkNTile * kLd];
    static_assert(kChunk * kLd <= 2 * kChunkNTile * kLd, "the x tile fits the two tiles");
    float* ct_s = tiles;
    float* ot_s = tiles + kChunkNTile * kLd;
    float* x_s = tiles;
    int64_t begin;
    int count;
    if (!chunk_of_slot(seq_starts, a.n_seqs, blockIdx.x, begin, count)) return;  // the whole CTA
    const int h = blockIdx.y, g = h / a.heads_per_group, P = a.head_dim, N = a.state_size;
    chunk_decays(a, dt, begin, count, h, d_s, cs_s);
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const T* C_g = xbc + a.c_off + static_cast<int64_t>(g) * N;
    // ct_s[n][j] = C of token j at state column n0 + n (zeros past the chunk or the state)
    auto load_c = [&](int n0) {
        for (int e = threadIdx.x; e < kChunk * kChunkNTile; e += kChunkThreads) {
            const int j = e / kChunkNTile, n = e % kChunkNTile;
            ct_s[n * kLd + j] =
                j < count && n0 + n < N ? load1(C_g + (begin + j) * a.xbc_stride + n0 + n) : 0.0f;
        }
    };
    // G from the group's C B^T, masked and decayed, stored transposed (read after the next __syncthreads).
    {
        const float* CB =
            a.chunk_cb +
            (static_cast<int64_t>(blockIdx.x) * (a.n_heads / a.heads_per_group) + g) * kChunk * kChunk;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = 4 * ty + i;  // the output token
            const float4 cb4 = *reinterpret_cast<const float4*>(CB + r * kChunk + 4 * tx);
            const float cb[4] = {cb4.x, cb4.y, cb4.z, cb4.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int k = 4 * tx + j;  // the input token
                gt_s[k * kLd + r] = k <= r ? cb[j] * expf(cs_s[r] - cs_s[k]) * d_s[k] : 0.0f;
            }
        }
    }
    const float* h_in = a.chunk_states + (static_cast<int64_t>(blockIdx.x) * a.n_heads + h) * P * N;
    const float Dh = a.D[h];
    for (int p0 = 0; p0 < P; p0 += 64) {
        float acc[4][4] = {};
        // inter-chunk: C_j . h_in[p]
        for (int n0 = 0; n0 < N; n0 += kChunkNTile) {
            load_c(n0);
            for (int e = threadIdx.x; e < 64 * kChunkNTile; e += kChunkThreads) {
                const int p = e / kChunkNTile, n = e % kChunkNTile;
                ot_s[n * kLd + p] =
                    p0 + p < P && n0 + n < N ? h_in[static_cast<int64_t>(p0 + p) * N + n0 + n] : 0.0f;
            }
            __syncthreads();
            product_64x64(acc, ct_s, kLd, ot_s, kLd, kChunkNTile);
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float decay = expf(cs_s[4 * ty + i]);
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] *= decay;
        }
        // intra-chunk: sum_k G[j, k] x_k[p]
        for (int e = threadIdx.x; e < kChunk * 64; e += kChunkThreads) {
            const int k = e >> 6, p = e & 63;
            x_s[k * kLd + p] =
                k < count && p0 + p < P
                    ? load1(xbc + (begin + k) * a.xbc_stride + static_cast<int64_t>(h) * P + p0 + p)
                    : 0.0f;
        }
        __syncthreads();
        product_64x64(acc, gt_s, kLd, x_s, kLd, (count + 7) & ~7);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = 4 * ty + i, p = 4 * tx + j;
                if (r < count && p0 + p < P)
                    store1(y + (begin + r) * a.d_inner + static_cast<int64_t>(h) * P + p0 + p,
                           acc[i][j] + Dh * x_s[r * kLd + p]);
            }
        __syncthreads();  // x_s aliases the tiles the next p0 loads
    }
}

constexpr int kNormThreads = 128;

// One CTA per (row, group).
template <class T>
__global__ void __launch_bounds__(kNormThreads)
    gated_rmsnorm_kernel(const T* y, const T* __restrict__ z, int64_t z_stride, int64_t d, int64_t group_size,
                         const float* __restrict__ weight, float eps, T* out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ float scratch[32];
    const int64_t groups = d / group_size;
    const int64_t r = blockIdx.x / groups, g0 = (blockIdx.x % groups) * group_size;
    const T* yr = y + r * d;
    const T* zr = z + r * z_stride;
    float ss = 0.0f;
    for (int64_t i = g0 + threadIdx.x; i < g0 + group_size; i += kNormThreads) {
        const float gv = load1(yr + i) * silu(load1(zr + i));
        ss = fmaf(gv, gv, ss);
    }
    ss = block_sum<kNormThreads>(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(group_size) + eps);
    T* orow = out + r * d;
    for (int64_t i = g0 + threadIdx.x; i < g0 + group_size; i += kNormThreads) {
        const float gv = load1(yr + i) * silu(load1(zr + i));  // this thread's own elements: out may alias y
        store1(orow + i, weight[i] * (gv * inv));
    }
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

void check_dtype(DType dtype, const char* what) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        bad(std::string(what) + ": activations must be F32 or BF16");
}

unsigned blocks_for(int64_t n, int threads, const char* what) {
    const int64_t b = (n + threads - 1) / threads;
    if (b > 0x7fffffff) bad(std::string(what) + ": too many elements");
    return static_cast<unsigned>(b);
}

}  // namespace

void mamba_conv1d(const void* x, DType dtype, int64_t x_stride, int64_t n_tokens, int64_t channels,
                  const int32_t* seq_starts, int64_t n_seqs, const float* weight, const float* bias,
                  int64_t kernel, float* const* conv_states, void* out, cudaStream_t stream) {
    const char* what = "mamba_conv1d";
    check_dtype(dtype, what);
    if (kernel < 1 || kernel > kMaxConvKernel)
        bad("mamba_conv1d: kernel " + std::to_string(kernel) + " not in 1..8");
    if (channels <= 0 || channels > 0x7fffffff || x_stride < channels || n_tokens < 0 || n_seqs < 1 ||
        n_seqs > 0x7fffffff)
        bad("mamba_conv1d: channels " + std::to_string(channels) + ", x_stride " + std::to_string(x_stride) +
            ", n_tokens " + std::to_string(n_tokens) + ", n_seqs " + std::to_string(n_seqs) +
            " out of range");
    const int ch = static_cast<int>(channels), ns = static_cast<int>(n_seqs), kw = static_cast<int>(kernel);
    auto body = [&]<class T>() {
        const T* xt = static_cast<const T*>(x);
        if (n_tokens > 0)
            launch_pdl(conv1d_kernel<T>, dim3(blocks_for(n_tokens * channels, kConvThreads, what)),
                       dim3(kConvThreads), 0, stream, xt, x_stride, n_tokens, ch, seq_starts, ns, weight,
                       bias, kw, conv_states, static_cast<T*>(out));
        if (kernel > 1 && n_tokens > 0)
            launch_pdl(conv1d_state_kernel<T>, dim3(blocks_for(n_seqs * channels, kConvThreads, what)),
                       dim3(kConvThreads), 0, stream, xt, x_stride, ch, seq_starts, ns, kw, conv_states);
    };
    if (dtype == DType::F32)
        body.template operator()<float>();
    else
        body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

namespace {

void check_scan(const char* what, const SsmScanParams& p, int64_t n_tokens, int64_t n_seqs,
                int64_t xbc_stride, int64_t dt_stride, DType dtype) {
    check_dtype(dtype, what);
    if (p.n_heads < 1 || p.n_groups < 1 || p.n_heads % p.n_groups != 0 || p.head_dim < 1 ||
        p.state_size < 1 || p.state_size > 32 * kMaxStatePerLane || p.n_heads > 0x7fff || p.head_dim > 0x7fff)
        bad(std::string(what) + ": " + std::to_string(p.n_heads) + " heads in " + std::to_string(p.n_groups) +
            " groups, head_dim " + std::to_string(p.head_dim) + ", state_size " +
            std::to_string(p.state_size) + " (state_size must be 1..256, heads a multiple of groups)");
    const int64_t d_inner = p.n_heads * p.head_dim;
    if (xbc_stride < d_inner + 2 * p.n_groups * p.state_size || dt_stride < p.n_heads || n_seqs < 1 ||
        n_seqs > 65535 || n_tokens < 0 || n_tokens > 0x7fffffff)
        bad(std::string(what) + ": xbc_stride " + std::to_string(xbc_stride) + " / dt_stride " +
            std::to_string(dt_stride) + " shorter than a row, or n_seqs " + std::to_string(n_seqs) +
            " not in 1..65535, or n_tokens " + std::to_string(n_tokens) + " out of range");
    if (p.A == nullptr || p.D == nullptr || p.dt_bias == nullptr)
        bad(std::string(what) + ": A, D and dt_bias are required");
}

int64_t chunk_slots(int64_t n_tokens, int64_t n_seqs) { return n_seqs + (n_tokens + kChunk - 1) / kChunk; }

}  // namespace

void ssm_scan(const SsmScanParams& p, int64_t n_tokens, const int32_t* seq_starts, int64_t n_seqs,
              const void* xbc, int64_t xbc_stride, const void* dt, int64_t dt_stride, DType dtype,
              void* const* ssm_states, SsmStateDtype state_dtype, void* y, cudaStream_t stream) {
    check_scan("ssm_scan", p, n_tokens, n_seqs, xbc_stride, dt_stride, dtype);
    const int64_t d_inner = p.n_heads * p.head_dim;
    if (n_tokens == 0) return;
    ScanArgs a{};
    a.n_heads = static_cast<int>(p.n_heads);
    a.head_dim = static_cast<int>(p.head_dim);
    a.state_size = static_cast<int>(p.state_size);
    a.heads_per_group = static_cast<int>(p.n_heads / p.n_groups);
    a.row_tiles = static_cast<int>((p.head_dim + kScanWarps - 1) / kScanWarps);
    a.A = p.A, a.D = p.D, a.dt_bias = p.dt_bias;
    a.dt_min = p.dt_min, a.dt_max = p.dt_max;
    a.xbc_stride = xbc_stride, a.dt_stride = dt_stride;
    a.b_off = d_inner, a.c_off = d_inner + p.n_groups * p.state_size, a.d_inner = d_inner;
    const dim3 grid(static_cast<unsigned>(a.n_heads * a.row_tiles), static_cast<unsigned>(n_seqs));
    auto body = [&]<class T, class ST>() {
        launch_pdl(scan_kernel<T, ST>, dim3(grid), dim3(kScanWarps * 32), 0, stream, a, seq_starts,
                   static_cast<const T*>(xbc), static_cast<const T*>(dt), ssm_states, static_cast<T*>(y));
    };
    const bool f32_state = state_dtype == SsmStateDtype::F32;
    if (dtype == DType::F32) {
        if (f32_state)
            body.template operator()<float, float>();
        else
            body.template operator()<float, __nv_bfloat16>();
    } else {
        if (f32_state)
            body.template operator()<__nv_bfloat16, float>();
        else
            body.template operator()<__nv_bfloat16, __nv_bfloat16>();
    }
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

namespace {

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The workspace: chunk states [slots, H, P, N], then decays [slots, H], then C B^T [slots, G, 64, 64]
// (float32, each part 256-byte aligned).
struct ChunkWorkspace {
    size_t states, decay, cb, total;
    ChunkWorkspace(const SsmScanParams& p, int64_t n_tokens, int64_t n_seqs) {
        const auto slots = static_cast<size_t>(chunk_slots(n_tokens, n_seqs));
        states = 0;
        decay = align256(slots * static_cast<size_t>(p.n_heads * p.head_dim * p.state_size) * sizeof(float));
        cb = decay + align256(slots * static_cast<size_t>(p.n_heads) * sizeof(float));
        total = cb + slots * static_cast<size_t>(p.n_groups) * kChunk * kChunk * sizeof(float);
    }
};

}  // namespace

size_t ssm_scan_chunked_workspace_bytes(const SsmScanParams& p, int64_t n_tokens, int64_t n_seqs) {
    return ChunkWorkspace(p, n_tokens, n_seqs).total;
}

void ssm_scan_chunked(const SsmScanParams& p, int64_t n_tokens, const int32_t* seq_starts, int64_t n_seqs,
                      const void* xbc, int64_t xbc_stride, const void* dt, int64_t dt_stride, DType dtype,
                      void* const* ssm_states, SsmStateDtype state_dtype, void* y, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
    check_scan("ssm_scan_chunked", p, n_tokens, n_seqs, xbc_stride, dt_stride, dtype);
    const size_t need = ssm_scan_chunked_workspace_bytes(p, n_tokens, n_seqs);
    if (workspace == nullptr || workspace_bytes < need)
        bad("ssm_scan_chunked: workspace of " + std::to_string(workspace_bytes) + " bytes, " +
            std::to_string(need) + " needed for " + std::to_string(n_tokens) + " tokens in " +
            std::to_string(n_seqs) + " sequences");
    if (n_tokens == 0) return;
    const int64_t d_inner = p.n_heads * p.head_dim, slots = chunk_slots(n_tokens, n_seqs);
    ChunkArgs a{};
    a.n_heads = static_cast<int>(p.n_heads);
    a.head_dim = static_cast<int>(p.head_dim);
    a.state_size = static_cast<int>(p.state_size);
    a.heads_per_group = static_cast<int>(p.n_heads / p.n_groups);
    a.n_seqs = static_cast<int>(n_seqs);
    a.A = p.A, a.D = p.D, a.dt_bias = p.dt_bias;
    a.dt_min = p.dt_min, a.dt_max = p.dt_max;
    a.xbc_stride = xbc_stride, a.dt_stride = dt_stride;
    a.b_off = d_inner, a.c_off = d_inner + p.n_groups * p.state_size, a.d_inner = d_inner;
    const ChunkWorkspace layout(p, n_tokens, n_seqs);
    auto* base = static_cast<uint8_t*>(workspace);
    a.chunk_states = reinterpret_cast<float*>(base + layout.states);
    a.chunk_decay = reinterpret_cast<float*>(base + layout.decay);
    a.chunk_cb = reinterpret_cast<float*>(base + layout.cb);
    const dim3 chunk_grid(static_cast<unsigned>(slots), static_cast<unsigned>(p.n_heads));
    const dim3 cb_grid(static_cast<unsigned>(slots), static_cast<unsigned>(p.n_groups));
    const dim3 pass_grid(blocks_for(p.head_dim * p.state_size, kChunkThreads, "ssm_scan_chunked"),
                         static_cast<unsigned>(p.n_heads), static_cast<unsigned>(n_seqs));
    auto body = [&]<class T, class ST>() {
        const T* xt = static_cast<const T*>(xbc);
        const T* dtt = static_cast<const T*>(dt);
        launch_pdl(chunk_state_kernel<T>, dim3(chunk_grid), dim3(kChunkThreads), 0, stream, a, seq_starts, xt,
                   dtt);
        launch_pdl(chunk_cb_kernel<T>, dim3(cb_grid), dim3(kChunkThreads), 0, stream, a,
                   static_cast<int>(p.n_groups), seq_starts, xt);
        launch_pdl(state_pass_kernel<ST>, dim3(pass_grid), dim3(kChunkThreads), 0, stream, a, seq_starts,
                   ssm_states);
        launch_pdl(chunk_output_kernel<T>, dim3(chunk_grid), dim3(kChunkThreads), 0, stream, a, seq_starts,
                   xt, dtt, static_cast<T*>(y));
    };
    const bool f32_state = state_dtype == SsmStateDtype::F32;
    if (dtype == DType::F32) {
        if (f32_state)
            body.template operator()<float, float>();
        else
            body.template operator()<float, __nv_bfloat16>();
    } else {
        if (f32_state)
            body.template operator()<__nv_bfloat16, float>();
        else
            body.template operator()<__nv_bfloat16, __nv_bfloat16>();
    }
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gated_rmsnorm(const void* y, const void* z, int64_t z_stride, DType dtype, int64_t m, int64_t d,
                   int64_t group_size, const float* weight, float eps, void* out, cudaStream_t stream) {
    check_dtype(dtype, "gated_rmsnorm");
    if (group_size <= 0 || d <= 0 || d % group_size != 0 || z_stride < d || m < 0)
        bad("gated_rmsnorm: width " + std::to_string(d) + " is not a multiple of group " +
            std::to_string(group_size) + " (or z_stride " + std::to_string(z_stride) + " < width)");
    if (m == 0) return;
    const int64_t ctas = m * (d / group_size);
    if (ctas > 0x7fffffff) bad("gated_rmsnorm: too many rows");
    auto body = [&]<class T>() {
        launch_pdl(gated_rmsnorm_kernel<T>, dim3(static_cast<unsigned>(ctas)), dim3(kNormThreads), 0, stream,
                   static_cast<const T*>(y), static_cast<const T*>(z), z_stride, d, group_size, weight, eps,
                   static_cast<T*>(out));
    };
    if (dtype == DType::F32)
        body.template operator()<float>();
    else
        body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
