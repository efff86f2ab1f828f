// nibble-kernel-bench: times the decode GEMV kernels (NVFP4 on the tensor cores: v2 and the pipelined v3 with
// its k split automatic and forced to 1, 2, 4; the previous CUDA-core NVFP4 kernel; BF16 weights; BF16
// activations) at the Llama-3.1-8B projection shapes for m = 1, 2, 4, 8, 16, then the fused NVFP4 launches
// (q/k/v, gate/up + SwiGLU) against the separate launches they replace; all against the card's measured
// device-to-device copy bandwidth.
// Method: random weights filled on the device (never zeros); several weight copies, together
// at least 4x the L2 size, launched in turn so each launch streams its weights from HBM; a warm-up batch;
// then >= 50 timed batches (CUDA events around one launch per copy), reporting the median time per launch.
// Bandwidth counts the bytes each launch must move: weights (+ NVFP4 scales), activations, outputs.
// The copy reference is the median of 20 cudaMemcpy of 1 GiB, counted as bytes read + bytes written.
// Decode attention over the paged KV cache (Llama-3.1-8B attention: 32 query heads, 8 KV heads, head_dim
// 128, block size 16, shuffled block tables) at depths 8K/32K/64K/128K, batch 1, 8 and 8 of mixed lengths,
// per KV dtype, the old tensor-core decode kernel against the default one: one layer's attention per launch
// (split-K + combine), enough layer copies to be >= 4x the L2, reporting time, GB/s of KV bytes read and %
// of copy. Prefill attention (same shape): 512 new query tokens of one sequence after 0, 8K,
// 32K and 64K cached tokens, per KV dtype, one layer per launch (the launcher's kernel and splits), reporting
// TFLOP/s with FLOPs = 4 * head_dim * n_heads * (attended (query, key) pairs, causal counted exactly:
// sum over the 512 queries of depth + i + 1), and what 32 such layers cost per token (the attention share of
// a Llama-3.1-8B pp512 at that depth). `nibble-kernel-bench gemv`, `attention`, `prefill`, `moe` (MoE
// decode step and Mamba2 ops, see bench_moe_mamba) or `fp8` (FP8-weight GEMV, see bench_gemv_fp8) runs one
// part; no argument runs all five. `stream` (the stream NVFP4 GEMVs beside the production ones, see
// bench_gemv_stream) and `attention-short` (decode attention at
// depths 64-8192 over every split count, see bench_attention_short) run only when named.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/fill_random.h"
#include "ops/activation/activation_cuda.h"
#include "ops/attention/attention_cuda.h"
#include "ops/linear/gemm_cuda.h"
#include "ops/linear/gemv_stream_cuda.h"
#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe_cuda.h"
#include "ops/ssm/ssm_cuda.h"

namespace {

using nibble::DType;
using nibble::cuda::DeviceBuffer;

struct Events {
    cudaEvent_t start{}, stop{};
    Events() {
        NIBBLE_CUDA_CHECK(cudaEventCreate(&start));
        NIBBLE_CUDA_CHECK(cudaEventCreate(&stop));
    }
    ~Events() {
        (void)cudaEventDestroy(start);
        (void)cudaEventDestroy(stop);
    }
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median milliseconds of `reps` timed calls of body() after `warmup` untimed ones.
template <class F>
double time_ms(cudaStream_t stream, int warmup, int reps, F&& body) {
    Events ev;
    for (int i = 0; i < warmup; ++i) body();
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
        NIBBLE_CUDA_CHECK(cudaEventRecord(ev.start, stream));
        body();
        NIBBLE_CUDA_CHECK(cudaEventRecord(ev.stop, stream));
        NIBBLE_CUDA_CHECK(cudaEventSynchronize(ev.stop));
        float t = 0;
        NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&t, ev.start, ev.stop));
        ms.push_back(t);
    }
    return median(ms);
}

struct Row {
    std::string shape, format;
    int m;
    double us, gbps, frac;
};

// Bytes of one cached K (or V) row of head_dim hd in the KV dtype: BF16, E4M3, or E2M1 plus one E4M3 scale per 16.
int64_t kv_row_bytes(nibble::KvDtype dt, int64_t hd) {
    using nibble::KvDtype;
    return dt == KvDtype::Bf16 ? hd * 2 : dt == KvDtype::Fp8 ? hd : hd / 2 + hd / 16;
}

// Layer copies of random K and V (enough that together they are >= 4x the L2, so each launch reads HBM): BF16
// |v| < 2; E4M3 / E2M1 / scale bytes with bit 3 clear, never a NaN code.
size_t fill_kv_copies(const cudaDeviceProp& prop, nibble::KvDtype dt, size_t layer_bytes, uint64_t& seed,
                      std::vector<DeviceBuffer>& kb, std::vector<DeviceBuffer>& vb, cudaStream_t stream) {
    const bool bf16 = dt == nibble::KvDtype::Bf16;
    const size_t copies =
        std::max<size_t>(1, (4 * static_cast<size_t>(prop.l2CacheSize) + 2 * layer_bytes - 1) / (2 * layer_bytes));
    const uint32_t and_mask = bf16 ? 0x83ff83ffu : 0xf7f7f7f7u, or_mask = bf16 ? 0x3c003c00u : 0u;
    for (size_t c = 0; c < copies; ++c) {
        kb.emplace_back(layer_bytes);
        vb.emplace_back(layer_bytes);
        nibble::cuda::fill_random_u32(kb.back().as<uint32_t>(), layer_bytes / 4, ++seed, and_mask, or_mask, stream);
        nibble::cuda::fill_random_u32(vb.back().as<uint32_t>(), layer_bytes / 4, ++seed, and_mask, or_mask, stream);
    }
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return copies;
}

