// `nibble bench`: llama-bench-style throughput of the CUDA backend. For each KV cache dtype and depth d:
//   pp<P> @ d<D>: one prompt of P tokens prefilled on top of D cached tokens (tokens/s of the prompt);
//   tg<N> @ d<D>: N greedy decode steps of one sequence after D cached tokens (tokens/s generated);
//   tg<N> xB @ d<D> (-b B, B > 1): the same with B sequences decoding together, one token each a step
//   (tokens/s generated over all B; each sequence has its own D cached tokens).
// Each figure is the mean and standard deviation over -r repeats, and is quoted against its physical limit,
// measured on the card in the same run: generation against copy bandwidth over the bytes one token reads
// (every weight once plus the KV cache at that depth; a MoE layer's router and top_k experts only; a batched
// step's B tokens read the experts B tokens pick on average under uniform routing, and B caches), prompt
// processing against the BF16 matrix rate over the FLOPs one token needs (the weights it passes through and
// attention). Models come from a checkpoint (--model DIR) or are
// random weights of a real architecture's shape made on the device (--synthetic llama3-8b). Hybrid models
// (NemotronH, --synthetic nemotron-3-nano-30b-a3b) run through the hybrid forward with one state slot; their
// token bytes add the Mamba state read and written, their FLOPs count the attention layers only.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "cli/commands.h"
#include "ops/attention/kv_cache.h"
#if defined(NIBBLE_HAVE_CUDA)
#include "cuda/device_info.h"
#include <cuda_runtime.h>

#include <exception>
#include <thread>

#include "cuda/cuda_check.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/device_hybrid.h"
#include "gpu/device_limits.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "parallel/nccl_communicator.h"
#include "tune/device_profile.h"
#include "tune/eligibility.h"
#include "tune/kernel_choices.h"
#include "tune/tune_cache.h"
#endif

