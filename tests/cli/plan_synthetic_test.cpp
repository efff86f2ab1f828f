// `nibble plan --synthetic NAME`: weight bytes and the decode roofline of published shapes against hand counts.
#include <gtest/gtest.h>

#include "cli_test_util.h"

#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace {

using Result = nibble::test::CommandResult;

Result run(const std::string& args) { return nibble::test::run_nibble("plan " + args); }

nlohmann::json plan_json(const std::string& args) {
    const Result r = run(args + " --json");
    EXPECT_EQ(r.rc, 0) << r.out;
    return r.rc == 0 ? nlohmann::json::parse(r.out) : nlohmann::json::object();
}

// An NVFP4 linear [n, k] as ModelOpt stores it: n*k/2 bytes of E2M1, n*k/16 E4M3 block scales, the F32 global
// scale and the F32 input (activation) scale.
constexpr int64_t nvfp4(int64_t n, int64_t k) { return n * k / 2 + n * k / 16 + 4 + 4; }

// Llama-3.1-8B NVFP4, lm_head and embeddings BF16, by hand:
//   embed_tokens + lm_head   2 x 128256 x 4096 x 2 B                        = 2,101,346,304
//   per layer: q, o [4096, 4096], k, v [1024, 4096], gate, up [14336, 4096], down [4096, 14336] in NVFP4:
//              2 x 9,437,192 + 2 x 2,359,304 + 3 x 33,030,152               =   122,683,448
//              input and post-attention norms 2 x 4096 x 2 B               =        16,384
//   32 layers x 122,699,832                                                = 3,926,394,624
//   final norm 4096 x 2 B                                                  =         8,192
//   total                                                                  = 6,027,749,120 (5.61 GiB)
constexpr int64_t kLlama8bNvfp4 = 6'027'749'120;

// Qwen3-30B-A3B NVFP4, lm_head, embeddings and the routers BF16, by hand:
//   embed_tokens + lm_head   2 x 151936 x 2048 x 2 B                        = 1,244,659,712
//   per layer: q [4096, 2048], k, v [512, 2048], o [2048, 4096] NVFP4       =    10,616,864
//              router mlp.gate [128, 2048] BF16                            =       524,288
//              128 experts x (gate, up [768, 2048], down [2048, 768]) NVFP4 = 128 x 3 x 884,744 = 339,741,696
//              norms: input, post-attention 2 x 2048 x 2, q_norm, k_norm 2 x 128 x 2 = 8,704
//   48 layers x 350,891,552                                                = 16,842,794,496
//   final norm 2048 x 2 B                                                  =          4,096
//   total                                                                  = 18,087,458,304 (16.85 GiB)
constexpr int64_t kQwen3MoeExpertsPerLayer = 128 * 3 * nvfp4(768, 2048);
constexpr int64_t kQwen3MoeNvfp4 = 18'087'458'304;

