// The CUDA forward of NemotronH (gpu/hybrid_forward.h: Mamba2, attention without RoPE, relu^2 MLP, sigmoid-
// routed MoE of relu^2 NVFP4 experts plus a shared expert) against the CPU reference (CpuModelRunner over the
// same checkpoint), on small random checkpoints with the CUDA kernels' sizes (hidden 256, head_dim 64, Mamba
// 8 heads of 32 with state 16 in 2 groups, conv kernel 4, experts of width 64, shared expert 96), layers
// "M-M*EM" (each kind once, the Mamba layer before the attention one BF16 as ModelOpt's recipe keeps it),
// quantized to NVFP4 ModelOpt by `nibble quantize`'s own code (the other linears and the experts NVFP4).
//
// As decoder_forward_test.cpp: three sequences, each in its own state slot (prompts of 37, 5 and 70 tokens:
// 112 rows, so BF16 activations take the prefill GEMM; then decode steps, replayed from CUDA graphs with a
// padding sequence in the scratch slot) with teacher forcing; logits agree within tol = rel * max(1,
// rms(cpu logits)) and the greedy tokens agree outside near-ties of the logits. rel: F32 activations with a
// BF16 KV cache 2e-3 (float32 summation order, plus rare BF16 rounding flips of K/V, as the dense tests);
// a BF16 SSM state adds the same kind of flip in the state (2^-8 relative on one element): 1e-2. BF16
// activations round every intermediate and the Mamba recurrence carries them along: 8e-2.
//
// Router near-ties: the sigmoid router picks the top_k experts by sigmoid(logit) + correction bias within
// the best groups; a choice value within the runners' difference of the next one can pick another expert on
// the GPU. The F32 comparisons with routing (8 experts, top 2, 2 groups keeping 1) therefore watch the CPU
// model's router inputs and mark a sequence once any of its tokens has a margin (k-th vs (k+1)-th choice
// among the eligible experts, or topk_group-th vs next group score) below 1e-4 (choice values are O(1); the
// runners' router logits differ by float32 summation order, ~1e-6); from then on its logits are only checked
// for being finite. The BF16 comparison runs a checkpoint whose top_k is every expert (4 of 4, one group):
// routing weights, permutation, grouped GEMVs and combine all run, with no selection that can flip.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "decoder_forward_util.h"
#include "device_test_util.h"
#include "engine/engine.h"
#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/device_hybrid.h"
#include "gpu/hybrid_forward.h"
#include "model/model.h"
#include "ops/activation/activation.h"
#include "ops/activation/activation_cuda.h"
#include "ops/ssm/mamba_slots_cuda.h"
#include "quant/quantize.h"
#include "tensor/convert.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

using test::quantized;
namespace fs = std::filesystem;

struct TinyHybrid {
    std::string pattern = "M-M*EM";
    int64_t n_experts = 8, top_k = 2, n_group = 2, topk_group = 1;
    int64_t ff = 256, moe_ff = 64, shared_ff = 96;  // the MLP's, an expert's and the shared expert's widths
};

