// NVFP4 decode GEMV, stream family (gemv_stream_cuda.h): CUDA cores, float32 FMAs, designed for bytes in
// flight like gemv_fp8_kernel (linear_cuda.cu), which reaches 80-98% of copy at the Llama shapes where the
// NVFP4 kernels reach 35-62% (docs/perf.md).
//
// Work split. A warp owns a group of kRows = 2 weight rows (gate/up: gate row j and up row j) and walks its k
// in steps: at step s lane l takes chunks c = 32 U s + 32 u + l (u = 0..U-1) of both rows, a chunk being 16
// bytes of codes (32 elements, 2 blocks of 16) plus its 2 E4M3 scale bytes, so each load instruction of a
// warp reads 512 contiguous code bytes (64 scale bytes) of a row. The warps of the grid (one wave, as many
// CTAs as fit) take groups g, g + warps, ...; a warp's steps over all its groups form one stream of items.
//
// Bytes in flight. Register buffer (r, u) holds one chunk; as soon as the step's math has used it, it is
// reloaded with the same chunk of the next item (the next step, or the first step of the warp's next group),
// so the loads of step s + 1 are in flight while step s computes, with one buffer per chunk instead of the
// two (current + next) of a copy-then-prefetch loop: 2 U chunks of code + scales per lane live, U = 2:
// 20 registers for 2 KB a warp in flight. The first item's loads (constants) are issued before
// griddepcontrol.wait (cuda/pdl.cuh), the activations and outputs touched only after it.
//
// Math per chunk and row: the integer E2M1 decode of nvfp4_decode.cuh (e2m1 * 2^-14 as float32, exact), 16
// float32 FMAs per block into a block sum per token, then acc += block_sum * e4m3 (exact decode of the
// block's scale); the epilogue applies global_scale * 2^14 and the bias. The numerics are those of
// gemv_nvfp4_kernel (v1), so its tolerance derivation holds (tests/device/gemv_stream_cuda_test.cpp).
// Activations are re-read per warp from L1 (x is at most 8 x 14336 x 4 bytes) with ld.global.ca, not the
// non-coherent path: x is written by the kernel this one overlaps with under programmatic launch.
//
// Per weight at m = 1 (BF16): ~1.6 integer ops of decode, 1 fp16 -> fp32 widening, 1 FMA, 0.5 activation
// widening, ~0.3 of loads, addressing and scales: ~4.4 issue slots, ~81 of the SM's 128 a cycle at 80% of
// H100 copy bandwidth (18.5 weights a cycle; v1 measured ~5.3 a weight, docs/perf.md). Each further token
// adds an FMA, 0.5 widening and L1 traffic per weight (a lane's 64 activation bytes per chunk come in 4
// 16-byte loads whose warp spans 2 KB, ~1/32 L1 cycle a weight and token), so from m = 2-4 the float32 math
// and L1, not the memory, bound this kernel (m = 8 needs 148 FMAs a cycle on a 128-lane SM): it is meant for
// m = 1..2, with the tensor-core kernels above that.
//
// Resources of gemv_nvfp4_stream_kernel<MT, U, XT, GATE_UP> (ptxas -v, CUDA 13.0, -O3, sm_90a; 128 threads,
// no shared memory, no stack, no spills), registers for BF16 / F32 activations, plain / gate-up:
//   U = 2: MT = 1 61 / 64, 62 / 63 (capped at 64: 8 CTAs = 32 warps an SM); MT = 2 82 / 88, 77 / 82;
//          MT = 4 83 / 88, 80 / 84; MT = 8 100 / 104, 96 / 100
//   U = 4: MT = 1 93 / 95, 89 / 93 (5 CTAs an SM); MT = 2 105 / 108, 101 / 105; MT = 4 107 / 110,
//          103 / 106; MT = 8 123 / 126, 119 / 122
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "ops/linear/gemv_common.cuh"
#include "ops/linear/gemv_stream_cuda.h"
#include "ops/linear/nvfp4_decode.cuh"

