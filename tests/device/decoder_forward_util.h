// Helpers of the whole-forward device tests (decoder_forward_test.cpp, tune_runner_test.cpp,
// moe_forward_test.cpp, hybrid_forward_test.cpp): small random llama-family and Qwen3-MoE checkpoints, their
// NVFP4 quantizations, the step-by-step comparison of the CUDA runner with the CPU reference (its tolerance
// rules are explained in decoder_forward_test.cpp's header), CUDA graphs against eager steps, and the engine
// over the CUDA runner against the engine over the CPU one.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
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
#include "tune/kernel_choices.h"

namespace nibble::test {

namespace fs = std::filesystem;

struct TinyArch {
    std::string arch = "LlamaForCausalLM";
    bool qk_norm = false, bias = false, tied = false;
    int64_t head_dim = 64;
    // Qwen3MoeForCausalLM: n_experts experts of moe_ff per MoE layer, top_k per token (norm_topk_prob),
    // the layers in mlp_only_layers dense; n_layers layers in all.
    int64_t n_experts = 8, top_k = 2, moe_ff = 128;
    std::vector<int64_t> mlp_only_layers;
    int64_t n_layers = 2;
};

// A BF16 checkpoint of a small llama-family or Qwen3-MoE model with random weights (Normal(0, 0.05) linears,
// routers Normal(0, 0.1), norms near 1).
inline fs::path write_checkpoint(const fs::path& dir, const TinyArch& a, uint64_t seed) {
    fs::create_directories(dir);
    const int64_t d = 256, heads = 4, kv_heads = 2, hd = a.head_dim, ff = 512, vocab = 1024, layers = a.n_layers;
    const bool moe = a.arch == "Qwen3MoeForCausalLM";
    auto is_moe_layer = [&](int64_t l) {
        return moe && std::find(a.mlp_only_layers.begin(), a.mlp_only_layers.end(), l) == a.mlp_only_layers.end();
    };
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
    if (moe) {
        cfg["num_experts"] = a.n_experts;
        cfg["num_experts_per_tok"] = a.top_k;
        cfg["moe_intermediate_size"] = a.moe_ff;
        cfg["norm_topk_prob"] = true;
        cfg["decoder_sparse_step"] = 1;
        cfg["mlp_only_layers"] = a.mlp_only_layers;
    }
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
        if (a.bias) {
            for (const char* m : {"q", "k", "v"}) {
                const int64_t n = std::string(m) == "q" ? heads * hd : kv_heads * hd;
                tensors.push_back({p + "self_attn." + m + "_proj.bias", {n}, 0.2f, 0.0f});
            }
            // Llama's attention_bias covers o_proj too (Qwen2's bias is q/k/v only).
            if (a.arch == "LlamaForCausalLM") tensors.push_back({p + "self_attn.o_proj.bias", {d}, 0.2f, 0.0f});
        }
        if (a.qk_norm) {
            tensors.push_back({p + "self_attn.q_norm.weight", {hd}, 0.1f, 1.0f});
            tensors.push_back({p + "self_attn.k_norm.weight", {hd}, 0.1f, 1.0f});
        }
        if (is_moe_layer(l)) {
            tensors.push_back({p + "mlp.gate.weight", {a.n_experts, d}, 0.1f, 0.0f});
            for (int64_t e = 0; e < a.n_experts; ++e) {
                const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
                tensors.push_back({x + "gate_proj.weight", {a.moe_ff, d}, 0.05f, 0.0f});
                tensors.push_back({x + "up_proj.weight", {a.moe_ff, d}, 0.05f, 0.0f});
                tensors.push_back({x + "down_proj.weight", {d, a.moe_ff}, 0.05f, 0.0f});
            }
            continue;
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

// fusion_group_global_scales false: every tensor its own NVFP4 global scale (--per-tensor-global-scales), so
// q/k/v keep three unless their amax is pinned (shared_qkv_scale.h).
inline fs::path quantized(const fs::path& src, const fs::path& dst, QuantLayout layout, bool quantize_lm_head,
                          bool fusion_group_global_scales = true) {
    ThreadPool pool(0);
    QuantizeOptions o;
    o.src_dir = src.string();
    o.dst_dir = dst.string();
    o.layout = layout;
    o.fusion_group_global_scales = fusion_group_global_scales;
    if (quantize_lm_head) o.exclude = {};
    o.progress = false;
    quantize_checkpoint(o, pool);
    return dst;
}

// What a comparison changes in the CUDA runner's options.
struct ForwardVariant {
    std::shared_ptr<tune::KernelChoices> kernel_choices;  // null: the ops' own dispatch
    bool fused_gemv = true;
};

inline void compare_forward(const fs::path& dir, DType act, KvDtype kv, double rel, const std::string& what,
                            const ForwardVariant& variant = {}) {
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
                                              .act_dtype = act,
                                              .fused_gemv = variant.fused_gemv,
                                              .kernel_choices = variant.kernel_choices});
    std::mt19937_64 rng(fresh_seed());
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

// Decode steps of 5 sequences (padded to the graph bucket of 8) replayed from CUDA graphs compute what eager
// steps compute: finite logits within rel x max(1, RMS) of the eager ones (F32 activations: summation order
// only, 1e-4; BF16: one ulp of a rounded activation can differ through the layers, 3e-2), for 30 steps fed the
// eager run's greedy tokens; the graph runner captured at least one graph, the eager one none. Both runners
// take o but for max_cudagraph_capture_size (8 and 0). state_slots: sequence s runs in state slot 7 - s
// (hybrid models; not its index, so a slot mix-up shows), else in none. Weights: gpu::DeviceDecoder or
// gpu::DeviceHybrid.
template <class Weights>
void expect_graph_replays_match_eager(const std::shared_ptr<Weights>& weights, gpu::CudaRunnerOptions o,
                                      bool state_slots, const std::string& what) {
    o.max_cudagraph_capture_size = 8;
    gpu::CudaModelRunner graphs(weights, o);
    o.max_cudagraph_capture_size = 0;
    gpu::CudaModelRunner eager(weights, o);
    std::mt19937_64 rng(fresh_seed());
    const int64_t vocab = weights->config.vocab_size;
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
    const std::vector<int64_t> lengths = {3, 40, 17, 1, 66};
    std::vector<std::vector<int32_t>> seqs(lengths.size()), tables(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
        for (int64_t i = 0; i < lengths[s]; ++i) seqs[s].push_back(tok(rng));
        for (int64_t b = 0; b < 20; ++b) tables[s].push_back(static_cast<int32_t>(s * 24 + static_cast<size_t>(b)));
    }
    std::vector<int64_t> done(lengths.size(), 0);
    const double rel = o.act_dtype == DType::F32 ? 1e-4 : 3e-2;
    for (int step = 0; step < 30; ++step) {
        std::vector<RunnerSequence> batch;
        for (size_t s = 0; s < seqs.size(); ++s)
            batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s])),
                             .block_table = tables[s], .start_pos = done[s], .needs_logits = true,
                             .state_slot = state_slots ? static_cast<int32_t>(7 - s) : RunnerSequence{}.state_slot});
        std::vector<float> a, b;
        graphs.execute(batch, a);
        eager.execute(batch, b);
        ASSERT_EQ(a.size(), b.size()) << what;
        double worst = 0, ms = 0;
        for (size_t i = 0; i < a.size(); ++i) {
            ASSERT_TRUE(std::isfinite(a[i])) << what << " step " << step;
            worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
            ms += static_cast<double>(b[i]) * b[i];
        }
        EXPECT_LE(worst, rel * std::max(1.0, std::sqrt(ms / static_cast<double>(a.size())))) << what << " step " << step;
        for (size_t s = 0; s < seqs.size(); ++s) {
            const float* row = b.data() + s * static_cast<size_t>(vocab);
            done[s] = static_cast<int64_t>(seqs[s].size());
            seqs[s].push_back(static_cast<int32_t>(std::max_element(row, row + vocab) - row));
        }
    }
    EXPECT_GE(graphs.num_cuda_graphs(), 1) << what;
    EXPECT_EQ(eager.num_cuda_graphs(), 0) << what;
}

