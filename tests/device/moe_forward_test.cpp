// The CUDA forward of Qwen3-MoE (Qwen3MoeForCausalLM: the router + NVFP4 experts in place of the dense MLP,
// gpu/decoder_forward.h) against the CPU reference (CpuModelRunner over the same checkpoint), on small random
// checkpoints (hidden 256, head_dim 64, 8 experts of width 128, top 2, three layers with the middle one
// dense through mlp_only_layers) quantized to NVFP4 ModelOpt (experts quantized, the router kept BF16), and
// the same checkpoints unquantized (BF16 experts: the MoE's plain GEMV, and its grouped GEMM at prefill sizes).
//
// As decoder_forward_test.cpp: three sequences (prompts of 37, 5 and 70 tokens, then decode steps) with
// teacher forcing; logits agree within tol = rel * max(1, rms(cpu logits)) and the greedy tokens agree
// outside near-ties of the logits. rel as the dense tests: F32 activations with a bf16 KV cache 2e-3.
//
// Router near-ties: a token whose k-th and (k+1)-th router logits (softmax is monotone, so the same order
// as the probabilities) lie closer than the two runners' difference in those logits can pick a different
// expert on the GPU than on the CPU; that changes the token's MLP output by O(1), and through the KV cache
// every later logit of its sequence. An observer on the CPU model's linear inputs recomputes each router's
// logits and marks a sequence once any of its tokens, in any MoE layer, has a top-k margin below
// tie_rel * max(1, rms of that token's router logits); from then on that sequence's logits are only checked
// for being finite (and counted as skipped). F32 activations: the runners' router logits differ by float32
// summation order and rare bf16 KV rounding flips (expected well below 1e-4 relative; not yet measured),
// tie_rel 1e-3 (on these fixtures about 0.2% of token-layers fall within it: a run usually marks none).
// BF16 activations round the hidden state and the router logits themselves (2^-8 relative), so a tie
// margin would have to be ~3e-2 of the logits' scale and would mark most sequences: the BF16 comparison
// (loose, 8e-2) therefore runs a checkpoint whose top_k equals n_experts (4 of 4): the router's softmax
// weights, the permutation, the grouped GEMVs and the combine all run, with no selection that can flip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "decoder_forward_util.h"
#include "device_test_util.h"
#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "ops/moe/moe_cuda.h"
#include "quant/quantize.h"
#include "tensor/convert.h"

namespace nibble {
namespace {

using test::quantized;
using test::TinyArch;
using test::write_checkpoint;
namespace fs = std::filesystem;

// Marks the sequences whose tokens hit a router near-tie on the CPU (see the header).
class RouterTieObserver final : public LinearInputObserver {
public:
    RouterTieObserver(int64_t n_experts, int64_t top_k, double tie_rel)
        : n_experts_(n_experts), top_k_(top_k), tie_rel_(tie_rel) {}

    std::vector<size_t> row_seq;  // [rows of the next forward] the sequence of each flattened row
    std::vector<bool> tied;       // [sequences] a near-tie has happened in this sequence
    int events = 0;

