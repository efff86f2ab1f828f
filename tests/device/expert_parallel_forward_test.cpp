// Expert parallelism in the CUDA forward: a Qwen3-MoE checkpoint (NVFP4 ModelOpt experts, BF16 router; one
// dense layer through mlp_only_layers) split over N = 2 and N = 4 GPUs (ranks as threads of this process, NCCL
// between; each case skipped with fewer than N GPUs) as parallel/tensor_parallel.h lays it out: attention and
// the dense MLP as the llama family's (at N = 4: one query head per rank, the 2 KV heads each replicated on 2
// ranks), each rank holding E / N of every MoE layer's experts (by id, whole) with the router replicated; both
// models' 8 and 4 experts divide by 2 and 4. Against the unsharded CUDA forward (TP = 1) on the same checkpoint.
//
// A random prompt is prefilled and decoded greedily for 12 steps by TP = 1; TP = N is fed the same tokens
// (teacher forcing) and must pick the same greedy token at every step on every rank, with logits within
// rel x max(1, RMS) of TP = 1's. What differs is only where sums are cut: the row-parallel o_proj/down_proj
// outputs are N partial sums added by the all-reduce (as in tensor_parallel_forward_test.cpp), and a MoE
// output is each rank's weighted sum over its own experts (in ascending id, as the whole model's), the
// ranks' partial sums then added by the all-reduce: a token's top_k terms are summed in another grouping.
//   F32 activations: float32 keeps gamma_K sum|terms| either way for every regrouped sum, so the
//   difference stays at rounding level, amplified through the layers (measured on 2 x H100: 3.4e-6 to
//   4.4e-4 of the logits' RMS at N = 2; N = 4 not yet measured); 1e-3 (as the llama tensor-parallel test)
//   covers it, while a wrong expert window, a dropped pair that still contributes or a missing all-reduce
//   moves logits by 1e-2 or more. Routing: the router sees TP = N's h, which differs from TP = 1's by rounding
//   only; a choice could flip only at a router near-tie of that size (improbable at 1e-6: never seen).
//   BF16 activations: every all-reduce rounds its partial sums to BF16 once more (at N = 4 a ring all-reduce
//   may round each of its N - 1 additions; an ulp or so of an activation, 3e-2 as for the llama family); greedy tokens must agree except at near-ties (gap below the tolerance),
//   which are counted. The BF16 case runs all 4 experts of 4 per token (top_k = n_experts) so that no
//   routing choice exists for a BF16 rounding to flip (a flipped expert is a discontinuity no tolerance
//   derives); its 2 + 2 (N = 2) or 1 + 1 + 1 + 1 (N = 4) split still exercises the partial sums, and F32 runs
//   top 2 of 8 (at N = 4 a token's 2 experts are on one rank or on two, and some ranks hold none of them).
// Decode steps run as CUDA graphs (the localize kernel and NCCL's collectives captured) and eagerly.
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/thread_pool.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "decoder_forward_util.h"
#include "tensor_parallel_util.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "parallel/nccl_communicator.h"
#include "parallel/tensor_parallel.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

// The checkpoints, written once per process: BF16, then quantized to NVFP4 ModelOpt (router kept BF16).
fs::path test_model(const std::string& name) {
    static const fs::path root = fs::temp_directory_path() / ("nibble-ep-forward-" + std::to_string(getpid()));
    const fs::path dir = root / name;
    if (fs::exists(dir / "config.json")) return dir;
    using test::TinyArch;
    if (name == "top2_of_8")  // layers 0 and 2 MoE, layer 1 dense
        return test::quantized(
            test::write_checkpoint(root / (name + "-bf16"),
                                   TinyArch{.arch = "Qwen3MoeForCausalLM", .qk_norm = true, .head_dim = 64,
                                            .n_experts = 8, .top_k = 2, .moe_ff = 128, .mlp_only_layers = {1},
                                            .n_layers = 3},
                                   21),
            dir, QuantLayout::ModelOpt, false);
    if (name == "all_of_4")
        return test::quantized(
            test::write_checkpoint(root / (name + "-bf16"),
                                   TinyArch{.arch = "Qwen3MoeForCausalLM", .qk_norm = true, .head_dim = 128,
                                            .n_experts = 4, .top_k = 4, .moe_ff = 128, .mlp_only_layers = {0},
                                            .n_layers = 3},
                                   22),
            dir, QuantLayout::ModelOpt, false);
    ADD_FAILURE() << "no test model " << name;
    return dir;
}

struct EpCase {
    std::string model;  // a name of test_model()
    DType act;
    int64_t graph_size;  // 0: eager decode
    int tp;              // ranks of the sharded run (GPUs 0 .. tp-1)
};

class CudaExpertParallel : public ::testing::TestWithParam<EpCase> {};