namespace nibble::cli {
namespace {

struct BenchOptions {
    std::string model_dir;
    std::string synthetic;
    std::string weights = "nvfp4";  // synthetic: nvfp4 or bf16
    bool lm_head_nvfp4 = false;
    std::vector<int64_t> prompt = {512};
    std::vector<int64_t> gen = {128};
    std::vector<int64_t> depth = {0};
    std::vector<int64_t> batch = {1};  // sequences decoding together in the tg tests
    std::vector<std::string> kv = {"bf16"};
    int repeats = 5;
    std::string output = "md";
    int64_t prefill_chunk = 2048;
    bool enforce_eager = false;
    bool unfused = false;
    std::string tune;  // off | cached; empty: cached when this GPU has a tune cache
    int64_t tensor_parallel_size = 1;  // -tp: one thread per GPU, one NCCL group (GPUs 0 .. N-1)
    int master_port = 29511;           // the group's NCCL rendezvous on 127.0.0.1
};

template <class T>
std::vector<T> split_list(const std::string& text, const char* flag) {
    std::vector<T> out;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, ',')) {
        if constexpr (std::is_same_v<T, std::string>) {
            out.push_back(item);
        } else {
            size_t used = 0;
            long long v = 0;
            try {
                v = std::stoll(item, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            NIBBLE_CHECK(used == item.size() && !item.empty() && v >= 0, "{} {}: '{}' is not a non-negative integer",
                         flag, text, item);
            out.push_back(static_cast<T>(v));
        }
    }
    NIBBLE_CHECK(!out.empty(), "{}: empty list", flag);
    return out;
}

#if defined(NIBBLE_HAVE_CUDA)

struct Stat {
    double mean = 0, stddev = 0;
};
Stat stat_of(const std::vector<double>& v) {
    Stat s;
    for (double x : v) s.mean += x;
    s.mean /= static_cast<double>(v.size());
    for (double x : v) s.stddev += (x - s.mean) * (x - s.mean);
    s.stddev = v.size() > 1 ? std::sqrt(s.stddev / static_cast<double>(v.size() - 1)) : 0.0;
    return s;
}

struct Row {
    std::string kv, test;
    int64_t depth = 0;
    Stat tps;
    double limit_tps = 0;  // the physical bound for this test
    std::string limit_kind;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// FLOPs of one prompt of p tokens on top of d cached ones: 2 per weight a token passes through per token (MoE
// layers: the router and its top_k experts; lm_head for the last token only) plus attention's
// 4 * heads * head_dim per (query, visible key) pair.
int64_t attention_layers(const gpu::DeviceDecoder& w) { return w.config.n_layers; }
int64_t attention_layers(const gpu::DeviceHybrid& w) { return w.n_attention; }
// Recurrent state a decode step reads and writes (hybrid models: every Mamba layer's conv and SSM state).
int64_t state_bytes_per_token(const gpu::DeviceDecoder&) { return 0; }
int64_t state_bytes_per_token(const gpu::DeviceHybrid& w) { return 2 * w.state_shape(SsmStateDtype::F32).bytes(); }

template <class Weights>
double prompt_flops(const Weights& w, int64_t p, int64_t d) {
    const ModelConfig& c = w.config;
    const double linear_params = static_cast<double>(w.active_linear_params());
    const double pairs = static_cast<double>(p) * static_cast<double>(d) + static_cast<double>(p) * (p + 1) / 2.0;
    const double attn =
        4.0 * static_cast<double>(c.n_heads * c.head_dim) * pairs * static_cast<double>(attention_layers(w));
    return 2.0 * linear_params * static_cast<double>(p) + 2.0 * static_cast<double>(w.lm_head.n_out * w.lm_head.n_in) + attn;
}

// Bytes one decode step of `seqs` sequences reads at cache length `len` each: every streamed weight once (MoE
// layers: the router and the experts the step's tokens pick, top_k for one token), each sequence's KV cache,
// recurrent state and embedding row.
template <class Weights>
double step_bytes(const Weights& w, const KvCacheShape& kv, double len, int64_t seqs) {
    const auto n = static_cast<double>(seqs);
    return w.streamed_bytes_per_step(seqs) +
           n * (len * static_cast<double>(kv.bytes_per_token()) + static_cast<double>(w.config.n_embd * 2) +
                static_cast<double>(state_bytes_per_token(w)));
}

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int64_t n, int64_t vocab) {
    std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = dist(rng);
    return t;
}

// --tune: this GPU's tune cache as kernel choices (null: off, or no usable cache under "cached" by default).
std::shared_ptr<tune::KernelChoices> bench_kernel_choices(const std::string& mode) {
    NIBBLE_CHECK(mode.empty() || mode == "off" || mode == "cached", "--tune {}: off or cached", mode);
    if (mode == "off") {
        log::info("--tune off: kernels use their built-in choices");
        return nullptr;
    }
    const tune::DeviceProfile device = tune::profile_from_device(cuda::query_device(0));
    const tune::CacheKey key = tune::cache_key_for(device);
    std::string path;
    try {
        path = tune::tune_cache_path(tune::tune_cache_dir(), key);
    } catch (const Error& e) {
        NIBBLE_CHECK(mode.empty(), "--tune cached: {}", e.what());
        log::info("no tune cache directory ({}); kernels use their built-in choices", e.what());
        return nullptr;
    }
    const std::optional<tune::TuneCache> cache = tune::load_tune_cache(path, key);
    if (!cache) {
        NIBBLE_CHECK(mode.empty(), "--tune cached: no usable tune cache for {} at {} (run `nibble tune MODEL_DIR`)",
                     device.name, path);
        log::info("no tune cache for {} at {}; kernels use their built-in choices", device.name, path);
        return nullptr;
    }
    log::info("tune cache: {} kernel choices for {} ({})", cache->choices().size(), device.name, path);
    return std::make_shared<tune::KernelChoices>(&*cache, device, tune::BuildTargets::configured());
}

template <class Weights>
void log_weights(const std::string& name, const Weights& w, double seconds) {
    log::info("{}: {:.2f} GB of weights on the device in {:.1f} s; {:.3f} GB streamed per token", name,
              static_cast<double>(w.device_bytes()) / 1e9, seconds, w.streamed_bytes_per_step(1) / 1e9);
}

// The tests of every KV dtype on one rank's weights. Under tensor parallelism every rank runs this with the
// same options at once (the same random tokens: every rank's generator starts alike, and greedy tokens come
// from the gathered logits every rank holds), so their collectives match; rank 0's rows are the report.
template <class Weights>
std::vector<Row> bench_rank(const BenchOptions& o, const std::vector<KvDtype>& kv_dtypes,
                            const std::shared_ptr<const Weights>& weights, const gpu::DeviceLimits& limits,
                            const std::shared_ptr<tune::KernelChoices>& kernel_choices, Communicator* comm,
                            cudaStream_t stream) {
    const ModelConfig& c = weights->config;
    const int64_t max_p = *std::max_element(o.prompt.begin(), o.prompt.end());
    const int64_t max_n = *std::max_element(o.gen.begin(), o.gen.end());
    const int64_t max_d = *std::max_element(o.depth.begin(), o.depth.end());
    const int64_t max_b = *std::max_element(o.batch.begin(), o.batch.end());
    const int64_t block = 16;
    const int64_t max_len = max_d + std::max(max_p, max_n) + block;
    const int64_t blocks = (max_len + block - 1) / block;
    // Sequence s's blocks: s * blocks .. (s + 1) * blocks - 1 (sequence 0 runs the pp tests).
    std::vector<std::vector<int32_t>> tables(static_cast<size_t>(max_b),
                                             std::vector<int32_t>(static_cast<size_t>(blocks)));
    for (int64_t s = 0; s < max_b; ++s)
        for (int64_t i = 0; i < blocks; ++i)
            tables[static_cast<size_t>(s)][static_cast<size_t>(i)] = static_cast<int32_t>(s * blocks + i);
    std::mt19937_64 rng(42);

    std::vector<Row> rows;
    for (KvDtype kv : kv_dtypes) {
        gpu::CudaModelRunner runner(weights,
                                    {.kv_dtype = kv,
                                     .num_blocks = blocks * max_b,
                                     .block_size = block,
                                     .max_model_len = max_len,
                                     .max_num_batched_tokens = std::max({max_p, o.prefill_chunk, max_b}),
                                     .max_num_seqs = max_b,
                                     .act_dtype = DType::BF16,
                                     .max_cudagraph_capture_size = o.enforce_eager ? 0 : max_b,
                                     .fused_gemv = !o.unfused,
                                     .kernel_choices = kernel_choices,
                                     .num_state_slots = max_b,
                                     .stream = stream});
        if constexpr (std::is_same_v<Weights, gpu::DeviceDecoder>) runner.set_communicator(comm);
        const KvCacheShape& shape = runner.kv_cache().shape();
        std::vector<float> logits;
        std::vector<int32_t> next;
        auto prefill_seq = [&](int64_t seq, const std::vector<int32_t>& tokens, int64_t start) {
            const RunnerSequence s{.tokens = tokens,
                                   .block_table = tables[static_cast<size_t>(seq)],
                                   .start_pos = start,
                                   .needs_logits = true,
                                   .state_slot = static_cast<int32_t>(seq)};
            runner.execute_greedy(std::span(&s, 1), next);
        };
        auto prefill = [&](const std::vector<int32_t>& tokens, int64_t start) {
            prefill_seq(0, tokens, start);
        };
        for (int64_t d : o.depth) {
            // Fill sequence 0's cache to depth d (untimed), in chunks; the other sequences' before the first
            // batched test.
            auto fill = [&](int64_t seq) {
                for (int64_t at = 0; at < d; at += o.prefill_chunk)
                    prefill_seq(seq, random_tokens(rng, std::min(o.prefill_chunk, d - at), c.vocab_size), at);
            };
            fill(0);
            bool others_filled = false;
            for (int64_t p : o.prompt) {
                if (p == 0) continue;
                std::vector<double> tps;
                const std::vector<int32_t> prompt = random_tokens(rng, p, c.vocab_size);
                prefill(prompt, d);  // warm-up: cuBLASLt plans, first-touch
                for (int r = 0; r < o.repeats; ++r) {
                    const auto t0 = std::chrono::steady_clock::now();
                    prefill(prompt, d);
                    tps.push_back(static_cast<double>(p) / seconds_since(t0));
                }
                const double flops_per_token = prompt_flops(*weights, p, d) / static_cast<double>(p);
                rows.push_back({kv_dtype_name(kv).data(), "pp" + std::to_string(p), d, stat_of(tps),
                                limits.bf16_flops_per_s / flops_per_token, "BF16 matmul"});
            }
            for (int64_t b : o.batch)
                for (int64_t n : o.gen) {
                    if (n == 0 || b == 0) continue;
                    if (b > 1 && !others_filled) {
                        for (int64_t seq = 1; seq < max_b; ++seq) fill(seq);
                        others_filled = true;
                    }
                    std::vector<double> tps;
                    std::vector<std::vector<int32_t>> tok(static_cast<size_t>(b));
                    std::vector<RunnerSequence> seqs(static_cast<size_t>(b));
                    for (int r = 0; r <= o.repeats; ++r) {  // the first run warms up
                        for (auto& t : tok)
                            t = {static_cast<int32_t>(rng() % static_cast<uint64_t>(c.vocab_size))};
                        const auto t0 = std::chrono::steady_clock::now();
                        for (int64_t i = 0; i < n; ++i) {
                            for (int64_t q = 0; q < b; ++q) {
                                const auto qi = static_cast<size_t>(q);
                                seqs[qi] = {.tokens = tok[qi],
                                            .block_table = tables[qi],
                                            .start_pos = d + i,
                                            .needs_logits = true,
                                            .state_slot = static_cast<int32_t>(q)};
                            }
                            runner.execute_greedy(std::span(seqs), next);
                            for (int64_t q = 0; q < b; ++q)
                                tok[static_cast<size_t>(q)][0] = next[static_cast<size_t>(q)];
                        }
                        if (r > 0) tps.push_back(static_cast<double>(n * b) / seconds_since(t0));
                    }
                    const double len = static_cast<double>(d) + static_cast<double>(n) / 2.0;
                    const double bytes = step_bytes(*weights, shape, len, b);
                    rows.push_back({kv_dtype_name(kv).data(),
                                    "tg" + std::to_string(n) + (b > 1 ? " x" + std::to_string(b) : ""), d,
                                    stat_of(tps), static_cast<double>(b) * limits.copy_bytes_per_s / bytes,
                                    "copy bandwidth"});
                }
        }
    }

    return rows;
}

// -tp N: rank r on GPU r in its own thread, the ranks one NCCL group (bootstrapped over 127.0.0.1); each
// rank makes or uploads its own shard. Returns rank 0's rows; `weights` becomes rank 0's shard.
std::vector<Row> bench_tensor_parallel(const BenchOptions& o, const std::vector<KvDtype>& kv_dtypes,
                                       const gpu::DeviceLimits& limits,
                                       std::shared_ptr<const gpu::DeviceDecoder>& weights, std::string& model_name) {
    const int64_t tp = o.tensor_parallel_size;
    const auto t_load = std::chrono::steady_clock::now();
    ThreadPool pool(0);
    std::unique_ptr<Model> model;
    DecoderView view;
    ModelConfig config;
    if (!o.synthetic.empty()) {
        config = gpu::synthetic_config(o.synthetic);
        model_name = o.synthetic + " " + o.weights +
                     (o.weights == "nvfp4" ? (o.lm_head_nvfp4 ? " (lm_head nvfp4)" : " (lm_head bf16)") : "");
    } else {
        model = load_model(o.model_dir, pool);
        NIBBLE_CHECK(model->decoder_view(view), "{}: {} is not a decoder the CUDA backend runs", o.model_dir,
                     model->config().arch_name);
        config = model->config();
        model_name = o.model_dir;
    }
    check_tensor_parallel(config, tp);
    model_name += " TP=" + std::to_string(tp);
    std::vector<std::exception_ptr> errors(static_cast<size_t>(tp));
    std::vector<Row> rows;
    std::vector<std::thread> ranks;
    for (int64_t r = 0; r < tp; ++r)
        ranks.emplace_back([&, r] {
            try {
                NIBBLE_CUDA_CHECK(cudaSetDevice(static_cast<int>(r)));
                auto shard = std::make_shared<const gpu::DeviceDecoder>(
                    model ? gpu::upload_decoder_rank(config, model->quant_config(), view, tp, r)
                          : gpu::synthetic_decoder_rank(
                                config, {.nvfp4 = o.weights == "nvfp4", .lm_head_nvfp4 = o.lm_head_nvfp4, .seed = 1},
                                tp, r));
                if (r == 0) log_weights(model_name + ", rank 0", *shard, seconds_since(t_load));
                cudaStream_t stream = nullptr;
                NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
                {
                    NcclCommunicator comm({.world_size = static_cast<int>(tp), .rank = static_cast<int>(r),
                                           .device = static_cast<int>(r), .master_addr = "127.0.0.1",
                                           .master_port = o.master_port, .timeout_ms = 120000},
                                          stream);
                    // Kernel choices record launches and failures: one set per rank thread.
                    std::vector<Row> mine =
                        bench_rank(o, kv_dtypes, shard, limits, bench_kernel_choices(o.tune), &comm, stream);
                    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
                    if (r == 0) {
                        rows = std::move(mine);
                        weights = shard;
                    }
                }
                (void)cudaStreamDestroy(stream);
            } catch (...) {
                errors[static_cast<size_t>(r)] = std::current_exception();
            }
        });
    for (std::thread& t : ranks) t.join();
    for (int64_t r = 0; r < tp; ++r)
        if (errors[static_cast<size_t>(r)]) {
            try {
                std::rethrow_exception(errors[static_cast<size_t>(r)]);
            } catch (const std::exception& e) {
                fail("-tp {}: rank {} failed: {}", tp, r, e.what());
            }
        }
    return rows;
}

void run_bench(const BenchOptions& o) {
    NIBBLE_CHECK(o.model_dir.empty() != o.synthetic.empty(), "nibble bench: give exactly one of --model DIR and --synthetic NAME");
    NIBBLE_CHECK(o.weights == "nvfp4" || o.weights == "bf16", "--weights {}: nvfp4 or bf16", o.weights);
    NIBBLE_CHECK(o.output == "md" || o.output == "json", "-o {}: md or json", o.output);
    NIBBLE_CHECK(o.repeats >= 1, "-r {}: at least 1", o.repeats);
    NIBBLE_CHECK(o.tune.empty() || o.tune == "off" || o.tune == "cached", "--tune {}: off or cached", o.tune);
    std::vector<KvDtype> kv_dtypes;
    for (const std::string& name : o.kv) {
        const auto t = kv_dtype_from_name(name);
        NIBBLE_CHECK(t && *t != KvDtype::F32, "--kv-cache-dtype {}: bf16, fp8 or nvfp4", name);
        kv_dtypes.push_back(*t);
    }

    const gpu::DeviceLimits limits = gpu::measure_device_limits();
    log::info("{}: copy {:.0f} GB/s, BF16 matmul {:.0f} TFLOP/s (measured now)", limits.device_name,
              limits.copy_bytes_per_s / 1e9, limits.bf16_flops_per_s / 1e12);

    const int64_t tp = o.tensor_parallel_size;
    NIBBLE_CHECK(tp >= 1, "-tp {}: at least 1", tp);
    NIBBLE_CHECK(tp == 1 || cuda::device_count() >= tp, "-tp {}: this machine has {} CUDA devices", tp,
                 cuda::device_count());
    std::shared_ptr<const gpu::DeviceDecoder> weights;
    std::string model_name;
    const auto t_load = std::chrono::steady_clock::now();
    std::vector<Row> rows;
    if (tp > 1) {
        rows = bench_tensor_parallel(o, kv_dtypes, limits, weights, model_name);
    } else {
        std::shared_ptr<const gpu::DeviceHybrid> hybrid;  // NemotronH: the hybrid forward
        const std::string weights_name =
            o.weights + (o.weights == "nvfp4" ? (o.lm_head_nvfp4 ? " (lm_head nvfp4)" : " (lm_head bf16)") : "");
        std::unique_ptr<Model> model;
        ThreadPool pool(0);
        HybridView view;
        if (!o.synthetic.empty() && gpu::synthetic_config(o.synthetic).arch == Arch::NemotronH) {
            hybrid = std::make_shared<gpu::DeviceHybrid>(gpu::synthetic_hybrid(
                gpu::synthetic_config(o.synthetic),
                {.nvfp4 = o.weights == "nvfp4", .lm_head_nvfp4 = o.lm_head_nvfp4, .seed = 1}));
            model_name = o.synthetic + " " + weights_name;
        } else if (o.synthetic.empty() && (model = load_model(o.model_dir, pool))->hybrid_view(view)) {
            hybrid = std::make_shared<gpu::DeviceHybrid>(gpu::upload_hybrid(model->config(), view));
            model_name = o.model_dir;
        }
        if (hybrid) {
            log_weights(model_name, *hybrid, seconds_since(t_load));
            rows = bench_rank(o, kv_dtypes, hybrid, limits, bench_kernel_choices(o.tune), nullptr, nullptr);
        } else if (!o.synthetic.empty()) {
            const ModelConfig c = gpu::synthetic_config(o.synthetic);
            weights = std::make_shared<gpu::DeviceDecoder>(gpu::synthetic_decoder(
                c, {.nvfp4 = o.weights == "nvfp4", .lm_head_nvfp4 = o.lm_head_nvfp4, .seed = 1}));
            model_name = o.synthetic + " " + weights_name;
        } else {
            DecoderView decoder;
            NIBBLE_CHECK(model->decoder_view(decoder), "{}: {} is not a model the CUDA backend runs", o.model_dir,
                         model->config().arch_name);
            weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), decoder));
            model_name = o.model_dir;
        }
        if (!hybrid) {
            log_weights(model_name, *weights, seconds_since(t_load));
            rows = bench_rank(o, kv_dtypes, weights, limits, bench_kernel_choices(o.tune), nullptr, nullptr);
        }
    }

    if (o.output == "json") {
        nlohmann::ordered_json j;
        j["device"] = limits.device_name;
        j["copy_bytes_per_s"] = limits.copy_bytes_per_s;
        j["bf16_flops_per_s"] = limits.bf16_flops_per_s;
        j["model"] = model_name;
        j["results"] = nlohmann::ordered_json::array();
        for (const Row& r : rows)
            j["results"].push_back({{"kv_cache_dtype", r.kv}, {"test", r.test}, {"depth", r.depth},
                                    {"tokens_per_s", r.tps.mean}, {"stddev", r.tps.stddev},
                                    {"limit_tokens_per_s", r.limit_tps}, {"limit", r.limit_kind},
                                    {"fraction_of_limit", r.tps.mean / r.limit_tps}});
        std::printf("%s\n", j.dump(2).c_str());
        return;
    }
    std::printf("\n%s | copy %.0f GB/s | BF16 matmul %.0f TFLOP/s | %s | decode %s%s\n\n",
                limits.device_name.c_str(), limits.copy_bytes_per_s / 1e9, limits.bf16_flops_per_s / 1e12,
                model_name.c_str(), o.enforce_eager ? "eager" : "CUDA graphs",
                std::string(o.unfused ? ", q/k/v and gate/up unfused" : "").c_str());
    std::printf("| kv    | test            |            t/s | bound t/s | of bound | bound by       |\n");
    std::printf("| ----- | --------------- | -------------: | --------: | -------: | -------------- |\n");
    for (const Row& r : rows) {
        const std::string test = r.test + (r.depth > 0 ? " @ d" + std::to_string(r.depth) : "");
        std::printf("| %-5s | %-15s | %8.1f ± %5.1f | %9.0f | %7.1f%% | %-14s |\n", r.kv.c_str(), test.c_str(),
                    r.tps.mean, r.tps.stddev, r.limit_tps, 100.0 * r.tps.mean / r.limit_tps, r.limit_kind.c_str());
    }
}

