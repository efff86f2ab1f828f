// The CUDA runner consuming tune choices (gpu::CudaRunnerOptions::kernel_choices): a tune cache that names
// a variant other than the built-in heuristic's for a shape makes the runner launch that variant (seen
// through KernelChoices' launch counters, not timing), and the forward still matches the CPU reference
// within decoder_forward_test.cpp's tolerances; a named variant that fails to launch (the test hook makes
// its launch throw, as a launch error does, inside the launch guard) is marked failed, the next candidate
// runs, and the forward still matches.
//
// Model: decoder_forward_util.h's NVFP4 llama (d 256, 4 heads of 128, 2 KV heads, ff 512), F32 activations
// (every linear runs the GEMV, prefill included), q/k/v and gate/up unfused so all seven linears go through
// the choices. Prefill runs 112 rows (GEMV tile 16), decode steps 3 sequences padded to the graph bucket 4
// (tile 4), the cache-length class 512 (max_model_len).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include "cuda/device_info.h"
#include "decoder_forward_util.h"
#include "tune/device_profile.h"
#include "tune/eligibility.h"
#include "tune/kernel_choices.h"
#include "tune/registry.h"
#include "tune/tune_cache.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using tune::OpKind;
using tune::OpShape;

// The test model's NVFP4 linear shapes (n_out, n_in): q, k/v, o, gate/up, down.
const std::vector<std::pair<int64_t, int64_t>> kNvfp4Linears = {{512, 256}, {256, 256}, {256, 512}, {512, 256},
                                                                {256, 512}};

const tune::KernelVariant& variant(OpKind op, std::string_view name) {
    const tune::KernelVariant* v = tune::find_variant(op, name);
    if (!v) throw std::runtime_error("no registered variant " + std::string(name));
    return *v;
}

// A cache choosing, for every NVFP4 linear with F32 activations, the CUDA-core kernel at tiles 4 and 16
// (the heuristic runs the tensor-core one there), and for FP8-cache decode of 4 sequences up to 512 tokens
// decode_mma with 2 splits (the heuristic runs decode_pipe).
tune::TuneCache test_cache() {
    tune::TuneCache cache(tune::CacheKey{.gpu_name = "test"});
    for (const auto& [n, k] : kNvfp4Linears) {
        for (int64_t m : {4, 16}) {
            const OpShape s{.op = OpKind::GemvNvfp4, .activation = DType::F32, .m = m, .n = n, .k = k};
            cache.put({.op = s.op, .bucket = tune::shape_bucket(s), .dtype = tune::shape_dtype(s),
                       .variant = m == 4 ? "cuda_core.mt4" : "cuda_core.mt16", .splits = 1, .median_us = 1.0});
        }
    }
    const OpShape decode{.op = OpKind::AttentionDecode, .activation = DType::F32, .head_dim = 128, .group = 2,
                         .kv_dtype = KvDtype::Fp8, .n_seqs = 4, .n_kv_heads = 2, .q_len = 1, .kv_len = 512};
    cache.put({.op = decode.op, .bucket = tune::shape_bucket(decode), .dtype = tune::shape_dtype(decode),
               .variant = "decode_mma.fp8.hd128", .splits = 2, .median_us = 1.0});
    return cache;
}

std::shared_ptr<tune::KernelChoices> choices_from(const tune::TuneCache& cache) {
    return std::make_shared<tune::KernelChoices>(&cache, tune::profile_from_device(cuda::query_device(0)),
                                                 tune::BuildTargets::configured());
}