    void observe(const LinearWeight& w, const float* x, int64_t m) override {
        if (!w.name.ends_with("mlp.gate") || top_k_ >= n_experts_) return;
        ASSERT_EQ(w.format, WeightFormat::Dense) << w.name;
        ASSERT_EQ(w.n_out, n_experts_) << w.name;
        ASSERT_EQ(static_cast<size_t>(m), row_seq.size()) << w.name;
        std::vector<float>& W = router_[&w];
        if (W.empty()) {
            W.resize(static_cast<size_t>(w.n_out * w.n_in));
            decode_to_float(w.data, w.dtype, w.n_out * w.n_in, W.data());
        }
        std::vector<double> logits(static_cast<size_t>(n_experts_));
        for (int64_t r = 0; r < m; ++r) {
            double ms = 0;
            for (int64_t e = 0; e < n_experts_; ++e) {
                double acc = 0;
                for (int64_t i = 0; i < w.n_in; ++i)
                    acc += static_cast<double>(x[r * w.n_in + i]) * W[static_cast<size_t>(e * w.n_in + i)];
                logits[static_cast<size_t>(e)] = acc;
                ms += acc * acc;
            }
            std::sort(logits.begin(), logits.end(), std::greater<>());
            const double gap = logits[static_cast<size_t>(top_k_ - 1)] - logits[static_cast<size_t>(top_k_)];
            const double margin = tie_rel_ * std::max(1.0, std::sqrt(ms / static_cast<double>(n_experts_)));
            if (gap < margin) {
                const size_t s = row_seq[static_cast<size_t>(r)];
                if (s >= tied.size()) tied.resize(s + 1, false);
                tied[s] = true;
                ++events;
            }
        }
    }

private:
    int64_t n_experts_, top_k_;
    double tie_rel_;
    std::map<const LinearWeight*, std::vector<float>> router_;
};

void compare_moe_forward(const fs::path& dir, DType act, KvDtype kv, double rel, double tie_rel,
                         const std::string& what) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    const ModelConfig& c = model->config();
    ASSERT_EQ(c.arch, Arch::Qwen3Moe);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    RouterTieObserver ties(c.moe.n_experts, c.moe.top_k, tie_rel);
    model->set_linear_input_observer(&ties);
    const int64_t blocks = 64, bs = 16;
    CpuModelRunner cpu(*model, blocks, bs, kv);
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(c, view));
    ASSERT_TRUE(weights->has_moe());
    gpu::CudaModelRunner gpu_runner(weights, {.kv_dtype = kv,
                                              .num_blocks = blocks,
                                              .block_size = bs,
                                              .max_model_len = 512,
                                              .max_num_batched_tokens = 256,
                                              .max_num_seqs = 8,
                                              .act_dtype = act});
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t vocab = c.vocab_size;
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
    const std::vector<int64_t> lengths = {37, 5, 70};
    std::vector<std::vector<int32_t>> seqs(lengths.size()), tables(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
        for (int64_t i = 0; i < lengths[s]; ++i) seqs[s].push_back(tok(rng));
        for (int64_t b = 0; b < 12; ++b) tables[s].push_back(static_cast<int32_t>(s * 20 + static_cast<size_t>(b)));
    }
    ties.tied.assign(lengths.size(), false);
    std::vector<int64_t> done(lengths.size(), 0);
    int near_ties = 0, compared = 0, skipped = 0;
    for (int step = 0; step < 12; ++step) {
        std::vector<RunnerSequence> batch;
        ties.row_seq.clear();
        for (size_t s = 0; s < seqs.size(); ++s) {
            batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s])),
                             .block_table = tables[s],
                             .start_pos = done[s],
                             .needs_logits = true});
            ties.row_seq.insert(ties.row_seq.end(), seqs[s].size() - static_cast<size_t>(done[s]), s);
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
            done[s] = static_cast<int64_t>(seqs[s].size());
            seqs[s].push_back(ct);  // teacher forcing: both continue with the CPU's token
            if (ties.tied[s]) {
                ++skipped;
                continue;
            }
            ++compared;
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
    model->set_linear_input_observer(nullptr);
    std::printf("[  detail  ] %s: 12 steps x 3 sequences, %d compared, %d skipped after %d router near-ties, "
                "%d logit near-ties\n",
                what.c_str(), compared, skipped, ties.events, near_ties);
    // A router near-tie marks one sequence; with these margins most runs mark none (see the header).
    EXPECT_GE(compared, 12) << what << ": too few comparisons left after router near-ties";
}

