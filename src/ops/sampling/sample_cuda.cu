#include <climits>
#include <stdexcept>
#include <string>

#include "cuda/pdl.cuh"
#include "ops/sampling/sample_cuda.h"
#include "ops/sampling/sampling_weight.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;  // 32: one warp reduces the warp totals, one per lane
constexpr int kItems = 8;              // the draw scan: each thread walks kItems consecutive ids per tile
constexpr unsigned kFull = 0xffffffffu;

// An unsigned key with the float order (NaN lowest, -0 as +0): equal logits have equal keys, so the bisection
// sees ties exactly as the host's comparisons do.
__device__ __forceinline__ uint32_t order_key(float f) {
    if (f != f) return 0u;
    uint32_t b = __float_as_uint(f);
    if (b == 0x80000000u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_logit(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct Sum {
    template <class T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    template <class T>
    __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
    template <class T>
    __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Every thread gets the block's reduction. smem: [kWarps], free again on return.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity, T* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < kWarps ? smem[lane] : identity;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
    __syncthreads();
    return v;
}

// Exclusive prefix sum over the 32 lanes of a warp.
__device__ __forceinline__ double warp_exclusive_sum(double v) {
    const int lane = threadIdx.x & 31;
    double inclusive = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const double o = __shfl_up_sync(kFull, inclusive, off);
        if (lane >= off) inclusive += o;
    }
    const double before = __shfl_up_sync(kFull, inclusive, 1);
    return lane == 0 ? 0.0 : before;
}

// The first id, ascending, at which the running sum of weight(logit, id) >= target (or > target when
// strict), counting only ids of positive weight; -1 if the whole row stays below. The row is scanned in
// tiles of kThreads * kItems ids, each thread owning kItems consecutive ones.
//   warp_sums [kWarps] and found: block shared memory.
template <class Weight>
__device__ int32_t first_crossing(const float* __restrict__ row, int32_t n, Weight weight, double target, bool strict,
                                  double* warp_sums, int32_t* found) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double carry = 0.0;  // the sum over the tiles before this one
    for (int32_t base = 0; base < n; base += kThreads * kItems) {
        const int32_t first = base + static_cast<int32_t>(threadIdx.x) * kItems;
        double w[kItems];
        double local = 0.0;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
            const int32_t id = first + j;
            w[j] = id < n ? weight(row[id], id) : 0.0;
            local += w[j];
        }
        const double in_warp_before = warp_exclusive_sum(local);
        if (lane == 31) warp_sums[warp] = in_warp_before + local;
        if (threadIdx.x == 0) *found = INT_MAX;
        __syncthreads();
        const double warp_total = lane < kWarps ? warp_sums[lane] : 0.0;
        const double warps_before = warp_exclusive_sum(warp_total);
        const double this_warp_before = __shfl_sync(kFull, warps_before, warp);
        const double tile_total = __shfl_sync(kFull, warps_before + warp_total, 31);
        double acc = carry + this_warp_before + in_warp_before;
        int32_t hit = INT_MAX;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
            acc += w[j];
            if (hit == INT_MAX && w[j] > 0.0 && (strict ? acc > target : acc >= target)) hit = first + j;
        }
        if (hit != INT_MAX) atomicMin(found, hit);
        __syncthreads();
        const int32_t f = *found;
        __syncthreads();  // everyone has read found and warp_sums before the next tile rewrites them
        if (f != INT_MAX) return f;
        carry += tile_total;
    }
    return -1;
}