// A BF16 NemotronH checkpoint with random weights: linears Normal(0, 0.05), router Normal(0, 0.1), correction
// bias Normal(0, 0.05) (F32, as published), norms near 1, conv taps Normal(0, 0.3), A_log in log(1..16),
// dt_bias in -4..-1 (softplus 0.02..0.3), D near 1.
fs::path write_hybrid_checkpoint(const fs::path& dir, const TinyHybrid& a, uint64_t seed) {
    fs::create_directories(dir);
    const int64_t d = 256, heads = 4, kv_heads = 2, hd = 64, ff = a.ff, vocab = 1024;
    const int64_t m_heads = 8, m_hd = 32, state = 16, groups = 2, kernel = 4, moe_ff = a.moe_ff,
                  shared_ff = a.shared_ff;
    const int64_t d_inner = m_heads * m_hd, conv_dim = d_inner + 2 * groups * state;
    const int64_t in_dim = d_inner + conv_dim + m_heads;
    const int64_t layers = static_cast<int64_t>(a.pattern.size());
    nlohmann::json cfg = {{"architectures", {"NemotronHForCausalLM"}},
                          {"hidden_size", d},
                          {"num_hidden_layers", layers},
                          {"hybrid_override_pattern", a.pattern},
                          {"num_attention_heads", heads},
                          {"num_key_value_heads", kv_heads},
                          {"head_dim", hd},
                          {"attention_bias", false},
                          {"intermediate_size", ff},
                          {"mlp_hidden_act", "relu2"},
                          {"mlp_bias", false},
                          {"mamba_num_heads", m_heads},
                          {"mamba_head_dim", m_hd},
                          {"ssm_state_size", state},
                          {"n_groups", groups},
                          {"conv_kernel", kernel},
                          {"chunk_size", 16},
                          {"use_conv_bias", true},
                          {"use_bias", false},
                          {"mamba_hidden_act", "silu"},
                          {"moe_intermediate_size", moe_ff},
                          {"moe_shared_expert_intermediate_size", shared_ff},
                          {"n_shared_experts", 1},
                          {"n_routed_experts", a.n_experts},
                          {"num_experts_per_tok", a.top_k},
                          {"n_group", a.n_group},
                          {"topk_group", a.topk_group},
                          {"norm_topk_prob", true},
                          {"routed_scaling_factor", 2.5},
                          {"vocab_size", vocab},
                          {"max_position_embeddings", 4096},
                          {"layer_norm_epsilon", 1e-5},
                          {"tie_word_embeddings", false},
                          {"torch_dtype", "bfloat16"}};
    std::ofstream(dir / "config.json") << cfg.dump(2);

    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    struct T {
        std::string name;
        Shape shape;
        DType dtype;
        std::function<float()> draw;
    };
    auto gauss = [&](float mean, float sigma) { return [&, mean, sigma] { return mean + sigma * normal(rng); }; };
    auto range = [&](float lo, float hi) { return [&, lo, hi] { return lo + (hi - lo) * uniform(rng); }; };
    std::vector<T> tensors = {{"backbone.embeddings.weight", {vocab, d}, DType::BF16, gauss(0.0f, 0.5f)}};
    auto linear = [&](const std::string& name, int64_t n_out, int64_t n_in) {
        tensors.push_back({name + ".weight", {n_out, n_in}, DType::BF16, gauss(0.0f, 0.05f)});
    };
    for (int64_t l = 0; l < layers; ++l) {
        const std::string p = "backbone.layers." + std::to_string(l) + ".";
        const std::string mx = p + "mixer.";
        tensors.push_back({p + "norm.weight", {d}, DType::BF16, gauss(1.0f, 0.1f)});
        switch (a.pattern[static_cast<size_t>(l)]) {
            case 'M':
                linear(mx + "in_proj", in_dim, d);
                tensors.push_back({mx + "conv1d.weight", {conv_dim, 1, kernel}, DType::BF16, gauss(0.0f, 0.3f)});
                tensors.push_back({mx + "conv1d.bias", {conv_dim}, DType::BF16, gauss(0.0f, 0.1f)});
                tensors.push_back({mx + "dt_bias", {m_heads}, DType::BF16, range(-4.0f, -1.0f)});
                tensors.push_back({mx + "A_log", {m_heads}, DType::BF16, range(0.0f, 2.77f)});
                tensors.push_back({mx + "D", {m_heads}, DType::BF16, gauss(1.0f, 0.1f)});
                tensors.push_back({mx + "norm.weight", {d_inner}, DType::BF16, gauss(1.0f, 0.1f)});
                linear(mx + "out_proj", d, d_inner);
                break;
            case '*':
                linear(mx + "q_proj", heads * hd, d);
                linear(mx + "k_proj", kv_heads * hd, d);
                linear(mx + "v_proj", kv_heads * hd, d);
                linear(mx + "o_proj", d, heads * hd);
                break;
            case '-':
                linear(mx + "up_proj", ff, d);
                linear(mx + "down_proj", d, ff);
                break;
            case 'E':
                tensors.push_back({mx + "gate.weight", {a.n_experts, d}, DType::BF16, gauss(0.0f, 0.1f)});
                tensors.push_back({mx + "gate.e_score_correction_bias", {a.n_experts}, DType::F32, gauss(0.0f, 0.05f)});
                for (int64_t e = 0; e < a.n_experts; ++e) {
                    linear(mx + "experts." + std::to_string(e) + ".up_proj", moe_ff, d);
                    linear(mx + "experts." + std::to_string(e) + ".down_proj", d, moe_ff);
                }
                linear(mx + "shared_experts.up_proj", shared_ff, d);
                linear(mx + "shared_experts.down_proj", d, shared_ff);
                break;
        }
    }
    tensors.push_back({"backbone.norm_f.weight", {d}, DType::BF16, gauss(1.0f, 0.1f)});
    linear("lm_head", vocab, d);

    SafetensorsWriter w((dir / "model.safetensors").string());
    for (const T& t : tensors) w.declare(t.name, t.dtype, t.shape);
    for (const T& t : tensors) {
        const size_t n = static_cast<size_t>(t.shape.numel());
        if (t.dtype == DType::F32) {
            std::vector<float> v(n);
            for (auto& x : v) x = t.draw();
            w.write(t.name, v.data(), n * 4);
        } else {
            std::vector<uint16_t> bits(n);
            for (auto& b : bits) b = bf16_from_float(t.draw());
            w.write(t.name, bits.data(), n * 2);
        }
    }
    w.finish();
    return dir;
}