// Decode attention: bytes of K and V read per launch over time, per KV dtype, depth and batch, the old
// tensor-core decode kernel (DecodeKernel::Mma, splits by keys) against the launcher's default (Auto: the
// pipelined kernel for FP8/NVFP4, splits by bytes) side by side. Batches: 1 and 8 sequences at the depth,
// and 8 of mixed lengths (depth * (s + 1) / 8, the batch decode of a server).
void bench_attention(const cudaDeviceProp& prop, cudaStream_t stream, double copy_gbps) {
    using nibble::KvDtype;
    using nibble::cuda::DecodeKernel;
    const int64_t n_heads = 32, nkv = 8, hd = 128, bs = 16;
    const int64_t depths[] = {8192, 32768, 65536, 131072};
    struct BatchKind {
        int64_t n;
        bool mixed;
    };
    const BatchKind batches[] = {{1, false}, {8, false}, {8, true}};
    const KvDtype dtypes[] = {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4};
    struct ARow {
        int64_t depth, batch;
        bool mixed;
        KvDtype dt;
        double us[3], gbps[3];  // old, new, NVFP4 Pipelined16
        int splits[3];
    };
    std::vector<ARow> rows;
    uint64_t seed = 99;
    std::mt19937_64 rng(7);
    for (int64_t depth : depths) {
        for (const BatchKind& bk : batches) {
            const int64_t batch = bk.n;
            std::vector<int64_t> lens(static_cast<size_t>(batch));
            for (int64_t s = 0; s < batch; ++s) lens[static_cast<size_t>(s)] = bk.mixed ? depth * (s + 1) / batch : depth;
            const int64_t blocks_per_seq = depth / bs, n_blocks = batch * blocks_per_seq;
            const int64_t total_keys = std::accumulate(lens.begin(), lens.end(), int64_t{0});
            // Shuffled physical blocks, one table row per sequence (rows sized for the longest).
            std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
            std::iota(ids.begin(), ids.end(), 0);
            std::shuffle(ids.begin(), ids.end(), rng);
            std::vector<int32_t> q_start(static_cast<size_t>(batch + 1)), start_pos(static_cast<size_t>(batch));
            for (int64_t s = 0; s <= batch; ++s) q_start[static_cast<size_t>(s)] = static_cast<int32_t>(s);
            for (int64_t s = 0; s < batch; ++s)
                start_pos[static_cast<size_t>(s)] = static_cast<int32_t>(lens[static_cast<size_t>(s)] - 1);
            DeviceBuffer d_bt(ids.size() * 4), d_qs(q_start.size() * 4), d_sp(start_pos.size() * 4);
            d_bt.upload(ids.data(), d_bt.bytes());
            d_qs.upload(q_start.data(), d_qs.bytes());
            d_sp.upload(start_pos.data(), d_sp.bytes());
            nibble::cuda::AttentionBatch b{batch, batch, d_qs.as<int32_t>(), d_sp.as<int32_t>(), d_bt.as<int32_t>(),
                                           blocks_per_seq, 1, depth};
            DeviceBuffer q(static_cast<size_t>(batch * n_heads * hd * 2)), out(q.bytes());
            nibble::cuda::fill_random_u32(q.as<uint32_t>(), q.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
            for (KvDtype dt : dtypes) {
                const int64_t row_bytes = kv_row_bytes(dt, hd);
                const int64_t block_bytes = (bs * nkv * row_bytes + 15) / 16 * 16;
                const size_t layer_bytes = static_cast<size_t>(n_blocks * block_bytes);
                std::vector<DeviceBuffer> kb, vb;
                const size_t copies = fill_kv_copies(prop, dt, layer_bytes, seed, kb, vb, stream);
                ARow row{depth, batch, bk.mixed, dt, {0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
                // 0: old (Mma, splits by keys), 1: default (Auto, splits by bytes), 2 (NVFP4): Pipelined16.
                const int n_variants = dt == KvDtype::Nvfp4 ? 3 : 2;
                for (int variant = 0; variant < n_variants; ++variant) {
                    nibble::cuda::PagedKvLayer kv0{kb[0].as<uint8_t>(), vb[0].as<uint8_t>(), n_blocks, block_bytes, bs,
                                                   nkv, hd, dt, 0.01f, 0.01f};
                    const int splits =
                        variant == 0 ? nibble::cuda::paged_attention_splits(b, nkv, n_heads, prop.multiProcessorCount)
                                     : nibble::cuda::paged_attention_splits(b, kv0, n_heads, prop.multiProcessorCount);
                    const size_t ws_bytes = nibble::cuda::paged_attention_workspace_bytes(splits, batch, n_heads, hd);
                    DeviceBuffer ws(std::max<size_t>(ws_bytes, 16));
                    const nibble::cuda::AttentionArgs args{n_heads, 0.088f, 0,
                                                           variant == 0   ? DecodeKernel::Mma
                                                           : variant == 1 ? DecodeKernel::Auto
                                                                          : DecodeKernel::Pipelined16};
                    size_t next = 0;
                    auto launch = [&] {
                        for (size_t c = 0; c < copies; ++c, ++next) {
                            const size_t i = next % copies;
                            nibble::cuda::PagedKvLayer kv{kb[i].as<uint8_t>(), vb[i].as<uint8_t>(), n_blocks, block_bytes,
                                                          bs, nkv, hd, dt, 0.01f, 0.01f};
                            nibble::cuda::paged_attention(q.get(), DType::BF16, kv, b, args, splits, ws.get(), ws_bytes,
                                                          out.get(), stream);
                        }
                    };
                    const int reps = depth * batch >= 32768 * 8 ? 10 : 30;
                    const double ms = time_ms(stream, 2, reps, launch) / static_cast<double>(copies);
                    const double bytes = 2.0 * static_cast<double>(total_keys * nkv * row_bytes);
                    row.us[variant] = ms * 1e3;
                    row.gbps[variant] = bytes / (ms * 1e-3) / 1e9;
                    row.splits[variant] = splits;
                }
                rows.push_back(row);
                std::printf("attention decode depth=%-6lld batch=%-2lld%s %-5s copies=%-3zu old %8.1f us %5.1f%% (splits %3d)"
                            "  new %8.1f us %6.0f GB/s %5.1f%% of copy (splits %3d)  old/new %.2fx\n",
                            static_cast<long long>(depth), static_cast<long long>(batch), bk.mixed ? " mixed" : "      ",
                            dt == KvDtype::Bf16 ? "bf16" : dt == KvDtype::Fp8 ? "fp8" : "nvfp4", copies, row.us[0],
                            100 * row.gbps[0] / copy_gbps, row.splits[0], row.us[1], row.gbps[1],
                            100 * row.gbps[1] / copy_gbps, row.splits[1], row.us[0] / row.us[1]);
                if (n_variants == 3)
                    std::printf("%63s new16 %8.1f us %6.0f GB/s %5.1f%% of copy\n", "", row.us[2], row.gbps[2],
                                100 * row.gbps[2] / copy_gbps);
            }
        }
    }
    // One table: per dtype, old us / % copy and new us / GB/s / % copy; then bf16 (new) over nvfp4 (new) time.
    std::printf("\n| depth | batch | bf16 old us | %% | bf16 new us | GB/s | %% | fp8 old us | %% | fp8 new us | GB/s | %% "
                "| nvfp4 old us | %% | nvfp4 new us | GB/s | %% | bf16/nvfp4 time |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i + 2 < rows.size(); i += 3) {
        std::printf("| %lldK | %lld%s |", static_cast<long long>(rows[i].depth / 1024),
                    static_cast<long long>(rows[i].batch), rows[i].mixed ? " mixed" : "");
        for (size_t j = i; j < i + 3; ++j) {
            const ARow& r = rows[j];
            std::printf(" %.1f | %.0f%% | %.1f | %.0f | %.0f%% |", r.us[0], 100 * r.gbps[0] / copy_gbps, r.us[1],
                        r.gbps[1], 100 * r.gbps[1] / copy_gbps);
        }
        std::printf(" %.2fx |\n", rows[i].us[1] / rows[i + 2].us[1]);
    }
}

// Decode attention at short and medium depths, one sequence: the time of one layer's attention (decode
// kernel + split combine) for every split count that leaves each split at least one 32-key tile, beside the
// count paged_attention_splits picks, for the Llama-3.1-8B (32 / 8 heads) and Qwen3-30B-A3B (32 / 4) shapes.
// At these depths a launch reads 0.1-4 MB, so latency, not bandwidth, sets the time: the question is how
// many CTAs the split policy should make.
void bench_attention_short(const cudaDeviceProp& prop, cudaStream_t stream) {
    using nibble::KvDtype;
    const int64_t n_heads = 32, hd = 128, bs = 16;
    const int64_t kv_heads[] = {8, 4};
    const int64_t depths[] = {64, 576, 1088, 2048, 4096, 8192};
    const int split_counts[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128};
    const KvDtype dtypes[] = {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4};
    uint64_t seed = 1234;
    std::printf(
        "\n| kv heads | dtype | depth | policy splits | policy us | best splits | best us | policy/best |\n"
        "|---|---|---|---|---|---|---|---|\n");
    for (int64_t nkv : kv_heads) {
        for (KvDtype dt : dtypes) {
            for (int64_t depth : depths) {
                const int64_t n_blocks = (depth + bs - 1) / bs;
                std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
                std::iota(ids.begin(), ids.end(), 0);
                std::mt19937_64 rng(static_cast<uint64_t>(depth));
                std::shuffle(ids.begin(), ids.end(), rng);
                const int32_t q_start[2] = {0, 1}, start_pos[1] = {static_cast<int32_t>(depth - 1)};
                DeviceBuffer d_bt(ids.size() * 4), d_qs(8), d_sp(4);
                d_bt.upload(ids.data(), d_bt.bytes());
                d_qs.upload(q_start, 8);
                d_sp.upload(start_pos, 4);
                const nibble::cuda::AttentionBatch b{
                    1, 1, d_qs.as<int32_t>(), d_sp.as<int32_t>(), d_bt.as<int32_t>(), n_blocks, 1, depth};
                DeviceBuffer q(static_cast<size_t>(n_heads * hd * 2)), out(q.bytes());
                nibble::cuda::fill_random_u32(q.as<uint32_t>(), q.bytes() / 4, ++seed, 0x83ff83ffu,
                                              0x3c003c00u, stream);
                const int64_t block_bytes = (bs * nkv * kv_row_bytes(dt, hd) + 15) / 16 * 16;
                const size_t layer_bytes = static_cast<size_t>(n_blocks * block_bytes);
                std::vector<DeviceBuffer> kb, vb;
                const size_t copies = fill_kv_copies(prop, dt, layer_bytes, seed, kb, vb, stream);
                auto layer = [&](size_t i) {  // copy i of the layer's cache
                    return nibble::cuda::PagedKvLayer{
                        kb[i].as<uint8_t>(), vb[i].as<uint8_t>(), n_blocks, block_bytes, bs, nkv, hd, dt, 0.01f, 0.01f};
                };
                const std::string dt_name(nibble::kv_dtype_name(dt));
                const int policy =
                    nibble::cuda::paged_attention_splits(b, layer(0), n_heads, prop.multiProcessorCount);
                std::vector<int> counts;
                for (int s : split_counts)
                    if (s == 1 || depth / s >= 32) counts.push_back(s);
                if (std::find(counts.begin(), counts.end(), policy) == counts.end()) counts.push_back(policy);
                double policy_us = 0, best_us = 1e30;
                int best = 1;
                std::printf("attention short nkv=%lld %-5s depth=%-5lld", static_cast<long long>(nkv),
                            dt_name.c_str(), static_cast<long long>(depth));
                for (int splits : counts) {
                    const size_t ws_bytes =
                        nibble::cuda::paged_attention_workspace_bytes(splits, 1, n_heads, hd);
                    DeviceBuffer ws(std::max<size_t>(ws_bytes, 16));
                    const nibble::cuda::AttentionArgs args{n_heads, 0.088f, 0};
                    size_t next = 0;
                    auto launch = [&] {
                        for (size_t c = 0; c < copies; ++c, ++next) {
                            nibble::cuda::paged_attention(q.get(), DType::BF16, layer(next % copies), b, args,
                                                          splits, ws.get(), ws_bytes, out.get(), stream);
                        }
                    };
                    const double us = 1e3 * time_ms(stream, 2, 20, launch) / static_cast<double>(copies);
                    std::printf(" %d:%.1f", splits, us);
                    if (splits == policy) policy_us = us;
                    if (us < best_us) best_us = us, best = splits;
                }
                std::printf("\n");
                std::printf("| %lld | %s | %lld | %d | %.1f | %d | %.1f | %.2fx |\n", static_cast<long long>(nkv),
                            dt_name.c_str(), static_cast<long long>(depth), policy, policy_us, best, best_us,
                            policy_us / best_us);
            }
        }
    }
}

// Prefill attention: 512 query tokens after `depth` cached ones, TFLOP/s per KV dtype, for both tensor-core
// prefill kernels (Narrow: 8 warps of 16 rows, 1 CTA an SM; Wide: 4 warps of 32 rows, 2 CTAs an SM) at 1, 2
// and 4 key splits and at the launcher's choice (paged_attention_splits, sized for Wide).
void bench_prefill_attention(const cudaDeviceProp& prop, cudaStream_t stream) {
    using nibble::KvDtype;
    using nibble::cuda::PrefillKernel;
    const int64_t n_heads = 32, nkv = 8, hd = 128, bs = 16, n_q = 512, n_layers = 32;
    // NIBBLE_PREFILL_DEPTHS=65536 (a comma list) runs only those depths: one kernel's launches for a
    // profiler.
    std::vector<int64_t> depths = {0, 8192, 32768, 65536};
    if (const char* env = std::getenv("NIBBLE_PREFILL_DEPTHS")) {
        depths.clear();
        const std::string list = env;
        for (size_t at = 0; at < list.size();) {
            const size_t comma = std::min(list.find(',', at), list.size());
            depths.push_back(std::stoll(list.substr(at, comma - at)));
            at = comma + 1;
        }
    }
    const KvDtype dtypes[] = {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4};
    struct PRow {
        int64_t depth;
        KvDtype dt;
        double narrow_us, wide_us, policy_us;
        int narrow_splits, wide_splits, policy_splits;
        double flops;
    };
    std::vector<PRow> rows;
    uint64_t seed = 499;
    std::mt19937_64 rng(11);
    for (int64_t depth : depths) {
        const int64_t kv_len = depth + n_q;
        const int64_t n_blocks = (kv_len + bs - 1) / bs;
        std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        const std::vector<int32_t> q_start = {0, static_cast<int32_t>(n_q)}, start_pos = {static_cast<int32_t>(depth)};
        DeviceBuffer d_bt(ids.size() * 4), d_qs(q_start.size() * 4), d_sp(start_pos.size() * 4);
        d_bt.upload(ids.data(), d_bt.bytes());
        d_qs.upload(q_start.data(), d_qs.bytes());
        d_sp.upload(start_pos.data(), d_sp.bytes());
        nibble::cuda::AttentionBatch b{1, n_q, d_qs.as<int32_t>(), d_sp.as<int32_t>(), d_bt.as<int32_t>(), n_blocks, n_q,
                                       kv_len};
        DeviceBuffer q(static_cast<size_t>(n_q * n_heads * hd * 2)), out(q.bytes());
        nibble::cuda::fill_random_u32(q.as<uint32_t>(), q.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
        const int policy = nibble::cuda::paged_attention_splits(b, nkv, n_heads, prop.multiProcessorCount);
        const size_t ws_bytes =
            nibble::cuda::paged_attention_workspace_bytes(std::max(policy, 4), n_q, n_heads, hd);
        DeviceBuffer ws(std::max<size_t>(ws_bytes, 16));
        // Attended (query, key) pairs: query i sits at position depth + i and sees depth + i + 1 keys.
        const double pairs = static_cast<double>(n_q) * static_cast<double>(depth) + n_q * (n_q + 1) / 2.0;
        const double flops = 4.0 * static_cast<double>(hd * n_heads) * pairs;
        for (KvDtype dt : dtypes) {
            const int64_t row_bytes = dt == KvDtype::Bf16 ? hd * 2 : dt == KvDtype::Fp8 ? hd : hd / 2 + hd / 16;
            const int64_t block_bytes = (bs * nkv * row_bytes + 15) / 16 * 16;
            const size_t layer_bytes = static_cast<size_t>(n_blocks * block_bytes);
            const size_t copies = std::clamp<size_t>(
                (4 * static_cast<size_t>(prop.l2CacheSize) + 2 * layer_bytes - 1) / (2 * layer_bytes), 1, 64);
            std::vector<DeviceBuffer> kb, vb;
            for (size_t c = 0; c < copies; ++c) {
                kb.emplace_back(layer_bytes);
                vb.emplace_back(layer_bytes);
                // BF16 |v| < 2; E4M3 / E2M1 / scale bytes with bit 3 clear: never a NaN code.
                const uint32_t and_mask = dt == KvDtype::Bf16 ? 0x83ff83ffu : 0xf7f7f7f7u;
                const uint32_t or_mask = dt == KvDtype::Bf16 ? 0x3c003c00u : 0u;
                nibble::cuda::fill_random_u32(kb.back().as<uint32_t>(), layer_bytes / 4, ++seed, and_mask, or_mask, stream);
                nibble::cuda::fill_random_u32(vb.back().as<uint32_t>(), layer_bytes / 4, ++seed, and_mask, or_mask, stream);
            }
            NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
            size_t next = 0;
            auto time_us = [&](PrefillKernel kernel, int splits) {
                auto launch = [&] {
                    for (size_t c = 0; c < copies; ++c, ++next) {
                        const size_t i = next % copies;
                        nibble::cuda::PagedKvLayer kv{kb[i].as<uint8_t>(),
                                                      vb[i].as<uint8_t>(),
                                                      n_blocks,
                                                      block_bytes,
                                                      bs,
                                                      nkv,
                                                      hd,
                                                      dt,
                                                      0.01f,
                                                      0.01f};
                        nibble::cuda::AttentionArgs args{n_heads, 0.088f, 0};
                        args.prefill_kernel = kernel;
                        nibble::cuda::paged_attention(q.get(), DType::BF16, kv, b, args, splits, ws.get(),
                                                      ws_bytes, out.get(), stream);
                    }
                };
                const int reps = depth >= 32768 ? 5 : 20;
                return 1e3 * time_ms(stream, 1, reps, launch) / static_cast<double>(copies);
            };
            PRow row{depth, dt, 1e30, 1e30, 0.0, 0, 0, policy, flops};
            std::printf("attention prefill q=%lld depth=%-6lld %-5s copies=%-3zu",
                        static_cast<long long>(n_q), static_cast<long long>(depth),
                        std::string(nibble::kv_dtype_name(dt)).c_str(), copies);
            for (PrefillKernel kernel : {PrefillKernel::Narrow, PrefillKernel::Wide}) {
                const bool wide = kernel == PrefillKernel::Wide;
                std::printf(" %s", wide ? "wide" : "narrow");
                for (int splits : {1, 2, 4}) {
                    const double us = time_us(kernel, splits);
                    std::printf(" %d:%.1f", splits, us);
                    double& best = wide ? row.wide_us : row.narrow_us;
                    if (us < best) best = us, (wide ? row.wide_splits : row.narrow_splits) = splits;
                    if (wide && splits == policy) row.policy_us = us;
                }
            }
            if (row.policy_us == 0.0) row.policy_us = time_us(PrefillKernel::Wide, policy);
            std::printf(" policy %d:%.1f us\n", policy, row.policy_us);
            rows.push_back(row);
        }
    }
    std::printf(
        "\n| depth | KV | narrow us (splits) | TFLOP/s | wide us (splits) | TFLOP/s | wide/narrow | launcher "
        "(splits) us | attention-only pp512 tok/s, 32 layers |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    for (const PRow& r : rows)
        std::printf("| %lldK | %s | %.1f (%d) | %.1f | %.1f (%d) | %.1f | %.2fx | %.1f (%d) | %.0f |\n",
                    static_cast<long long>(r.depth / 1024), std::string(nibble::kv_dtype_name(r.dt)).c_str(),
                    r.narrow_us, r.narrow_splits, r.flops / r.narrow_us / 1e6, r.wide_us, r.wide_splits,
                    r.flops / r.wide_us / 1e6, r.narrow_us / r.wide_us, r.policy_us, r.policy_splits,
                    static_cast<double>(n_q) / (n_layers * r.policy_us * 1e-6));
}


// One MoE layer's experts for the benches: random NVFP4 weights and E4M3 scales (every expert's matrices
// back to back) and the device tables of per-expert pointers the launchers read.
struct BenchMoeExperts {
    int64_t mats;         // matrices an expert holds: gate, up, down with SwiGLU; up, down otherwise
    size_t expert_bytes;  // one expert's weight + scale bytes
    DeviceBuffer packed, scales;  // [n_experts * mats, d * ff / 2], [n_experts * mats, d * ff / 16]
    DeviceBuffer tables[3];       // gate, up, down: [n_experts] Nvfp4DeviceWeight (gate empty without SwiGLU)
    nibble::cuda::MoeDeviceExperts experts;

    BenchMoeExperts(bool swiglu, int64_t n_experts, int64_t d, int64_t ff, uint64_t& seed, cudaStream_t stream) {
        mats = swiglu ? 3 : 2;
        const size_t packed_bytes = static_cast<size_t>(d * ff / 2), scale_bytes = static_cast<size_t>(d * ff / 16);
        expert_bytes = static_cast<size_t>(mats) * (packed_bytes + scale_bytes);
        packed = DeviceBuffer(packed_bytes * mats * n_experts);
        scales = DeviceBuffer(scale_bytes * mats * n_experts);
        nibble::cuda::fill_random_u32(packed.as<uint32_t>(), packed.bytes() / 4, ++seed, ~0u, 0u, stream);
        nibble::cuda::fill_random_u32(scales.as<uint32_t>(), scales.bytes() / 4, ++seed, 0x1f1f1f1fu, 0x20202020u,
                                      stream);
        std::vector<nibble::cuda::Nvfp4DeviceWeight> host[3];  // gate, up, down
        for (int64_t e = 0; e < n_experts; ++e)
            for (int64_t j = 0; j < mats; ++j) {
                const size_t i = static_cast<size_t>(e * mats + j);
                const bool down = j == mats - 1;
                host[swiglu ? j : j + 1].push_back({packed.as<uint8_t>() + i * packed_bytes,
                                                    scales.as<uint8_t>() + i * scale_bytes, 0.01f, down ? d : ff,
                                                    down ? ff : d});
            }
        for (int j = 0; j < 3; ++j) {
            tables[j] = DeviceBuffer(std::max<size_t>(1, host[j].size()) * sizeof(nibble::cuda::Nvfp4DeviceWeight));
            if (!host[j].empty())
                tables[j].upload(host[j].data(), host[j].size() * sizeof(nibble::cuda::Nvfp4DeviceWeight));
        }
        experts = {swiglu ? tables[0].as<nibble::cuda::Nvfp4DeviceWeight>() : nullptr,
                   tables[1].as<nibble::cuda::Nvfp4DeviceWeight>(), tables[2].as<nibble::cuda::Nvfp4DeviceWeight>(),
                   n_experts, d, ff};
    }
};

// MoE decode step (`nibble-kernel-bench moe`): BF16 router logits -> route -> permute -> grouped NVFP4 up
// and down -> combine, at Qwen3-30B-A3B (128 experts, top-8, SwiGLU, 2048 x 768) and Nemotron-3-Nano
// (128 experts, top-6, relu^2, 2688 x 1856) shapes, m = 1 / 8 / 32 / 64 tokens. Eight logits buffers
// are launched in turn so consecutive steps pick different experts (all experts: >= 300 MB, well past
// the L2). GB/s counts the active experts' weight bytes (n_active read back once per buffer).
// Mamba2 at Nemotron-3-Nano's mixer shape (64 heads x 64, state 128, 8 groups, conv 4): conv1d + scan
// + gated RMSNorm for decode batches of 1 / 8 / 32 sequences and a 512-token prefill, float32 state.
void bench_moe_mamba(cudaStream_t stream) {
    struct Cfg {
        const char* name;
        bool swiglu;
        int64_t n_experts, d, ff, top_k;
    };
    const Cfg cfgs[] = {{"qwen3-30b-a3b", true, 128, 2048, 768, 8}, {"nemotron-3-nano", false, 128, 2688, 1856, 6}};
    uint64_t seed = 777;
    for (const Cfg& c : cfgs) {
        const BenchMoeExperts moe(c.swiglu, c.n_experts, c.d, c.ff, seed, stream);
        const nibble::cuda::MoeDeviceExperts& ex = moe.experts;
        for (int64_t m : {1, 8, 32, 64}) {
            const int64_t pairs = m * c.top_k;
            constexpr int kBuffers = 8;
            std::vector<DeviceBuffer> logits;
            for (int b = 0; b < kBuffers; ++b) {
                logits.emplace_back(static_cast<size_t>(m * c.n_experts * 2 + 4));
                nibble::cuda::fill_random_u32(logits.back().as<uint32_t>(), logits.back().bytes() / 4, ++seed,
                                              0x83ff83ffu, 0x3c003c00u, stream);
            }
            DeviceBuffer x(static_cast<size_t>(m * c.d * 2)), y(static_cast<size_t>(m * c.d * 2));
            nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
            DeviceBuffer ids(static_cast<size_t>(pairs * 4)), rw(static_cast<size_t>(pairs * 4));
            DeviceBuffer counts(static_cast<size_t>(c.n_experts * 4)), offsets(static_cast<size_t>(c.n_experts * 4 + 4)),
                sorted(static_cast<size_t>(pairs * 4)), position(static_cast<size_t>(pairs * 4)),
                active(static_cast<size_t>(c.n_experts * 4)), n_active(4);
            const nibble::cuda::MoePermutation perm{counts.as<int32_t>(), offsets.as<int32_t>(), sorted.as<int32_t>(),
                                                    position.as<int32_t>(), active.as<int32_t>(), n_active.as<int32_t>()};
            DeviceBuffer h(static_cast<size_t>(pairs * c.ff * 4)), o(static_cast<size_t>(pairs * c.d * 4));
            int next = 0;
            auto step = [&](int b) {
                nibble::cuda::moe_route_softmax(logits[static_cast<size_t>(b)].get(), DType::BF16, m, c.n_experts,
                                                c.top_k, true, ids.as<int32_t>(), rw.as<float>(), stream);
                nibble::cuda::moe_permute(ids.as<int32_t>(), m, c.top_k, c.n_experts, perm, stream);
                nibble::cuda::moe_experts_up_nvfp4(x.get(), DType::BF16, m, c.top_k, ex,
                                                   c.swiglu ? nibble::MoeActivation::SwiGlu : nibble::MoeActivation::Relu2,
                                                   perm, h.as<float>(), stream);
                nibble::cuda::moe_experts_down_nvfp4(h.as<float>(), m, c.top_k, ex, perm, o.as<float>(), stream);
                nibble::cuda::moe_combine(o.as<float>(), ids.as<int32_t>(), rw.as<float>(), perm.pair_position, m,
                                          c.top_k, c.d, nullptr, DType::BF16, y.get(), stream);
            };
            double active_sum = 0;  // active experts over the buffers
            for (int b = 0; b < kBuffers; ++b) {
                step(b);
                int32_t na = 0;
                n_active.download(&na, 4);
                active_sum += na;
            }
            const double ms = time_ms(stream, 2, 50, [&] {
                for (int b = 0; b < kBuffers; ++b) step(next++ % kBuffers);
            }) / kBuffers;
            const double bytes = active_sum / kBuffers * static_cast<double>(moe.expert_bytes);
            std::printf("moe %-16s m=%-2lld active %5.1f experts %8.2f us/step %6.0f GB/s of active weights\n", c.name,
                        static_cast<long long>(m), active_sum / kBuffers, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
            // Each stage alone (the others' outputs from the last full step stay valid): where a step's time goes.
            auto stage_us = [&](auto&& launch) {
                return time_ms(stream, 2, 50, [&] {
                           for (int b = 0; b < kBuffers; ++b) launch(next++ % kBuffers);
                       }) / kBuffers * 1e3;
            };
            const double route = stage_us([&](int b) {
                nibble::cuda::moe_route_softmax(logits[static_cast<size_t>(b)].get(), DType::BF16, m, c.n_experts,
                                                c.top_k, true, ids.as<int32_t>(), rw.as<float>(), stream);
            });
            const double permute = stage_us([&](int) {
                nibble::cuda::moe_permute(ids.as<int32_t>(), m, c.top_k, c.n_experts, perm, stream);
            });
            const double up = stage_us([&](int) {
                nibble::cuda::moe_experts_up_nvfp4(x.get(), DType::BF16, m, c.top_k, ex,
                                                   c.swiglu ? nibble::MoeActivation::SwiGlu : nibble::MoeActivation::Relu2,
                                                   perm, h.as<float>(), stream);
            });
            const double down = stage_us([&](int) {
                nibble::cuda::moe_experts_down_nvfp4(h.as<float>(), m, c.top_k, ex, perm, o.as<float>(), stream);
            });
            const double combine = stage_us([&](int) {
                nibble::cuda::moe_combine(o.as<float>(), ids.as<int32_t>(), rw.as<float>(), perm.pair_position, m,
                                          c.top_k, c.d, nullptr, DType::BF16, y.get(), stream);
            });
            std::printf("    stages: route %.2f  permute %.2f  up %.2f  down %.2f  combine %.2f us\n", route, permute,
                        up, down, combine);
        }
    }

    // Mamba2 mixer ops at Nemotron-3-Nano's shape.
    const int64_t H = 64, P = 64, N = 128, G = 8, K = 4, d_inner = H * P, conv_dim = d_inner + 2 * G * N;
    DeviceBuffer A(H * 4), Dp(H * 4), dt_bias(H * 4), conv_w(static_cast<size_t>(conv_dim * K * 4)),
        norm_w(static_cast<size_t>(d_inner * 4));
    // floats 0.5 .. 1 (exponent 126): A negated below by the sign bit
    nibble::cuda::fill_random_u32(A.as<uint32_t>(), H, ++seed, 0x007fffffu, 0xbf000000u, stream);
    nibble::cuda::fill_random_u32(Dp.as<uint32_t>(), H, ++seed, 0x007fffffu, 0x3f000000u, stream);
    nibble::cuda::fill_random_u32(dt_bias.as<uint32_t>(), H, ++seed, 0x007fffffu, 0xc0000000u, stream);  // -2..-4
    nibble::cuda::fill_random_u32(conv_w.as<uint32_t>(), conv_dim * K, ++seed, 0x807fffffu, 0x3e000000u, stream);
    nibble::cuda::fill_random_u32(norm_w.as<uint32_t>(), d_inner, ++seed, 0x007fffffu, 0x3f800000u, stream);
    nibble::SsmScanParams sp;
    sp.n_heads = H, sp.head_dim = P, sp.state_size = N, sp.n_groups = G;
    sp.A = A.as<float>(), sp.D = Dp.as<float>(), sp.dt_bias = dt_bias.as<float>();
    sp.dt_min = 0.0f, sp.dt_max = 1e30f;
    struct Batch {
        const char* name;
        int64_t n_seqs, len;
    };
    for (const Batch& b : {Batch{"decode x1", 1, 1}, Batch{"decode x8", 8, 1}, Batch{"decode x32", 32, 1},
                           Batch{"prefill 512", 1, 512}}) {
        const int64_t n = b.n_seqs * b.len;
        const int64_t proj = d_inner + conv_dim + H;  // in_proj row: z, xBC, dt
        DeviceBuffer zxbcdt(static_cast<size_t>(n * proj * 2)), xbc(static_cast<size_t>(n * conv_dim * 2)),
            yb(static_cast<size_t>(n * d_inner * 2));
        nibble::cuda::fill_random_u32(zxbcdt.as<uint32_t>(), zxbcdt.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u,
                                      stream);
        std::vector<int32_t> starts(static_cast<size_t>(b.n_seqs + 1));
        for (int64_t s = 0; s <= b.n_seqs; ++s) starts[static_cast<size_t>(s)] = static_cast<int32_t>(s * b.len);
        DeviceBuffer dstarts(starts.size() * 4);
        dstarts.upload(starts.data(), starts.size() * 4);
        DeviceBuffer conv_state(static_cast<size_t>(b.n_seqs * (K - 1) * conv_dim * 4)),
            ssm_state(static_cast<size_t>(b.n_seqs * H * P * N * 4));
        conv_state.fill_bytes(0);
        ssm_state.fill_bytes(0);
        std::vector<float*> cptr;
        std::vector<void*> sptr;
        for (int64_t s = 0; s < b.n_seqs; ++s) {
            cptr.push_back(conv_state.as<float>() + s * (K - 1) * conv_dim);
            sptr.push_back(ssm_state.as<float>() + s * H * P * N);
        }
        DeviceBuffer dcptr(cptr.size() * sizeof(float*)), dsptr(sptr.size() * sizeof(void*));
        dcptr.upload(cptr.data(), dcptr.bytes());
        dsptr.upload(sptr.data(), dsptr.bytes());
        const auto* base = zxbcdt.as<uint16_t>();
        double t_conv = time_ms(stream, 2, 50, [&] {
            nibble::cuda::mamba_conv1d(base + d_inner, DType::BF16, proj, n, conv_dim, dstarts.as<int32_t>(), b.n_seqs,
                                       conv_w.as<float>(), nullptr, K, dcptr.as<float* const>(), xbc.get(), stream);
        });
        double t_scan = time_ms(stream, 2, 50, [&] {
            nibble::cuda::ssm_scan(sp, n, dstarts.as<int32_t>(), b.n_seqs, xbc.get(), conv_dim,
                                   base + d_inner + conv_dim, proj, DType::BF16, dsptr.as<void* const>(),
                                   nibble::SsmStateDtype::F32, yb.get(), stream);
        });
        double t_norm = time_ms(stream, 2, 50, [&] {
            nibble::cuda::gated_rmsnorm(yb.get(), base, proj, DType::BF16, n, d_inner, d_inner / G, norm_w.as<float>(),
                                        1e-5f, yb.get(), stream);
        });
        std::printf("mamba2 %-12s conv %8.2f us  scan %9.2f us  gated norm %7.2f us\n", b.name, t_conv * 1e3,
                    t_scan * 1e3, t_norm * 1e3);
    }
}

// Mamba2 selective scan for prefill (`nibble-kernel-bench ssd`, not part of "all"): the sequential scan
// (ssm_scan) against the chunked SSD scan (ssm_scan_chunked) at Nemotron-3-Nano's mixer shape (64 heads x
// 64, state 128, 8 groups), BF16 activations, F32 state, for one 2048-token prompt and smaller batches:
// median of 30 launches each (the state slots keep evolving between launches: the work is the same), then
// one run of each from the same initial states, reporting their largest |y| difference as a sanity check.
void bench_ssd_scan(cudaStream_t stream) {
    using nibble::cuda::DeviceBuffer;
    uint64_t seed = 777;
    const int64_t H = 64, P = 64, N = 128, G = 8, d_inner = H * P, conv_dim = d_inner + 2 * G * N;
    DeviceBuffer A(H * 4), Dp(H * 4), dt_bias(H * 4);
    nibble::cuda::fill_random_u32(A.as<uint32_t>(), H, ++seed, 0x007fffffu, 0xbf800000u, stream);  // -1..-2
    nibble::cuda::fill_random_u32(Dp.as<uint32_t>(), H, ++seed, 0x007fffffu, 0x3f000000u, stream);
    nibble::cuda::fill_random_u32(dt_bias.as<uint32_t>(), H, ++seed, 0x007fffffu, 0xc0000000u, stream);  // -2..-4
    nibble::SsmScanParams sp;
    sp.n_heads = H, sp.head_dim = P, sp.state_size = N, sp.n_groups = G;
    sp.A = A.as<float>(), sp.D = Dp.as<float>(), sp.dt_bias = dt_bias.as<float>();
    sp.dt_min = 0.0f, sp.dt_max = 1e30f;
    struct Batch {
        const char* name;
        int64_t n_seqs, len;
    };
    for (const Batch& b : {Batch{"1 x 2048", 1, 2048}, Batch{"1 x 512", 1, 512}, Batch{"1 x 128", 1, 128},
                           Batch{"4 x 512", 4, 512}, Batch{"8 x 256", 8, 256}}) {
        const int64_t n = b.n_seqs * b.len, dt_stride = H + 8;
        // xBC in bf16, values +-(1/128 .. 1/64) * 2^k patterns as bench_moe_mamba; dt raw likewise
        DeviceBuffer xbc(static_cast<size_t>(n * conv_dim * 2)), dt(static_cast<size_t>(n * dt_stride * 2)),
            y_seq(static_cast<size_t>(n * d_inner * 2)), y_chunk(static_cast<size_t>(n * d_inner * 2));
        nibble::cuda::fill_random_u32(xbc.as<uint32_t>(), xbc.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
        nibble::cuda::fill_random_u32(dt.as<uint32_t>(), dt.bytes() / 4, ++seed, 0x803f803fu, 0x3f003f00u, stream);
        std::vector<int32_t> starts(static_cast<size_t>(b.n_seqs + 1));
        for (int64_t s = 0; s <= b.n_seqs; ++s) starts[static_cast<size_t>(s)] = static_cast<int32_t>(s * b.len);
        DeviceBuffer dstarts(starts.size() * 4);
        dstarts.upload(starts.data(), starts.size() * 4);
        const size_t state_bytes = static_cast<size_t>(b.n_seqs * H * P * N * 4);
        DeviceBuffer state(state_bytes), state0(state_bytes);
        nibble::cuda::fill_random_u32(state0.as<uint32_t>(), state_bytes / 4, ++seed, 0x807fffffu, 0x3e000000u, stream);
        std::vector<void*> sptr;
        for (int64_t s = 0; s < b.n_seqs; ++s) sptr.push_back(state.as<float>() + s * H * P * N);
        DeviceBuffer dsptr(sptr.size() * sizeof(void*));
        dsptr.upload(sptr.data(), dsptr.bytes());
        DeviceBuffer workspace(nibble::cuda::ssm_scan_chunked_workspace_bytes(sp, n, b.n_seqs));
        auto sequential = [&] {
            nibble::cuda::ssm_scan(sp, n, dstarts.as<int32_t>(), b.n_seqs, xbc.get(), conv_dim, dt.get(), dt_stride,
                                   DType::BF16, dsptr.as<void* const>(), nibble::SsmStateDtype::F32, y_seq.get(),
                                   stream);
        };
        auto chunked = [&] {
            nibble::cuda::ssm_scan_chunked(sp, n, dstarts.as<int32_t>(), b.n_seqs, xbc.get(), conv_dim, dt.get(),
                                           dt_stride, DType::BF16, dsptr.as<void* const>(),
                                           nibble::SsmStateDtype::F32, y_chunk.get(), workspace.get(),
                                           workspace.bytes(), stream);
        };
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(state.get(), state0.get(), state_bytes, cudaMemcpyDeviceToDevice, stream));
        const double t_seq = time_ms(stream, 2, 30, sequential);
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(state.get(), state0.get(), state_bytes, cudaMemcpyDeviceToDevice, stream));
        const double t_chunk = time_ms(stream, 2, 30, chunked);
        // Sanity: both from the same states.
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(state.get(), state0.get(), state_bytes, cudaMemcpyDeviceToDevice, stream));
        sequential();
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(state.get(), state0.get(), state_bytes, cudaMemcpyDeviceToDevice, stream));
        chunked();
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<uint16_t> a(static_cast<size_t>(n * d_inner)), c(a.size());
        y_seq.download(a.data(), a.size() * 2);
        y_chunk.download(c.data(), c.size() * 2);
        auto widen = [](uint16_t v) {
            const uint32_t bits = static_cast<uint32_t>(v) << 16;
            float f;
            std::memcpy(&f, &bits, 4);
            return f;
        };
        double max_diff = 0, max_y = 0;
        for (size_t i = 0; i < a.size(); ++i) {
            max_diff = std::max(max_diff, static_cast<double>(std::fabs(widen(a[i]) - widen(c[i]))));
            max_y = std::max(max_y, static_cast<double>(std::fabs(widen(a[i]))));
        }
        std::printf("ssd scan %-9s sequential %9.2f us  chunked %9.2f us  (%.2fx; %.1f MiB workspace)  max|dy| %.3g of "
                    "max|y| %.3g\n",
                    b.name, t_seq * 1e3, t_chunk * 1e3, t_seq / t_chunk, workspace.bytes() / 1048576.0, max_diff,
                    max_y);
    }
}

// MoE prefill experts (`nibble-kernel-bench moe-prefill`, not part of "all"): one layer's grouped NVFP4 up
// and down over m tokens (BF16 x, random router logits: near-uniform expert loads), the decode GEMV
// (MoeExpertKernel::Gemv) against the tensor-core grouped GEMM (Gemm), at the Qwen3-30B-A3B (128 experts,
// top-8, SwiGLU, 2048 x 768, 48 MoE layers) and Nemotron-3-Nano (128 experts, top-6, relu^2, 2688 x 1856,
// 23 MoE layers) shapes. TFLOP/s counts 2 * m * top_k * matrices * n_embd * n_ff, and "% bf16" compares it
// with 989 TFLOP/s, the dense BF16 tensor rate of an H100 / H200 SXM. "step" is the whole expert part
// (route, permute, up, down, combine) with the launchers' Auto choice; "MoE tok/s" = m / (layers * step),
// what the experts alone would allow a prefill.
void bench_moe_prefill(cudaStream_t stream) {
    struct Cfg {
        const char* name;
        bool swiglu;
        int64_t n_experts, d, ff, top_k, layers;
    };
    const Cfg cfgs[] = {{"qwen3-30b-a3b", true, 128, 2048, 768, 8, 48},
                        {"nemotron-3-nano", false, 128, 2688, 1856, 6, 23}};
    constexpr double kBf16DenseTflops = 989.0;
    uint64_t seed = 999;
    std::printf("\n| moe prefill | m | gemv up+down us | gemm up us | gemm down us | gemm TFLOP/s | %% bf16 | "
                "speed-up | step us (auto) | MoE tok/s |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Cfg& c : cfgs) {
        const BenchMoeExperts moe(c.swiglu, c.n_experts, c.d, c.ff, seed, stream);
        const nibble::cuda::MoeDeviceExperts& ex = moe.experts;
        const auto act = c.swiglu ? nibble::MoeActivation::SwiGlu : nibble::MoeActivation::Relu2;
        for (int64_t m : {64, 128, 256, 512, 2048}) {
            const int64_t pairs = m * c.top_k;
            DeviceBuffer logits(static_cast<size_t>(m * c.n_experts * 2 + 4));
            nibble::cuda::fill_random_u32(logits.as<uint32_t>(), logits.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u,
                                          stream);
            DeviceBuffer x(static_cast<size_t>(m * c.d * 2)), y(static_cast<size_t>(m * c.d * 2));
            nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
            DeviceBuffer ids(static_cast<size_t>(pairs * 4)), rw(static_cast<size_t>(pairs * 4));
            DeviceBuffer workspace(nibble::cuda::moe_workspace_bytes(m, c.top_k, c.n_experts, c.d, c.ff));
            DeviceBuffer counts(static_cast<size_t>(c.n_experts * 4)), offsets(static_cast<size_t>(c.n_experts * 4 + 4)),
                sorted(static_cast<size_t>(pairs * 4)), position(static_cast<size_t>(pairs * 4)),
                active(static_cast<size_t>(c.n_experts * 4)), n_active(4);
            const nibble::cuda::MoePermutation perm{counts.as<int32_t>(), offsets.as<int32_t>(), sorted.as<int32_t>(),
                                                    position.as<int32_t>(), active.as<int32_t>(), n_active.as<int32_t>()};
            DeviceBuffer h(static_cast<size_t>(pairs * c.ff * 4)), o(static_cast<size_t>(pairs * c.d * 4));
            nibble::cuda::moe_route_softmax(logits.get(), DType::BF16, m, c.n_experts, c.top_k, true, ids.as<int32_t>(),
                                            rw.as<float>(), stream);
            nibble::cuda::moe_permute(ids.as<int32_t>(), m, c.top_k, c.n_experts, perm, stream);
            using nibble::cuda::MoeExpertKernel;
            auto up = [&](MoeExpertKernel kernel) {
                nibble::cuda::moe_experts_up_nvfp4(x.get(), DType::BF16, m, c.top_k, ex, act, perm, h.as<float>(), stream,
                                                   kernel);
            };
            auto down = [&](MoeExpertKernel kernel) {
                nibble::cuda::moe_experts_down_nvfp4(h.as<float>(), m, c.top_k, ex, perm, o.as<float>(), stream, kernel);
            };
            const int reps = m >= 512 ? 20 : 50;
            const double gemv_ms = time_ms(stream, 2, reps, [&] {
                up(MoeExpertKernel::Gemv);
                down(MoeExpertKernel::Gemv);
            });
            const double up_ms = time_ms(stream, 2, reps, [&] { up(MoeExpertKernel::Gemm); });
            const double down_ms = time_ms(stream, 2, reps, [&] { down(MoeExpertKernel::Gemm); });
            const double step_ms = time_ms(stream, 2, reps, [&] {
                nibble::cuda::moe_route_softmax(logits.get(), DType::BF16, m, c.n_experts, c.top_k, true,
                                                ids.as<int32_t>(), rw.as<float>(), stream);
                nibble::cuda::moe_experts_nvfp4(x.get(), DType::BF16, m, ids.as<int32_t>(), rw.as<float>(), c.top_k, ex,
                                                act, nullptr, workspace.get(), y.get(), stream);
            });
            const double flops = 2.0 * static_cast<double>(pairs) * static_cast<double>(moe.mats * c.d * c.ff);
            const double tflops = flops / ((up_ms + down_ms) * 1e-3) / 1e12;
            std::printf("| %s | %lld | %.1f | %.1f | %.1f | %.1f | %.1f%% | %.2fx | %.1f | %.0f |\n", c.name,
                        static_cast<long long>(m), gemv_ms * 1e3, up_ms * 1e3, down_ms * 1e3, tflops,
                        100.0 * tflops / kBf16DenseTflops, gemv_ms / (up_ms + down_ms), step_ms * 1e3,
                        static_cast<double>(m) / (static_cast<double>(c.layers) * step_ms * 1e-3));
        }
    }
}
// NVFP4 weights of rows ns x k, in as many copies as make 4x L2 (at least 2) so that launches cycling over
// them stream their weights from DRAM as a decode step does: random E2M1 codes, E4M3 scales 0x20..0x3f (2^-3
// .. 1.875, never NaN). Each buffer draws the next seed, copy by copy, projection by projection, codes first.
struct Nvfp4WeightCopies {
    std::vector<int64_t> ns;
    int64_t k = 0;
    size_t set_bytes = 0, copies = 0;  // bytes of one copy (codes + scales of every projection)
    std::vector<std::vector<DeviceBuffer>> codes, scales;
    Nvfp4WeightCopies(const cudaDeviceProp& prop, std::vector<int64_t> rows, int64_t cols, uint64_t& seed,
                      cudaStream_t stream)
        : ns(std::move(rows)), k(cols) {
        for (int64_t n : ns) set_bytes += static_cast<size_t>(n * k / 2 + n * k / 16);
        copies = std::max<size_t>(2, (4 * static_cast<size_t>(prop.l2CacheSize) + set_bytes - 1) / set_bytes);
        codes.resize(copies);
        scales.resize(copies);
        for (size_t cp = 0; cp < copies; ++cp)
            for (int64_t n : ns) {
                codes[cp].emplace_back(static_cast<size_t>(n * k / 2));
                nibble::cuda::fill_random_u32(codes[cp].back().as<uint32_t>(), codes[cp].back().bytes() / 4,
                                              ++seed, ~0u, 0u, stream);
                scales[cp].emplace_back(static_cast<size_t>(n * k / 16));
                nibble::cuda::fill_random_u32(scales[cp].back().as<uint32_t>(), scales[cp].back().bytes() / 4,
                                              ++seed, 0x1f1f1f1fu, 0x20202020u, stream);
            }
    }
    // Projection i of copy cp, global scale 0.01.
    nibble::cuda::Nvfp4DeviceWeight weight(size_t cp, size_t i) const {
        return {codes[cp][i].as<uint8_t>(), scales[cp][i].as<uint8_t>(), 0.01f, ns[i], k};
    }
};

// Fused NVFP4 launches against the separate ones they replace, at the Llama-3.1-8B shapes: q, k, v
// (4096 + 1024 + 1024 rows, k = 4096) and gate + up with SwiGLU (2 x 14336 rows, k = 4096; the separate
// path adds the silu_mul launch). Same method as the GEMV table: weight copies >= 4x L2 launched in turn,
// median of 50 batches; bytes = weights + scales + x + every output written.
void bench_gemv_fused(const cudaDeviceProp& prop, cudaStream_t stream, double copy_gbps) {
    using nibble::cuda::Nvfp4Projection;
    struct Case {
        const char* name;
        std::vector<int64_t> ns;
        bool gate_up;
    };
    const Case cases[] = {{"qkv 4096+1024+1024 x 4096", {4096, 1024, 1024}, false},
                          {"gate_up 2x14336 x 4096", {14336, 14336}, true}};
    const int64_t k = 4096;
    const int max_m = 16;
    uint64_t seed = 777;
    std::printf(
        "\n| fused case | m | separate (gemv_nvfp4) us | separate (v3) us | fused us | fused GB/s | "
        "%% copy | fused PDL us | separate/fused time |\n|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& c : cases) {
        const Nvfp4WeightCopies wc(prop, c.ns, k, seed, stream);
        const size_t set_bytes = wc.set_bytes, copies = wc.copies;
        DeviceBuffer x(static_cast<size_t>(max_m * k * 2));
        nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u,
                                      stream);
        std::vector<DeviceBuffer> y;  // one output per projection, [max_m, n] BF16
        for (int64_t n : c.ns) y.emplace_back(static_cast<size_t>(max_m * n * 2));
        DeviceBuffer h(static_cast<size_t>(max_m * c.ns[0] * 2));  // gate_up: [max_m, n_ff]
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        auto weight = [&](size_t cp, size_t i) { return wc.weight(cp, i); };
        for (int m : {1, 2, 4, 8, 16}) {
            double us[4];
            // 0 separate gemv_nvfp4, 1 separate v3, 2 fused, 3 fused again (the old PDL column: PDL is now a
            // build option, cuda/pdl.cuh, the same for every launch, so this is a repeat: run-to-run spread)
            for (int method = 0; method < 4; ++method) {
                const bool fused = method >= 2;
                size_t next = 0;
                auto launch = [&] {
                    for (size_t cc = 0; cc < copies; ++cc, ++next) {
                        const size_t cp = next % copies;
                        if (fused && c.gate_up) {
                            nibble::cuda::gemv_nvfp4_gate_up_silu(x.get(), DType::BF16, m, weight(cp, 0),
                                                                  nullptr, weight(cp, 1), nullptr, h.get(),
                                                                  stream, 0);
                        } else if (fused) {
                            Nvfp4Projection p[3];
                            for (size_t i = 0; i < c.ns.size(); ++i)
                                p[i] = {weight(cp, i), nullptr, y[i].get()};
                            nibble::cuda::gemv_nvfp4_fused(x.get(), DType::BF16, m, p,
                                                           static_cast<int>(c.ns.size()), stream, 0);
                        } else {
                            for (size_t i = 0; i < c.ns.size(); ++i) {
                                if (method == 0)
                                    nibble::cuda::gemv_nvfp4(x.get(), DType::BF16, m, weight(cp, i), nullptr,
                                                             y[i].get(), stream);
                                else
                                    nibble::cuda::gemv_nvfp4_pipelined(x.get(), DType::BF16, m, weight(cp, i),
                                                                       nullptr, y[i].get(), stream);
                            }
                            if (c.gate_up)
                                nibble::cuda::silu_mul(y[0].get(), y[1].get(), DType::BF16, m * c.ns[0],
                                                       h.get(), stream);
                        }
                    }
                };
                us[method] = time_ms(stream, 2, 50, launch) / static_cast<double>(copies) * 1e3;
            }
            size_t out_elems = 0;
            for (int64_t n : c.ns) out_elems += static_cast<size_t>(n);
            if (c.gate_up) out_elems = static_cast<size_t>(c.ns[0]);
            const double bytes =
                static_cast<double>(set_bytes) + 2.0 * m * (static_cast<double>(k) + out_elems);
            const double gbps = bytes / (us[2] * 1e-6) / 1e9;
            std::printf("| %s | %d | %.1f | %.1f | %.1f | %.0f | %.0f%% | %.1f | %.2fx |\n", c.name, m, us[0],
                        us[1], us[2], gbps, 100 * gbps / copy_gbps, us[3], std::min(us[0], us[1]) / us[2]);
        }
    }
}
// FP8 E4M3 weights (per-tensor scale), BF16 activations, at the Llama-3.1-8B projection shapes: gemv_fp8
// (CUDA cores, weights streamed once per 16-row tile) and gemv_fp8_mma (tensor cores) against the path
// gemv_fp8 replaced in decode, gemm_fp8 (dequantize to a BF16 scratch copy, then cuBLASLt), with GB/s and %
// of copy counting the bytes a GEMV must move (weights, activations, outputs). `nibble-kernel-bench fp8` runs
// this part alone.
void bench_gemv_fp8(const cudaDeviceProp& prop, cudaStream_t stream, double copy_gbps) {
    struct Shape {
        const char* name;
        int64_t n, k;
    };
    const Shape shapes[] = {{"qkvo 4096x4096", 4096, 4096},
                            {"gate/up 14336x4096", 14336, 4096},
                            {"down 4096x14336", 4096, 14336},
                            {"lm_head 128256x4096", 128256, 4096}};
    const int max_m = 32;
    uint64_t seed = 4242;
    std::printf("\n| fp8 shape | m | gemv_fp8 us | GB/s | %% copy | gemv_fp8_mma us | %% copy | dequant + cuBLASLt us "
                "| speed-up (best GEMV) |\n|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& s : shapes) {
        const size_t wbytes = static_cast<size_t>(s.n * s.k);
        const size_t copies =
            std::max<size_t>(2, (4 * static_cast<size_t>(prop.l2CacheSize) + wbytes - 1) / wbytes);
        std::vector<DeviceBuffer> w;
        for (size_t c = 0; c < copies; ++c) {
            w.emplace_back(wbytes);
            // E4M3 codes with exponent field <= 14: every sign, mantissa and subnormal, never NaN.
            nibble::cuda::fill_random_u32(w.back().as<uint32_t>(), wbytes / 4, ++seed, 0xf7f7f7f7u, 0u, stream);
        }
        DeviceBuffer x(static_cast<size_t>(max_m * s.k * 2)), y(static_cast<size_t>(max_m * s.n * 2));
        nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
        nibble::cuda::GemmContext ctx(s.n * s.k);
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        for (int m : {1, 2, 4, 8, 16, 32}) {
            double us[3];  // gemv_fp8, dequantize + cuBLASLt, gemv_fp8_mma
            for (int method = 0; method < 3; ++method) {
                size_t next = 0;
                auto launch = [&] {
                    for (size_t c = 0; c < copies; ++c, ++next) {
                        const auto* wp = w[next % copies].as<uint8_t>();
                        if (method == 0)
                            nibble::cuda::gemv_fp8(x.get(), DType::BF16, m, wp, s.n, s.k, 0.01f, nullptr, y.get(),
                                                   stream);
                        else if (method == 2)
                            nibble::cuda::gemv_fp8_mma(x.get(), DType::BF16, m, wp, s.n, s.k, 0.01f, nullptr,
                                                       y.get(), stream);
                        else
                            nibble::cuda::gemm_fp8(ctx, x.get(), m, wp, s.n, s.k, 0.01f, nullptr, y.get(), stream);
                    }
                };
                us[method] = time_ms(stream, 2, method == 1 ? 20 : 50, launch) / static_cast<double>(copies) * 1e3;
            }
            const double bytes = static_cast<double>(wbytes) + 2.0 * m * static_cast<double>(s.k + s.n);
            const double gbps = bytes / (us[0] * 1e-6) / 1e9, mma_gbps = bytes / (us[2] * 1e-6) / 1e9;
            std::printf("| %s | %d | %.1f | %.0f | %.0f%% | %.1f | %.0f%% | %.1f | %.2fx |\n", s.name, m, us[0], gbps,
                        100 * gbps / copy_gbps, us[2], 100 * mma_gbps / copy_gbps, us[1],
                        us[1] / std::min(us[0], us[2]));
        }
    }
}

// The stream NVFP4 GEMVs (ops/linear/gemv_stream_cuda.h, CUDA cores, U = 2 and 4 chunks a lane) against the
// production path at the Llama-3.1-8B decode shapes, BF16 activations: qkvo 4096x4096 and down 4096x14336
// and lm_head 128256x4096 (gemv_nvfp4), q/k/v 4096 + 1024 + 1024 rows in one launch (gemv_nvfp4_fused),
// gate/up 2 x 14336 rows + SwiGLU (gemv_nvfp4_gate_up_silu). Same method as the GEMV table: weight copies
// >= 4x L2 launched in turn, median of 50 batches; bytes = weights + scales + x + every output written.
// `nibble-kernel-bench stream` runs this part alone (not part of "all").
void bench_gemv_stream(const cudaDeviceProp& prop, cudaStream_t stream, double copy_gbps) {
    using nibble::cuda::Nvfp4Projection;
    enum class Kind { Single, Fused, GateUp };
    struct Case {
        const char* name;
        std::vector<int64_t> ns;
        int64_t k;
        Kind kind;
    };
    const Case cases[] = {{"qkvo 4096x4096", {4096}, 4096, Kind::Single},
                          {"qkv 4096+1024+1024 x 4096", {4096, 1024, 1024}, 4096, Kind::Fused},
                          {"gate_up 2x14336 x 4096", {14336, 14336}, 4096, Kind::GateUp},
                          {"down 4096x14336", {4096}, 14336, Kind::Single},
                          {"lm_head 128256x4096", {128256}, 4096, Kind::Single}};
    const int max_m = 8;
    uint64_t seed = 5150;
    std::printf("\n| stream case | m | production us | GB/s | %% copy | stream U=2 us | GB/s | %% copy | stream U=4 us | "
                "GB/s | %% copy | production / best stream time |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& c : cases) {
        const Nvfp4WeightCopies wc(prop, c.ns, c.k, seed, stream);
        const size_t set_bytes = wc.set_bytes, copies = wc.copies;
        DeviceBuffer x(static_cast<size_t>(max_m * c.k * 2));
        nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
        std::vector<DeviceBuffer> y;  // [max_m, n] BF16 a projection (gate/up: y[0] is h)
        for (int64_t n : c.ns) y.emplace_back(static_cast<size_t>(max_m * n * 2));
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        auto weight = [&](size_t cp, size_t i) { return wc.weight(cp, i); };
        size_t out_elems = 0;
        for (int64_t n : c.ns) out_elems += static_cast<size_t>(n);
        if (c.kind == Kind::GateUp) out_elems = static_cast<size_t>(c.ns[0]);
        for (int m : {1, 2, 4, 8}) {
            double us[3];  // 0 production, 1 stream U = 2, 2 stream U = 4
            for (int method = 0; method < 3; ++method) {
                const int u = method == 1 ? 2 : 4;
                size_t next = 0;
                auto launch = [&] {
                    for (size_t cc = 0; cc < copies; ++cc, ++next) {
                        const size_t cp = next % copies;
                        if (c.kind == Kind::GateUp) {
                            if (method == 0)
                                nibble::cuda::gemv_nvfp4_gate_up_silu(x.get(), DType::BF16, m, weight(cp, 0), nullptr,
                                                                      weight(cp, 1), nullptr, y[0].get(), stream);
                            else
                                nibble::cuda::gemv_nvfp4_stream_gate_up_silu(x.get(), DType::BF16, m, weight(cp, 0),
                                                                             nullptr, weight(cp, 1), nullptr,
                                                                             y[0].get(), stream, u);
                        } else if (c.kind == Kind::Fused) {
                            Nvfp4Projection p[3];
                            for (size_t i = 0; i < c.ns.size(); ++i) p[i] = {weight(cp, i), nullptr, y[i].get()};
                            if (method == 0)
                                nibble::cuda::gemv_nvfp4_fused(x.get(), DType::BF16, m, p,
                                                               static_cast<int>(c.ns.size()), stream);
                            else
                                nibble::cuda::gemv_nvfp4_stream_fused(x.get(), DType::BF16, m, p,
                                                                      static_cast<int>(c.ns.size()), stream, u);
                        } else if (method == 0) {
                            nibble::cuda::gemv_nvfp4(x.get(), DType::BF16, m, weight(cp, 0), nullptr, y[0].get(),
                                                     stream);
                        } else {
                            nibble::cuda::gemv_nvfp4_stream(x.get(), DType::BF16, m, weight(cp, 0), nullptr,
                                                            y[0].get(), stream, u);
                        }
                    }
                };
                us[method] = time_ms(stream, 2, 50, launch) / static_cast<double>(copies) * 1e3;
            }
            const double bytes = static_cast<double>(set_bytes) + 2.0 * m * (static_cast<double>(c.k) + out_elems);
            double gbps[3];
            for (int i = 0; i < 3; ++i) gbps[i] = bytes / (us[i] * 1e-6) / 1e9;
            std::printf("| %s | %d | %.1f | %.0f | %.0f%% | %.1f | %.0f | %.0f%% | %.1f | %.0f | %.0f%% | %.2fx |\n",
                        c.name, m, us[0], gbps[0], 100 * gbps[0] / copy_gbps, us[1], gbps[1],
                        100 * gbps[1] / copy_gbps, us[2], gbps[2], 100 * gbps[2] / copy_gbps,
                        us[0] / std::min(us[1], us[2]));
        }
    }
}

// The fused q/k/v GEMV at one token on the shapes of the dense models as served (tensor parallelism divides
// the heads): the production launch (tensor-core pipe kernel, k split chosen), the pipe kernel at each k
// split, the CUDA-core stream kernel (U = 2, 4), and three launches of the CUDA-core v1 kernel (k split for
// few rows), each cycled over copies beyond 4x L2.
void bench_gemv_qkv(const cudaDeviceProp& prop, cudaStream_t stream, double copy_gbps) {
    using nibble::cuda::Nvfp4Projection;
    struct Case {
        const char* name;
        int64_t q, kv, k;
    };
    const Case cases[] = {{"llama3-8b", 4096, 1024, 4096},
                          {"llama3-70b tp1", 8192, 1024, 8192},
                          {"llama3-70b tp2", 4096, 512, 8192},
                          {"llama3-70b tp4", 2048, 256, 8192},
                          {"qwen3-30b-a3b", 4096, 512, 2048}};
    uint64_t seed = 8800;
    std::printf(
        "\n| q/k/v case | rows x k | MB | pipe auto us | pipe ks=1 | ks=2 | ks=4 | stream U=2 | U=4 | v1 x3 "
        "| best "
        "%% copy |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Case& c : cases) {
        const int64_t ns[3] = {c.q, c.kv, c.kv};
        const Nvfp4WeightCopies wc(prop, {c.q, c.kv, c.kv}, c.k, seed, stream);
        const size_t set_bytes = wc.set_bytes, copies = wc.copies;
        DeviceBuffer x(static_cast<size_t>(c.k * 2));
        nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u,
                                      stream);
        std::vector<DeviceBuffer> y;
        for (int64_t n : ns) y.emplace_back(static_cast<size_t>(n * 2));
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        auto weight = [&](size_t cp, int i) { return wc.weight(cp, static_cast<size_t>(i)); };
        // method: 0 production, 1..3 pipe ks 1/2/4, 4..5 stream U 2/4, 6 v1 x3
        double us[7];
        for (int method = 0; method < 7; ++method) {
            size_t next = 0;
            auto launch = [&] {
                for (size_t cc = 0; cc < copies; ++cc, ++next) {
                    const size_t cp = next % copies;
                    Nvfp4Projection p[3];
                    for (int i = 0; i < 3; ++i) p[i] = {weight(cp, i), nullptr, y[i].get()};
                    if (method == 0)
                        nibble::cuda::gemv_nvfp4_fused(x.get(), DType::BF16, 1, p, 3, stream);
                    else if (method <= 3)
                        nibble::cuda::gemv_nvfp4_fused(x.get(), DType::BF16, 1, p, 3, stream,
                                                       1 << (method - 1));
                    else if (method <= 5)
                        nibble::cuda::gemv_nvfp4_stream_fused(x.get(), DType::BF16, 1, p, 3, stream,
                                                              method == 4 ? 2 : 4);
                    else
                        for (int i = 0; i < 3; ++i)
                            nibble::cuda::gemv_nvfp4(x.get(), DType::BF16, 1, weight(cp, i), nullptr,
                                                     y[i].get(), stream);
                }
            };
            us[method] = time_ms(stream, 2, 50, launch) / static_cast<double>(copies) * 1e3;
        }
        const double best = *std::min_element(us, us + 7);
        std::printf(
            "| %s | %lld+%lld+%lld x %lld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f%% "
            "|\n",
            c.name, static_cast<long long>(c.q), static_cast<long long>(c.kv), static_cast<long long>(c.kv),
            static_cast<long long>(c.k), set_bytes / 1e6, us[0], us[1], us[2], us[3], us[4], us[5], us[6],
            100.0 * (set_bytes / (best * 1e-6) / 1e9) / copy_gbps);
    }
}
}  // namespace