// One block per row.
__global__ void __launch_bounds__(kThreads) sample_kernel(const float* __restrict__ logits, int32_t n,
                                                          const RowSamplingParams* __restrict__ rows,
                                                          int32_t* __restrict__ tokens) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    __shared__ uint32_t red_u[kWarps];
    __shared__ int32_t red_i[kWarps];
    __shared__ double red_d[kWarps];
    __shared__ int32_t found;
    const float* row = logits + static_cast<int64_t>(blockIdx.x) * n;
    const RowSamplingParams p = rows[blockIdx.x];
    const int32_t tid = static_cast<int32_t>(threadIdx.x);

    uint32_t top_key = 0;
    for (int32_t i = tid; i < n; i += kThreads) top_key = max(top_key, order_key(row[i]));
    top_key = block_reduce(top_key, Max{}, 0u, red_u);
    const float top_logit = key_logit(top_key);

    if (p.temperature == 0.0f || !isfinite(top_logit)) {  // greedy: the first maximum
        int32_t first = INT_MAX;
        for (int32_t i = tid; i < n; i += kThreads)
            if (order_key(row[i]) == top_key) {
                first = i;  // a thread's ids ascend: its first hit is its smallest
                break;
            }
        first = block_reduce(first, Min{}, INT_MAX, red_i);
        if (tid == 0) tokens[blockIdx.x] = first;
        return;
    }

    // Unnormalized probability of a logit: exp((l - top) / T), 1 for the top one, bit for bit the host's.
    const float top = top_logit, inv_t = sampling_inv_temperature(p.temperature);
    auto weight = [top, inv_t](float l) { return static_cast<double>(sampling_weight(l, top, inv_t)); };

    // top-k: kept are key > cut_k, and the ties at cut_k up to id cut_id_k (the lowest ids first).
    uint32_t cut_k = 0;
    int32_t cut_id_k = n - 1;
    const int32_t k = p.top_k > 0 && p.top_k < n ? p.top_k : n;
    if (k < n) {
        // The largest key with at least k logits at or above it: count(key >= lo) >= k and count(key > hi) < k
        // hold throughout. The answer is some logit's key, so each step moves lo or hi to the nearest key
        // present on its side of mid (there is one: the counts at lo and hi + 1 differ from the one at mid).
        uint32_t lo = 0, hi = top_key;
        while (lo < hi) {
            const uint32_t mid = hi - (hi - lo) / 2;  // in (lo, hi]
            uint32_t c = 0, up = 0xffffffffu, down = 0u;
            for (int32_t i = tid; i < n; i += kThreads) {
                const uint32_t key = order_key(row[i]);
                if (key >= mid) {
                    ++c;
                    up = min(up, key);
                } else if (key >= lo) {
                    down = max(down, key);
                }
            }
            c = block_reduce(c, Sum{}, 0u, red_u);
            if (c >= static_cast<uint32_t>(k)) lo = min(block_reduce(up, Min{}, 0xffffffffu, red_u), hi);
            else hi = max(block_reduce(down, Max{}, 0u, red_u), lo);
        }
        cut_k = lo;
        uint32_t greater = 0, ties = 0;
        for (int32_t i = tid; i < n; i += kThreads) {
            const uint32_t key = order_key(row[i]);
            greater += key > cut_k ? 1u : 0u;
            ties += key == cut_k ? 1u : 0u;
        }
        greater = block_reduce(greater, Sum{}, 0u, red_u);  // < k, by the bisection
        ties = block_reduce(ties, Sum{}, 0u, red_u);        // >= k - greater
        const uint32_t ties_needed = static_cast<uint32_t>(k) - greater;
        if (ties_needed < ties) {  // else every tie stays (cut_id_k = n - 1)
            const int32_t at = first_crossing(
                row, n, [cut_k](float l, int32_t) { return order_key(l) == cut_k ? 1.0 : 0.0; },
                static_cast<double>(ties_needed), false, red_d, &found);
            cut_id_k = at >= 0 ? at : n - 1;
        }
    }
    auto in_top_k = [cut_k, cut_id_k](uint32_t key, int32_t id) {
        return key > cut_k || (key == cut_k && id <= cut_id_k);
    };

    double mass_k = 0.0;  // the top-k tokens' mass
    for (int32_t i = tid; i < n; i += kThreads) {
        const float l = row[i];
        if (in_top_k(order_key(l), i)) mass_k += weight(l);
    }
    mass_k = block_reduce(mass_k, Sum{}, 0.0, red_d);

    // top-p over the top-k tokens: the shortest prefix by (logit descending, id ascending) whose mass reaches
    // top_p x mass_k. Kept are key > cut_p, and the ties at cut_p up to id cut_id_p.
    uint32_t cut_p = 0;
    int32_t cut_id_p = n - 1;
    if (p.top_p < 1.0f) {
        const double target = static_cast<double>(p.top_p) * mass_k;
        // The largest key whose top-k tokens at or above it reach the target (the mass at cut_k is all of it),
        // with lo and hi moved to keys present as in the top-k search. Above cut_k every token is a top-k one.
        uint32_t lo = cut_k, hi = top_key;
        while (lo < hi) {
            const uint32_t mid = hi - (hi - lo) / 2;
            double m = 0.0;
            uint32_t up = 0xffffffffu, down = 0u;
            for (int32_t i = tid; i < n; i += kThreads) {
                const float l = row[i];
                const uint32_t key = order_key(l);
                if (key >= mid) {
                    m += weight(l);
                    up = min(up, key);
                } else if (key >= lo && in_top_k(key, i)) {
                    down = max(down, key);
                }
            }
            m = block_reduce(m, Sum{}, 0.0, red_d);
            if (m >= target) lo = min(block_reduce(up, Min{}, 0xffffffffu, red_u), hi);
            else hi = max(block_reduce(down, Max{}, 0u, red_u), lo);
        }
        cut_p = lo;
        double above = 0.0;  // mass strictly above the cut
        uint32_t ties = 0;   // top-k tokens at the cut
        for (int32_t i = tid; i < n; i += kThreads) {
            const float l = row[i];
            const uint32_t key = order_key(l);
            if (key > cut_p && in_top_k(key, i)) above += weight(l);
            if (key == cut_p && in_top_k(key, i)) ++ties;
        }
        above = block_reduce(above, Sum{}, 0.0, red_d);
        ties = block_reduce(ties, Sum{}, 0u, red_u);
        // Tied tokens weigh the same: the prefix ends at the first one that brings the mass to the target.
        const double tie_weight = weight(key_logit(cut_p));
        double ties_needed = tie_weight > 0.0 ? ceil((target - above) / tie_weight) : 1.0;
        ties_needed = fmax(ties_needed, 1.0);
        if (ties_needed < static_cast<double>(ties)) {  // else every tie stays (cut_id_p = n - 1)
            const int32_t at = first_crossing(
                row, n,
                [cut_p, in_top_k](float l, int32_t id) {
                    const uint32_t key = order_key(l);
                    return key == cut_p && in_top_k(key, id) ? 1.0 : 0.0;
                },
                ties_needed, false, red_d, &found);
            cut_id_p = at >= 0 ? at : n - 1;
        }
    }

    // min-p: weight >= min_p x the top one's (1).
    const double min_weight = p.min_p > 0.0f ? static_cast<double>(p.min_p) : 0.0;
    auto kept = [in_top_k, cut_p, cut_id_p, min_weight, weight](float l, int32_t id) {
        const uint32_t key = order_key(l);
        return in_top_k(key, id) && (key > cut_p || (key == cut_p && id <= cut_id_p)) && weight(l) >= min_weight;
    };

    double mass = 0.0;
    int32_t last_kept = -1;
    for (int32_t i = tid; i < n; i += kThreads) {
        const float l = row[i];
        if (kept(l, i)) {
            mass += weight(l);
            last_kept = i;  // ascending per thread
        }
    }
    mass = block_reduce(mass, Sum{}, 0.0, red_d);
    last_kept = block_reduce(last_kept, Max{}, -1, red_i);

    const int32_t token = first_crossing(
        row, n, [kept, weight](float l, int32_t id) { return kept(l, id) ? weight(l) : 0.0; }, p.u * mass, true,
        red_d, &found);
    if (tid == 0) tokens[blockIdx.x] = token >= 0 ? token : last_kept;
}

}  // namespace

void sample_rows(const float* logits, int64_t n_rows, int64_t vocab, const RowSamplingParams* rows, int32_t* tokens,
                 cudaStream_t stream) {
    // Ids and the scan's tile bases stay below 2^31 with room for one tile past the end.
    if (vocab <= 0 || vocab > INT_MAX - kThreads * kItems)
        throw std::invalid_argument("sample_rows: vocab = " + std::to_string(vocab));
    if (n_rows < 0 || n_rows > INT_MAX) throw std::invalid_argument("sample_rows: n_rows = " + std::to_string(n_rows));
    if (n_rows == 0) return;
    launch_pdl(sample_kernel, dim3(static_cast<unsigned>(n_rows)), dim3(kThreads), 0, stream, logits,
               static_cast<int32_t>(vocab), rows, tokens);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw std::runtime_error(std::string("sample_rows: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace nibble::cuda