fs::path nvfp4_checkpoint(const fs::path& root, const std::string& name, const TinyHybrid& a, uint64_t seed) {
    return quantized(write_hybrid_checkpoint(root / name, a, seed), root / (name + "-nvfp4"), QuantLayout::ModelOpt,
                     false);
}

// Marks the sequences whose tokens hit a sigmoid-router near-tie on the CPU (see the header).
class SigmoidTieObserver final : public LinearInputObserver {
public:
    SigmoidTieObserver(const Checkpoint& ck, const MoeConfig& moe, double margin)
        : ck_(ck), moe_(moe), margin_(margin) {}

    std::vector<size_t> row_seq;  // [rows of the next forward] the sequence of each flattened row
    std::vector<bool> tied;       // [sequences]
    int events = 0;

    // The CPU model runs its router outside the observed linears; the shared expert's up projection sees the
    // same input (the layer's normed hidden state), so the router's logits are recomputed from there.
    void observe(const LinearWeight& w, const float* x, int64_t m) override {
        const std::string shared = "shared_experts.up_proj";
        if (!w.name.ends_with(shared)) return;
        ASSERT_EQ(static_cast<size_t>(m), row_seq.size()) << w.name;
        const int64_t ne = moe_.n_experts, per_group = ne / moe_.n_group;
        const std::string mixer = w.name.substr(0, w.name.size() - shared.size());  // "...layers.{i}.mixer."
        auto& [W, bias] = router_[mixer];
        if (W.empty()) {
            const TensorInfo& g = ck_.get(mixer + "gate.weight");
            ASSERT_EQ(g.shape, (Shape{ne, w.n_in})) << mixer;
            W.resize(static_cast<size_t>(ne * w.n_in));
            decode_to_float(g.data, g.dtype, ne * w.n_in, W.data());
            const TensorInfo& b = ck_.get(mixer + "gate.e_score_correction_bias");
            bias.resize(static_cast<size_t>(ne));
            decode_to_float(b.data, b.dtype, ne, bias.data());
        }
        std::vector<double> choice(static_cast<size_t>(ne));
        for (int64_t r = 0; r < m; ++r) {
            for (int64_t e = 0; e < ne; ++e) {
                double acc = 0;
                for (int64_t i = 0; i < w.n_in; ++i)
                    acc += static_cast<double>(x[r * w.n_in + i]) * W[static_cast<size_t>(e * w.n_in + i)];
                choice[static_cast<size_t>(e)] = 1.0 / (1.0 + std::exp(-acc)) + bias[static_cast<size_t>(e)];
            }
            bool tie = false;
            std::vector<std::pair<double, int64_t>> groups;
            for (int64_t g = 0; g < moe_.n_group; ++g) {
                std::vector<double> v(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
                std::sort(v.begin(), v.end(), std::greater<>());
                groups.push_back({per_group >= 2 ? v[0] + v[1] : v[0], g});
            }
            std::sort(groups.begin(), groups.end(), std::greater<>());
            if (moe_.topk_group < moe_.n_group)
                tie |= groups[static_cast<size_t>(moe_.topk_group - 1)].first -
                           groups[static_cast<size_t>(moe_.topk_group)].first < margin_;
            std::vector<double> eligible;
            for (int64_t i = 0; i < moe_.topk_group; ++i) {
                const int64_t g = groups[static_cast<size_t>(i)].second;
                eligible.insert(eligible.end(), choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
            }
            std::sort(eligible.begin(), eligible.end(), std::greater<>());
            if (moe_.top_k < static_cast<int64_t>(eligible.size()))
                tie |= eligible[static_cast<size_t>(moe_.top_k - 1)] - eligible[static_cast<size_t>(moe_.top_k)] < margin_;
            if (tie) {
                const size_t s = row_seq[static_cast<size_t>(r)];
                if (s >= tied.size()) tied.resize(s + 1, false);
                tied[s] = true;
                ++events;
            }
        }
    }

private:
    const Checkpoint& ck_;
    MoeConfig moe_;
    double margin_;
    std::map<std::string, std::pair<std::vector<float>, std::vector<float>>> router_;  // by mixer prefix
};

gpu::CudaRunnerOptions runner_options(DType act, KvDtype kv, SsmStateDtype ssm, int64_t snapshots = 0) {
    return {.kv_dtype = kv, .num_blocks = 64, .block_size = 16, .max_model_len = 512, .max_num_batched_tokens = 256,
            .max_num_seqs = 8, .act_dtype = act, .num_state_slots = 8, .ssm_dtype = ssm,
            .num_state_snapshots = snapshots};
}

std::shared_ptr<gpu::DeviceHybrid> upload(const Model& model) {
    HybridView view;
    EXPECT_TRUE(model.hybrid_view(view));
    return std::make_shared<gpu::DeviceHybrid>(gpu::upload_hybrid(model.config(), view));
}

// The step-by-step comparison of the header; tie_margin 0: no router-tie watch. lengths: the prompts;
// first_take (if given): the tokens of each prompt the first step feeds, the rest following in step 2 (a
// prefill continuing from a non-zero recurrent state).
void compare_hybrid(const fs::path& dir, DType act, SsmStateDtype ssm, double rel, double tie_margin,
                    const std::string& what, const std::vector<int64_t>& lengths = {37, 5, 70},
                    const std::vector<int64_t>& first_take = {}) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    const ModelConfig& c = model->config();
    ASSERT_EQ(c.arch, Arch::NemotronH);
    Checkpoint ck(dir.string());
    SigmoidTieObserver ties(ck, c.moe, tie_margin);
    if (tie_margin > 0) model->set_linear_input_observer(&ties);
    const KvDtype kv = KvDtype::Bf16;
    CpuModelRunner cpu(*model, 64, 16, kv, 8, ssm);
    const auto weights = upload(*model);
    gpu::CudaModelRunner gpu_runner(weights, runner_options(act, kv, ssm));
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t vocab = c.vocab_size;
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
    std::vector<std::vector<int32_t>> seqs(lengths.size()), tables(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
        for (int64_t i = 0; i < lengths[s]; ++i) seqs[s].push_back(tok(rng));
        const int64_t blocks = (lengths[s] + 12 + 15) / 16;  // the prompt and 12 generated tokens
        EXPECT_LE(blocks, 20) << what;
        for (int64_t b = 0; b < blocks; ++b) tables[s].push_back(static_cast<int32_t>(s * 20 + static_cast<size_t>(b)));
    }
    // Slots 5, 2, 7: not the sequences' indices, so a slot mix-up shows.
    const std::vector<int32_t> slots = {5, 2, 7};
    std::vector<int64_t> done(lengths.size(), 0);
    int near_ties = 0, skipped = 0;
    for (int step = 0; step < 12; ++step) {
        std::vector<RunnerSequence> batch;
        std::vector<int64_t> take(seqs.size());
        ties.row_seq.clear();
        for (size_t s = 0; s < seqs.size(); ++s) {
            take[s] = static_cast<int64_t>(seqs[s].size()) - done[s];
            if (step == 0 && !first_take.empty()) take[s] = std::min(take[s], first_take[s]);
            batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s]),
                                                                  static_cast<size_t>(take[s])),
                             .block_table = tables[s],
                             .start_pos = done[s],
                             .needs_logits = true,
                             .state_slot = slots[s]});
            ties.row_seq.insert(ties.row_seq.end(), static_cast<size_t>(take[s]), s);
        }
        std::vector<float> ref, got;
        cpu.execute(batch, ref);
        gpu_runner.execute(batch, got);
        ASSERT_EQ(ref.size(), got.size());
        for (size_t s = 0; s < seqs.size(); ++s) {
            const float* r = ref.data() + s * static_cast<size_t>(vocab);
            const float* g = got.data() + s * static_cast<size_t>(vocab);
            for (int64_t i = 0; i < vocab; ++i)
                ASSERT_TRUE(std::isfinite(g[i])) << what << ": step " << step << " seq " << s << " logit " << i;
            const int32_t ct = static_cast<int32_t>(std::max_element(r, r + vocab) - r);
            done[s] += take[s];
            // teacher forcing: both continue with the CPU's token once the prompt is in
            if (done[s] == static_cast<int64_t>(seqs[s].size())) seqs[s].push_back(ct);
            if (s < ties.tied.size() && ties.tied[s]) {
                ++skipped;
                continue;
            }
            double ms = 0, worst = 0;
            for (int64_t i = 0; i < vocab; ++i) {
                ms += static_cast<double>(r[i]) * r[i];
                worst = std::max(worst, std::fabs(static_cast<double>(g[i]) - r[i]));
            }
            const double tol = rel * std::max(1.0, std::sqrt(ms / static_cast<double>(vocab)));
            EXPECT_LE(worst, tol) << what << ": step " << step << " seq " << s;
            const int32_t gt = static_cast<int32_t>(std::max_element(g, g + vocab) - g);
            if (ct != gt) {
                EXPECT_LT(r[ct] - r[gt], tol) << what << ": step " << step << " seq " << s << " greedy " << gt
                                              << " vs CPU " << ct << " beyond a near-tie";
                ++near_ties;
            }
        }
    }
    EXPECT_GE(gpu_runner.num_cuda_graphs(), 1) << what;
    std::printf("[  detail  ] %s: 12 steps x 3 sequences, %d near-ties, %d sequence-steps skipped after %d router "
                "ties\n", what.c_str(), near_ties, skipped, ties.events);
}