// The same for a llama-family or Qwen3-MoE decoder with act activations and a BF16 KV cache.
inline void expect_graph_replays_match_eager(const std::shared_ptr<const gpu::DeviceDecoder>& weights, DType act,
                                             const std::string& what) {
    const gpu::CudaRunnerOptions o{.kv_dtype = KvDtype::Bf16, .num_blocks = 128, .block_size = 16,
                                   .max_model_len = 2048, .max_num_batched_tokens = 256, .max_num_seqs = 8,
                                   .act_dtype = act};
    expect_graph_replays_match_eager(weights, o, false, what);
}

// The engine over the CUDA runner generates what it generates over the CPU runner, request for request: every
// prompt's 12 greedy tokens (EOS ignored). The CPU run goes first; make_cuda_runner is called after it.
inline void expect_engine_on_cuda_matches_cpu(Model& model, const EngineConfig& cfg,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              const std::function<std::unique_ptr<ModelRunner>()>& make_cuda_runner) {
    auto generate = [&](std::unique_ptr<ModelRunner> runner) {
        Engine engine(model, cfg, std::move(runner));
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
    const auto on_gpu = generate(make_cuda_runner());
    ASSERT_EQ(on_cpu.size(), prompts.size());
    for (const auto& [id, tokens] : on_cpu) {
        EXPECT_EQ(tokens.size(), 12u) << id;
        EXPECT_EQ(on_gpu.at(id), tokens) << id;
    }
}

}  // namespace nibble::test