TEST_P(CudaExpertParallel, GreedyTokensAndLogitsMatchTpOne) {
    const EpCase& c = GetParam();
    if (const std::string missing = test::missing_gpus(c.tp); !missing.empty()) GTEST_SKIP() << missing;
    ThreadPool pool(0);
    const std::unique_ptr<Model> model = load_model(test_model(c.model).string(), pool);
    ASSERT_EQ(model->config().arch, Arch::Qwen3Moe);
    const int64_t n_experts = model->config().moe.n_experts;
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<int32_t> prompt(37);
    for (int32_t& t : prompt) t = token(rng);
    static int port = 29720;  // a fresh rendezvous port per group: the last one's socket may linger
    const std::vector<test::RankResult> one = test::run_ranks(*model, 1, c.act, c.graph_size, prompt, {}, ++port);
    ASSERT_EQ(one[0].greedy.size(), static_cast<size_t>(test::kTpDecodeSteps + 1));
    EXPECT_EQ(one[0].experts_held, n_experts);
    const std::vector<int32_t> forced(one[0].greedy.begin(), one[0].greedy.end() - 1);
    const std::vector<test::RankResult> many =
        test::run_ranks(*model, c.tp, c.act, c.graph_size, prompt, forced, ++port);
    ASSERT_EQ(many.size(), static_cast<size_t>(c.tp));
    for (int r = 0; r < c.tp; ++r)
        EXPECT_EQ(many[static_cast<size_t>(r)].experts_held, n_experts / c.tp) << "rank " << r << " of " << c.tp;
    const test::TpComparison cmp = test::compare_tp_with_one(one, many, c.act, c.act == DType::F32 ? 1e-3 : 3e-2);
    std::printf("[  detail  ] %s %s %s: TP=%d (experts split by id) vs TP=1 over %d steps: max |diff| %.3g, "
                "%d near-ties\n",
                c.model.c_str(), c.act == DType::F32 ? "f32" : "bf16", c.graph_size > 0 ? "graphs" : "eager", c.tp,
                test::kTpDecodeSteps + 1, cmp.worst, cmp.near_ties);
}

std::vector<EpCase> ep_cases() {
    std::vector<EpCase> cases;
    for (int tp : {2, 4})
        for (const EpCase& c : {EpCase{"top2_of_8", DType::F32, 8, tp}, EpCase{"top2_of_8", DType::F32, 0, tp},
                                EpCase{"all_of_4", DType::F32, 8, tp}, EpCase{"all_of_4", DType::BF16, 8, tp}})
            cases.push_back(c);
    return cases;
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, CudaExpertParallel, ::testing::ValuesIn(ep_cases()), [](const auto& info) {
    const EpCase& c = info.param;
    return c.model + (c.act == DType::F32 ? "_f32" : "_bf16") + (c.graph_size > 0 ? "_graphs" : "_eager") + "_tp" +
           std::to_string(c.tp);
});

// The synthetic Qwen3-30B-A3B shape (128 experts, 32 query / 4 KV heads) splits 2 and 4 ways on one GPU's
// worth of checks (no NCCL needed; the ranks are made one after another on this GPU): each rank holds its
// E / N of every MoE layer's experts and the replicated router, seeded alike on every rank.
TEST(CudaExpertParallelSynthetic, Qwen3MoeRanksHoldTheirShareOfTheExperts) {
    NIBBLE_REQUIRE_GPU();
    ModelConfig c = gpu::synthetic_config("qwen3-30b-a3b");
    c.n_layers = 2;  // the shape, not the depth
    for (int64_t n : {2, 4}) {
        std::vector<std::vector<uint16_t>> routers;
        for (int64_t r = 0; r < n; ++r) {
            const gpu::DeviceDecoder d = gpu::synthetic_decoder_rank(c, {}, n, r);
            EXPECT_EQ(d.tp.experts, (IndexRange{r * c.moe.n_experts / n, (r + 1) * c.moe.n_experts / n}))
                << "rank " << r << " of " << n;
            EXPECT_EQ(d.config.moe.n_experts, c.moe.n_experts);
            ASSERT_TRUE(d.layers[0].moe);
            EXPECT_EQ(d.layers[0].experts.n_experts, c.moe.n_experts / n) << "rank " << r << " of " << n;
            EXPECT_EQ(d.layers[0].router.n_out, c.moe.n_experts);
            std::vector<uint16_t> router(static_cast<size_t>(c.moe.n_experts * c.n_embd));
            d.layers[0].router.storage.download(router.data(), router.size() * 2);
            routers.push_back(std::move(router));
        }
        for (size_t r = 1; r < routers.size(); ++r)
            EXPECT_TRUE(routers[r] == routers[0]) << "the replicated router differs between ranks 0 and " << r
                                                  << " of " << n;
    }
}

}  // namespace
}  // namespace nibble