class MoeForwardCuda : public ::testing::Test {
protected:
    void SetUp() override {
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
        root_ = fs::temp_directory_path() / ("nibble-moe-forward-" + std::to_string(::getpid()));
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_;
};

// Top 2 of 8 experts; layer 1 dense (mlp_only_layers), layers 0 and 2 MoE.
TinyArch top2_of_8(int64_t head_dim) {
    return {.arch = "Qwen3MoeForCausalLM", .qk_norm = true, .head_dim = head_dim, .n_experts = 8, .top_k = 2,
            .moe_ff = 128, .mlp_only_layers = {1}, .n_layers = 3};
}

// Every expert for every token: no selection that BF16 rounding could flip.
TinyArch all_of_4() {
    return {.arch = "Qwen3MoeForCausalLM", .qk_norm = true, .head_dim = 64, .n_experts = 4, .top_k = 4,
            .moe_ff = 128, .n_layers = 2};
}

TEST_F(MoeForwardCuda, Qwen3MoeNvfp4ModelOptF32Activations) {
    const fs::path m = quantized(write_checkpoint(root_ / "moe", top2_of_8(64), 11), root_ / "moe-nvfp4",
                                 QuantLayout::ModelOpt, false);
    compare_moe_forward(m, DType::F32, KvDtype::Bf16, 2e-3, 1e-3, "qwen3-moe nvfp4 top2/8 hd64 / f32 act / bf16 kv");
}

TEST_F(MoeForwardCuda, Qwen3MoeNvfp4ModelOptHeadDim128F32Activations) {
    const fs::path m = quantized(write_checkpoint(root_ / "moe", top2_of_8(128), 12), root_ / "moe-nvfp4",
                                 QuantLayout::ModelOpt, false);
    compare_moe_forward(m, DType::F32, KvDtype::Bf16, 2e-3, 1e-3, "qwen3-moe nvfp4 top2/8 hd128 / f32 act / bf16 kv");
}

TEST_F(MoeForwardCuda, Qwen3MoeNvfp4ModelOptAllExperts) {
    const fs::path m = quantized(write_checkpoint(root_ / "moe", all_of_4(), 13), root_ / "moe-nvfp4",
                                 QuantLayout::ModelOpt, false);
    compare_moe_forward(m, DType::F32, KvDtype::Bf16, 2e-3, 1e-3, "qwen3-moe nvfp4 all 4/4 / f32 act / bf16 kv");
    compare_moe_forward(m, DType::BF16, KvDtype::Bf16, 8e-2, 1e-3, "qwen3-moe nvfp4 all 4/4 / bf16 act / bf16 kv");
}

// An unquantized (BF16) checkpoint: the experts stay BF16 on the device. F32 activations run them on the
// MoE's plain GEMV (the exactness mode); BF16 activations on the all-experts model take the grouped GEMM at
// the first step (112 prompt rows x 4 choices >= 8 x 4 experts: moe_prefers_gemm) and the plain GEMV for the
// decode steps after it.
TEST_F(MoeForwardCuda, Qwen3MoeBf16ExpertsF32Activations) {
    const fs::path m = write_checkpoint(root_ / "moe-bf16", top2_of_8(64), 14);
    compare_moe_forward(m, DType::F32, KvDtype::Bf16, 2e-3, 1e-3,
                        "qwen3-moe bf16 experts top2/8 / f32 act / bf16 kv");
}

TEST_F(MoeForwardCuda, Qwen3MoeBf16ExpertsAllExperts) {
    const fs::path m = write_checkpoint(root_ / "moe-bf16-all", all_of_4(), 17);
    ASSERT_TRUE(cuda::moe_prefers_gemm(112, 4, 4, DType::BF16));
    compare_moe_forward(m, DType::F32, KvDtype::Bf16, 2e-3, 1e-3,
                        "qwen3-moe bf16 experts all 4/4 / f32 act / bf16 kv");
    compare_moe_forward(m, DType::BF16, KvDtype::Bf16, 8e-2, 1e-3,
                        "qwen3-moe bf16 experts all 4/4 / bf16 act / bf16 kv");
}

// An FP8 expert has no CUDA MoE kernel: refused at upload, naming it.
TEST_F(MoeForwardCuda, Fp8ExpertRefused) {
    const fs::path dir = write_checkpoint(root_ / "moe-bf16", top2_of_8(64), 14);
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    LinearWeight fp8 = *view.layers[0].expert_up[3];
    fp8.format = WeightFormat::Fp8;  // format only: the check refuses it before any byte is read
    view.layers[0].expert_up[3] = &fp8;
    try {
        (void)gpu::upload_decoder(model->config(), view);
        ADD_FAILURE() << "an FP8 expert was accepted";
    } catch (const std::exception& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("model.layers.0.mlp.experts.3.up_proj"), std::string::npos) << msg;
        EXPECT_NE(msg.find("NVFP4 or BF16"), std::string::npos) << msg;
    }
}

// Decode steps replayed from CUDA graphs (batches padded to their bucket; the padding rows are routed too)
// compute what eager steps compute. F32 on the top-2 model: the runs differ by the attention's float32
// summation order only (~1e-7 relative), far below any router margin these random models produce. BF16 on
// the all-experts model (a one-ulp BF16 difference could flip a top-2 choice, see the header).
TEST_F(MoeForwardCuda, GraphReplaysMatchEagerSteps) {
    const fs::path top2 = quantized(write_checkpoint(root_ / "moe2", top2_of_8(128), 15), root_ / "moe2-nvfp4",
                                    QuantLayout::ModelOpt, false);
    const fs::path all = quantized(write_checkpoint(root_ / "moe4", all_of_4(), 16), root_ / "moe4-nvfp4",
                                   QuantLayout::ModelOpt, false);
    const fs::path top2_bf16 = write_checkpoint(root_ / "moe2-bf16", top2_of_8(128), 18);  // BF16 experts
    for (const auto& [dir, act] :
         {std::pair{top2, DType::F32}, std::pair{all, DType::BF16}, std::pair{top2_bf16, DType::F32}}) {
        ThreadPool pool(0);
        std::unique_ptr<Model> model = load_model(dir.string(), pool);
        DecoderView view;
        ASSERT_TRUE(model->decoder_view(view));
        auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
        test::expect_graph_replays_match_eager(weights, act, "qwen3-moe " + std::string(dtype_name(act)));
    }
}

