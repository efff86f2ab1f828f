// nibble-wave-probe: what a grid that issues all its loads at once costs with no math at all, the floor under
// a one-token MoE expert GEMV (docs/perf.md, session 10). Each CTA of 128 threads loads its share of 8 (or 6)
// "experts" picked at random from a 320 MB pool (or adjacent ones), L 16-byte loads a thread, all before any
// use; kernels run back to back on one stream (no early launch). Prints us a launch and GB/s read.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

#define PROBE_CHECK(call)                                                     \
    do {                                                                      \
        const cudaError_t err = (call);                                       \
        if (err != cudaSuccess) {                                             \
            std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(err)); \
            std::exit(1);                                                     \
        }                                                                     \
    } while (0)

template <int L>
__global__ void __launch_bounds__(128) read_wave(const uint4* pool, const long long* expert_offset,
                                                 long long cta_u4, int ctas_per_expert, unsigned* sink) {
    const int e = blockIdx.x / ctas_per_expert, c = blockIdx.x % ctas_per_expert;
    const uint4* p = pool + expert_offset[e] + c * cta_u4;
    uint4 v[L];
#pragma unroll
    for (int i = 0; i < L; ++i) v[i] = __ldcs(p + i * 128 + threadIdx.x);
    unsigned s = 0;
#pragma unroll
    for (int i = 0; i < L; ++i) s ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    if (s == 0x9e3779b9u) sink[0] = s;  // keeps the loads; never true for the pool's bytes
}

// us a launch, and the bytes a launch reads, for loads of L chunks a thread.
template <int L>
double time_wave(const uint4* pool, long long pool_u4, long long expert_u4, int experts, bool adjacent,
                 unsigned* sink, double* bytes) {
    const long long cta_u4 = 128LL * L;
    const int ctas_per_expert = static_cast<int>(expert_u4 / cta_u4);
    constexpr int kSets = 16, kIters = 20;
    const long long slots = pool_u4 / expert_u4;
    std::vector<long long> offsets(static_cast<size_t>(kSets * experts));
    std::mt19937_64 rng(7);
    for (int s = 0; s < kSets; ++s)
        for (int e = 0; e < experts; ++e)
            offsets[static_cast<size_t>(s * experts + e)] =
                (adjacent ? (s * experts + e) % slots : static_cast<long long>(rng() % slots)) * expert_u4;
    long long* d_offsets = nullptr;
    PROBE_CHECK(cudaMalloc(&d_offsets, offsets.size() * sizeof(long long)));
    PROBE_CHECK(
        cudaMemcpy(d_offsets, offsets.data(), offsets.size() * sizeof(long long), cudaMemcpyHostToDevice));
    auto launch = [&](int s) {
        read_wave<L><<<ctas_per_expert * experts, 128>>>(pool, d_offsets + s * experts, cta_u4,
                                                         ctas_per_expert, sink);
    };
    for (int s = 0; s < 2 * kSets; ++s) launch(s % kSets);
    cudaEvent_t start, stop;
    PROBE_CHECK(cudaEventCreate(&start));
    PROBE_CHECK(cudaEventCreate(&stop));
    PROBE_CHECK(cudaEventRecord(start));
    for (int it = 0; it < kIters; ++it)
        for (int s = 0; s < kSets; ++s) launch(s);
    PROBE_CHECK(cudaEventRecord(stop));
    PROBE_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    PROBE_CHECK(cudaEventElapsedTime(&ms, start, stop));
    PROBE_CHECK(cudaFree(d_offsets));
    *bytes = static_cast<double>(ctas_per_expert) * experts * cta_u4 * 16;
    return ms * 1e3 / (kIters * kSets);
}

}  // namespace

int main() {
    const long long pool_bytes = 320LL << 20;
    uint4* pool = nullptr;
    unsigned* sink = nullptr;
    PROBE_CHECK(cudaMalloc(&pool, pool_bytes));
    PROBE_CHECK(cudaMemset(pool, 1, pool_bytes));
    PROBE_CHECK(cudaMalloc(&sink, 4));
    struct Shape {
        const char* name;
        long long expert_bytes;
        int experts;
    };
    const Shape shapes[] = {{"qwen3-30b-a3b gate+up (8 x 1.77 MB)", 1769472, 8},
                            {"qwen3-30b-a3b down (8 x 0.88 MB)", 884736, 8},
                            {"nemotron-3-nano up (6 x 2.81 MB)", 2809856, 6}};
    for (const Shape& sh : shapes)
        for (bool adjacent : {false, true}) {
            std::printf("%-38s %-8s", sh.name, adjacent ? "adjacent" : "random");
            double bytes = 0;
            const long long eu = sh.expert_bytes / 16;
            const double t[] = {time_wave<4>(pool, pool_bytes / 16, eu, sh.experts, adjacent, sink, &bytes),
                                time_wave<8>(pool, pool_bytes / 16, eu, sh.experts, adjacent, sink, &bytes),
                                time_wave<16>(pool, pool_bytes / 16, eu, sh.experts, adjacent, sink, &bytes)};
            const int loads[] = {4, 8, 16};
            for (int i = 0; i < 3; ++i)
                std::printf("  L=%-2d %6.2f us %5.0f GB/s", loads[i], t[i], bytes / t[i] / 1e3);
            std::printf("\n");
        }
    return 0;
}
