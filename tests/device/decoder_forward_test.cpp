// The whole CUDA forward (gpu/cuda_model_runner.h) against the CPU reference (CpuModelRunner over the same
// checkpoint), on small random llama-family checkpoints with real head sizes (golden_cuda_test.cpp runs the
// golden fixtures, head_dim 16 and 32, on the CUDA runner against transformers and the CPU).
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
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "decoder_forward_util.h"
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

using test::compare_forward;
using test::quantized;
using test::TinyArch;
using test::write_checkpoint;
namespace fs = std::filesystem;

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
    for (DType act : {DType::F32, DType::BF16})
        test::expect_graph_replays_match_eager(weights, act, "llama nvfp4 " + std::string(dtype_name(act)));
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
    test::expect_engine_on_cuda_matches_cpu(*model, cfg, prompts, [&] {
        return std::make_unique<gpu::CudaModelRunner>(
            weights, gpu::CudaRunnerOptions{.kv_dtype = KvDtype::Bf16, .num_blocks = 96, .block_size = 16,
                                            .max_model_len = 256, .max_num_batched_tokens = 128, .max_num_seqs = 8,
                                            .act_dtype = DType::F32, .max_cudagraph_capture_size = 8});
    });
}

}  // namespace
}  // namespace nibble