namespace nibble::cuda {
namespace {

constexpr int kStreamThreads = 128;
constexpr int kStreamWarps = kStreamThreads / 32;
constexpr int kRows = 2;          // weight rows a warp owns (gate/up: one gate and one up row)
constexpr int kMaxTokens = 8;     // tokens a launch; more run in several launches
constexpr int kMaxProjections = 3;

struct StreamProjection {
    const uint4* wq = nullptr;           // [n, k / 32] chunks of 32 codes
    const unsigned short* ws = nullptr;  // [n, k / 32] the 2 E4M3 scales of each chunk
    float out_scale = 1.0f;              // global scale * 2^14 (undoes the decode's 2^-14)
    const float* bias = nullptr;         // [n] or null
    void* y = nullptr;                   // [m, n], XT; gate/up: h (proj[0] only)
    int64_t n = 0;
    int64_t group_end = 0;  // row groups of all projections up to and including this one
};
struct StreamJob {
    StreamProjection proj[kMaxProjections];  // gate/up: proj[0] = gate, proj[1] = up
    int64_t groups = 0;                      // row groups (warp tasks) in all
};

// The projection owning row group `group` (< job.groups) and its first group. Unused slots have group_end
// == job.groups, so they are never chosen.
__device__ __forceinline__ int projection_of(const StreamJob& job, int64_t group, int64_t& first_group) {
    int p = 0;
    first_group = 0;
#pragma unroll
    for (int i = 1; i < kMaxProjections; ++i)
        if (group >= job.proj[i - 1].group_end) p = i, first_group = job.proj[i - 1].group_end;
    return p;
}

// At MT = 1 and U = 2 the live state is ~60 registers: cap it at 64 so 8 CTAs (32 warps) fit an SM.
template <int MT, int U>
constexpr int stream_min_ctas() {
    return MT == 1 && U == 2 ? 8 : 1;
}

// y = x W^T for the row groups of `job` (gate/up: h = silu(x gate^T) * (x up^T)), m <= MT tokens.
template <int MT, int U, class XT, bool GATE_UP>
__global__ void __launch_bounds__(kStreamThreads, stream_min_ctas<MT, U>())
    gemv_nvfp4_stream_kernel(const XT* __restrict__ x, int m, int64_t k, const StreamJob job) {
    constexpr int kStepChunks = 32 * U;  // chunks of a row a warp step covers
    const int lane = threadIdx.x & 31;
    const int64_t chunks = k >> 5;
    // Steps per group; k = 0 still takes one (no chunk) so the bias is stored.
    const int64_t steps = max(int64_t{1}, (chunks + kStepChunks - 1) / kStepChunks);
    const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kStreamWarps;
    int64_t group = static_cast<int64_t>(blockIdx.x) * kStreamWarps + (threadIdx.x >> 5);

    // Chunk 0 of each row of the group being loaded; rows past n repeat row n - 1 (loaded, never stored).
    const uint4* lq[kRows];
    const unsigned short* ls[kRows];
    auto point_rows = [&](int64_t g) {
        if constexpr (GATE_UP) {
            const int64_t row = min(g, job.proj[0].n - 1);
            lq[0] = job.proj[0].wq + row * chunks, ls[0] = job.proj[0].ws + row * chunks;
            lq[1] = job.proj[1].wq + row * chunks, ls[1] = job.proj[1].ws + row * chunks;
        } else {
            int64_t first = 0;
            const StreamProjection p = pick_projection(job, projection_of(job, min(g, job.groups - 1), first));
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                const int64_t row = min((g - first) * kRows + r, p.n - 1);
                lq[r] = p.wq + row * chunks, ls[r] = p.ws + row * chunks;
            }
        }
    };
    uint4 q[kRows][U];      // codes of chunk u of each row
    uint32_t s[kRows][U];   // its 2 scale codes (low byte: the first block)
    // Buffers u of item (g, step); past the last group or past k: zero codes and scales (never used).
    auto load_chunk = [&](int u, int64_t g, int64_t step) {
        const int64_t c = step * kStepChunks + 32 * u + lane;
        if (g < job.groups && c < chunks) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) q[r][u] = __ldcs(lq[r] + c), s[r][u] = __ldcs(ls[r] + c);
        } else {
#pragma unroll
            for (int r = 0; r < kRows; ++r) q[r][u] = make_uint4(0, 0, 0, 0), s[r][u] = 0;
        }
    };

    // The first item's weights are constants: load them before waiting for the previous grid.
    point_rows(group);
