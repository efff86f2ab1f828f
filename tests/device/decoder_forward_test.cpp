// The whole CUDA forward (gpu/cuda_model_runner.h) against the CPU reference (CpuModelRunner over the same
// checkpoint), on small random llama-family checkpoints with real head sizes (the golden fixtures' head_dim 16
// is below what the CUDA attention takes; the CPU reference itself matches transformers on those).
//
// Three sequences run in one batch: a prefill step (prompts of 37, 5 and 70 tokens: 112 rows, so BF16
// activations take the prefill GEMM) and then decode steps. Both runners are fed the CPU's greedy token
// (teacher forcing), so a near-tie cannot derail the comparison; at every step:
//   - logits agree within tol = rel * max(1, rms(cpu logits)) element-wise, and
//   - the GPU's argmax equals the CPU's, unless the CPU's own margin between the two tokens is below tol
//     (a near-tie the tolerance admits).
// rel follows from the activation and cache formats: F32 activations differ from the CPU by float32
// summation order (~1e-6) until a K/V value stored in BF16 (or FP8/NVFP4) lands on the other side of a
// rounding boundary, which moves that element by up to a half step of its format (BF16 2^-8, FP8 E4M3 2^-4,
// NVFP4 up to 1/3 of a code relative); BF16 activations round every intermediate (2^-8 relative per value).
// With BF16 activations and an NVFP4 cache the two combine: a 2^-8 move of K or V lands across an E2M1
// boundary for a few per cent of the elements, each then off by a whole code step (seen: up to 0.17 of the
// logits' RMS on these 2-layer models, so that case allows 0.3).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <mutex>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "device_test_util.h"
#include "engine/engine.h"
#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "quant/quantize.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

struct TinyArch {
    std::string arch = "LlamaForCausalLM";
    bool qk_norm = false, bias = false, tied = false;
    int64_t head_dim = 64;
};

// A BF16 checkpoint of a small llama-family model with random weights (Normal(0, 0.05) linears, norms near 1).
fs::path write_checkpoint(const fs::path& dir, const TinyArch& a, uint64_t seed) {
    fs::create_directories(dir);
    const int64_t d = 256, heads = 4, kv_heads = 2, hd = a.head_dim, ff = 512, vocab = 1024, layers = 2;
    nlohmann::json cfg = {{"architectures", {a.arch}},
                          {"hidden_size", d},
                          {"num_hidden_layers", layers},
                          {"num_attention_heads", heads},
                          {"num_key_value_heads", kv_heads},
                          {"head_dim", hd},
                          {"intermediate_size", ff},
                          {"vocab_size", vocab},
                          {"max_position_embeddings", 4096},
                          {"rms_norm_eps", 1e-6},
                          {"rope_theta", 10000.0},
                          {"tie_word_embeddings", a.tied},
                          {"torch_dtype", "bfloat16"}};
    if (a.arch == "LlamaForCausalLM") cfg["attention_bias"] = a.bias;
    std::ofstream(dir / "config.json") << cfg.dump(2);

    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    struct T {
        std::string name;
        Shape shape;
        float sigma, mean;
    };
    std::vector<T> tensors = {{"model.embed_tokens.weight", {vocab, d}, 0.5f, 0.0f}};
    for (int64_t l = 0; l < layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        tensors.push_back({p + "input_layernorm.weight", {d}, 0.1f, 1.0f});
        tensors.push_back({p + "post_attention_layernorm.weight", {d}, 0.1f, 1.0f});
        tensors.push_back({p + "self_attn.q_proj.weight", {heads * hd, d}, 0.05f, 0.0f});
        tensors.push_back({p + "self_attn.k_proj.weight", {kv_heads * hd, d}, 0.05f, 0.0f});
        tensors.push_back({p + "self_attn.v_proj.weight", {kv_heads * hd, d}, 0.05f, 0.0f});
        tensors.push_back({p + "self_attn.o_proj.weight", {d, heads * hd}, 0.05f, 0.0f});
        if (a.bias)
            for (const char* m : {"q", "k", "v"}) {
                const int64_t n = std::string(m) == "q" ? heads * hd : kv_heads * hd;
                tensors.push_back({p + "self_attn." + m + "_proj.bias", {n}, 0.2f, 0.0f});
            }
        if (a.qk_norm) {
            tensors.push_back({p + "self_attn.q_norm.weight", {hd}, 0.1f, 1.0f});
            tensors.push_back({p + "self_attn.k_norm.weight", {hd}, 0.1f, 1.0f});
        }
        tensors.push_back({p + "mlp.gate_proj.weight", {ff, d}, 0.05f, 0.0f});
        tensors.push_back({p + "mlp.up_proj.weight", {ff, d}, 0.05f, 0.0f});
        tensors.push_back({p + "mlp.down_proj.weight", {d, ff}, 0.05f, 0.0f});
    }
    tensors.push_back({"model.norm.weight", {d}, 0.1f, 1.0f});
    if (!a.tied) tensors.push_back({"lm_head.weight", {vocab, d}, 0.05f, 0.0f});

    SafetensorsWriter w((dir / "model.safetensors").string());
    for (const T& t : tensors) w.declare(t.name, DType::BF16, t.shape);
    for (const T& t : tensors) {
        std::vector<uint16_t> bits(static_cast<size_t>(t.shape.numel()));
        for (auto& b : bits) b = bf16_from_float(t.mean + t.sigma * normal(rng));
        w.write(t.name, bits.data(), bits.size() * 2);
    }
    w.finish();
    return dir;
}

