// nibble-kernel-bench: times the decode GEMV kernels (NVFP4 on the tensor cores, the previous CUDA-core
// NVFP4 kernel, and BF16 weights; BF16 activations) at the Llama-3.1-8B projection shapes for m = 1, 4, 8,
// 16, against the card's measured device-to-device copy
// bandwidth. Method: random weights filled on the device (never zeros); several weight copies, together
// at least 4x the L2 size, launched in turn so each launch streams its weights from HBM; a warm-up batch;
// then >= 50 timed batches (CUDA events around one launch per copy), reporting the median time per launch.
// Bandwidth counts the bytes each launch must move: weights (+ NVFP4 scales), activations, outputs.
// The copy reference is the median of 20 cudaMemcpy of 1 GiB, counted as bytes read + bytes written.
// Decode attention over the paged KV cache (Llama-3.1-8B attention: 32 query heads, 8 KV heads, head_dim
// 128, block size 16, shuffled block tables) at contexts 4K/32K/128K, batch 1/8/32, per KV dtype: one
// layer's attention per launch (split-K + combine), enough layer copies to be >= 4x the L2, reporting the
// GB/s of KV bytes read. Prefill attention (same shape): 512 new query tokens of one sequence after 0, 8K,
// 32K and 64K cached tokens, per KV dtype, one layer per launch (the launcher's kernel and splits), reporting
// TFLOP/s with FLOPs = 4 * head_dim * n_heads * (attended (query, key) pairs, causal counted exactly:
// sum over the 512 queries of depth + i + 1), and what 32 such layers cost per token (the attention share of
// a Llama-3.1-8B pp512 at that depth). `nibble-kernel-bench gemv`, `attention` or `prefill` runs one part;
// no argument runs all three.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/fill_random.h"
#include "ops/attention/attention_cuda.h"
#include "ops/linear/linear_cuda.h"

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

// Decode attention: bytes of K and V read per launch over time, per KV dtype, context and batch.
void bench_attention(const cudaDeviceProp& prop, cudaStream_t stream, double copy_gbps) {
    using nibble::KvDtype;
    const int64_t n_heads = 32, nkv = 8, hd = 128, bs = 16;
    const int64_t contexts[] = {4096, 32768, 131072};
    const int64_t batches[] = {1, 8, 32};
    const KvDtype dtypes[] = {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4};
    struct ARow {
        int64_t ctx, batch;
        KvDtype dt;
        double us, gbps;
        int splits;
    };
    std::vector<ARow> rows;
    uint64_t seed = 99;
    std::mt19937_64 rng(7);
    for (int64_t ctx : contexts) {
        for (int64_t batch : batches) {
            const int64_t blocks_per_seq = ctx / bs, n_blocks = batch * blocks_per_seq;
            // Shuffled physical blocks, one table row per sequence.
            std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
            std::iota(ids.begin(), ids.end(), 0);
            std::shuffle(ids.begin(), ids.end(), rng);
            std::vector<int32_t> q_start(static_cast<size_t>(batch + 1)), start_pos(static_cast<size_t>(batch), static_cast<int32_t>(ctx - 1));
            for (int64_t s = 0; s <= batch; ++s) q_start[static_cast<size_t>(s)] = static_cast<int32_t>(s);
            DeviceBuffer d_bt(ids.size() * 4), d_qs(q_start.size() * 4), d_sp(start_pos.size() * 4);
            d_bt.upload(ids.data(), d_bt.bytes());
            d_qs.upload(q_start.data(), d_qs.bytes());
            d_sp.upload(start_pos.data(), d_sp.bytes());
            nibble::cuda::AttentionBatch b{batch, batch, d_qs.as<int32_t>(), d_sp.as<int32_t>(), d_bt.as<int32_t>(),
                                           blocks_per_seq, 1, ctx};
            DeviceBuffer q(static_cast<size_t>(batch * n_heads * hd * 2)), out(q.bytes());
            nibble::cuda::fill_random_u32(q.as<uint32_t>(), q.bytes() / 4, ++seed, 0x83ff83ffu, 0x3c003c00u, stream);
            const int splits = nibble::cuda::paged_attention_splits(b, nkv, n_heads, prop.multiProcessorCount);
            const size_t ws_bytes = nibble::cuda::paged_attention_workspace_bytes(splits, batch, n_heads, hd);
            DeviceBuffer ws(std::max<size_t>(ws_bytes, 16));
            for (KvDtype dt : dtypes) {
                const int64_t row_bytes = dt == KvDtype::Bf16 ? hd * 2 : dt == KvDtype::Fp8 ? hd : hd / 2 + hd / 16;
                const int64_t block_bytes = (bs * nkv * row_bytes + 15) / 16 * 16;
                const size_t layer_bytes = static_cast<size_t>(n_blocks * block_bytes);
                const size_t copies = std::max<size_t>(
                    1, (4 * static_cast<size_t>(prop.l2CacheSize) + 2 * layer_bytes - 1) / (2 * layer_bytes));
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
                auto launch = [&] {
                    for (size_t c = 0; c < copies; ++c, ++next) {
                        const size_t i = next % copies;
                        nibble::cuda::PagedKvLayer kv{kb[i].as<uint8_t>(), vb[i].as<uint8_t>(), n_blocks, block_bytes, bs,
                                                      nkv, hd, dt, 0.01f, 0.01f};
                        nibble::cuda::paged_attention(q.get(), DType::BF16, kv, b,
                                                      nibble::cuda::AttentionArgs{n_heads, 0.088f, 0}, splits, ws.get(),
                                                      ws_bytes, out.get(), stream);
                    }
                };
                const int reps = ctx * batch >= 32768 * 8 ? 10 : 30;
                const double ms = time_ms(stream, 2, reps, launch) / static_cast<double>(copies);
                const double bytes = 2.0 * static_cast<double>(batch * ctx * nkv * row_bytes);
                const double gbps = bytes / (ms * 1e-3) / 1e9;
                rows.push_back({ctx, batch, dt, ms * 1e3, gbps, splits});
                std::printf("attention decode ctx=%-6lld batch=%-2lld %-5s splits=%-3d copies=%-3zu %9.1f us %7.0f GB/s %5.1f%% of copy\n",
                            static_cast<long long>(ctx), static_cast<long long>(batch),
                            dt == KvDtype::Bf16 ? "bf16" : dt == KvDtype::Fp8 ? "fp8" : "nvfp4", splits, copies, ms * 1e3, gbps,
                            100 * gbps / copy_gbps);
            }
        }
    }
    std::printf("\n| context | batch | splits | bf16 us | GB/s | %% copy | fp8 us | GB/s | %% copy | nvfp4 us | GB/s | %% copy | bf16/nvfp4 time |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i + 2 < rows.size(); i += 3) {
        const ARow &a = rows[i], &f = rows[i + 1], &n = rows[i + 2];
        std::printf("| %lldK | %lld | %d | %.1f | %.0f | %.0f%% | %.1f | %.0f | %.0f%% | %.1f | %.0f | %.0f%% | %.2fx |\n",
                    static_cast<long long>(a.ctx / 1024), static_cast<long long>(a.batch), a.splits, a.us, a.gbps,
                    100 * a.gbps / copy_gbps, f.us, f.gbps, 100 * f.gbps / copy_gbps, n.us, n.gbps,
                    100 * n.gbps / copy_gbps, a.us / n.us);
    }
}