class HybridForwardCuda : public ::testing::Test {
protected:
    void SetUp() override {
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
        root_ = fs::temp_directory_path() / ("nibble-hybrid-" + std::to_string(::getpid()));
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_;
};

const TinyHybrid kAllExperts{.n_experts = 4, .top_k = 4, .n_group = 1, .topk_group = 1};

TEST_F(HybridForwardCuda, F32ActivationsAllExpertsMatchCpu) {
    compare_hybrid(nvfp4_checkpoint(root_, "all", kAllExperts, 11), DType::F32, SsmStateDtype::F32, 2e-3, 0,
                   "nemotron_h f32 act / all experts");
}

TEST_F(HybridForwardCuda, F32ActivationsRoutedMatchCpu) {
    compare_hybrid(nvfp4_checkpoint(root_, "routed", {}, 12), DType::F32, SsmStateDtype::F32, 2e-3, 1e-4,
                   "nemotron_h f32 act / top 2 of 8 in 2 groups");
}

TEST_F(HybridForwardCuda, F32ActivationsBf16SsmStateMatchCpu) {
    compare_hybrid(nvfp4_checkpoint(root_, "all", kAllExperts, 13), DType::F32, SsmStateDtype::Bf16, 1e-2, 0,
                   "nemotron_h f32 act / bf16 ssm state");
}

// Prompts long enough for the chunked (SSD) scan (HybridForward::kChunkedScanMinTokens): a 150-token
// prefill beside short ones; then a 200-token prompt fed as 60 tokens and then 140 continuing from the
// state the first 60 left (in a batch with two decoding sequences), BF16 SSM state too.
TEST_F(HybridForwardCuda, ChunkedScanPrefillMatchesCpu) {
    compare_hybrid(nvfp4_checkpoint(root_, "all", kAllExperts, 16), DType::F32, SsmStateDtype::F32, 2e-3, 0,
                   "nemotron_h f32 act / chunked scan prefill", {150, 5, 100});
    compare_hybrid(nvfp4_checkpoint(root_, "all2", kAllExperts, 17), DType::F32, SsmStateDtype::Bf16, 1e-2, 0,
                   "nemotron_h f32 act / bf16 ssm state / chunked scan continuing a prompt", {200, 5, 40},
                   {60, 5, 40});
}

TEST_F(HybridForwardCuda, Bf16ActivationsAllExpertsMatchCpu) {
    compare_hybrid(nvfp4_checkpoint(root_, "all", kAllExperts, 14), DType::BF16, SsmStateDtype::F32, 8e-2, 0,
                   "nemotron_h bf16 act / all experts");
}

// Widths of 16 (mod 32) (MLP 208, experts 48, shared expert 80; real models have multiples of 32): gemv_nvfp4's
// 16-element block kernel and the MoE's plain GEMV inside the forward, on NVFP4 checkpoints and on BF16 ones
// (BF16 routed experts: the plain GEMV too), F32 and BF16 activations (112 prefill rows: the BF16 run takes
// the prefill GEMM on the dense linears, k = 80 and 208 included). All experts chosen, as the tests above.
const TinyHybrid kNarrow{.n_experts = 4, .top_k = 4, .n_group = 1, .topk_group = 1, .ff = 208, .moe_ff = 48,
                         .shared_ff = 80};

TEST_F(HybridForwardCuda, NarrowWidthsMatchCpu) {
    compare_hybrid(nvfp4_checkpoint(root_, "narrow", kNarrow, 18), DType::F32, SsmStateDtype::F32, 2e-3, 0,
                   "nemotron_h widths 208/48/80 nvfp4 / f32 act");
    compare_hybrid(nvfp4_checkpoint(root_, "narrow2", kNarrow, 19), DType::BF16, SsmStateDtype::F32, 8e-2, 0,
                   "nemotron_h widths 208/48/80 nvfp4 / bf16 act");
    compare_hybrid(write_hybrid_checkpoint(root_ / "narrow-bf16", kNarrow, 20), DType::F32, SsmStateDtype::F32,
                   2e-3, 0, "nemotron_h widths 208/48/80 bf16 weights / f32 act");
    compare_hybrid(write_hybrid_checkpoint(root_ / "narrow-bf16-2", kNarrow, 21), DType::BF16, SsmStateDtype::F32,
                   8e-2, 0, "nemotron_h widths 208/48/80 bf16 weights / bf16 act");
}

// Decode steps of 5 sequences (padded to the graph bucket of 8: three padding sequences in the scratch slot)
// replayed from CUDA graphs compute what eager steps compute (F32 activations: summation order only, 1e-4;
// BF16: 3e-2), for 30 steps fed the eager run's greedy tokens: decoder_forward_util.h's check, the sequences
// in state slots 7 - s.
TEST_F(HybridForwardCuda, GraphReplaysMatchEager) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(nvfp4_checkpoint(root_, "routed", {}, 15).string(), pool);
    const auto weights = upload(*model);
    for (DType act : {DType::F32, DType::BF16}) {
        const std::string what = "nemotron_h " + std::string(dtype_name(act));
        gpu::CudaRunnerOptions o = runner_options(act, KvDtype::Bf16, SsmStateDtype::F32);
        o.num_blocks = 128;
        o.max_model_len = 2048;
        test::expect_graph_replays_match_eager(weights, o, true, what);
    }
}