#pragma unroll
    for (int u = 0; u < U; ++u) load_chunk(u, group, 0);
    pdl_wait();  // no early pdl_launch_dependents: this grid fills the GPU (cuda/pdl.cuh)

    float acc[kRows][MT];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

    int64_t step = 0;
    while (group < job.groups) {  // warp-uniform
        // The item the buffers are reloaded with: this group's next step, or the warp's next group.
        int64_t next_group = group, next_step = step + 1;
        if (next_step == steps) {
            next_group = group + warp_stride, next_step = 0;
            point_rows(next_group);  // this item's chunks are all in registers already
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t c = step * kStepChunks + 32 * u + lane;
            if (c < chunks) {  // lanes past k idle in a group's last step
                const XT* xc = x + c * 32;
#pragma unroll
                for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 16: words 2b, 2b + 1
                    float part[kRows][MT];
#pragma unroll
                    for (int r = 0; r < kRows; ++r)
#pragma unroll
                        for (int mi = 0; mi < MT; ++mi) part[r][mi] = 0.0f;
#pragma unroll
                    for (int j = 2 * b; j < 2 * b + 2; ++j) {
                        float wf[kRows][8];
#pragma unroll
                        for (int r = 0; r < kRows; ++r) e2m1x8_to_float(word_of(q[r][u], j), wf[r]);
#pragma unroll
                        for (int mi = 0; mi < MT; ++mi) {
                            if (mi >= m) break;  // warp-uniform
                            float xv[8];
                            load_x8<XLoad::Coherent>(xc + static_cast<int64_t>(mi) * k + 8 * j, xv);
#pragma unroll
                            for (int r = 0; r < kRows; ++r)
#pragma unroll
                                for (int e = 0; e < 8; ++e) part[r][mi] = fmaf(wf[r][e], xv[e], part[r][mi]);
                        }
                    }
#pragma unroll
                    for (int r = 0; r < kRows; ++r) {
                        const float sc = e4m3_exact(s[r][u] >> (8 * b));
#pragma unroll
                        for (int mi = 0; mi < MT; ++mi) acc[r][mi] = fmaf(part[r][mi], sc, acc[r][mi]);
                    }
                }
            }
            load_chunk(u, next_group, next_step);  // buffer u is free: refill it one item ahead
        }

        if (next_step == 0) {  // the group's last step: sum over the warp and store
            constexpr int V = kRows * MT;
            float flat[V];
#pragma unroll
            for (int r = 0; r < kRows; ++r)
#pragma unroll
                for (int mi = 0; mi < MT; ++mi) flat[r * MT + mi] = acc[r][mi], acc[r][mi] = 0.0f;
            int index = 0;
            const float total = reduce_scatter<V>(flat, lane, index);
            const bool holder = (lane & (32 / V - 1)) == 0;
            const int r = index / MT, mi = index % MT;
            if constexpr (GATE_UP) {
                // r is index's top bit, i.e. lane bit 4: the up sum of token mi sits in lane ^ 16.
                const float up_total = __shfl_xor_sync(0xffffffffu, total, 16);
                if (holder && r == 0 && mi < m) {
                    const StreamProjection& gp = job.proj[0];
                    const StreamProjection& upp = job.proj[1];
                    const int64_t row = group;
                    float gate = total * gp.out_scale, up = up_total * upp.out_scale;
                    if (gp.bias) gate += gp.bias[row];
                    if (upp.bias) up += upp.bias[row];
                    store_y(static_cast<XT*>(gp.y) + static_cast<int64_t>(mi) * gp.n + row,
                              gate / (1.0f + expf(-gate)) * up);
                }
            } else if (holder && mi < m) {
                int64_t first = 0;
                const StreamProjection p = pick_projection(job, projection_of(job, group, first));
                const int64_t row = (group - first) * kRows + r;
                if (row < p.n) {
                    float out = total * p.out_scale;
                    if (p.bias) out += p.bias[row];
                    store_y(static_cast<XT*>(p.y) + static_cast<int64_t>(mi) * p.n + row, out);
                }
            }
        }
        group = next_group, step = next_step;
    }
}

