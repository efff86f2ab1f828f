// The fused all-reduce + residual + RMSNorm over NCCL's LSA device API (lsa_reduce_norm_cuda.h has the
// contract). The row is split into slices of 256 values, one CTA a slice, so the peers' bytes come over NVLink
// through as many SMs at once (one CTA a whole row measured slower than NCCL's all-reduce + the norm kernel:
// docs/perf.md, session 6). Warp w of a CTA takes rows w, w + 4, ...; lane l the slice's values 8l .. 8l + 7,
// every peer's 8 loaded before any is added. Each CTA meets the peers at its own LSA barrier (index = slice),
// writes its residual values and each row's partial sum of squares, and the CTAs then meet at a grid barrier
// (all are resident: at most kLsaReduceNormMaxSlices small CTAs) and sum the partials in slice order: every
// CTA of every rank gets the same norm factor.
#include <cuda_bf16.h>
#include <nccl.h>
#include <nccl_device.h>

#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "parallel/lsa_reduce_norm_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kSlice = 256;     // values of a row a CTA takes: 32 lanes x 8
constexpr int kMaxPeers = 8;    // an NVLink domain of one host

// 8 values of a peer's window, fetched anew (ld.global.cv: the peer wrote them after this GPU may have cached
// the line in an earlier step).
__device__ __forceinline__ void load8_fresh(const float* p, float (&v)[8]) {
    const float4 a = __ldcv(reinterpret_cast<const float4*>(p));
    const float4 b = __ldcv(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8_fresh(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 u = __ldcv(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        v[2 * j] = __uint_as_float(w[j] << 16);
        v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

// All CTAs of the grid (co-resident) meet; self-resetting, so it works across launches and graph replays.
// sync[0]: arrivals of this round, sync[1]: the round's generation.
__device__ __forceinline__ void grid_barrier(unsigned* sync) {
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned* generation = sync + 1;
        const unsigned mine = *generation;
        __threadfence();  // this CTA's partial sums before its arrival
        if (atomicAdd(sync, 1u) == gridDim.x - 1) {
            sync[0] = 0;
            __threadfence();
            atomicExch(sync + 1, mine + 1);
        } else {
            while (*generation == mine) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32)
    lsa_reduce_norm_kernel(const ncclDevComm comm, ncclWindow_t window, size_t offset, int m, int d, T* residual,
                           const float* weight, float eps, T* out, float* partial_ss, unsigned* sync) {
    // Wait for the GEMV that wrote this rank's rows, then let the next kernel (a GEMV) be scheduled: it loads
    // its weights while this one meets the peers (cuda/pdl.cuh; this grid is at most 64 small CTAs).
    pdl_enter();
    {
        // This slice of every rank's partial sums is in its window (each rank's GEMV finished before its
        // arrival), and every peer has finished reading what this rank wrote two calls ago.
        ncclLsaBarrierSession<ncclCoopCta> barrier(ncclCoopCta(), comm, ncclTeamTagLsa(), blockIdx.x);
        barrier.sync(ncclCoopCta(), ::cuda::memory_order_acq_rel);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int peers = comm.lsaSize;
    const T* peer_rows[kMaxPeers];  // each peer's rows, mapped once
#pragma unroll
    for (int p = 0; p < kMaxPeers; ++p)
        peer_rows[p] = p < peers ? static_cast<const T*>(ncclGetLsaPointer(window, offset, p)) : nullptr;
    const int col = static_cast<int>(blockIdx.x) * kSlice + lane * 8;  // this lane's first value of each row
    const bool has = col < d;
    for (int row = warp; row < m; row += kWarps) {
        float ss = 0.0f;
        if (has) {
            const int64_t at = static_cast<int64_t>(row) * d + col;
            float part[kMaxPeers][8];
#pragma unroll
            for (int p = 0; p < kMaxPeers; ++p)
                if (p < peers) load8_fresh(peer_rows[p] + at, part[p]);
            T* const rr = residual + static_cast<int64_t>(row) * d + col;
            float r[8];
            load8(rr, r);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float s = part[0][e];
#pragma unroll
                for (int p = 1; p < kMaxPeers; ++p)
                    if (p < peers) s += part[p][e];
                r[e] = round_as(round_as(s, rr) + r[e], rr);  // all_reduce_sum's store, then rmsnorm_residual's
                ss = fmaf(r[e], r[e], ss);
            }
            store8(rr, r);
        }
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) partial_ss[row * gridDim.x + blockIdx.x] = ss;
    }
    grid_barrier(sync);
    for (int row = warp; row < m; row += kWarps) {
        float ss = 0.0f;
        for (unsigned c = 0; c < gridDim.x; ++c) ss += __ldcg(partial_ss + row * gridDim.x + c);  // slice order
        if (!has) continue;
        const float inv = rsqrtf(ss / static_cast<float>(d) + eps);
        const T* const rr = residual + static_cast<int64_t>(row) * d + col;
        float v[8];
        load8(rr, v);  // this thread's own stores above
        const float4 w0 = reinterpret_cast<const float4*>(weight + col)[0];
        const float4 w1 = reinterpret_cast<const float4*>(weight + col)[1];
        const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = w[e] * (v[e] * inv);
        store8(out + static_cast<int64_t>(row) * d + col, v);
    }
}

}  // namespace

bool lsa_reduce_norm_supported(int64_t m, int64_t d, DType dtype) {
    return m >= 1 && m <= kLsaReduceNormMaxRows && d > 0 && d % 8 == 0 && d <= kSlice * kLsaReduceNormMaxSlices &&
           (dtype == DType::BF16 || dtype == DType::F32);
}

void lsa_all_reduce_residual_rmsnorm(const ncclDevComm& comm, ncclWindow_vidmem* window, size_t offset, int64_t m,
                                     int64_t d, DType dtype, void* residual, const float* weight, float eps,
                                     void* out, void* scratch, cudaStream_t stream) {
    if (!lsa_reduce_norm_supported(m, d, dtype))
        throw std::invalid_argument("lsa_all_reduce_residual_rmsnorm: m = " + std::to_string(m) + ", d = " +
                                    std::to_string(d) + " (m 1.." + std::to_string(kLsaReduceNormMaxRows) +
                                    ", d a multiple of 8 up to " + std::to_string(kSlice * kLsaReduceNormMaxSlices) +
                                    ", F32 or BF16)");
    if (comm.lsaSize < 1 || comm.lsaSize > kMaxPeers)
        throw std::invalid_argument("lsa_all_reduce_residual_rmsnorm: " + std::to_string(comm.lsaSize) +
                                    " load/store-accessible ranks (1.." + std::to_string(kMaxPeers) + ")");
    const dim3 grid(static_cast<unsigned>((d + kSlice - 1) / kSlice));
    auto* partial_ss = static_cast<float*>(scratch);
    auto* sync = reinterpret_cast<unsigned*>(partial_ss + kLsaReduceNormMaxRows * kLsaReduceNormMaxSlices);
    if (dtype == DType::BF16)
        launch_pdl(lsa_reduce_norm_kernel<__nv_bfloat16>, grid, dim3(kWarps * 32), 0, stream, comm, window, offset,
                   static_cast<int>(m), static_cast<int>(d), static_cast<__nv_bfloat16*>(residual), weight, eps,
                   static_cast<__nv_bfloat16*>(out), partial_ss, sync);
    else
        launch_pdl(lsa_reduce_norm_kernel<float>, grid, dim3(kWarps * 32), 0, stream, comm, window, offset,
                   static_cast<int>(m), static_cast<int>(d), static_cast<float*>(residual), weight, eps,
                   static_cast<float*>(out), partial_ss, sync);
}

}  // namespace nibble::cuda