// A snapshot taken after a prompt and restored into another slot continues exactly as the original slot
// does: the same decode steps (same tokens, positions and KV blocks) from slot 1 after the restore give the
// logits they gave from slot 0 (same kernels, same inputs: equal up to 1e-6 of their scale), and the CPU
// runner doing the same agrees within the F32 tolerance.
TEST_F(HybridForwardCuda, StateSnapshotRestoreContinuesTheSequence) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(nvfp4_checkpoint(root_, "routed", {}, 16).string(), pool);
    const auto weights = upload(*model);
    for (SsmStateDtype ssm : {SsmStateDtype::F32, SsmStateDtype::Bf16}) {
        const std::string what = std::string("snapshot, ssm state ") + std::string(ssm_state_dtype_name(ssm));
        gpu::CudaModelRunner gpu_runner(weights, runner_options(DType::F32, KvDtype::Bf16, ssm, 2));
        CpuModelRunner cpu(*model, 64, 16, KvDtype::Bf16, 8, ssm, 2);
        ASSERT_EQ(gpu_runner.num_state_snapshots(), 2);
        std::mt19937_64 rng(test::fresh_seed());
        std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model->config().vocab_size - 1));
        std::vector<int32_t> prompt(45), next(6);
        for (auto& t : prompt) t = tok(rng);
        for (auto& t : next) t = tok(rng);
        std::vector<int32_t> table(8);
        std::iota(table.begin(), table.end(), 3);
        auto run = [&](ModelRunner& r, std::span<const int32_t> tokens, int64_t start, int32_t slot) {
            std::vector<float> logits;
            const RunnerSequence s{.tokens = tokens, .block_table = table, .start_pos = start, .needs_logits = true,
                                   .state_slot = slot};
            r.execute(std::span(&s, 1), logits);
            return logits;
        };
        auto decode = [&](ModelRunner& r, int32_t slot) {
            std::vector<float> all;
            for (size_t i = 0; i < next.size(); ++i) {
                const std::vector<float> l =
                    run(r, std::span(next).subspan(i, 1), static_cast<int64_t>(prompt.size() + i), slot);
                all.insert(all.end(), l.begin(), l.end());
            }
            return all;
        };
        std::vector<float> first[2], second[2];
        ModelRunner* runners[2] = {&gpu_runner, &cpu};
        for (int k = 0; k < 2; ++k) {
            ModelRunner& r = *runners[k];
            run(r, prompt, 0, 0);
            r.save_state_snapshot(0, 1);
            first[k] = decode(r, 0);
            run(r, std::span(prompt).subspan(0, 3), 0, 0);  // slot 0 moves on to another sequence
            r.restore_state_snapshot(1, 1);
            second[k] = decode(r, 1);
        }
        ASSERT_EQ(first[0].size(), second[0].size());
        double worst = 0, ms = 0, worst_cpu = 0;
        for (size_t i = 0; i < first[0].size(); ++i) {
            ASSERT_TRUE(std::isfinite(second[0][i])) << what;
            worst = std::max(worst, std::fabs(static_cast<double>(first[0][i]) - second[0][i]));
            worst_cpu = std::max(worst_cpu, std::fabs(static_cast<double>(second[0][i]) - second[1][i]));
            ms += static_cast<double>(first[0][i]) * first[0][i];
        }
        const double scale = std::max(1.0, std::sqrt(ms / static_cast<double>(first[0].size())));
        EXPECT_LE(worst, 1e-6 * scale) << what << ": restored slot vs original";
        EXPECT_LE(worst_cpu, (ssm == SsmStateDtype::F32 ? 2e-3 : 1e-2) * scale) << what << ": CUDA vs CPU";
    }
}

