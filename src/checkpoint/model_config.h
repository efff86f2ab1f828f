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
// Qwen2-MoE / Qwen3-MoE (Qwen2MoeConfig, Qwen3MoeConfig): num_experts (transformers 5 may write it as
// num_local_experts, its attribute_map target), num_experts_per_tok, moe_intermediate_size and (Qwen2-MoE)
// shared_expert_intermediate_size are shape fields and required; norm_topk_prob false, decoder_sparse_step 1,
// mlp_only_layers [] (null: []); head_dim hidden / heads; num_key_value_heads Qwen2-MoE 16, Qwen3-MoE 4.
// Common: rms_norm_eps 1e-6, rope_theta 10000, hidden_act silu, tie_word_embeddings false,
// attention_bias/mlp_bias false; dtype F32 when neither torch_dtype nor dtype is given (what transformers
// loads then).
#pragma once

#include <cmath>
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
    Qwen2Moe, // Qwen2MoeForCausalLM: Qwen2 attention; MoE MLPs with a sigmoid-gated shared expert
    Qwen3Moe, // Qwen3MoeForCausalLM: Qwen3 attention (QK-norm); MoE MLPs
    NemotronH,  // NemotronHForCausalLM: hybrid Mamba2 / attention (no RoPE) / relu^2 MLP / MoE, one mixer per layer
};

// The mixer of one layer of a hybrid model (NemotronH's hybrid_override_pattern M, *, -, E).
enum class LayerKind { Mamba, Attention, Mlp, Moe };

// Mamba2 mixer sizes and discretization constants (NemotronH field names in comments).
struct MambaConfig {
    int64_t n_heads = 0;          // mamba_num_heads
    int64_t head_dim = 0;         // mamba_head_dim; d_inner = n_heads * head_dim
    int64_t state_size = 0;       // ssm_state_size
    int64_t n_groups = 1;         // n_groups: B and C are shared by n_heads / n_groups heads
    int64_t conv_kernel = 4;      // conv_kernel
    int64_t chunk_size = 128;     // chunk_size (of the chunked prefill scan)
    bool conv_bias = true;        // use_conv_bias
    bool proj_bias = false;       // use_bias (in_proj / out_proj)
    float dt_min = 0.0f, dt_max = INFINITY;  // time_step_limit: dt is clamped to it after softplus
    float time_step_min = 0.001f, time_step_max = 0.1f, time_step_floor = 1e-4f;  // init only
    int64_t d_inner() const { return n_heads * head_dim; }
    int64_t conv_dim() const { return d_inner() + 2 * n_groups * state_size; }  // channels of x, B, C
    int64_t in_proj_dim() const { return d_inner() + conv_dim() + n_heads; }    // z, x, B, C, dt
};

enum class MoeScoring { Softmax, Sigmoid };

// Mixture-of-experts layer: router, top-k, experts, optional shared expert(s).
struct MoeConfig {
    int64_t n_experts = 0;              // n_routed_experts / num_experts
    int64_t top_k = 0;                  // num_experts_per_tok
    int64_t n_ff = 0;                   // moe_intermediate_size (per expert)
    int64_t n_shared_experts = 0;       // n_shared_experts (NemotronH: one MLP of n_ff_shared)
    int64_t n_ff_shared = 0;            // moe_shared_expert_intermediate_size
    MoeScoring scoring = MoeScoring::Softmax;
    bool score_correction_bias = false; // gate.e_score_correction_bias added for the choice only
    int64_t n_group = 1, topk_group = 1;// grouped top-k: keep the topk_group best groups of experts
    bool norm_topk_prob = false;        // renormalise the chosen k weights to sum 1
    float routed_scaling_factor = 1.0f; // multiplies the routed weights
    bool gated_experts = true;          // SwiGLU (gate, up, down); false: act(up) then down (NemotronH relu^2)
    bool shared_expert_gate = false;    // Qwen2-MoE: the shared expert's output times sigmoid(shared_expert_gate x)
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
    // Which dimensions rotate together (each pair i by inv_freq[i]): false, NeoX "rotate half" (i and
    // i + rotary_dim / 2; every architecture supported today); true, GPT-J interleaved (2i and 2i + 1).
    // Not read from config.json: the HF key for it, `rope_interleave` (transformers' DeepseekV3Config and
    // the configs derived from it, default true), belongs to architectures not supported yet, and the
    // Llama/Mistral/Qwen configs ignore it; GPT-J and GLM imply interleaving by architecture, with no key.
    bool interleaved = false;
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
    // Hybrid models (NemotronH): one mixer per layer; empty for the llama family (attention + MLP each).
    std::vector<LayerKind> layer_kinds;
    MambaConfig mamba;                  // NemotronH
    MoeConfig moe;                      // MoE layers
    std::string mlp_act = "silu";       // NemotronH mlp_hidden_act: relu2 (relu(x)^2), non-gated MLPs
    bool residual_in_fp32 = false;      // NemotronH; our residual stream is float32 anyway
    bool has_layer(LayerKind kind) const;
    // Qwen2-MoE / Qwen3-MoE (every layer has attention): layer il's MLP is the MoE block when moe.n_experts > 0,
    // (il + 1) % decoder_sparse_step == 0 and il is not in mlp_only_layers (transformers' decoder-layer rule);
    // otherwise it is the dense n_ff MLP.
    int64_t decoder_sparse_step = 1;    // decoder_sparse_step
    std::vector<int64_t> mlp_only_layers;  // mlp_only_layers
    bool is_moe_layer(int64_t il) const;
    int64_t count_layers(LayerKind kind) const;
};

// Parses a config.json object; `source` names the file in messages ("config.json: rope_scaling.rope_type
// 'yarn' is not supported (supported: default, linear, llama3)").
ModelConfig parse_model_config(const nlohmann::json& config, const std::string& source);
// NemotronHForCausalLM's config (NemotronHConfig of transformers; parse_model_config dispatches to it).
ModelConfig parse_nemotron_h_config(const nlohmann::json& config, const std::string& source);
// Reads DIR/config.json.
ModelConfig load_model_config(const std::string& dir);

// "LlamaForCausalLM", ... : the architectures[0] spelling of each Arch.
std::string_view arch_name(Arch arch);

}  // namespace nibble