// Prefill attention: 512 query tokens after `depth` cached ones, TFLOP/s per KV dtype.
void bench_prefill_attention(const cudaDeviceProp& prop, cudaStream_t stream) {
    using nibble::KvDtype;
    const int64_t n_heads = 32, nkv = 8, hd = 128, bs = 16, n_q = 512, n_layers = 32;
    const int64_t depths[] = {0, 8192, 32768, 65536};
    const KvDtype dtypes[] = {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4};
    struct PRow {
        int64_t depth;
        KvDtype dt;
        double us, tflops;
        int splits;
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
        const int splits = nibble::cuda::paged_attention_splits(b, nkv, n_heads, prop.multiProcessorCount);
        const size_t ws_bytes = nibble::cuda::paged_attention_workspace_bytes(splits, n_q, n_heads, hd);
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
            auto launch = [&] {
                for (size_t c = 0; c < copies; ++c, ++next) {
                    const size_t i = next % copies;
                    nibble::cuda::PagedKvLayer kv{kb[i].as<uint8_t>(), vb[i].as<uint8_t>(), n_blocks, block_bytes, bs,
                                                  nkv, hd, dt, 0.01f, 0.01f};
                    nibble::cuda::paged_attention(q.get(), DType::BF16, kv, b,
                                                  nibble::cuda::AttentionArgs{n_heads, 0.088f, 0}, splits, ws.get(),
                                                  ws_bytes, out.get(), stream);
                }
            };
            const int reps = depth >= 32768 ? 10 : 20;
            const double ms = time_ms(stream, 2, reps, launch) / static_cast<double>(copies);
            const double tflops = flops / (ms * 1e-3) / 1e12;
            rows.push_back({depth, dt, ms * 1e3, tflops, splits});
            std::printf("attention prefill q=%lld depth=%-6lld %-5s splits=%-2d copies=%-3zu %9.1f us %6.1f TFLOP/s "
                        "(%.3g FLOP)  32 layers: %.0f tok/s\n",
                        static_cast<long long>(n_q), static_cast<long long>(depth),
                        dt == KvDtype::Bf16 ? "bf16" : dt == KvDtype::Fp8 ? "fp8" : "nvfp4", splits, copies, ms * 1e3,
                        tflops, flops, static_cast<double>(n_q) / (n_layers * ms * 1e-3));
        }
    }
    std::printf("\n| depth | splits | bf16 us | TFLOP/s | fp8 us | TFLOP/s | nvfp4 us | TFLOP/s | nvfp4/bf16 time | "
                "attention-only pp512 tok/s (32 layers, bf16 / nvfp4) |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i + 2 < rows.size(); i += 3) {
        const PRow &a = rows[i], &f = rows[i + 1], &n = rows[i + 2];
        std::printf("| %lldK | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2fx | %.0f / %.0f |\n",
                    static_cast<long long>(a.depth / 1024), a.splits, a.us, a.tflops, f.us, f.tflops, n.us, n.tflops,
                    n.us / a.us, static_cast<double>(n_q) / (n_layers * a.us * 1e-6),
                    static_cast<double>(n_q) / (n_layers * n.us * 1e-6));
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
        if (part == "attention" || part == "all") bench_attention(prop, stream, copy_gbps);
        if (part == "prefill" || part == "all") bench_prefill_attention(prop, stream);
        if (part == "attention" || part == "prefill") {
            NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            return 0;
        }
        const Shape shapes[] = {{"qkvo 4096x4096", 4096, 4096},
                                {"gate/up 14336x4096", 14336, 4096},
                                {"down 4096x14336", 4096, 14336},
                                {"lm_head 128256x4096", 128256, 4096}};
        const int ms_list[] = {1, 4, 8, 16};
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
                    for (int variant = 0; variant < (nvfp4 ? 2 : 1); ++variant) {  // nvfp4: 0 mma, 1 cuda-core
                    const std::string format = !nvfp4 ? "bf16" : variant == 0 ? "nvfp4" : "nvfp4-v1";
                    size_t next = 0;
                    auto launch = [&] {
                        for (size_t c = 0; c < copies; ++c, ++next) {
                            const size_t i = next % copies;
                            if (nvfp4) {
                                nibble::cuda::Nvfp4DeviceWeight dw{w[i].as<uint8_t>(), sc[i].as<uint8_t>(), 0.01f, s.n,
                                                                   s.k};
                                if (variant == 0)
                                    nibble::cuda::gemv_nvfp4_mma(x.get(), DType::BF16, m, dw, nullptr, y.get(), stream);
                                else
                                    nibble::cuda::gemv_nvfp4_cuda_core(x.get(), DType::BF16, m, dw, nullptr, y.get(),
                                                                       stream);
                            } else {
                                nibble::cuda::gemv_bf16(x.get(), DType::BF16, m, w[i].as<uint16_t>(), s.n, s.k, nullptr,
                                                        y.get(), stream);
                            }
                        }
                    };
                    const double ms = time_ms(stream, 2, reps, launch) / static_cast<double>(copies);
                    const double bytes = static_cast<double>(wbytes + sbytes) + 2.0 * m * (s.k + s.n);
                    const double gbps = bytes / (ms * 1e-3) / 1e9;
                    rows.push_back({s.name, format, m, ms * 1e3, gbps, gbps / copy_gbps});
                    std::printf("%-20s %-8s m=%-2d copies=%-3zu %9.2f us %7.0f GB/s %5.1f%% of copy\n", s.name,
                                format.c_str(), m, copies, ms * 1e3, gbps, 100 * gbps / copy_gbps);
                }
            }
        }

        std::printf("\n| shape | m | nvfp4 us | nvfp4 GB/s | %% copy | v1 us | %% copy | bf16 us | bf16 GB/s | %% copy | bf16/nvfp4 time |\n");
        std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (const auto& r : rows) {
            if (r.format != "nvfp4") continue;
            auto find = [&](const char* f) {
                return std::find_if(rows.begin(), rows.end(),
                                    [&](const Row& o) { return o.format == f && o.shape == r.shape && o.m == r.m; });
            };
            const auto b = find("bf16"), v1 = find("nvfp4-v1");
            std::printf("| %s | %d | %.1f | %.0f | %.0f%% | %.1f | %.0f%% | %.1f | %.0f | %.0f%% | %.2fx |\n", r.shape.c_str(),
                        r.m, r.us, r.gbps, 100 * r.frac, v1->us, 100 * v1->frac, b->us, b->gbps, 100 * b->frac,
                        b->us / r.us);
        }
        std::printf("copy bandwidth (read + write): %.0f GB/s\n", copy_gbps);
        NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "nibble-kernel-bench: %s\n", e.what());
        return 1;
    }
}