// The engine over the CUDA runner (device greedy sampling, graphs, state slots, prefix caching with state
// snapshots every block) generates what it generates over the CPU runner, request for request, with F32
// activations. Prompts share prefixes so later requests restore snapshots. Every expert is active (no
// router ties can flip a token).
TEST_F(HybridForwardCuda, EngineOnCudaMatchesEngineOnCpu) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(nvfp4_checkpoint(root_, "all", kAllExperts, 17).string(), pool);
    const EngineConfig cfg{.max_model_len = 256, .max_num_seqs = 8, .max_num_batched_tokens = 128, .block_size = 16,
                           .num_blocks = 96, .enable_prefix_caching = true, .mamba_snapshot_interval = 16,
                           .kv_cache_dtype = KvDtype::Bf16};
    const auto weights = upload(*model);
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<int32_t> shared(40);
    for (auto& t : shared) t = tok(rng);
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 10; ++i) {
        std::vector<int32_t> p = i % 2 == 0 ? shared : std::vector<int32_t>{};
        p.resize(p.size() + static_cast<size_t>(3 + 7 * i));
        for (size_t j = i % 2 == 0 ? shared.size() : 0; j < p.size(); ++j) p[j] = tok(rng);
        prompts.push_back(p);
    }
    test::expect_engine_on_cuda_matches_cpu(*model, cfg, prompts, [&] {
        gpu::CudaRunnerOptions o = runner_options(DType::F32, KvDtype::Bf16, SsmStateDtype::F32, cfg.max_num_seqs);
        o.num_blocks = cfg.num_blocks;
        o.max_model_len = cfg.max_model_len;
        o.max_num_batched_tokens = cfg.max_num_batched_tokens;
        o.max_cudagraph_capture_size = 8;
        return std::make_unique<gpu::CudaModelRunner>(weights, o);
    });
}