#endif

}  // namespace

void add_bench_command(CLI::App& app) {
    auto o = std::make_shared<BenchOptions>();
    auto lists = std::make_shared<std::vector<std::string>>(5);
    CLI::App* cmd = app.add_subcommand("bench", "llama-bench-style prompt and generation throughput on the CUDA backend");
    cmd->add_option("--model,-m", o->model_dir, "a checkpoint directory");
    cmd->add_option("--synthetic", o->synthetic, "random weights of a real shape: llama3-8b, llama3-70b, qwen3-8b, mistral-7b, qwen3-30b-a3b, "
                    "nemotron-3-nano-30b-a3b (its experts NVFP4 only; qwen3-30b-a3b's BF16 too, with --weights bf16)");
    cmd->add_option("--weights", o->weights, "synthetic weights: nvfp4 (default) or bf16");
    cmd->add_flag("--lm-head-nvfp4", o->lm_head_nvfp4, "synthetic: lm_head in NVFP4 too (ModelOpt keeps it BF16)");
    cmd->add_option("-p,--n-prompt", (*lists)[0], "prompt lengths, comma-separated (default 512)");
    cmd->add_option("-n,--n-gen", (*lists)[1], "generated tokens, comma-separated (default 128)");
    cmd->add_option("-d,--n-depth", (*lists)[2], "cached tokens before each test, comma-separated (default 0)");
    cmd->add_option("--kv-cache-dtype", (*lists)[3], "bf16, fp8, nvfp4, comma-separated (default bf16)");
    cmd->add_option(
        "-b,--batch", (*lists)[4],
        "sequences decoding together in the tg tests, comma-separated (default 1; B > 1: tg<N> xB, tokens/s "
        "over all B)");
    cmd->add_option("-r,--repetitions", o->repeats, "repeats of each test (default 5)");
    cmd->add_option("-o,--output", o->output, "md (default) or json");
    cmd->add_flag("--enforce-eager", o->enforce_eager, "decode without CUDA graphs (to measure what they save)");
    cmd->add_option(
        "--tune", o->tune,
        "kernel choices: cached (this GPU's tune cache, `nibble tune`; the default when one exists) or "
        "off (the built-in dispatch)");
    cmd->add_flag("--no-fused-gemv", o->unfused,
                  "q/k/v and gate/up as separate launches: the decode GEMVs, and the prefill's q/k/v GEMM (to compare)");
    // -tp arrives as --tensor-parallel-size (main.cpp spells it out: CLI11 cannot declare a two-letter flag).
    cmd->add_option("--tensor-parallel-size", o->tensor_parallel_size,
                    "-tp: GPUs the model is split over (one thread and NCCL rank per GPU, GPUs 0 .. N-1; default 1)");
    cmd->add_option("--master-port", o->master_port, "-tp: the NCCL rendezvous port on 127.0.0.1 (default 29511)");
    cmd->add_option("--prefill-chunk", o->prefill_chunk, "tokens per step when filling the cache to a depth (default 2048)");
    cmd->callback([o, lists] {
        if (!(*lists)[0].empty()) o->prompt = split_list<int64_t>((*lists)[0], "-p");
        if (!(*lists)[1].empty()) o->gen = split_list<int64_t>((*lists)[1], "-n");
        if (!(*lists)[2].empty()) o->depth = split_list<int64_t>((*lists)[2], "-d");
        if (!(*lists)[3].empty()) o->kv = split_list<std::string>((*lists)[3], "--kv-cache-dtype");
        if (!(*lists)[4].empty()) o->batch = split_list<int64_t>((*lists)[4], "-b");
        for (int64_t b : o->batch) NIBBLE_CHECK(b >= 1 && b <= 256, "-b {}: each batch must be 1 .. 256", b);
        NIBBLE_CHECK(o->prefill_chunk > 0, "--prefill-chunk {}: must be positive", o->prefill_chunk);
#if defined(NIBBLE_HAVE_CUDA)
        run_bench(*o);
#else
        fail("nibble bench measures the CUDA backend, and this build has none (configure with CUDA to use it)");
#endif
    });
}

}  // namespace nibble::cli
