// config.json of a Hugging Face model folder, parsed once into a plain struct. Both spellings in the
// wild are accepted: the classic keys of published checkpoints (rope_theta, rope_scaling, torch_dtype)
// and the ones transformers 5 writes (rope_parameters, dtype). Unsupported values are refused by name.
//
// Absent keys take the defaults of the transformers config class of the architecture (LlamaConfig,
// MistralConfig, Qwen2Config, Qwen3Config; the same in transformers 4.x and 5.x), except the shape fields
// hidden_size, num_hidden_layers, num_attention_heads, intermediate_size and vocab_size: transformers
// would silently take the sizes of a 7B model there, which no real checkpoint relies on, so they are
// required. Per-architecture defaults that differ (see model_config.cpp for the table):
//   num_key_value_heads  Llama: num_attention_heads, Mistral: 8, Qwen2/Qwen3: 32 (null: num_attention_heads)
//   head_dim             Qwen3: 128, others: hidden_size / num_attention_heads (null: the latter)
//   max_position_embeddings  Llama 2048, Mistral 131072, Qwen2/Qwen3 32768
//   bos/eos_token_id     Llama/Mistral 1/2, Qwen2/Qwen3 none
//   sliding_window       Mistral 4096 (null: none); Qwen2/Qwen3 only with use_sliding_window (refused)
// Common: rms_norm_eps 1e-6, rope_theta 10000, hidden_act silu, tie_word_embeddings false,
// attention_bias/mlp_bias false; dtype F32 when neither torch_dtype nor dtype is given (what transformers
// loads then).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
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
    int64_t sliding_window = 0;     // 0: full attention; else each query sees the last N keys (Mistral)
    std::string hidden_act = "silu";
    DType dtype = DType::F32;       // torch_dtype / dtype: F32, F16 or BF16
    std::vector<int64_t> bos_token_ids, eos_token_ids;  // int or list in the file; empty for null
};

// Parses a config.json object; `source` names the file in messages ("config.json: rope_scaling.rope_type
// 'yarn' is not supported (supported: default, linear, llama3)").
ModelConfig parse_model_config(const nlohmann::json& config, const std::string& source);
// Reads DIR/config.json.
ModelConfig load_model_config(const std::string& dir);

// "LlamaForCausalLM", ... : the architectures[0] spelling of each Arch.
std::string_view arch_name(Arch arch);

}  // namespace nibble
