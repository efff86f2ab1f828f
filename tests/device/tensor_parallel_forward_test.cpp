// The tensor-parallel CUDA forward (weights sharded by parallel/decoder_view_shard.h, collectives by NCCL)
// against the unsharded CUDA forward, with the ranks as threads of this process on GPUs 0 .. N-1 (skipped on a
// machine with fewer GPUs). The models are the llama-family variants of the whole-forward device tests
// (decoder_forward_util.h: Llama with and without biases and tied embeddings, Qwen2 biases, Qwen3 QK-norm,
// head_dim 64 and 128; BF16, NVFP4 ModelOpt and NVFP4 compressed-tensors): the golden fixtures' head_dim 16
// and 32 are below what the CUDA attention takes, and tests/parallel/llama_tp_test.cpp runs those sharded on
// the CPU.
//
// A random prompt is prefilled and then decoded greedily for 12 steps by TP = 1; TP = N is fed the same
// tokens (teacher forcing) and must pick the same greedy token at every step on every rank (every rank holds
// the gathered logits), with logits within rel x max(1, RMS) of TP = 1's:
//   F32 activations: only summation order differs (a row-parallel output is N partial sums added by the
//   all-reduce; float32 keeps gamma_K sum|terms| either way, as tests/parallel/llama_tp_test.cpp derives).
//   Each reordered sum differs by a few float32 ulps, but the difference is carried and amplified through
//   the layers, norms and an NVFP4 lm_head's large weights: measured on 2 x H100, 1.4e-6 to 1.4e-4 of the
//   logits' RMS over these models. 1e-3 here: an order of magnitude above that, an order below what a wrong
//   head slice, a bias added twice or a vocabulary offset off by one row does (1e-2 or more).
//   BF16 activations: the all-reduce rounds the partial sums to BF16 once more per row-parallel layer, so one
//   ulp of a rounded activation can differ (3e-2, as graphs vs eager); greedy tokens must agree except at
//   near-ties (gap below the tolerance), which are counted.
// Decode steps run as CUDA graphs (NCCL's collectives captured) and eagerly.
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <string>
#include <random>
#include <thread>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "decoder_forward_util.h"
#include "parallel/nccl_communicator.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

constexpr int kDecodeSteps = 12;

struct RankResult {
    std::vector<std::vector<float>> logits;  // [steps][vocab]: prefill's last row, then each decode step
    std::vector<int32_t> greedy;             // [steps] argmax of each
};

int32_t argmax(const std::vector<float>& row) {
    return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Runs the prompt and kDecodeSteps decode steps on tp ranks (GPUs 0 .. tp-1). Decode feeds `forced` when it
// is given, else the step's own greedy token. Returns every rank's result.
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
                cudaStream_t stream = nullptr;
                NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
                std::unique_ptr<NcclCommunicator> comm;
                if (tp > 1) {
                    comm = std::make_unique<NcclCommunicator>(
                        NcclBootstrap{.world_size = tp, .rank = r, .device = r, .master_addr = "127.0.0.1",
                                      .master_port = port, .timeout_ms = 60000},
                        stream);
                }
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
                    RankResult& out = results[static_cast<size_t>(r)];
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

struct TpCase {
    std::string model;  // a name of test_model()
    DType act;
    int64_t graph_size;  // 0: eager decode
};

// The test's checkpoints, written once per process under a temporary folder.
fs::path test_model(const std::string& name) {
    static const fs::path root = fs::temp_directory_path() / ("nibble-tp-forward-" + std::to_string(getpid()));
    const fs::path dir = root / name;
    if (fs::exists(dir / "config.json")) return dir;
    using test::TinyArch;
    if (name == "llama") return test::write_checkpoint(dir, TinyArch{}, 11);
    if (name == "llama_bias_tied") return test::write_checkpoint(dir, TinyArch{.bias = true, .tied = true}, 12);
    if (name == "qwen2_bias") return test::write_checkpoint(dir, TinyArch{.arch = "Qwen2ForCausalLM", .bias = true}, 13);
    if (name == "qwen3_qknorm_hd128")
        return test::write_checkpoint(dir, TinyArch{.arch = "Qwen3ForCausalLM", .qk_norm = true, .head_dim = 128}, 14);
    if (name == "llama_nvfp4_modelopt")
        return test::quantized(test_model("llama"), dir, QuantLayout::ModelOpt, false);
    if (name == "qwen3_nvfp4_ct_lm_head")
        return test::quantized(test_model("qwen3_qknorm_hd128"), dir, QuantLayout::CompressedTensors, true);
    ADD_FAILURE() << "no test model " << name;
    return dir;
}

class CudaTensorParallel : public ::testing::TestWithParam<TpCase> {};

TEST_P(CudaTensorParallel, GreedyTokensAndLogitsMatchTpOne) {
    const int gpus = cuda::device_count();
    if (gpus < 2) GTEST_SKIP() << "needs 2 GPUs, this machine has " << gpus;
    const TpCase& c = GetParam();
    ThreadPool pool(0);
    const std::unique_ptr<Model> model = load_model(test_model(c.model).string(), pool);
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<int32_t> prompt(37);
    for (int32_t& t : prompt) t = token(rng);
    static int port = 29620;  // a fresh rendezvous port per group: the last one's socket may linger
    const std::vector<RankResult> one = run_ranks(*model, 1, c.act, c.graph_size, prompt, {}, ++port);
    ASSERT_EQ(one[0].greedy.size(), static_cast<size_t>(kDecodeSteps + 1));
    const std::vector<int32_t> forced(one[0].greedy.begin(), one[0].greedy.end() - 1);
    const std::vector<RankResult> two = run_ranks(*model, 2, c.act, c.graph_size, prompt, forced, ++port);
    ASSERT_EQ(two.size(), 2u);
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
                EXPECT_NE(c.act, DType::F32) << "rank " << r << " step " << step << ": greedy " << have << " vs TP=1 " << want;
                EXPECT_LT(ref[static_cast<size_t>(want)] - ref[static_cast<size_t>(have)], tol)
                    << "rank " << r << " step " << step << ": greedy " << have << " vs TP=1 " << want
                    << " beyond a near-tie";
                ++near_ties;
            }
        }
        // Both ranks hold the same gathered logits.
        EXPECT_EQ(two[0].logits[step], two[1].logits[step]) << "step " << step;
    }
    std::printf("[  detail  ] %s %s %s: TP=2 vs TP=1 over %d steps: max |diff| %.3g, %d near-ties\n", c.model.c_str(),
                c.act == DType::F32 ? "f32" : "bf16", c.graph_size > 0 ? "graphs" : "eager", kDecodeSteps + 1, worst,
                near_ties);
}

std::vector<TpCase> tp_cases() {
    std::vector<TpCase> cases;
    for (const char* m : {"llama", "llama_bias_tied", "qwen2_bias", "qwen3_qknorm_hd128", "llama_nvfp4_modelopt",
                          "qwen3_nvfp4_ct_lm_head"}) {
        cases.push_back({m, DType::F32, 8});
        cases.push_back({m, DType::BF16, 8});
    }
    cases.push_back({"llama", DType::F32, 0});
    cases.push_back({"llama_nvfp4_modelopt", DType::BF16, 0});
    return cases;
}

INSTANTIATE_TEST_SUITE_P(LlamaFamily, CudaTensorParallel, ::testing::ValuesIn(tp_cases()), [](const auto& info) {
    const TpCase& c = info.param;
    return c.model + (c.act == DType::F32 ? "_f32" : "_bf16") + (c.graph_size > 0 ? "_graphs" : "_eager");
});

}  // namespace
}  // namespace nibble