int current_sm_count() {
    int device = 0, sms = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

// CTAs of this kernel that fit the device at once (the grid is one wave; warps loop over groups), cached
// per device: the launches are a few microseconds, host time counts.
template <int MT, int U, class XT, bool GATE_UP>
int resident_ctas() {
    thread_local int cached_device = -1, cached_ctas = 0;
    int device = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    if (device != cached_device) {
        int per_sm = 0;
        NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, gemv_nvfp4_stream_kernel<MT, U, XT, GATE_UP>, kStreamThreads, 0));
        if (per_sm < 1) throw std::runtime_error("gemv_nvfp4_stream: kernel does not fit an SM");
        cached_ctas = per_sm * current_sm_count(), cached_device = device;
    }
    return cached_ctas;
}

template <int MT, int U, class XT, bool GATE_UP>
void launch_stream(const XT* x, int m, int64_t k, const StreamJob& job, cudaStream_t stream) {
    const int64_t needed = (job.groups + kStreamWarps - 1) / kStreamWarps;
    const int64_t ctas = std::min<int64_t>(needed, resident_ctas<MT, U, XT, GATE_UP>());
    launch_pdl(gemv_nvfp4_stream_kernel<MT, U, XT, GATE_UP>, dim3(static_cast<unsigned>(ctas)),
               dim3(kStreamThreads), 0, stream, x, m, k, job);
}

// 0 picks by size: U = 4 (every step's loads issued at once) below 24 M weights a launch, U = 2 from there on
// (nibble-kernel-bench qkv, H100: U = 4 won at 2560 x 8192 and 5120 x 2048, U = 2 at 6144 x 4096 and larger).
int pick_chunks_per_lane(int requested, int64_t weights, const char* what) {
    if (requested == 0) return weights < (int64_t{24} << 20) ? 4 : 2;
    if (requested != 2 && requested != 4)
        throw std::invalid_argument(std::string(what) + ": chunks_per_lane = " + std::to_string(requested) +
                                    ", expected 0 (default), 2 or 4");
    return requested;
}