// relu2 against relu2_cpu on fresh Normal inputs (half of them negative), outputs poisoned first: F32 exact
// (one product), BF16 within one rounding of the result (the input rounded first, as the device reads it).
TEST(HybridOpsCuda, Relu2MatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (bool bf16 : {false, true})
        for (int64_t n : {1, 8, 1000, 4099}) {
            std::vector<float> x = test::random_normal(rng, static_cast<size_t>(n), 2.0f);
            test::DeviceActs dx;
            dx.upload(x, bf16);
            test::DeviceOut out(static_cast<size_t>(n), bf16);
            cuda::relu2(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, n, out.buf.get(), nullptr);
            std::vector<float> ref(static_cast<size_t>(n));
            relu2_cpu(x.data(), n, ref.data());
            std::vector<double> tol(ref.size());
            for (size_t i = 0; i < ref.size(); ++i) tol[i] = bf16 ? std::fabs(ref[i]) * test::kEpsBf16 : 0.0;
            test::expect_close(out.download(), ref, tol, std::string("relu2 ") + (bf16 ? "bf16" : "f32"));
        }
}

// mamba_slot_tables: the pointer tables name each sequence's slot (negative or out-of-range slots the scratch
// slot), and exactly the slots of sequences at position 0 are zeroed (every layer), the others untouched.
TEST(HybridOpsCuda, MambaSlotTablesPointAndZero) {
    NIBBLE_REQUIRE_GPU();
    for (SsmStateDtype dt : {SsmStateDtype::F32, SsmStateDtype::Bf16}) {
        cuda::MambaSlotPool pool{.n_slots = 6, .n_layers = 3, .conv_elems = 24, .ssm_elems = 40, .ssm_dtype = dt};
        const size_t conv_bytes = static_cast<size_t>(pool.n_slots * pool.conv_slot_bytes());
        const size_t ssm_bytes = static_cast<size_t>(pool.n_slots * pool.ssm_slot_bytes());
        cuda::DeviceBuffer conv(conv_bytes), ssm(ssm_bytes);
        conv.fill_bytes(0x5a);
        ssm.fill_bytes(0x5a);
        pool.conv = conv.as<float>();
        pool.ssm = ssm.get();
        const std::vector<int32_t> slots = {3, -1, 0, 4, 9};   // -1 and 9: the scratch slot 5
        const std::vector<int32_t> starts = {0, 0, 17, 5, 2};  // sequences 0 and 1 start over
        const int64_t n = static_cast<int64_t>(slots.size());
        cuda::DeviceBuffer d_slots = test::upload_vec(slots), d_starts = test::upload_vec(starts);
        cuda::DeviceBuffer conv_ptrs(static_cast<size_t>(pool.n_layers * n) * sizeof(float*));
        cuda::DeviceBuffer ssm_ptrs(static_cast<size_t>(pool.n_layers * n) * sizeof(void*));
        conv_ptrs.fill_bytes(0xff);
        ssm_ptrs.fill_bytes(0xff);
        cuda::mamba_slot_tables(pool, d_slots.as<int32_t>(), d_starts.as<int32_t>(), n, conv_ptrs.as<float*>(),
                                ssm_ptrs.as<void*>(), nullptr);
        const auto cp = test::download_vec<float*>(conv_ptrs, static_cast<size_t>(pool.n_layers * n));
        const auto sp = test::download_vec<void*>(ssm_ptrs, static_cast<size_t>(pool.n_layers * n));
        for (int64_t l = 0; l < pool.n_layers; ++l)
            for (int64_t s = 0; s < n; ++s) {
                const int64_t slot = pool.resolve(slots[static_cast<size_t>(s)]);
                EXPECT_EQ(cp[static_cast<size_t>(l * n + s)], pool.conv + (slot * pool.n_layers + l) * pool.conv_elems)
                    << "layer " << l << " seq " << s;
                EXPECT_EQ(sp[static_cast<size_t>(l * n + s)],
                          static_cast<char*>(pool.ssm) + (slot * pool.n_layers + l) * pool.ssm_elems * pool.ssm_elem_bytes())
                    << "layer " << l << " seq " << s;
            }
        const auto conv_host = test::download_vec<uint8_t>(conv, conv_bytes);
        const auto ssm_host = test::download_vec<uint8_t>(ssm, ssm_bytes);
        for (int64_t slot = 0; slot < pool.n_slots; ++slot) {
            const uint8_t want = slot == 3 || slot == 5 ? 0 : 0x5a;  // seq 0's slot 3, seq 1's scratch slot 5
            for (size_t i = 0; i < static_cast<size_t>(pool.conv_slot_bytes()); ++i)
                ASSERT_EQ(conv_host[static_cast<size_t>(slot * pool.conv_slot_bytes()) + i], want) << "conv slot " << slot;
            for (size_t i = 0; i < static_cast<size_t>(pool.ssm_slot_bytes()); ++i)
                ASSERT_EQ(ssm_host[static_cast<size_t>(slot * pool.ssm_slot_bytes()) + i], want) << "ssm slot " << slot;
        }
    }
}

