// Expert parallelism in the CUDA forward: a Qwen3-MoE checkpoint (NVFP4 ModelOpt experts, BF16 router; one
// dense layer through mlp_only_layers) split over 2 GPUs (ranks as threads of this process, NCCL between;
// skipped with fewer GPUs) as parallel/tensor_parallel.h lays it out: attention and the dense MLP as the
// llama family's, each rank holding half of every MoE layer's experts with the router replicated. Against
// the unsharded CUDA forward (TP = 1) on the same checkpoint.
//
// A random prompt is prefilled and decoded greedily for 12 steps by TP = 1; TP = 2 is fed the same tokens
// (teacher forcing) and must pick the same greedy token at every step on both ranks, with logits within
// rel x max(1, RMS) of TP = 1's. What differs is only where sums are cut: the row-parallel o_proj/down_proj
// outputs are 2 partial sums added by the all-reduce (as in tensor_parallel_forward_test.cpp), and a MoE
// output is each rank's weighted sum over its own experts (in ascending id, as the whole model's), the
// ranks' partial sums then added by the all-reduce: a token's top_k terms are summed in another grouping.
//   F32 activations: float32 keeps gamma_K sum|terms| either way for every regrouped sum, so the
//   difference stays at rounding level, amplified through the layers (measured on 2 x H100: 3.4e-6 to
//   4.4e-4 of the logits' RMS); 1e-3 (as the llama tensor-parallel test) covers it, while a wrong expert window, a dropped pair that still contributes or a missing all-reduce moves
//   logits by 1e-2 or more. Routing: the router sees TP = 2's h, which differs from TP = 1's by rounding
//   only; a choice could flip only at a router near-tie of that size (improbable at 1e-6: never seen).
//   BF16 activations: every all-reduce rounds its partial sums to BF16 once more (one ulp of an activation,
//   3e-2 as for the llama family); greedy tokens must agree except at near-ties (gap below the tolerance),
//   which are counted. The BF16 case runs all 4 experts of 4 per token (top_k = n_experts) so that no
//   routing choice exists for a BF16 rounding to flip (a flipped expert is a discontinuity no tolerance
//   derives); its 2 + 2 split still exercises the partial sums, and F32 runs top 2 of 8.
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
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "parallel/nccl_communicator.h"
#include "parallel/tensor_parallel.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

constexpr int kDecodeSteps = 12;

struct RankResult {
    std::vector<std::vector<float>> logits;  // [steps][vocab]: prefill's last row, then each decode step
    std::vector<int32_t> greedy;             // [steps] argmax of each
    int64_t experts_held = 0;                // a MoE layer's experts on this rank
};