// Runs the job over m in launches of up to kMaxTokens tokens (outputs at token 0 in `job`).
template <bool GATE_UP>
void run_stream(const void* x, DType dtype, int64_t m, int64_t k, const StreamJob& job, int u,
                cudaStream_t stream) {
    auto body = [&]<class XT>() {
        const auto* xt = static_cast<const XT*>(x);
        for (int64_t m0 = 0; m0 < m; m0 += kMaxTokens) {
            const int mt = static_cast<int>(std::min<int64_t>(kMaxTokens, m - m0));
            StreamJob jt = job;
            for (auto& p : jt.proj)
                if (p.y) p.y = static_cast<XT*>(p.y) + m0 * p.n;
            auto go = [&]<int MT>() {
                if (u == 4) launch_stream<MT, 4, XT, GATE_UP>(xt + m0 * k, mt, k, jt, stream);
                else launch_stream<MT, 2, XT, GATE_UP>(xt + m0 * k, mt, k, jt, stream);
            };
            if (mt <= 1) go.template operator()<1>();
            else if (mt <= 2) go.template operator()<2>();
            else if (mt <= 4) go.template operator()<4>();
            else go.template operator()<8>();
        }
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void check_stream(const void* x, DType dtype, int64_t m, const void* y, const Nvfp4DeviceWeight& w,
                  const char* what) {
    const std::string name(what);
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument(name + ": activations must be F32 or BF16");
    if (m < 0 || w.n < 0 || w.k < 0) throw std::invalid_argument(name + ": negative dimension");
    if (w.k % 32 != 0)
        throw std::invalid_argument(name + ": k = " + std::to_string(w.k) + " is not a multiple of 32");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 != 0)
        throw std::invalid_argument(name + ": x and y must be 16-byte aligned");
    if (reinterpret_cast<uintptr_t>(w.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(w.scales) % 2 != 0)
        throw std::invalid_argument(name + ": packed weights must be 16-byte aligned, scales 2-byte aligned");
}

StreamProjection stream_projection(const Nvfp4DeviceWeight& w, const float* bias, void* y) {
    StreamProjection p;
    p.wq = reinterpret_cast<const uint4*>(w.packed);
    p.ws = reinterpret_cast<const unsigned short*>(w.scales);
    p.out_scale = w.global_scale * 16384.0f;  // 2^14 undoes the decode's placement, exactly
    p.bias = bias;
    p.y = y;
    p.n = w.n;
    return p;
}

}  // namespace

void gemv_nvfp4_stream(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                       cudaStream_t stream, int chunks_per_lane) {
    const Nvfp4Projection p{w, bias, y};
    gemv_nvfp4_stream_fused(x, dtype, m, &p, 1, stream, chunks_per_lane);
}

void gemv_nvfp4_stream_fused(const void* x, DType dtype, int64_t m, const Nvfp4Projection* projections, int count,
                             cudaStream_t stream, int chunks_per_lane) {
    const char* what = "gemv_nvfp4_stream";
    if (count < 1 || count > kMaxProjections || !projections)
        throw std::invalid_argument(std::string(what) + ": 1 to 3 projections, got " + std::to_string(count));
    int64_t weights = 0;
    for (int i = 0; i < count; ++i) weights += projections[i].w.n * projections[i].w.k;
    const int u = pick_chunks_per_lane(chunks_per_lane, weights, what);
    StreamJob job;
    int used = 0;
    for (int i = 0; i < count; ++i) {
        const Nvfp4Projection& p = projections[i];
        check_stream(x, dtype, m, p.y, p.w, what);
        if (p.w.k != projections[0].w.k)
            throw std::invalid_argument(std::string(what) + ": projection " + std::to_string(i) + " has k = " +
                                        std::to_string(p.w.k) + ", projection 0 has " +
                                        std::to_string(projections[0].w.k));
        if (p.w.n == 0) continue;  // nothing to compute or store
        job.groups += (p.w.n + kRows - 1) / kRows;
        job.proj[used] = stream_projection(p.w, p.bias, p.y);
        job.proj[used].group_end = job.groups;
        ++used;
    }
    if (m == 0 || used == 0) return;
    for (int i = used; i < kMaxProjections; ++i) job.proj[i].group_end = job.groups;  // never chosen
    run_stream<false>(x, dtype, m, projections[0].w.k, job, u, stream);
}

void gemv_nvfp4_stream_gate_up_silu(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& gate,
                                    const float* gate_bias, const Nvfp4DeviceWeight& up, const float* up_bias,
                                    void* h, cudaStream_t stream, int chunks_per_lane) {
    const char* what = "gemv_nvfp4_stream_gate_up_silu";
    const int u = pick_chunks_per_lane(chunks_per_lane, 2 * gate.n * gate.k, what);
    check_stream(x, dtype, m, h, gate, what);
    check_stream(x, dtype, m, h, up, what);
    if (gate.n != up.n || gate.k != up.k)
        throw std::invalid_argument(std::string(what) + ": gate is " + std::to_string(gate.n) + "x" +
                                    std::to_string(gate.k) + ", up is " + std::to_string(up.n) + "x" +
                                    std::to_string(up.k) + "; they must match");
    if (m == 0 || gate.n == 0) return;
    StreamJob job;
    job.groups = gate.n;  // group j: gate row j and up row j
    job.proj[0] = stream_projection(gate, gate_bias, h);
    job.proj[1] = stream_projection(up, up_bias, nullptr);
    for (auto& p : job.proj) p.group_end = job.groups;
    run_stream<true>(x, dtype, m, gate.k, job, u, stream);
}

}  // namespace nibble::cuda
