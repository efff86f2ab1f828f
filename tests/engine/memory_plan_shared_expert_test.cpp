// The memory plan of MoE models the CUDA decoder runs since Qwen2-MoE and BF16 experts joined it: a Qwen2-MoE
// shared expert adds exactly its weights (gate/up/down in their format and the shared_expert_gate vector) and
// the activation rows the CUDA forward allocates for it (gpu/decoder_forward.cpp: its output rows [t,
// n_embd], and the MLP's hidden rows [t, max(intermediate, shared width)] twice); BF16 experts cost 2 bytes a
// weight. Each plan is compared with the same config whose shared expert is removed, so only the shared
// expert differs.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "engine/memory_plan.h"
#include "modelopt_quant_config.h"
#include "model/real_shapes.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kTokens = 2048;  // PlanOptions' default max_num_batched_tokens

PlanOptions options(int64_t device_memory, int64_t max_model_len, bool cuda_forward) {
    PlanOptions o;
    o.device_memory = device_memory;
    o.max_model_len = max_model_len;
    o.max_num_batched_tokens = kTokens;
    o.kv_cache_dtype = "bf16";
    o.cuda_forward = cuda_forward;
    return o;
}

ModelConfig without_shared_expert(ModelConfig c) {
    c.moe.n_shared_experts = 0;
    c.moe.n_ff_shared = 0;
    c.moe.shared_expert_gate = false;
    return c;
}

int64_t nvfp4_linear_bytes(int64_t n,
                           int64_t k) {  // packed E2M1 + E4M3 block scales + global and input scale
    return n * k / 2 + n * k / 16 + 4 + 4;
}

int64_t format_bytes(const MemoryPlan& p, const std::string& format) {
    for (const auto& [name, bytes] : p.weights_by_format)
        if (name == format) return bytes;
    return 0;
}

// The plan with the shared expert against the plan without: weights, activations and the KV budget differ by
// exactly the given bytes; logits, attention scratch and the MoE workspace not at all.
void expect_shared_expert_costs(const ModelConfig& with_shared, const QuantConfig& quant,
                                const PlanOptions& o, int64_t weight_bytes, int64_t activation_bytes,
                                int64_t gemm_scratch_bytes) {
    const MemoryPlan with = plan_memory(with_shared, quant, o);
    const MemoryPlan without = plan_memory(without_shared_expert(with_shared), quant, o);
    EXPECT_EQ(with.weights_bytes - without.weights_bytes, weight_bytes);
    EXPECT_EQ(with.model_weights_bytes - without.model_weights_bytes, weight_bytes);
    EXPECT_EQ(with.activation_bytes - without.activation_bytes, activation_bytes);
    EXPECT_EQ(with.gemm_scratch_bytes - without.gemm_scratch_bytes, gemm_scratch_bytes);
    EXPECT_EQ(with.logits_bytes, without.logits_bytes);
    EXPECT_EQ(with.attention_scratch_bytes, without.attention_scratch_bytes);
    EXPECT_EQ(with.moe_workspace_bytes, without.moe_workspace_bytes);
    EXPECT_EQ(with.workspace_bytes() - without.workspace_bytes(), activation_bytes + gemm_scratch_bytes);
    // The KV cache pays for all of it (the plan spends the rest of the usable memory on KV).
    EXPECT_EQ(without.kv_cache_bytes - with.kv_cache_bytes,
              weight_bytes + activation_bytes + gemm_scratch_bytes);
}

// tests/golden/fixtures/qwen2_moe: hidden 64, intermediate 128, 2 layers with decoder_sparse_step 2 (layer 0
// dense, layer 1 MoE), 4 experts of 32, shared_expert_intermediate_size 64, BF16.
TEST(MemoryPlanSharedExpert, Qwen2MoeGoldenFixture) {
    const fs::path path = fs::path(NIBBLE_SOURCE_DIR) / "tests/golden/fixtures/qwen2_moe/model/config.json";
    std::ifstream in(path);
    ASSERT_TRUE(in.good()) << path;
    const ModelConfig c = parse_model_config(nlohmann::json::parse(in), path.string());
    ASSERT_EQ(c.moe.n_shared_experts, 1);
    ASSERT_EQ(c.moe.n_ff_shared, 64);
    ASSERT_TRUE(c.moe.shared_expert_gate);
    ASSERT_FALSE(c.is_moe_layer(0));
    ASSERT_TRUE(c.is_moe_layer(1));
    // One MoE layer: gate/up [64, 64], down [64, 64] and the gate vector [1, 64], BF16.
    const int64_t weights = (3 * 64 * 64 + 64) * 2;
    static_assert(weights == 24704);
    // The shared expert is narrower than the dense MLP (64 < 128): only its output rows [2048, 64] are new.
    const int64_t activations = kTokens * 64 * 4;
    for (const bool cuda : {false, true}) {
        SCOPED_TRACE(cuda ? "cuda forward" : "host");
        // BF16 linears: the GEMM scratch is cuBLASLt's workspace alone, with or without the shared expert.
        expect_shared_expert_costs(c, QuantConfig{}, options(8 * kGiB, 128, cuda), weights, activations, 0);
        const MemoryPlan p = plan_memory(c, QuantConfig{}, options(8 * kGiB, 128, cuda));
        EXPECT_EQ(p.activation_bytes,
                  kTokens * (3 * 64 + 2 * 64 + 2 * 32 + 2 * 128 + 64 + 4 + 2 * 2) * 4);  // + router rows
    }
}

