// Each config below holds the fields of the published config.json that shape the weights, spelled as the file
// spells them, so parse_model_config treats it exactly as the real file. Sources (config.json on Hugging Face;
// this session checked them against public copies of those files found with the code search, as noted):
//   meta-llama/Llama-3.1-8B            checked (a public copy of its config.json)
//   meta-llama/Llama-3.1-70B           NOT re-checked here: the values gpu::synthetic_config carried
//   Qwen/Qwen3-8B                      checked (a public copy of its config.json)
//   mistralai/Mistral-7B-v0.3          NOT re-checked here: the values gpu::synthetic_config carried
//   Qwen/Qwen3-30B-A3B                 checked (a public copy of its config.json, transformers_version 4.51.0)
//   nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 checked (public copies of its config.json, transformers_version
//                                      4.55.4, several agreeing; the NVFP4 sibling has the same shape fields)
#include "model/real_shapes.h"

#include <nlohmann/json.hpp>

#include "base/error.h"

namespace nibble {

namespace {

// Llama 3.1's RoPE scaling (config.json rope_scaling; the same for 8B and 70B).
nlohmann::json llama31_rope_scaling() {
    return {{"factor", 8.0},
            {"low_freq_factor", 1.0},
            {"high_freq_factor", 4.0},
            {"original_max_position_embeddings", 8192},
            {"rope_type", "llama3"}};
}

nlohmann::json llama31_8b() {
    return {
        {"architectures", {"LlamaForCausalLM"}},
        {"hidden_size", 4096},                 // hidden_size
        {"num_hidden_layers", 32},             // num_hidden_layers
        {"num_attention_heads", 32},           // num_attention_heads (head_dim absent: 4096 / 32 = 128)
        {"num_key_value_heads", 8},            // num_key_value_heads
        {"intermediate_size", 14336},          // intermediate_size
        {"vocab_size", 128256},                // vocab_size
        {"max_position_embeddings", 131072},   // max_position_embeddings
        {"rms_norm_eps", 1e-5},                // rms_norm_eps
        {"rope_theta", 500000.0},              // rope_theta
        {"rope_scaling", llama31_rope_scaling()},
        {"tie_word_embeddings", false},        // tie_word_embeddings
        {"bos_token_id", 128000},              // bos_token_id
        {"eos_token_id", 128001},              // eos_token_id
        {"torch_dtype", "bfloat16"},           // torch_dtype
    };
}

nlohmann::json llama31_70b() {
    return {
        {"architectures", {"LlamaForCausalLM"}},
        {"hidden_size", 8192},                 // hidden_size
        {"num_hidden_layers", 80},             // num_hidden_layers
        {"num_attention_heads", 64},           // num_attention_heads (head_dim 8192 / 64 = 128)
        {"num_key_value_heads", 8},            // num_key_value_heads
        {"intermediate_size", 28672},          // intermediate_size
        {"vocab_size", 128256},                // vocab_size
        {"max_position_embeddings", 131072},   // max_position_embeddings
        {"rms_norm_eps", 1e-5},                // rms_norm_eps
        {"rope_theta", 500000.0},              // rope_theta
        {"rope_scaling", llama31_rope_scaling()},
        {"tie_word_embeddings", false},        // tie_word_embeddings
        {"bos_token_id", 128000},              // bos_token_id
        {"eos_token_id", 128001},              // eos_token_id
        {"torch_dtype", "bfloat16"},           // torch_dtype
    };
}

nlohmann::json qwen3_8b() {
    return {
        {"architectures", {"Qwen3ForCausalLM"}},
        {"hidden_size", 4096},                 // hidden_size
        {"num_hidden_layers", 36},             // num_hidden_layers
        {"num_attention_heads", 32},           // num_attention_heads
        {"num_key_value_heads", 8},            // num_key_value_heads
        {"head_dim", 128},                     // head_dim
        {"intermediate_size", 12288},          // intermediate_size
        {"vocab_size", 151936},                // vocab_size
        {"max_position_embeddings", 40960},    // max_position_embeddings
        {"rms_norm_eps", 1e-6},                // rms_norm_eps
        {"rope_theta", 1000000.0},             // rope_theta (rope_scaling null)
        {"tie_word_embeddings", false},        // tie_word_embeddings
        {"bos_token_id", 151643},              // bos_token_id
        {"eos_token_id", 151645},              // eos_token_id
        {"torch_dtype", "bfloat16"},           // torch_dtype
    };
}

nlohmann::json mistral_7b_v03() {
    return {
        {"architectures", {"MistralForCausalLM"}},
        {"hidden_size", 4096},                 // hidden_size
        {"num_hidden_layers", 32},             // num_hidden_layers
        {"num_attention_heads", 32},           // num_attention_heads (head_dim 4096 / 32 = 128)
        {"num_key_value_heads", 8},            // num_key_value_heads
        {"intermediate_size", 14336},          // intermediate_size
        {"vocab_size", 32768},                 // vocab_size (v0.3's extended vocabulary)
        {"max_position_embeddings", 32768},    // max_position_embeddings
        {"rms_norm_eps", 1e-5},                // rms_norm_eps
        {"rope_theta", 1000000.0},             // rope_theta
        {"sliding_window", nullptr},           // sliding_window null: full attention
        {"tie_word_embeddings", false},        // tie_word_embeddings
        {"bos_token_id", 1},                   // bos_token_id
        {"eos_token_id", 2},                   // eos_token_id
        {"torch_dtype", "bfloat16"},           // torch_dtype
    };
}

nlohmann::json qwen3_30b_a3b() {
    return {
        {"architectures", {"Qwen3MoeForCausalLM"}},
        {"hidden_size", 2048},                 // hidden_size
        {"num_hidden_layers", 48},             // num_hidden_layers
        {"num_attention_heads", 32},           // num_attention_heads
        {"num_key_value_heads", 4},            // num_key_value_heads
        {"head_dim", 128},                     // head_dim (q_dim 4096 > hidden 2048)
        {"intermediate_size", 6144},           // intermediate_size (dense MLP; unused: every layer is MoE)
        {"moe_intermediate_size", 768},        // moe_intermediate_size (per expert)
        {"num_experts", 128},                  // num_experts
        {"num_experts_per_tok", 8},            // num_experts_per_tok
        {"norm_topk_prob", true},              // norm_topk_prob
        {"decoder_sparse_step", 1},            // decoder_sparse_step
        {"mlp_only_layers", nlohmann::json::array()},  // mlp_only_layers []
        {"vocab_size", 151936},                // vocab_size
        {"max_position_embeddings", 40960},    // max_position_embeddings
        {"rms_norm_eps", 1e-6},                // rms_norm_eps
        {"rope_theta", 1000000.0},             // rope_theta (rope_scaling null)
        {"tie_word_embeddings", false},        // tie_word_embeddings
        {"bos_token_id", 151643},              // bos_token_id
        {"eos_token_id", 151645},              // eos_token_id
        {"torch_dtype", "bfloat16"},           // torch_dtype
        // Qwen3-MoE has no shared expert and no grouped routing: moe_shared_expert_intermediate_size, n_group,
        // topk_group are not fields of its config.
    };
}

nlohmann::json nemotron_3_nano_30b_a3b() {
    return {
        {"architectures", {"NemotronHForCausalLM"}},
        {"hidden_size", 2688},                 // hidden_size
        {"num_hidden_layers", 52},             // num_hidden_layers
        // hybrid_override_pattern: 23 M (Mamba2), 23 E (MoE), 6 * (attention), no - (MLP)
        {"hybrid_override_pattern", "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"},
        {"mamba_num_heads", 64},               // mamba_num_heads
        {"mamba_head_dim", 64},                // mamba_head_dim (d_inner 4096, not expand 2 x hidden)
        {"ssm_state_size", 128},               // ssm_state_size
        {"n_groups", 8},                       // n_groups (of B and C)
        {"conv_kernel", 4},                    // conv_kernel
        {"chunk_size", 128},                   // chunk_size
        {"use_conv_bias", true},               // use_conv_bias
        {"use_bias", false},                   // use_bias (in_proj / out_proj)
        {"mamba_hidden_act", "silu"},          // mamba_hidden_act
        {"time_step_min", 0.001},              // time_step_min
        {"time_step_max", 0.1},                // time_step_max
        {"time_step_floor", 0.0001},           // time_step_floor
        {"num_attention_heads", 32},           // num_attention_heads
        {"num_key_value_heads", 2},            // num_key_value_heads
        {"head_dim", 128},                     // head_dim
        {"attention_bias", false},             // attention_bias
        {"intermediate_size", 1856},           // intermediate_size (of '-' MLP layers; the pattern has none)
        {"mlp_hidden_act", "relu2"},           // mlp_hidden_act
        {"mlp_bias", false},                   // mlp_bias
        {"moe_intermediate_size", 1856},       // moe_intermediate_size (per routed expert)
        {"moe_shared_expert_intermediate_size", 3712},  // moe_shared_expert_intermediate_size
        {"n_shared_experts", 1},               // n_shared_experts
        {"n_routed_experts", 128},             // n_routed_experts
        {"num_experts_per_tok", 6},            // num_experts_per_tok
        {"n_group", 1},                        // n_group
        {"topk_group", 1},                     // topk_group
        {"norm_topk_prob", true},              // norm_topk_prob
        {"routed_scaling_factor", 2.5},        // routed_scaling_factor
        {"vocab_size", 131072},                // vocab_size
        {"max_position_embeddings", 262144},   // max_position_embeddings
        {"layer_norm_epsilon", 1e-5},          // layer_norm_epsilon
        {"tie_word_embeddings", false},        // tie_word_embeddings
        {"residual_in_fp32", false},           // residual_in_fp32
        {"bos_token_id", 1},                   // bos_token_id
        {"eos_token_id", 2},                   // eos_token_id
        {"torch_dtype", "bfloat16"},           // torch_dtype
    };
}

struct Entry {
    const char* name;
    nlohmann::json (*config)();
};

const Entry kEntries[] = {
    {"llama3-8b", llama31_8b},
    {"llama3-70b", llama31_70b},
    {"qwen3-8b", qwen3_8b},
    {"mistral-7b", mistral_7b_v03},
    {"qwen3-30b-a3b", qwen3_30b_a3b},
    {"nemotron-3-nano-30b-a3b", nemotron_3_nano_30b_a3b},
};

}  // namespace

std::vector<std::string> real_shape_names() {
    std::vector<std::string> out;
    for (const Entry& e : kEntries) out.emplace_back(e.name);
    return out;
}

nlohmann::json real_shape_config_json(const std::string& name) {
    for (const Entry& e : kEntries)
        if (name == e.name) return e.config();
    std::string known;
    for (const Entry& e : kEntries) known += (known.empty() ? "" : ", ") + std::string(e.name);
    fail("--synthetic {}: unknown shape (known: {})", name, known);
}

ModelConfig real_shape_config(const std::string& name) {
    return parse_model_config(real_shape_config_json(name), "--synthetic " + name + " config.json");
}

std::vector<std::string> nemotron_h_modelopt_exclusions(const ModelConfig& config) {
    std::vector<std::string> out;
    const auto& kinds = config.layer_kinds;
    for (size_t i = 0; i < kinds.size(); ++i) {
        const bool feeds_attention = i + 1 < kinds.size() && kinds[i + 1] == LayerKind::Attention;
        if (kinds[i] == LayerKind::Attention || (kinds[i] == LayerKind::Mamba && feeds_attention))
            out.push_back(fmt::format("backbone.layers.{}.mixer*", i));
    }
    return out;
}

RealShape real_shape(const std::string& name, const RealShapeOptions& options) {
    RealShape s;
    s.name = name;
    s.config = real_shape_config(name);
    if (!options.nvfp4) return s;
    // hf_quant_config.json as ModelOpt writes it for an NVFP4 export: lm_head stays BF16 unless asked;
    //  - Qwen3-MoE: the router (mlp.gate, a Linear) stays BF16, as ModelOpt never quantizes MoE gates;
    //  - NemotronH: attention layers and the Mamba layer before each stay BF16 and the KV cache is FP8, as the
    //    NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4 model card describes (its router is a plain tensor, stored F32).
    nlohmann::json exclude = nlohmann::json::array();
    if (!options.lm_head_nvfp4) exclude.push_back("lm_head");
    nlohmann::json kv_cache = nullptr;
    if (s.config.arch == Arch::Qwen3Moe || s.config.arch == Arch::Qwen2Moe) exclude.push_back("model.layers.*.mlp.gate");
    if (s.config.arch == Arch::NemotronH) {
        for (const std::string& p : nemotron_h_modelopt_exclusions(s.config)) exclude.push_back(p);
        kv_cache = "FP8";
    }
    const nlohmann::json file = {
        {"producer", {{"name", "modelopt"}, {"version", "0.29.0"}}},
        {"quantization",
         {{"quant_algo", "NVFP4"}, {"group_size", 16}, {"kv_cache_quant_algo", kv_cache}, {"exclude_modules", exclude}}},
    };
    s.quant = parse_hf_quant_config(file, "--synthetic " + name + " hf_quant_config.json");
    return s;
}

}  // namespace nibble