class TuneRunnerCuda : public ::testing::Test {
protected:
    void SetUp() override {
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
        root_ = fs::temp_directory_path() / ("nibble-tune-runner-" + std::to_string(::getpid()));
        model_ = test::quantized(test::write_checkpoint(root_ / "llama", {.head_dim = 128}, 11),
                                 root_ / "llama-nvfp4", QuantLayout::ModelOpt, false);
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_, model_;
};

TEST_F(TuneRunnerCuda, CachedVariantsAreLaunchedAndMatchTheCpu) {
    const tune::TuneCache cache = test_cache();
    const auto choices = choices_from(cache);
    const test::ForwardVariant with{.kernel_choices = choices, .fused_gemv = false};
    test::compare_forward(model_, DType::F32, KvDtype::Bf16, 2e-3, "tuned: f32 act / bf16 kv", with);
    test::compare_forward(model_, DType::F32, KvDtype::Fp8, 3e-2, "tuned: f32 act / fp8 kv", with);

    const auto& mt4 = variant(OpKind::GemvNvfp4, "cuda_core.mt4");
    const auto& mt16 = variant(OpKind::GemvNvfp4, "cuda_core.mt16");
    const auto& nt1 = variant(OpKind::GemvNvfp4, "mma.nt1");
    const auto& nt2 = variant(OpKind::GemvNvfp4, "mma.nt2");
    EXPECT_GT(choices->launches(mt4), 0) << "decode GEMVs (tile 4) should run the cached CUDA-core kernel";
    EXPECT_GT(choices->launches(mt16), 0) << "prefill GEMVs (tile 16) should run the cached CUDA-core kernel";
    EXPECT_EQ(choices->launches(nt1), 0) << "the heuristic's tensor-core kernel ran although the cache chose";
    EXPECT_EQ(choices->launches(nt2), 0) << "the heuristic's tensor-core kernel ran although the cache chose";
    const auto& mma = variant(OpKind::AttentionDecode, "decode_mma.fp8.hd128");
    const auto& pipe = variant(OpKind::AttentionDecode, "decode_pipe.fp8.hd128");
    EXPECT_GT(choices->launches(mma), 0) << "FP8 decode should run the cached decode_mma kernel";
    EXPECT_EQ(choices->launches(pipe), 0) << "FP8 decode ran the heuristic's decode_pipe kernel";
    EXPECT_EQ(choices->failed_variants().size(), 0u);
}

TEST_F(TuneRunnerCuda, VariantThatFailsToLaunchFallsBack) {
    const tune::TuneCache cache = test_cache();
    const auto choices = choices_from(cache);
    const auto& mt4 = variant(OpKind::GemvNvfp4, "cuda_core.mt4");
    const auto& nt1 = variant(OpKind::GemvNvfp4, "mma.nt1");
    const auto& mma = variant(OpKind::AttentionDecode, "decode_mma.fp8.hd128");
    const auto& pipe = variant(OpKind::AttentionDecode, "decode_pipe.fp8.hd128");
    choices->inject_launch_failure(&mt4);
    const test::ForwardVariant with{.kernel_choices = choices, .fused_gemv = false};
    test::compare_forward(model_, DType::F32, KvDtype::Bf16, 2e-3, "tuned, mt4 failing: f32 act / bf16 kv", with);
    EXPECT_TRUE(choices->failed(mt4));
    EXPECT_EQ(choices->launches(mt4), 0);
    EXPECT_GT(choices->launches(nt1), 0) << "tile 4 should fall back to the heuristic's tensor-core kernel";

    // An attention variant failing too: FP8 decode falls back to the pipelined kernel.
    choices->inject_launch_failure(&mma);
    test::compare_forward(model_, DType::F32, KvDtype::Fp8, 3e-2, "tuned, decode_mma failing: f32 act / fp8 kv", with);
    EXPECT_TRUE(choices->failed(mma));
    EXPECT_EQ(choices->launches(mma), 0);
    EXPECT_GT(choices->launches(pipe), 0) << "FP8 decode should fall back to decode_pipe";
    EXPECT_EQ(choices->failed_variants().size(), 2u);
}

// No cache: the runner resolves the built-in heuristics, which launch what the ops' own dispatch launches
// (same kernels as a runner without choices), and the forward matches as before.
TEST_F(TuneRunnerCuda, NoCacheRunsTheHeuristics) {
    const auto choices = std::make_shared<tune::KernelChoices>(
        nullptr, tune::profile_from_device(cuda::query_device(0)), tune::BuildTargets::configured());
    test::compare_forward(model_, DType::F32, KvDtype::Fp8, 3e-2, "heuristic choices: f32 act / fp8 kv",
                          {.kernel_choices = choices, .fused_gemv = false});
    EXPECT_EQ(choices->launches(variant(OpKind::GemvNvfp4, "cuda_core.mt4")), 0);
    EXPECT_GT(choices->launches(variant(OpKind::GemvNvfp4, "mma.nt1")), 0);
    EXPECT_GT(choices->launches(variant(OpKind::AttentionDecode, "decode_pipe.fp8.hd128")), 0);
    EXPECT_EQ(choices->launches(variant(OpKind::AttentionDecode, "decode_mma.fp8.hd128")), 0);
}

}  // namespace
}  // namespace nibble
