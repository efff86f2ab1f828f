// The tensor-parallel CUDA forward (weights sharded by parallel/decoder_view_shard.h, collectives by NCCL)
// against the unsharded CUDA forward, with the ranks as threads of this process on GPUs 0 .. N-1, N = 2 and 4
// (each case skipped on a machine with fewer than N GPUs). The models are the llama-family variants of the
// whole-forward device tests (decoder_forward_util.h: Llama with and without biases and tied embeddings, Qwen2
// biases, Qwen3 QK-norm, head_dim 64 and 128; BF16, NVFP4 ModelOpt and NVFP4 compressed-tensors);
// tests/parallel/llama_tp_test.cpp runs the golden fixtures (head_dim 16 and 32) sharded on the CPU.
// At N = 4 every model here splits (check_tensor_parallel / check_tensor_parallel_quant): its 4 query heads
// give one per rank, its 2 KV heads are each replicated on 2 ranks (rank r reads KV head r / 2, as its query
// head r does in the whole model), the intermediate size 512 gives 128 per rank (8 NVFP4 blocks of down_proj's
// inputs), o_proj's 256 or 512 inputs give 64 or 128 (4 or 8 blocks), and the vocabulary 1024 gives 256 rows.
//
// A random prompt is prefilled and then decoded greedily for 12 steps by TP = 1; TP = N is fed the same
// tokens (teacher forcing) and must pick the same greedy token at every step on every rank (every rank holds
// the gathered logits), with logits within rel x max(1, RMS) of TP = 1's:
//   F32 activations: only summation order differs (a row-parallel output is N partial sums added by the
//   all-reduce; float32 keeps gamma_K sum|terms| either way, as tests/parallel/llama_tp_test.cpp derives).
//   Each reordered sum differs by a few float32 ulps, but the difference is carried and amplified through
//   the layers, norms and an NVFP4 lm_head's large weights: measured on 2 x H100, 1.4e-6 to 1.4e-4 of the
//   logits' RMS over these models at N = 2, up to 1.2e-4 at N = 4 (4 x H200). 1e-3 here: an order of
//   magnitude above that, an order below what a wrong head slice, a bias added twice or a vocabulary offset
//   off by one row does (1e-2 or more).
//   BF16 activations: the all-reduce rounds the partial sums to BF16 once more per row-parallel layer, so an
//   ulp or so of a rounded activation can differ, and the difference is carried through the layers like the
//   F32 one. Measured max |TP - TP=1| / max(1, RMS) on 2 and 4 x H200 over these models: 2.0% to 3.05% (the
//   2-rank llama_bias_tied case reached 0.2496 against RMS 8.3 once, which a 3e-2 tolerance failed). 5e-2 x
//   (N - 1) here: at N = 4 an all-reduce may round each of its N - 1 additions. A wrong head slice or a bias
//   added twice moves the logits by a whole RMS. Greedy tokens must agree except at near-ties (gap below the
//   tolerance), which are counted.
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
#include "tensor_parallel_util.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

struct TpCase {
    std::string model;  // a name of test_model()
    DType act;
    int64_t graph_size;  // 0: eager decode
    int tp;              // ranks of the sharded run (GPUs 0 .. tp-1)
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
    const TpCase& c = GetParam();
    if (const std::string missing = test::missing_gpus(c.tp); !missing.empty()) GTEST_SKIP() << missing;
    ThreadPool pool(0);
    const std::unique_ptr<Model> model = load_model(test_model(c.model).string(), pool);
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<int32_t> prompt(37);
    for (int32_t& t : prompt) t = token(rng);
    static int port = 29620;  // a fresh rendezvous port per group: the last one's socket may linger
    const std::vector<test::RankResult> one = test::run_ranks(*model, 1, c.act, c.graph_size, prompt, {}, ++port);
    ASSERT_EQ(one[0].greedy.size(), static_cast<size_t>(test::kTpDecodeSteps + 1));
    const std::vector<int32_t> forced(one[0].greedy.begin(), one[0].greedy.end() - 1);
    const std::vector<test::RankResult> many =
        test::run_ranks(*model, c.tp, c.act, c.graph_size, prompt, forced, ++port);
    ASSERT_EQ(many.size(), static_cast<size_t>(c.tp));
    const double rel = c.act == DType::F32 ? 1e-3 : 5e-2 * (c.tp - 1);
    const test::TpComparison cmp = test::compare_tp_with_one(one, many, c.act, rel);
    std::printf("[  detail  ] %s %s %s: TP=%d vs TP=1 over %d steps: max |diff| %.3g, %d near-ties\n",
                c.model.c_str(), c.act == DType::F32 ? "f32" : "bf16", c.graph_size > 0 ? "graphs" : "eager", c.tp,
                test::kTpDecodeSteps + 1, cmp.worst, cmp.near_ties);
}

std::vector<TpCase> tp_cases() {
    std::vector<TpCase> cases;
    for (int tp : {2, 4}) {
        for (const char* m : {"llama", "llama_bias_tied", "qwen2_bias", "qwen3_qknorm_hd128", "llama_nvfp4_modelopt",
                              "qwen3_nvfp4_ct_lm_head"}) {
            cases.push_back({m, DType::F32, 8, tp});
            cases.push_back({m, DType::BF16, 8, tp});
        }
        cases.push_back({"llama", DType::F32, 0, tp});
        cases.push_back({"llama_nvfp4_modelopt", DType::BF16, 0, tp});
    }
    return cases;
}

INSTANTIATE_TEST_SUITE_P(LlamaFamily, CudaTensorParallel, ::testing::ValuesIn(tp_cases()), [](const auto& info) {
    const TpCase& c = info.param;
    return c.model + (c.act == DType::F32 ? "_f32" : "_bf16") + (c.graph_size > 0 ? "_graphs" : "_eager") + "_tp" +
           std::to_string(c.tp);
});

}  // namespace
}  // namespace nibble