// The synthetic Qwen3-30B-A3B shape (bench --synthetic qwen3-30b-a3b, NVFP4 and --weights bf16) at 4 of its
// 48 layers runs eagerly and from graphs with finite logits, and its accounting counts only the top_k experts
// per token.
class SyntheticQwen3Moe : public MoeForwardCuda, public ::testing::WithParamInterface<bool> {};

TEST_P(SyntheticQwen3Moe, ShapeRuns) {
    ModelConfig c = gpu::synthetic_config("qwen3-30b-a3b");
    EXPECT_EQ(c.arch, Arch::Qwen3Moe);
    c.n_layers = 4;
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::synthetic_decoder(c, {.nvfp4 = GetParam()}));
    EXPECT_EQ(weights->layers[0].experts.bf16.bytes() != 0, !GetParam());
    ASSERT_TRUE(weights->has_moe());
    EXPECT_FALSE(weights->has_dense_mlp());
    const int64_t expert_params = 3 * c.moe.n_ff * c.n_embd;
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    const int64_t per_layer = c.n_embd * (2 * q_dim + 2 * kv_dim) + c.moe.n_experts * c.n_embd + c.moe.top_k * expert_params;
    EXPECT_EQ(weights->active_linear_params(), c.n_layers * per_layer);
    gpu::CudaModelRunner runner(weights, {.kv_dtype = KvDtype::Bf16, .num_blocks = 64, .block_size = 16,
                                          .max_model_len = 512, .max_num_batched_tokens = 128, .max_num_seqs = 4,
                                          .act_dtype = DType::BF16, .max_cudagraph_capture_size = 4});
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(c.vocab_size - 1));
    std::vector<std::vector<int32_t>> seqs(3), tables(3);
    for (size_t s = 0; s < 3; ++s) {
        for (int i = 0; i < 20 + 17 * static_cast<int>(s); ++i) seqs[s].push_back(tok(rng));
        for (int b = 0; b < 8; ++b) tables[s].push_back(static_cast<int32_t>(s * 10 + static_cast<size_t>(b)));
    }
    std::vector<int64_t> done(3, 0);
    for (int step = 0; step < 6; ++step) {
        std::vector<RunnerSequence> batch;
        for (size_t s = 0; s < 3; ++s)
            batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s])),
                             .block_table = tables[s], .start_pos = done[s], .needs_logits = true});
        std::vector<float> logits;
        runner.execute(batch, logits);
        ASSERT_EQ(logits.size(), 3 * static_cast<size_t>(c.vocab_size));
        for (float v : logits) ASSERT_TRUE(std::isfinite(v)) << "step " << step;
        for (size_t s = 0; s < 3; ++s) {
            done[s] = static_cast<int64_t>(seqs[s].size());
            seqs[s].push_back(tok(rng));
        }
    }
    EXPECT_GE(runner.num_cuda_graphs(), 1);
}

INSTANTIATE_TEST_SUITE_P(Weights, SyntheticQwen3Moe, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "nvfp4" : "bf16"; });

}  // namespace
}  // namespace nibble

namespace nibble {
namespace {

// The experts a batched decode step reads on average (nibble bench's bound for tg xB): top_k for one token
// on a rank holding every expert, top_k E_r / E on one holding E_r, and the union of B uniform choices
// E_r (1 - (1 - top_k / E)^B) towards all of them (host only).
TEST(DeviceMoeExperts, ExpectedActiveExperts) {
    gpu::DeviceMoeExperts all;
    all.n_experts = 128;
    EXPECT_DOUBLE_EQ(all.expected_active(128, 8, 1), 8.0);
    EXPECT_DOUBLE_EQ(all.expected_active(128, 8, 2), 128.0 * (1.0 - (120.0 / 128.0) * (120.0 / 128.0)));
    EXPECT_NEAR(all.expected_active(128, 8, 256), 128.0, 1e-4);
    gpu::DeviceMoeExperts half;
    half.n_experts = 64;  // a rank's share
    EXPECT_DOUBLE_EQ(half.expected_active(128, 8, 1), 4.0);
}

}  // namespace
}  // namespace nibble