// Qwen/Qwen1.5-MoE-A2.7B's config.json, the fields that shape the plan: hidden_size 2048, intermediate_size
// 5632, num_hidden_layers 24, num_attention_heads 16, num_key_value_heads 16, num_experts 60,
// num_experts_per_tok 4, moe_intermediate_size 1408, shared_expert_intermediate_size 5632,
// decoder_sparse_step 1, mlp_only_layers [], vocab_size 151936, tie_word_embeddings false, torch_dtype
// bfloat16.
nlohmann::json qwen15_moe_a27b_config() {
    return nlohmann::json::parse(R"({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": false, "vocab_size": 151936, "max_position_embeddings": 8192, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "use_sliding_window": false})");
}

TEST(MemoryPlanSharedExpert, Qwen15MoeA27bBf16) {
    const ModelConfig c = parse_model_config(qwen15_moe_a27b_config(), "Qwen1.5-MoE-A2.7B config.json");
    ASSERT_EQ(c.moe.n_ff_shared, 5632);
    // 24 MoE layers x (gate/up [5632, 2048], down [2048, 5632] + the gate vector [1, 2048]) x 2 bytes.
    const int64_t weights = 24 * (3 * int64_t{5632} * 2048 + 2048) * 2;
    EXPECT_EQ(weights, 1'661'042'688);
    // As wide as intermediate_size: the hidden rows stay; its output rows [2048, 2048] float32 are new.
    const int64_t activations = kTokens * 2048 * 4;
    for (const bool cuda : {false, true}) {
        SCOPED_TRACE(cuda ? "cuda forward" : "host");
        expect_shared_expert_costs(c, QuantConfig{}, options(80 * kGiB, 8192, cuda), weights, activations, 0);
        const MemoryPlan p = plan_memory(c, QuantConfig{}, options(80 * kGiB, 8192, cuda));
        // The CUDA upload keeps norms (24 x 2 x 2048 + 2048) and q/k/v biases (24 x 6144) F32.
        const int64_t f32 = cuda ? (24 * 2 * 2048 + 2048 + 24 * 6144) * 4 : 0;
        EXPECT_EQ(format_bytes(p, "f32"), f32);
        EXPECT_EQ(format_bytes(p, "bf16") + f32, p.weights_bytes);
    }
}

// The same model as a ModelOpt NVFP4 export (router and shared_expert_gate kept BF16, as the CUDA decoder
// needs): the shared expert's three linears are NVFP4, its gate vector BF16; on the CUDA forward it is the
// largest decoder linear the prefill GEMMs dequantize, so GemmContext's BF16 copy grows from q_proj's [2048,
// 2048] to its [5632, 2048]; the dequantization pipeline's two buffers do not, already holding a layer's
// stacked q/k/v [6144, 2048].
TEST(MemoryPlanSharedExpert, Qwen15MoeA27bNvfp4) {
    const ModelConfig c = parse_model_config(qwen15_moe_a27b_config(), "Qwen1.5-MoE-A2.7B config.json");
    const QuantConfig q = test::modelopt_nvfp4_config(
        {"lm_head", "model.layers.*.mlp.gate", "model.layers.*.mlp.shared_expert_gate"});
    const int64_t nvfp4 = 24 * 3 * nvfp4_linear_bytes(5632, 2048), bf16 = 24 * 2048 * 2;
    EXPECT_EQ(nvfp4, 467'141'184);
    const int64_t activations = kTokens * 2048 * 4;
    expect_shared_expert_costs(c, q, options(80 * kGiB, 8192, false), nvfp4 + bf16, activations, 0);
    expect_shared_expert_costs(c, q, options(80 * kGiB, 8192, true), nvfp4 + bf16, activations,
                               (int64_t{5632} * 2048 - int64_t{2048} * 2048) * 2);
    const MemoryPlan with = plan_memory(c, q, options(80 * kGiB, 8192, false));
    const MemoryPlan without = plan_memory(without_shared_expert(c), q, options(80 * kGiB, 8192, false));
    EXPECT_EQ(format_bytes(with, "nvfp4") - format_bytes(without, "nvfp4"), nvfp4);
    EXPECT_EQ(format_bytes(with, "bf16") - format_bytes(without, "bf16"), bf16);
}

// Qwen/Qwen2-57B-A14B's config.json: hidden_size 3584, intermediate_size 18944, num_hidden_layers 28,
// num_attention_heads 28, num_key_value_heads 4, num_experts 64, num_experts_per_tok 8, moe_intermediate_size
// 2560, shared_expert_intermediate_size 20480, decoder_sparse_step 1, vocab_size 151936, tie_word_embeddings
// false, torch_dtype bfloat16. Its shared expert is wider than intermediate_size, so the CUDA forward widens
// the MLP's two hidden buffers (gate and up rows) to 20480.
TEST(MemoryPlanSharedExpert, Qwen2_57bA14bWidensTheHiddenRows) {
    const ModelConfig c = parse_model_config(nlohmann::json::parse(R"({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
        "shared_expert_intermediate_size": 20480, "decoder_sparse_step": 1, "norm_topk_prob": false,
        "vocab_size": 151936, "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "use_sliding_window": false})"),
                                             "Qwen2-57B-A14B config.json");
    const int64_t weights = 28 * (3 * int64_t{20480} * 3584 + 3584) * 2;
    EXPECT_EQ(weights, 12'331'454'464);
    // Output rows [t, 3584] and two hidden buffers 20480 - 18944 = 1536 wider, float32.
    const int64_t activations = kTokens * (3584 + 2 * (20480 - 18944)) * 4;
    EXPECT_EQ(activations, 54'525'952);
    for (const bool cuda : {false, true}) {
        SCOPED_TRACE(cuda ? "cuda forward" : "host");
        expect_shared_expert_costs(c, QuantConfig{}, options(256 * kGiB, 8192, cuda), weights, activations,
                                   0);
    }
    const int64_t q_dim = 28 * 128, kv_dim = 4 * 128;
    EXPECT_EQ(plan_memory(c, QuantConfig{}, options(256 * kGiB, 8192, true)).activation_bytes,
              kTokens * (3 * 3584 + 2 * q_dim + 2 * kv_dim + 2 * 20480 + 3584 + 64 + 2 * 8) * 4);
}

// Qwen3-30B-A3B with BF16 experts (the unquantized checkpoint, or an NVFP4 export that leaves the experts
// BF16): each expert weight costs 2 bytes. By hand: per layer q [4096, 2048], k and v [512, 2048], o [2048,
// 4096], q/k norms 128 each, two norms 2048 each, router [128, 2048], 128 experts x 3 x [768, 2048];
// embeddings and lm_head [151936, 2048], final norm 2048: 30,532,122,624 parameters, all BF16 in the
// checkpoint; the CUDA upload keeps the 48 x (2 x 128 + 2 x 2048) + 2048 norm weights F32.
TEST(MemoryPlanSharedExpert, Qwen3MoeBf16ExpertsCostTwoBytesAWeight) {
    const RealShape bf16 = real_shape("qwen3-30b-a3b", {.nvfp4 = false});
    const int64_t per_layer = 2048 * (4096 + 512 + 512) + 4096 * 2048 + 2 * 128 + 2 * 2048 + 128 * 2048 +
                              128 * 3 * int64_t{768} * 2048;
    const int64_t params = 48 * per_layer + 2 * int64_t{151936} * 2048 + 2048;
    EXPECT_EQ(params, 30'532'122'624);
    const MemoryPlan p = plan_memory(bf16.config, bf16.quant, options(80 * kGiB, 8192, true));
    const int64_t norms = 48 * (2 * 128 + 2 * 2048) + 2048;
    EXPECT_EQ(p.weights_bytes, params * 2 + norms * 2);
    ASSERT_EQ(p.weights_by_format.size(), 2u);
    EXPECT_EQ(format_bytes(p, "bf16"), (params - norms) * 2);
    EXPECT_EQ(format_bytes(p, "f32"), norms * 4);

    // An NVFP4 export whose experts stay BF16 against the one that quantizes them: each of the 48 x 128 x 3
    // expert matrices [768, 2048] costs 768 x 2048 x 2 bytes instead of its NVFP4 bytes; nothing else moves.
    auto modelopt = [](bool experts_bf16) {
        nlohmann::json exclude = {"lm_head", "model.layers.*.mlp.gate"};
        if (experts_bf16) exclude.push_back("model.layers.*.mlp.experts.*");
        return test::modelopt_nvfp4_config(exclude);
    };
    const MemoryPlan mixed = plan_memory(bf16.config, modelopt(true), options(80 * kGiB, 8192, true));
    const MemoryPlan nvfp4 = plan_memory(bf16.config, modelopt(false), options(80 * kGiB, 8192, true));
    const int64_t expert_mats = 48 * 128 * 3, expert_elems = int64_t{768} * 2048;
    EXPECT_EQ(mixed.weights_bytes - nvfp4.weights_bytes,
              expert_mats * (expert_elems * 2 - nvfp4_linear_bytes(768, 2048)));
    EXPECT_EQ(format_bytes(mixed, "bf16") - format_bytes(nvfp4, "bf16"), expert_mats * expert_elems * 2);
    EXPECT_EQ(format_bytes(nvfp4, "nvfp4") - format_bytes(mixed, "nvfp4"),
              expert_mats * nvfp4_linear_bytes(768, 2048));
    // The experts are not GEMM-path weights and have their own workspace: the workspace is the same.
    EXPECT_EQ(mixed.workspace_bytes(), nvfp4.workspace_bytes());
}

}  // namespace
}  // namespace nibble