int32_t argmax(const std::vector<float>& row) {
    return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Runs the prompt and kDecodeSteps decode steps on tp ranks (GPUs 0 .. tp-1); decode feeds `forced` when
// given, else each step's own greedy token.
std::vector<RankResult> run_ranks(const Model& model, int tp, DType act, int64_t graph_size,
                                  const std::vector<int32_t>& prompt, const std::vector<int32_t>& forced, int port) {
    DecoderView view;
    EXPECT_TRUE(model.decoder_view(view));
    std::vector<RankResult> results(static_cast<size_t>(tp));
    std::vector<std::exception_ptr> errors(static_cast<size_t>(tp));
    std::vector<std::thread> threads;
    for (int r = 0; r < tp; ++r)
        threads.emplace_back([&, r] {
            try {
                NIBBLE_CUDA_CHECK(cudaSetDevice(r));
                auto weights = std::make_shared<const gpu::DeviceDecoder>(
                    gpu::upload_decoder_rank(model.config(), model.quant_config(), view, tp, r));
                RankResult& out = results[static_cast<size_t>(r)];
                for (const gpu::DeviceDecoderLayer& L : weights->layers)
                    if (L.moe) out.experts_held = L.experts.n_experts;
                cudaStream_t stream = nullptr;
                NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
                std::unique_ptr<NcclCommunicator> comm;
                if (tp > 1)
                    comm = std::make_unique<NcclCommunicator>(
                        NcclBootstrap{.world_size = tp, .rank = r, .device = r, .master_addr = "127.0.0.1",
                                      .master_port = port, .timeout_ms = 60000},
                        stream);
                {
                    gpu::CudaModelRunner runner(weights, {.kv_dtype = KvDtype::Bf16,
                                                          .num_blocks = 16,
                                                          .block_size = 16,
                                                          .max_model_len = 256,
                                                          .max_num_batched_tokens = 128,
                                                          .max_num_seqs = 4,
                                                          .act_dtype = act,
                                                          .max_cudagraph_capture_size = graph_size,
                                                          .stream = stream});
                    runner.set_communicator(comm.get());
                    std::vector<int32_t> table(16);
                    for (int i = 0; i < 16; ++i) table[static_cast<size_t>(i)] = i;
                    std::vector<float> logits;
                    const RunnerSequence prefill{.tokens = prompt, .block_table = table, .start_pos = 0,
                                                 .needs_logits = true};
                    runner.execute(std::span(&prefill, 1), logits);
                    out.logits.push_back(logits);
                    out.greedy.push_back(argmax(logits));
                    for (int step = 0; step < kDecodeSteps; ++step) {
                        const std::vector<int32_t> token{forced.empty() ? out.greedy.back()
                                                                        : forced[static_cast<size_t>(step)]};
                        const RunnerSequence s{.tokens = token, .block_table = table,
                                               .start_pos = static_cast<int64_t>(prompt.size()) + step,
                                               .needs_logits = true};
                        runner.execute(std::span(&s, 1), logits);
                        out.logits.push_back(logits);
                        out.greedy.push_back(argmax(logits));
                    }
                    if (graph_size > 0) {
                        EXPECT_GE(runner.num_cuda_graphs(), 1) << "rank " << r;
                    }
                }
                comm.reset();
                (void)cudaStreamDestroy(stream);
            } catch (...) {
                errors[static_cast<size_t>(r)] = std::current_exception();
            }
        });
    for (std::thread& t : threads) t.join();
    for (int r = 0; r < tp; ++r)
        if (errors[static_cast<size_t>(r)]) {
            try {
                std::rethrow_exception(errors[static_cast<size_t>(r)]);
            } catch (const std::exception& e) {
                ADD_FAILURE() << "rank " << r << " of " << tp << ": " << e.what();
            }
        }
    return results;
}

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
};

class CudaExpertParallel : public ::testing::TestWithParam<EpCase> {};