TEST(PlanSynthetic, HandCountsAgree) {
    static_assert(2 * nvfp4(4096, 4096) + 2 * nvfp4(1024, 4096) + 2 * nvfp4(14336, 4096) + nvfp4(4096, 14336) ==
                  122'683'448);
    static_assert(kQwen3MoeExpertsPerLayer == 339'741'696);
    static_assert(2 * int64_t{128256} * 4096 * 2 + int64_t{32} * (122'683'448 + 16'384) + 8'192 == kLlama8bNvfp4);
    static_assert(2 * int64_t{151936} * 2048 * 2 +
                      48 * (nvfp4(4096, 2048) + 2 * nvfp4(512, 2048) + nvfp4(2048, 4096) + 128 * 2048 * 2 +
                            kQwen3MoeExpertsPerLayer + 8'704) +
                      4'096 ==
                  kQwen3MoeNvfp4);
}

TEST(PlanSynthetic, WeightBytesMatchTheHandCounts) {
    const nlohmann::json llama = plan_json("--synthetic llama3-8b --device-profile gb10");
    EXPECT_EQ(llama["architecture"], "LlamaForCausalLM");
    EXPECT_NEAR(static_cast<double>(llama["weights_bytes"].get<int64_t>()), static_cast<double>(kLlama8bNvfp4),
                0.01 * kLlama8bNvfp4);
    const nlohmann::json qwen = plan_json("--synthetic qwen3-30b-a3b --device-profile gb10");
    EXPECT_EQ(qwen["architecture"], "Qwen3MoeForCausalLM");
    EXPECT_NEAR(static_cast<double>(qwen["weights_bytes"].get<int64_t>()), static_cast<double>(kQwen3MoeNvfp4),
                0.01 * kQwen3MoeNvfp4);
    // --weights bf16: no quantization at all; --lm-head-nvfp4 moves lm_head from BF16 to NVFP4.
    const nlohmann::json bf16 = plan_json("--synthetic llama3-8b --weights bf16 --device-profile gb10");
    EXPECT_EQ(bf16["weights_quantization"], "none");
    EXPECT_GT(bf16["weights_bytes"].get<int64_t>(), 2 * kLlama8bNvfp4);
    // A device profile plans the CUDA upload, which keeps the 32 x 2 x 4096 + 4096 norm weights F32.
    const nlohmann::json head = plan_json("--synthetic llama3-8b --lm-head-nvfp4 --device-profile gb10");
    EXPECT_EQ(head["weights_bytes"].get<int64_t>(),
              kLlama8bNvfp4 - int64_t{128256} * 4096 * 2 + nvfp4(128256, 4096) + (32 * 2 * 4096 + 4096) * 2);
}

// Qwen3-30B-A3B on GB10, batch-1 decode: only the 8 chosen experts of 128 are read. By hand, per token:
//   MoE experts (active)  48 x 339,741,696 x 8 / 128                        = 1,019,225,088
//   attention projections 48 x 10,616,864                                   =   509,609,472
//   lm_head (BF16)        151936 x 2048 x 2                                 =   622,329,856
//   MoE routers           48 x 524,288                                      =    25,165,824
//   KV cache at 4096      4096 x 48 layers x (K, V) x 4 heads x 128 x 2 B    =   402,653,184
//   norms 48 x 8,704 + 4,096 = 421,888; the embedding row 2048 x 2 = 4,096
//   total                                                                   = 2,579,409,408 -> 273 GB/s / it = 105.8 tok/s
TEST(PlanSynthetic, Qwen3MoeDecodeReadsOnlyTheActiveExperts) {
    const nlohmann::json j = plan_json("--synthetic qwen3-30b-a3b --device-profile gb10");
    const nlohmann::json& r = j["roofline"];
    ASSERT_TRUE(r.is_object()) << j.dump();
    EXPECT_EQ(r["context_depth"], 4096);
    const nlohmann::json& by = r["decode_bytes"];
    EXPECT_EQ(by["MoE experts (active)"].get<int64_t>(), 48 * kQwen3MoeExpertsPerLayer * 8 / 128);
    EXPECT_EQ(by["MoE experts (active)"].get<int64_t>(), 1'019'225'088);
    EXPECT_EQ(by["attention projections"].get<int64_t>(), 509'609'472);
    EXPECT_EQ(by["lm_head"].get<int64_t>(), 622'329'856);
    EXPECT_EQ(by["MoE routers"].get<int64_t>(), 25'165'824);
    EXPECT_EQ(by["KV cache at 4096 tokens"].get<int64_t>(), 402'653'184);
    EXPECT_EQ(r["decode_bytes_per_token"].get<int64_t>(), 2'579'409'408);
    EXPECT_NEAR(r["decode_tokens_per_s"].get<double>(), 273e9 / 2'579'409'408.0, 0.1);
    // All 128 experts would be 16x the active share: the weights hold them all.
    EXPECT_GT(j["weights_bytes"].get<int64_t>(), 16 * by["MoE experts (active)"].get<int64_t>());
}

// Nemotron-3-Nano-30B-A3B on GB10: 6 of 128 experts, the BF16 layers ModelOpt keeps, the FP8 KV cache of the
// NVFP4 checkpoint (6 attention layers x 2 x 2 heads x 128 x 1 B = 3,072 B per token), and one sequence's
// Mamba state read and written (2 x 49,930,240 B with the float32 SSM state).
TEST(PlanSynthetic, NemotronNanoDecode) {
    const nlohmann::json j = plan_json("--synthetic nemotron-3-nano-30b-a3b --device-profile gb10");
    EXPECT_EQ(j["kv_cache_dtype"], "fp8");
    EXPECT_EQ(j["kv_bytes_per_token"].get<int64_t>(), 3072);
    const nlohmann::json& by = j["roofline"]["decode_bytes"];
    // 23 layers x 6 / 128 x 128 x (up [1856, 2688], down [2688, 1856]) NVFP4
    EXPECT_EQ(by["MoE experts (active)"].get<int64_t>(), 23 * 6 * 2 * nvfp4(1856, 2688));
    EXPECT_EQ(by["MoE shared experts"].get<int64_t>(), 23 * 2 * nvfp4(3712, 2688));
    // 6 BF16 Mamba layers (the ones before attention) and 17 NVFP4: in_proj [10304, 2688], out_proj [2688, 4096]
    EXPECT_EQ(by["Mamba mixers"].get<int64_t>(),
              6 * (int64_t{10304} * 2688 + int64_t{2688} * 4096) * 2 +
                  17 * (nvfp4(10304, 2688) + nvfp4(2688, 4096)));
    EXPECT_EQ(by["attention projections"].get<int64_t>(), 6 * int64_t{2688} * (4096 + 256 + 256 + 4096) * 2);
    EXPECT_EQ(by["lm_head"].get<int64_t>(), int64_t{131072} * 2688 * 2);
    EXPECT_EQ(by["Mamba state (read and written)"].get<int64_t>(), 2 * int64_t{49'930'240});
    EXPECT_EQ(by["KV cache at 4096 tokens"].get<int64_t>(), 4096 * 3072);
    // About 2.9 GB a token (the count), so about 94 tok/s on GB10's 273 GB/s.
    EXPECT_NEAR(j["roofline"]["decode_bytes_per_token"].get<double>(), 3.0e9, 0.1e9);
}

TEST(PlanSynthetic, BadArgumentsAreRefused) {
    Result r = run("--synthetic llama3-7b");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("known: llama3-8b"), std::string::npos) << r.out;
    r = run("some/dir --synthetic llama3-8b");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("exactly one of MODEL_DIR and --synthetic"), std::string::npos) << r.out;
    r = run("--synthetic llama3-8b --weights fp8");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("--weights 'fp8'"), std::string::npos) << r.out;
}

}  // namespace