fs::path quantized(const fs::path& src, const fs::path& dst, QuantLayout layout, bool quantize_lm_head) {
    ThreadPool pool(0);
    QuantizeOptions o;
    o.src_dir = src.string();
    o.dst_dir = dst.string();
    o.layout = layout;
    if (quantize_lm_head) o.exclude = {};
    o.progress = false;
    quantize_checkpoint(o, pool);
    return dst;
}

struct Tolerances {
    double rel;
};

void compare_forward(const fs::path& dir, DType act, KvDtype kv, double rel, const std::string& what) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    const int64_t blocks = 64, bs = 16;
    CpuModelRunner cpu(*model, blocks, bs, kv);
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
    gpu::CudaModelRunner gpu_runner(weights, {.kv_dtype = kv,
                                              .num_blocks = blocks,
                                              .block_size = bs,
                                              .max_model_len = 512,
                                              .max_num_batched_tokens = 256,
                                              .max_num_seqs = 8,
                                              .act_dtype = act});
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t vocab = model->config().vocab_size;
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
    const std::vector<int64_t> lengths = {37, 5, 70};
    std::vector<std::vector<int32_t>> seqs(lengths.size()), tables(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
        for (int64_t i = 0; i < lengths[s]; ++i) seqs[s].push_back(tok(rng));
        for (int64_t b = 0; b < 12; ++b) tables[s].push_back(static_cast<int32_t>(s * 20 + static_cast<size_t>(b) * 1));
    }
    std::vector<int64_t> done(lengths.size(), 0);
    int near_ties = 0;
    for (int step = 0; step < 12; ++step) {
        std::vector<RunnerSequence> batch;
        for (size_t s = 0; s < seqs.size(); ++s)
            batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s])),
                             .block_table = tables[s],
                             .start_pos = done[s],
                             .needs_logits = true});
        std::vector<float> ref, got;
        cpu.execute(batch, ref);
        gpu_runner.execute(batch, got);
        ASSERT_EQ(ref.size(), got.size());
        for (size_t s = 0; s < seqs.size(); ++s) {
            const float* r = ref.data() + s * static_cast<size_t>(vocab);
            const float* g = got.data() + s * static_cast<size_t>(vocab);
            double ms = 0;
            for (int64_t i = 0; i < vocab; ++i) ms += static_cast<double>(r[i]) * r[i];
            const double tol = rel * std::max(1.0, std::sqrt(ms / static_cast<double>(vocab)));
            double worst = 0;
            for (int64_t i = 0; i < vocab; ++i) {
                ASSERT_TRUE(std::isfinite(g[i])) << what << ": step " << step << " seq " << s << " logit " << i;
                worst = std::max(worst, std::fabs(static_cast<double>(g[i]) - r[i]));
            }
            EXPECT_LE(worst, tol) << what << ": step " << step << " seq " << s;
            const int32_t ct = static_cast<int32_t>(std::max_element(r, r + vocab) - r);
            const int32_t gt = static_cast<int32_t>(std::max_element(g, g + vocab) - g);
            if (ct != gt) {
                EXPECT_LT(r[ct] - r[gt], tol) << what << ": step " << step << " seq " << s << " greedy " << gt
                                              << " vs CPU " << ct << " beyond a near-tie";
                ++near_ties;
            }
            done[s] = static_cast<int64_t>(seqs[s].size());
            seqs[s].push_back(ct);  // teacher forcing: both continue with the CPU's token
        }
    }
    std::printf("[  detail  ] %s: 12 steps x 3 sequences, %d near-ties\n", what.c_str(), near_ties);
}

