// config.json of a Hugging Face model folder, parsed once into a plain struct. Both spellings in the
// wild are accepted: the classic keys of published checkpoints (rope_theta, rope_scaling, torch_dtype)
// and the ones transformers 5 writes (rope_parameters, dtype). Unsupported values are refused by name.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "tensor/dtype.h"

namespace nibble {

enum class Arch {
    Llama,    // LlamaForCausalLM
    Mistral,  // MistralForCausalLM
    Qwen2,    // Qwen2ForCausalLM: bias on q/k/v projections
    Qwen3,    // Qwen3ForCausalLM: RMSNorm on q and k per head (QK-norm)
};

enum class RopeType {
    Default,  // theta^(-2i/d)
    Linear,   // positions divided by factor
    Llama3,   // frequency-dependent scaling of Llama 3.1
};

struct RopeConfig {
    float theta = 10000.0f;
    RopeType type = RopeType::Default;
    float factor = 1.0f;                    // linear, llama3
    float low_freq_factor = 1.0f;           // llama3
    float high_freq_factor = 4.0f;          // llama3
    int64_t original_max_position = 8192;   // llama3
    float partial_rotary_factor = 1.0f;     // fraction of head_dim that is rotated
};

struct ModelConfig {
    Arch arch = Arch::Llama;
    std::string arch_name;          // architectures[0] as written
    int64_t n_embd = 0;             // hidden_size
    int64_t n_layers = 0;           // num_hidden_layers
    int64_t n_heads = 0;            // num_attention_heads
    int64_t n_kv_heads = 0;         // num_key_value_heads (defaults to n_heads)
    int64_t head_dim = 0;           // head_dim, else hidden_size / num_attention_heads
    int64_t n_ff = 0;               // intermediate_size
    int64_t vocab_size = 0;
    int64_t max_position_embeddings = 0;
    float norm_eps = 1e-6f;         // rms_norm_eps
    RopeConfig rope;
    bool qkv_bias = false;          // bias on q/k/v projections (attention_bias, or always for Qwen2)
    bool o_bias = false;            // bias on o_proj (attention_bias for Llama-style)
    bool mlp_bias = false;          // bias on gate/up/down (Llama mlp_bias)
    bool qk_norm = false;           // Qwen3 q_norm / k_norm
    bool tied_embeddings = false;   // tie_word_embeddings: lm_head reuses embed_tokens
    int64_t sliding_window = 0;     // 0: full attention
    std::string hidden_act = "silu";
    DType dtype = DType::BF16;      // torch_dtype / dtype
    std::vector<int64_t> bos_token_ids, eos_token_ids;
};

// Parses a config.json object; `source` names the file in messages ("config.json field rope_scaling.type:
// unsupported value 'yarn'").
ModelConfig parse_model_config(const nlohmann::json& config, const std::string& source);
// Reads DIR/config.json.
ModelConfig load_model_config(const std::string& dir);

}  // namespace nibble
