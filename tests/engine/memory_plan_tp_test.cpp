// The memory plan under tensor parallelism: per-GPU weights, KV bytes and workspace of a Llama-3.1-70B shape
// in BF16 and in NVFP4 at TP 1, 2, 4, 8 (on a notional 1 TiB device, so that TP 1 fits too) (and 16, where the 8 KV heads are replicated), computed here from the
// shapes by hand; the refusal of a split that does not divide; and TP 1 unchanged.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "engine/memory_plan.h"

namespace nibble {
namespace {

// meta-llama/Llama-3.1-70B-Instruct's shape fields.
ModelConfig llama70b() {
    return parse_model_config(nlohmann::json::parse(R"({
        "architectures": ["LlamaForCausalLM"], "head_dim": 128, "hidden_size": 8192, "intermediate_size": 28672,
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_hidden_layers": 80,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 128256})"),
                              "config.json");
}

PlanOptions options(int64_t tp, int64_t device_gib = 1024) {
    PlanOptions o;
    o.max_model_len = 8192;
    o.max_num_seqs = 16;
    o.max_num_batched_tokens = 2048;
    o.kv_cache_dtype = "bf16";
    o.device_memory = device_gib << 30;
    o.kv_cache_memory_bytes = int64_t{8} << 30;
    o.tensor_parallel_size = tp;
    return o;
}

TEST(MemoryPlanTensorParallel, Bf16WeightsAndKvPerGpu) {
    const ModelConfig c = llama70b();
    const QuantConfig none;
    const int64_t d = 8192, hd = 128, L = 80, V = 128256, F = 28672;
    const MemoryPlan one = plan_memory(c, none, options(1));
    for (int64_t tp : {1, 2, 4, 8}) {
        const MemoryPlan p = plan_memory(c, none, options(tp));
        // Per rank: vocabulary rows of embed and lm_head, 1/tp of every projection, norms whole; BF16.
        const int64_t per_layer = 2 * d + (64 / tp) * hd * d * 2 + 2 * (8 / tp) * hd * d + 3 * (F / tp) * d;
        const int64_t expected = 2 * (2 * (V / tp) * d + L * per_layer + d);
        EXPECT_EQ(p.weights_bytes, expected) << tp;
        EXPECT_EQ(p.model_weights_bytes, one.weights_bytes) << tp;
        EXPECT_EQ(p.tensor_parallel_size, tp);
        // K and V of every layer, the rank's KV heads, 2 bytes each.
        EXPECT_EQ(p.kv_bytes_per_token, 2 * L * (8 / tp) * hd * 2) << tp;
        // A block of the same KV budget is tp times smaller, so it holds about tp times the tokens.
        EXPECT_EQ(p.kv_block_bytes * tp, one.kv_block_bytes) << tp;
        EXPECT_EQ(p.kv_blocks, p.kv_cache_bytes / p.kv_block_bytes) << tp;
        EXPECT_GE(p.kv_tokens, one.kv_tokens * tp) << tp;
        EXPECT_EQ(p.activation_bytes, 2048 * (3 * d + 2 * (64 / tp) * hd + 2 * (8 / tp) * hd + 2 * (F / tp)) * 4);
        // Logits, the all-gather's slots (128256 divides by 2, 4, 8) and the lm_head's gathered input rows.
        EXPECT_EQ(p.logits_bytes, 16 * (V + (tp == 1 ? 0 : V) + d) * 4) << tp;
        EXPECT_EQ(p.attention_scratch_bytes, 16 * (64 / tp) * kAttentionSplits * (hd + 2) * 4);
    }
}

// Why the flag exists: 70B in BF16 (131 GiB) does not fit one 80 GiB H100; split over two it does.
TEST(MemoryPlanTensorParallel, SeventyBInBf16NeedsTwoH100s) {
    EXPECT_THROW(plan_memory(llama70b(), QuantConfig{}, options(1, 80)), Error);
    const MemoryPlan two = plan_memory(llama70b(), QuantConfig{}, options(2, 80));
    EXPECT_LT(two.weights_bytes + two.workspace_bytes() + two.kv_cache_bytes, int64_t{80} << 30);
}

TEST(MemoryPlanTensorParallel, ReplicatedKvHeadsBeyondTheirCount) {
    const MemoryPlan p = plan_memory(llama70b(), QuantConfig{}, options(16));
    EXPECT_EQ(p.kv_bytes_per_token, 2 * 80 * 1 * 128 * 2);  // one (replicated) KV head per GPU
}

TEST(MemoryPlanTensorParallel, Nvfp4ShardsCountScalesOncePerRank) {
    const ModelConfig c = llama70b();
    QuantConfig q;
    q.method = QuantMethod::ModelOptNvfp4;
    q.exclude_patterns = {"lm_head"};
    const int64_t d = 8192, hd = 128, L = 80, V = 128256, F = 28672;
    for (int64_t tp : {1, 2, 4, 8}) {
        const MemoryPlan p = plan_memory(c, q, options(tp));
        // An NVFP4 linear [n, k]: n*k/2 + n*k/16 bytes, plus its global and activation scales (4 + 4) on every rank.
        auto nvfp4 = [](int64_t n, int64_t k) { return n * k / 2 + n * k / 16 + 8; };
        const int64_t per_layer = nvfp4((64 / tp) * hd, d) + 2 * nvfp4((8 / tp) * hd, d) + nvfp4(d, (64 / tp) * hd) +
                                  2 * nvfp4(F / tp, d) + nvfp4(d, F / tp);
        const int64_t bf16 = 2 * (2 * (V / tp) * d + L * 2 * d + d);  // embed, lm_head (excluded), norms
        EXPECT_EQ(p.weights_bytes, L * per_layer + bf16) << tp;
    }
}

TEST(MemoryPlanTensorParallel, RefusesSplitsThatDoNotDivide) {
    try {
        plan_memory(llama70b(), QuantConfig{}, options(3));
        ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("--tensor-parallel-size 3 cannot split"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace nibble