class DecoderForwardCuda : public ::testing::Test {
protected:
    void SetUp() override {
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
        root_ = fs::temp_directory_path() / ("nibble-forward-" + std::to_string(::getpid()));
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_;
};

TEST_F(DecoderForwardCuda, LlamaBf16WeightsF32Activations) {
    const fs::path m = write_checkpoint(root_ / "llama", {}, 1);
    compare_forward(m, DType::F32, KvDtype::Bf16, 2e-3, "llama bf16 / f32 act / bf16 kv");
}

TEST_F(DecoderForwardCuda, LlamaBf16WeightsBf16Activations) {
    const fs::path m = write_checkpoint(root_ / "llama", {}, 2);
    compare_forward(m, DType::BF16, KvDtype::Bf16, 6e-2, "llama bf16 / bf16 act / bf16 kv");
}

TEST_F(DecoderForwardCuda, LlamaNvfp4ModelOpt) {
    const fs::path m = quantized(write_checkpoint(root_ / "llama", {.head_dim = 128}, 3), root_ / "llama-nvfp4",
                                 QuantLayout::ModelOpt, false);
    compare_forward(m, DType::F32, KvDtype::Bf16, 2e-3, "llama nvfp4 modelopt / f32 act / bf16 kv");
    compare_forward(m, DType::BF16, KvDtype::Bf16, 6e-2, "llama nvfp4 modelopt / bf16 act / bf16 kv");
    compare_forward(m, DType::F32, KvDtype::Fp8, 3e-2, "llama nvfp4 modelopt / f32 act / fp8 kv");
    compare_forward(m, DType::F32, KvDtype::Nvfp4, 1e-1, "llama nvfp4 modelopt / f32 act / nvfp4 kv");
}

TEST_F(DecoderForwardCuda, Qwen3QkNormNvfp4LmHeadCompressedTensors) {
    const fs::path m = quantized(write_checkpoint(root_ / "qwen3", {.arch = "Qwen3ForCausalLM", .qk_norm = true}, 4),
                                 root_ / "qwen3-nvfp4", QuantLayout::CompressedTensors, true);
    compare_forward(m, DType::F32, KvDtype::Bf16, 2e-3, "qwen3 nvfp4 ct (lm_head nvfp4) / f32 act");
    compare_forward(m, DType::BF16, KvDtype::Nvfp4, 3e-1, "qwen3 nvfp4 ct (lm_head nvfp4) / bf16 act / nvfp4 kv");
}

TEST_F(DecoderForwardCuda, Qwen2BiasTiedEmbeddings) {
    const fs::path m = write_checkpoint(root_ / "qwen2", {.arch = "Qwen2ForCausalLM", .bias = true, .tied = true}, 5);
    compare_forward(m, DType::F32, KvDtype::Bf16, 2e-3, "qwen2 bias tied / f32 act");
    compare_forward(m, DType::BF16, KvDtype::Bf16, 6e-2, "qwen2 bias tied / bf16 act");
}

// Decode steps replayed from CUDA graphs (batches padded to their bucket, attention split for the cache-length
// class) compute what eager steps compute: same tokens, logits within float32 summation-order differences.
TEST_F(DecoderForwardCuda, GraphReplaysMatchEagerSteps) {
    const fs::path dir = quantized(write_checkpoint(root_ / "llama", {.head_dim = 128}, 6), root_ / "llama-nvfp4",
                                   QuantLayout::ModelOpt, false);
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
    for (DType act : {DType::F32, DType::BF16}) {
        gpu::CudaRunnerOptions o{.kv_dtype = KvDtype::Bf16, .num_blocks = 128, .block_size = 16, .max_model_len = 2048,
                                 .max_num_batched_tokens = 256, .max_num_seqs = 8, .act_dtype = act,
                                 .max_cudagraph_capture_size = 8};
        gpu::CudaModelRunner graphs(weights, o);
        o.max_cudagraph_capture_size = 0;
        gpu::CudaModelRunner eager(weights, o);
        std::mt19937_64 rng(test::fresh_seed());
        std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model->config().vocab_size - 1));
        const std::vector<int64_t> lengths = {3, 40, 17, 1, 66};  // 5 sequences: padded to the bucket of 8
        std::vector<std::vector<int32_t>> seqs(lengths.size()), tables(lengths.size());
        for (size_t s = 0; s < lengths.size(); ++s) {
            for (int64_t i = 0; i < lengths[s]; ++i) seqs[s].push_back(tok(rng));
            for (int64_t b = 0; b < 20; ++b) tables[s].push_back(static_cast<int32_t>(s * 24 + static_cast<size_t>(b)));
        }
        std::vector<int64_t> done(lengths.size(), 0);
        const int64_t vocab = model->config().vocab_size;
        for (int step = 0; step < 30; ++step) {
            std::vector<RunnerSequence> batch;
            for (size_t s = 0; s < seqs.size(); ++s)
                batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s])),
                                 .block_table = tables[s], .start_pos = done[s], .needs_logits = true});
            std::vector<float> a, b;
            graphs.execute(batch, a);
            eager.execute(batch, b);
            ASSERT_EQ(a.size(), b.size());
            double worst = 0, ms = 0;
            for (size_t i = 0; i < a.size(); ++i) {
                ASSERT_TRUE(std::isfinite(a[i]));
                worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
                ms += static_cast<double>(b[i]) * b[i];
            }
            // F32: summation order only; BF16: one ulp of a rounded activation can differ through the layers.
            const double rel = act == DType::F32 ? 1e-4 : 3e-2;
            EXPECT_LE(worst, rel * std::max(1.0, std::sqrt(ms / static_cast<double>(a.size())))) << "step " << step;
            for (size_t s = 0; s < seqs.size(); ++s) {
                const float* row = b.data() + s * static_cast<size_t>(vocab);
                done[s] = static_cast<int64_t>(seqs[s].size());
                seqs[s].push_back(static_cast<int32_t>(std::max_element(row, row + vocab) - row));
            }
        }
        EXPECT_GE(graphs.num_cuda_graphs(), 1);
        EXPECT_EQ(eager.num_cuda_graphs(), 0);
    }
}