TEST_P(CudaExpertParallel, GreedyTokensAndLogitsMatchTpOne) {
    const int gpus = cuda::device_count();
    if (gpus < 2) GTEST_SKIP() << "needs 2 GPUs, this machine has " << gpus;
    const EpCase& c = GetParam();
    ThreadPool pool(0);
    const std::unique_ptr<Model> model = load_model(test_model(c.model).string(), pool);
    ASSERT_EQ(model->config().arch, Arch::Qwen3Moe);
    const int64_t n_experts = model->config().moe.n_experts;
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<int32_t> prompt(37);
    for (int32_t& t : prompt) t = token(rng);
    static int port = 29720;  // a fresh rendezvous port per group: the last one's socket may linger
    const std::vector<RankResult> one = run_ranks(*model, 1, c.act, c.graph_size, prompt, {}, ++port);
    ASSERT_EQ(one[0].greedy.size(), static_cast<size_t>(kDecodeSteps + 1));
    EXPECT_EQ(one[0].experts_held, n_experts);
    const std::vector<int32_t> forced(one[0].greedy.begin(), one[0].greedy.end() - 1);
    const std::vector<RankResult> two = run_ranks(*model, 2, c.act, c.graph_size, prompt, forced, ++port);
    ASSERT_EQ(two.size(), 2u);
    for (int r = 0; r < 2; ++r) EXPECT_EQ(two[static_cast<size_t>(r)].experts_held, n_experts / 2) << "rank " << r;
    const double rel = c.act == DType::F32 ? 1e-3 : 3e-2;
    double worst = 0;
    int near_ties = 0;
    for (size_t step = 0; step < one[0].logits.size(); ++step) {
        const std::vector<float>& ref = one[0].logits[step];
        double ms = 0;
        for (float v : ref) ms += static_cast<double>(v) * v;
        const double tol = rel * std::max(1.0, std::sqrt(ms / static_cast<double>(ref.size())));
        for (int r = 0; r < 2; ++r) {
            ASSERT_EQ(two[static_cast<size_t>(r)].logits.size(), one[0].logits.size()) << "rank " << r;
            const std::vector<float>& got = two[static_cast<size_t>(r)].logits[step];
            ASSERT_EQ(got.size(), ref.size());
            double d = 0;
            for (size_t i = 0; i < ref.size(); ++i) {
                ASSERT_TRUE(std::isfinite(got[i])) << "rank " << r << " step " << step << " logit " << i;
                d = std::max(d, std::fabs(static_cast<double>(got[i]) - ref[i]));
            }
            EXPECT_LE(d, tol) << "rank " << r << " step " << step;
            worst = std::max(worst, d);
            const int32_t want = one[0].greedy[step], have = two[static_cast<size_t>(r)].greedy[step];
            if (have != want) {
                EXPECT_NE(c.act, DType::F32) << "rank " << r << " step " << step << ": greedy " << have
                                             << " vs TP=1 " << want;
                EXPECT_LT(ref[static_cast<size_t>(want)] - ref[static_cast<size_t>(have)], tol)
                    << "rank " << r << " step " << step << ": greedy " << have << " vs TP=1 " << want
                    << " beyond a near-tie";
                ++near_ties;
            }
        }
        EXPECT_EQ(two[0].logits[step], two[1].logits[step]) << "step " << step;  // the same gathered logits
    }
    std::printf("[  detail  ] %s %s %s: TP=2 (experts split by id) vs TP=1 over %d steps: max |diff| %.3g, "
                "%d near-ties\n",
                c.model.c_str(), c.act == DType::F32 ? "f32" : "bf16", c.graph_size > 0 ? "graphs" : "eager",
                kDecodeSteps + 1, worst, near_ties);
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, CudaExpertParallel,
                         ::testing::Values(EpCase{"top2_of_8", DType::F32, 8}, EpCase{"top2_of_8", DType::F32, 0},
                                           EpCase{"all_of_4", DType::F32, 8}, EpCase{"all_of_4", DType::BF16, 8}),
                         [](const auto& info) {
                             const EpCase& c = info.param;
                             return c.model + (c.act == DType::F32 ? "_f32" : "_bf16") +
                                    (c.graph_size > 0 ? "_graphs" : "_eager");
                         });

// The synthetic Qwen3-30B-A3B shape splits 2 ways on one GPU's worth of checks (no NCCL needed): each rank
// holds half of every MoE layer's experts and the replicated router, seeded alike on both ranks.
TEST(CudaExpertParallelSynthetic, Qwen3MoeRanksHoldHalfTheExperts) {
    NIBBLE_REQUIRE_GPU();
    ModelConfig c = gpu::synthetic_config("qwen3-30b-a3b");
    c.n_layers = 2;  // the shape, not the depth
    std::vector<std::vector<uint16_t>> routers;
    for (int64_t r = 0; r < 2; ++r) {
        const gpu::DeviceDecoder d = gpu::synthetic_decoder_rank(c, {}, 2, r);
        EXPECT_EQ(d.tp.experts, (IndexRange{r * c.moe.n_experts / 2, (r + 1) * c.moe.n_experts / 2}));
        EXPECT_EQ(d.config.moe.n_experts, c.moe.n_experts);
        ASSERT_TRUE(d.layers[0].moe);
        EXPECT_EQ(d.layers[0].experts.n_experts, c.moe.n_experts / 2);
        EXPECT_EQ(d.layers[0].router.n_out, c.moe.n_experts);
        std::vector<uint16_t> router(static_cast<size_t>(c.moe.n_experts * c.n_embd));
        d.layers[0].router.storage.download(router.data(), router.size() * 2);
        routers.push_back(std::move(router));
    }
    EXPECT_TRUE(routers[0] == routers[1]) << "the replicated router differs between the ranks";
}

}  // namespace
}  // namespace nibble