// The Nemotron-3-Nano shape's synthetic weights (its first 8 layers, "MEMEM*EM": every kind, the Mamba layer
// before the attention one) keep ModelOpt's BF16 exclusions and run a prefill and a few decode steps through
// the runner with finite logits (the bench's path, `nibble bench --synthetic nemotron-3-nano-30b-a3b`).
TEST(HybridSyntheticCuda, NemotronNanoShapeRuns) {
    NIBBLE_REQUIRE_GPU();
    ModelConfig c = gpu::synthetic_config("nemotron-3-nano-30b-a3b");
    c.n_layers = 8;
    c.layer_kinds.resize(8);
    ASSERT_EQ(c.layer_kinds[5], LayerKind::Attention);
    const auto weights = std::make_shared<gpu::DeviceHybrid>(gpu::synthetic_hybrid(c, {}));
    for (size_t il = 0; il < weights->layers.size(); ++il) {
        const gpu::DeviceHybridLayer& L = weights->layers[il];
        const bool feeds_attention =
            il + 1 < weights->layers.size() && weights->layers[il + 1].kind == LayerKind::Attention;
        if (L.kind == LayerKind::Attention) {
            EXPECT_EQ(L.q.format, WeightFormat::Dense) << il;
        } else if (L.kind == LayerKind::Mamba) {
            EXPECT_EQ(L.in_proj.format, feeds_attention ? WeightFormat::Dense : WeightFormat::Nvfp4) << il;
        } else if (L.kind == LayerKind::Moe) {
            EXPECT_EQ(L.up.format, WeightFormat::Nvfp4) << il;
        }
    }
    EXPECT_EQ(weights->lm_head.format, WeightFormat::Dense);
    gpu::CudaModelRunner runner(weights, {.kv_dtype = KvDtype::Bf16, .num_blocks = 64, .block_size = 16,
                                          .max_model_len = 1024, .max_num_batched_tokens = 256, .max_num_seqs = 4,
                                          .act_dtype = DType::BF16, .max_cudagraph_capture_size = 4,
                                          .num_state_slots = 4});
    std::vector<int32_t> tokens(200);
    std::iota(tokens.begin(), tokens.end(), 1);
    std::vector<int32_t> table(16);
    std::iota(table.begin(), table.end(), 0);
    int64_t pos = 0;
    for (int step = 0; step < 4; ++step) {
        const size_t n = step == 0 ? 200 : 1;
        const RunnerSequence s{.tokens = std::span(tokens).subspan(0, n), .block_table = table, .start_pos = pos,
                               .needs_logits = true, .state_slot = 2};
        std::vector<float> logits;
        runner.execute(std::span(&s, 1), logits);
        ASSERT_EQ(static_cast<int64_t>(logits.size()), c.vocab_size);
        for (float v : logits) ASSERT_TRUE(std::isfinite(v)) << "step " << step;
        pos += static_cast<int64_t>(n);
    }
}

}  // namespace
}  // namespace nibble