// The engine over the CUDA runner (device greedy sampling, graphs) generates what it generates over the CPU
// runner, request for request, with F32 activations (greedy ties aside, which these random models do not hit).
TEST_F(DecoderForwardCuda, EngineOnCudaMatchesEngineOnCpu) {
    const fs::path dir = write_checkpoint(root_ / "llama", {}, 7);
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    const EngineConfig cfg{.max_model_len = 256, .max_num_seqs = 8, .max_num_batched_tokens = 128, .block_size = 16,
                           .num_blocks = 96, .enable_prefix_caching = true, .kv_cache_dtype = KvDtype::Bf16};
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 10; ++i) {
        std::vector<int32_t> p(static_cast<size_t>(3 + 11 * i));
        for (auto& t : p) t = tok(rng);
        prompts.push_back(p);
    }
    auto generate = [&](std::unique_ptr<ModelRunner> runner) {
        Engine engine(*model, cfg, std::move(runner));
        std::mutex mu;
        std::map<std::string, std::vector<int32_t>> out;
        for (size_t i = 0; i < prompts.size(); ++i) {
            GenerationRequest r;
            r.id = std::string("r").append(std::to_string(i));
            r.prompt = prompts[i];
            r.sampling.temperature = 0.0f;
            r.max_tokens = 12;
            r.ignore_eos = true;
            engine.submit(r, [&](const RequestOutput& o) {
                std::lock_guard lock(mu);
                for (const auto& s : o.outputs) out[o.request_id].insert(out[o.request_id].end(), s.tokens.begin(), s.tokens.end());
            });
        }
        int steps = 0;
        while (engine.step()) EXPECT_LT(++steps, 10000);
        return out;
    };
    const auto on_cpu = generate(nullptr);
    const auto on_gpu = generate(std::make_unique<gpu::CudaModelRunner>(
        weights, gpu::CudaRunnerOptions{.kv_dtype = KvDtype::Bf16, .num_blocks = 96, .block_size = 16,
                                        .max_model_len = 256, .max_num_batched_tokens = 128, .max_num_seqs = 8,
                                        .act_dtype = DType::F32, .max_cudagraph_capture_size = 8}));
    ASSERT_EQ(on_cpu.size(), prompts.size());
    for (const auto& [id, tokens] : on_cpu) {
        EXPECT_EQ(tokens.size(), 12u) << id;
        EXPECT_EQ(on_gpu.at(id), tokens) << id;
    }
}

}  // namespace
}  // namespace nibble