int main(int argc, char** argv) {
    try {
        cudaDeviceProp prop{};
        NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        int driver = 0, runtime = 0;
        NIBBLE_CUDA_CHECK(cudaDriverGetVersion(&driver));
        NIBBLE_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
        std::printf("device: %s, %d SMs, L2 %d MB, %.1f GB, driver %d, runtime %d\n", prop.name,
                    prop.multiProcessorCount, prop.l2CacheSize >> 20, prop.totalGlobalMem / 1e9, driver, runtime);
        cudaStream_t stream;
        NIBBLE_CUDA_CHECK(cudaStreamCreate(&stream));

        // Copy bandwidth: 1 GiB device to device, read + write.
        const size_t copy_bytes = size_t{1} << 30;
        double copy_gbps = 0;
        {
            DeviceBuffer a(copy_bytes), b(copy_bytes);
            nibble::cuda::fill_random_u32(a.as<uint32_t>(), copy_bytes / 4, 1, ~0u, 0, stream);
            const double ms = time_ms(stream, 3, 20, [&] {
                NIBBLE_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), copy_bytes, cudaMemcpyDeviceToDevice, stream));
            });
            copy_gbps = 2.0 * copy_bytes / (ms * 1e-3) / 1e9;
            std::printf("copy: 1 GiB device-to-device in %.3f ms = %.0f GB/s (read + write)\n", ms, copy_gbps);
        }

        struct Shape {
            const char* name;
            int64_t n, k;
        };
        const std::string part = argc > 1 ? argv[1] : "all";
        if (part == "moe-prefill") {  // not in "all": minutes of GEMV runs at m = 2048
            bench_moe_prefill(stream);
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        if (part == "qkv") {  // not in "all": the fused q/k/v GEMV's candidates at one token
            bench_gemv_qkv(prop, stream, copy_gbps);
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        if (part == "stream") {  // not in "all": candidates beside the production NVFP4 GEMVs
            bench_gemv_stream(prop, stream, copy_gbps);
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        if (part == "attention-short") {  // not in "all"
            bench_attention_short(prop, stream);
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        if (part == "ssd") {  // not in "all"
            bench_ssd_scan(stream);
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        if (part == "attention" || part == "all") bench_attention(prop, stream, copy_gbps);
        if (part == "prefill" || part == "all") bench_prefill_attention(prop, stream);
        if (part == "moe" || part == "all") bench_moe_mamba(stream);
        if (part == "fp8" || part == "all") bench_gemv_fp8(prop, stream, copy_gbps);
        if (part == "attention" || part == "prefill" || part == "moe" || part == "fp8") {
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        const Shape shapes[] = {{"qkvo 4096x4096", 4096, 4096},
                                {"gate/up 14336x4096", 14336, 4096},
                                {"down 4096x14336", 4096, 14336},
                                {"lm_head 128256x4096", 128256, 4096}};
        const int ms_list[] = {1, 2, 4, 8, 16};
        const int reps = 50;
        std::vector<Row> rows;
        uint64_t seed = 1234;

        for (const auto& s : shapes) {
            for (bool nvfp4 : {true, false}) {
                const size_t wbytes = nvfp4 ? static_cast<size_t>(s.n * s.k / 2) : static_cast<size_t>(s.n * s.k * 2);
                const size_t sbytes = nvfp4 ? static_cast<size_t>(s.n * s.k / 16) : 0;
                const size_t copies = std::max<size_t>(
                    2, (4 * static_cast<size_t>(prop.l2CacheSize) + wbytes + sbytes - 1) / (wbytes + sbytes));
                std::vector<DeviceBuffer> w, sc;
                for (size_t c = 0; c < copies; ++c) {
                    w.emplace_back(wbytes);
                    // NVFP4 codes: any byte. BF16: random sign and mantissa, exponent 120..127 (|v| < 2).
                    nibble::cuda::fill_random_u32(w.back().as<uint32_t>(), wbytes / 4, ++seed,
                                                  nvfp4 ? ~0u : 0x83ff83ffu, nvfp4 ? 0u : 0x3c003c00u, stream);
                    if (nvfp4) {
                        sc.emplace_back(sbytes);
                        // E4M3 scales 0x20..0x3f: 2^-3 .. 1.875, never NaN.
                        nibble::cuda::fill_random_u32(sc.back().as<uint32_t>(), sbytes / 4, ++seed, 0x1f1f1f1fu,
                                                      0x20202020u, stream);
                    }
                }
                const int max_m = 16;
                DeviceBuffer x(static_cast<size_t>(max_m * s.k * 2)), y(static_cast<size_t>(max_m * s.n * 2));
                nibble::cuda::fill_random_u32(x.as<uint32_t>(), x.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u,
                                              stream);
                NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
                for (int m : ms_list)
                    // nvfp4: 0 mma (v2), 1 cuda-core (v1), 2 pipelined (v3, k split from the shape), 3..5 v3
                    // with k split forced to 1, 2, 4, 6 v3 launched programmatically (PDL), 7 v3 with the
                    // 4-stage ring (gemv_nvfp4_pipelined_deep).
                    for (int variant = 0; variant < (nvfp4 ? 8 : 1); ++variant) {
                        static const char* const kNvfp4Formats[] = {
                            "nvfp4",      "nvfp4-v1",   "nvfp4-v3",    "nvfp4-v3k1",
                            "nvfp4-v3k2", "nvfp4-v3k4", "nvfp4-v3pdl", "nvfp4-v3deep"};
                        const std::string format = !nvfp4 ? "bf16" : kNvfp4Formats[variant];
                        size_t next = 0;
                        auto launch = [&] {
                            for (size_t c = 0; c < copies; ++c, ++next) {
                                const size_t i = next % copies;
                                if (nvfp4) {
                                    nibble::cuda::Nvfp4DeviceWeight dw{w[i].as<uint8_t>(),
                                                                       sc[i].as<uint8_t>(), 0.01f, s.n, s.k};
                                    if (variant == 0)
                                        nibble::cuda::gemv_nvfp4_mma(x.get(), DType::BF16, m, dw, nullptr,
                                                                     y.get(), stream);
                                    else if (variant == 1)
                                        nibble::cuda::gemv_nvfp4_cuda_core(x.get(), DType::BF16, m, dw,
                                                                           nullptr, y.get(), stream);
                                    else if (variant == 7)
                                        nibble::cuda::gemv_nvfp4_pipelined_deep(x.get(), DType::BF16, m, dw,
                                                                                nullptr, y.get(), stream);
                                    else
                                        nibble::cuda::gemv_nvfp4_pipelined(
                                            x.get(), DType::BF16, m, dw, nullptr, y.get(), stream,
                                            variant == 2 || variant == 6 ? 0 : 1 << (variant - 3));
                                } else {
                                    nibble::cuda::gemv_bf16(x.get(), DType::BF16, m, w[i].as<uint16_t>(), s.n,
                                                            s.k, nullptr, y.get(), stream);
                                }
                            }
                        };
                        const double ms = time_ms(stream, 2, reps, launch) / static_cast<double>(copies);
                        const double bytes = static_cast<double>(wbytes + sbytes) + 2.0 * m * (s.k + s.n);
                        const double gbps = bytes / (ms * 1e-3) / 1e9;
                        rows.push_back({s.name, format, m, ms * 1e3, gbps, gbps / copy_gbps});
                        std::printf("%-20s %-12s m=%-2d copies=%-3zu %9.2f us %7.0f GB/s %5.1f%% of copy\n",
                                    s.name, format.c_str(), m, copies, ms * 1e3, gbps,
                                    100 * gbps / copy_gbps);
                    }
            }
        }

        std::printf(
            "\n| shape | m | nvfp4 us | nvfp4 GB/s | %% copy | v1 us | %% copy | v3 us | v3 GB/s | "
            "%% copy | v3 k1 / k2 / k4 %% copy | v3 PDL us | %% copy | v3 deep us | %% copy | bf16 us | "
            "bf16 GB/s | %% copy | bf16/nvfp4 time | bf16/v3 time |\n");
        std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (const auto& r : rows) {
            if (r.format != "nvfp4") continue;
            auto find = [&](const char* f) {
                return std::find_if(rows.begin(), rows.end(),
                                    [&](const Row& o) { return o.format == f && o.shape == r.shape && o.m == r.m; });
            };
            const auto b = find("bf16"), v1 = find("nvfp4-v1"), v3 = find("nvfp4-v3"),
                       k1 = find("nvfp4-v3k1"), k2 = find("nvfp4-v3k2"), k4 = find("nvfp4-v3k4"),
                       pdl = find("nvfp4-v3pdl"), deep = find("nvfp4-v3deep");
            std::printf(
                "| %s | %d | %.1f | %.0f | %.0f%% | %.1f | %.0f%% | %.1f | %.0f | %.0f%% | "
                "%.0f / %.0f / %.0f%% | %.1f | %.0f%% | %.1f | %.0f%% | %.1f | %.0f | %.0f%% | %.2fx | %.2fx "
                "|\n",
                r.shape.c_str(), r.m, r.us, r.gbps, 100 * r.frac, v1->us, 100 * v1->frac, v3->us, v3->gbps,
                100 * v3->frac, 100 * k1->frac, 100 * k2->frac, 100 * k4->frac, pdl->us, 100 * pdl->frac,
                deep->us, 100 * deep->frac, b->us, b->gbps, 100 * b->frac, b->us / r.us, b->us / v3->us);
        }
        bench_gemv_fused(prop, stream, copy_gbps);
        std::printf("copy bandwidth (read + write): %.0f GB/s\n", copy_gbps);
        NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "nibble-kernel-bench: %s\n", e.what());
        return 1;
    }
}
