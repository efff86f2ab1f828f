// Qwen2-MoE / Qwen3-MoE config.json parsing: published configs (Qwen/Qwen3-30B-A3B, Qwen/Qwen1.5-MoE-A2.7B, as
// on the Hub) and transformers 5's spelling, the decoder-layer MoE rule of transformers' Qwen2Moe /
// Qwen3MoeDecoderLayer, and refusals by field name.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "checkpoint/model_config.h"

namespace nibble {
namespace {

nlohmann::json qwen3_30b_a3b() {
    return nlohmann::json::parse(R"({
      "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
      "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
      "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128,
      "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
      "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
      "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})");
}

nlohmann::json qwen15_moe_a27b() {
    return nlohmann::json::parse(R"({
      "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
      "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
      "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "norm_topk_prob": false,
      "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
      "num_key_value_heads": 16, "output_router_logits": false, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
      "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})");
}

std::string error_of(const nlohmann::json& j) {
    try {
        parse_model_config(j, "config.json");
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

TEST(ConfigMoe, Qwen3_30B_A3B) {
    const ModelConfig m = parse_model_config(qwen3_30b_a3b(), "config.json");
    EXPECT_EQ(m.arch, Arch::Qwen3Moe);
    EXPECT_EQ(m.moe.n_experts, 128);
    EXPECT_EQ(m.moe.top_k, 8);
    EXPECT_EQ(m.moe.n_ff, 768);
    EXPECT_TRUE(m.moe.norm_topk_prob);
    EXPECT_EQ(m.moe.n_shared_experts, 0);
    EXPECT_EQ(m.moe.scoring, MoeScoring::Softmax);
    EXPECT_TRUE(m.moe.gated_experts);
    EXPECT_EQ(m.head_dim, 128);  // explicit, != 2048 / 32
    EXPECT_EQ(m.n_kv_heads, 4);
    EXPECT_TRUE(m.qk_norm);
    EXPECT_FALSE(m.qkv_bias);
    for (int64_t il = 0; il < m.n_layers; ++il) EXPECT_TRUE(m.is_moe_layer(il)) << il;
}

TEST(ConfigMoe, Transformers5SpellingAndDefaults) {
    nlohmann::json j = qwen3_30b_a3b();
    // transformers 5 writes num_local_experts (Qwen3MoeConfig.attribute_map) and rope_parameters / dtype.
    j.erase("num_experts");
    j["num_local_experts"] = 128;
    j.erase("rope_theta");
    j.erase("rope_scaling");
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
    j.erase("head_dim");          // Qwen3-MoE then takes hidden / heads (Qwen3 would take 128)
    j.erase("num_key_value_heads");  // Qwen3MoeConfig default 4
    j.erase("mlp_only_layers");
    const ModelConfig m = parse_model_config(j, "config.json");
    EXPECT_EQ(m.moe.n_experts, 128);
    EXPECT_EQ(m.head_dim, 64);
    EXPECT_EQ(m.n_kv_heads, 4);
    EXPECT_FLOAT_EQ(m.rope.theta, 1e6f);
    j["num_experts"] = 64;
    EXPECT_NE(error_of(j).find("num_experts 64 and num_local_experts 128 disagree"), std::string::npos) << error_of(j);
}

TEST(ConfigMoe, DecoderLayerRule) {
    // transformers: MoE iff il not in mlp_only_layers and num_experts > 0 and (il + 1) % decoder_sparse_step == 0.
    nlohmann::json j = qwen3_30b_a3b();
    j["num_hidden_layers"] = 6;
    j["decoder_sparse_step"] = 2;
    j["mlp_only_layers"] = {3};
    const ModelConfig m = parse_model_config(j, "config.json");
    const bool want[6] = {false, true, false, false, false, true};
    for (int64_t il = 0; il < 6; ++il) EXPECT_EQ(m.is_moe_layer(il), want[il]) << il;
    j["num_experts"] = 0;  // every layer dense
    const ModelConfig dense = parse_model_config(j, "config.json");
    for (int64_t il = 0; il < 6; ++il) EXPECT_FALSE(dense.is_moe_layer(il)) << il;
}

TEST(ConfigMoe, Qwen15MoeSharedExpert) {
    const ModelConfig m = parse_model_config(qwen15_moe_a27b(), "config.json");
    EXPECT_EQ(m.arch, Arch::Qwen2Moe);
    EXPECT_EQ(m.moe.n_experts, 60);
    EXPECT_EQ(m.moe.top_k, 4);
    EXPECT_EQ(m.moe.n_ff, 1408);
    EXPECT_FALSE(m.moe.norm_topk_prob);
    EXPECT_EQ(m.moe.n_shared_experts, 1);
    EXPECT_EQ(m.moe.n_ff_shared, 5632);
    EXPECT_TRUE(m.moe.shared_expert_gate);
    EXPECT_TRUE(m.qkv_bias);  // Qwen2MoeAttention: q/k/v bias, o_proj none
    EXPECT_FALSE(m.o_bias);
    EXPECT_FALSE(m.qk_norm);
    EXPECT_EQ(m.head_dim, 128);  // 2048 / 16
    EXPECT_EQ(m.sliding_window, 0);
}

TEST(ConfigMoe, RefusesByName) {
    auto with = [](nlohmann::json j, const std::string& key, const nlohmann::json& v) {
        j[key] = v;
        return j;
    };
    auto without = [](nlohmann::json j, const std::string& key) {
        j.erase(key);
        return j;
    };
    EXPECT_NE(error_of(with(qwen3_30b_a3b(), "num_experts_per_tok", 0)).find("num_experts_per_tok"), std::string::npos);
    EXPECT_NE(error_of(with(qwen3_30b_a3b(), "num_experts_per_tok", 129)).find("num_experts_per_tok"),
              std::string::npos);
    EXPECT_NE(error_of(without(qwen3_30b_a3b(), "moe_intermediate_size")).find("moe_intermediate_size"),
              std::string::npos);
    EXPECT_NE(error_of(without(qwen3_30b_a3b(), "num_experts")).find("num_experts"), std::string::npos);
    EXPECT_NE(error_of(with(qwen3_30b_a3b(), "mlp_only_layers", {48})).find("mlp_only_layers[0]"), std::string::npos);
    EXPECT_NE(error_of(with(qwen3_30b_a3b(), "decoder_sparse_step", 0)).find("decoder_sparse_step"),
              std::string::npos);
    // use_sliding_window with sliding_window null slides nothing (transformers passes None); with a window it
    // would slide, which is refused.
    EXPECT_EQ(error_of(with(qwen3_30b_a3b(), "use_sliding_window", true)), "");
    EXPECT_NE(error_of(with(with(qwen3_30b_a3b(), "use_sliding_window", true), "sliding_window", 4096))
                  .find("use_sliding_window"),
              std::string::npos);
    EXPECT_NE(error_of(without(qwen15_moe_a27b(), "shared_expert_intermediate_size"))
                  .find("shared_expert_intermediate_size"),
              std::string::npos);
}

}  // namespace
}  // namespace nibble
