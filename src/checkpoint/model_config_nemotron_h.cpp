// NemotronHForCausalLM config.json -> ModelConfig, following transformers' NemotronHConfig
// (models/nemotron_h/configuration_nemotron_h.py) and what modeling_nemotron_h.py reads:
//  - the layer list is hybrid_override_pattern (published checkpoints: one character per layer, M Mamba2,
//    * attention, - MLP, E MoE) or layers_block_type / layer_types (transformers 5: "mamba" or
//    "linear_attention", "attention" or "full_attention", "mlp", "moe"); the pattern wins as in
//    __post_init__ only when no list is given; num_hidden_layers, when present, must agree.
//  - legacy aliases mamba_n_groups, mamba_d_conv, mamba_dt_min/max/limit, mamba_dt_init_floor,
//    mamba_conv_bias, mamba_chunk_size are accepted (__post_init__ maps them).
//  - transformers 5 writes non-finite floats as {"__float__": "Infinity"} (time_step_limit's upper end).
//  - attention has no RoPE and no bias (q/k/v/o are bias=False whatever the config says); MLPs and the
//    experts are non-gated: down(act(up(x))) with mlp_hidden_act (relu2 only).
//  - defaults are NemotronHConfig's (hidden/vocab sizes are required, as for every architecture).
#include <cmath>

#include "base/error.h"
#include "checkpoint/json_fields.h"
#include "checkpoint/model_config.h"
#include "checkpoint/model_config_detail.h"

namespace nibble {

namespace {

// A float as transformers 5 serializes it: a JSON number, or {"__float__": "Infinity" | "-Infinity" | "NaN"}.
double config_float(const JsonObject& c, const nlohmann::json& v, const std::string& where) {
    if (v.is_number()) return v.get<double>();
    if (v.is_object() && v.size() == 1 && v.contains("__float__") && v["__float__"].is_string()) {
        const std::string s = v["__float__"].get<std::string>();
        if (s == "Infinity") return INFINITY;
        if (s == "-Infinity") return -INFINITY;
        if (s == "NaN") return NAN;
    }
    fail("{}: field '{}' must be a number (or {{\"__float__\": \"Infinity\"}}), got {}", c.source(), where,
         describe_json_value(v));
}

// The first key present among `keys` (the current name, then legacy aliases).
const char* first_key(const JsonObject& c, std::initializer_list<const char*> keys) {
    for (const char* k : keys)
        if (c.has(k) && !c.is_null(k)) return k;
    return nullptr;
}

double number(const JsonObject& c, std::initializer_list<const char*> keys, double fallback) {
    const char* k = first_key(c, keys);
    return k ? config_float(c, *c.find(k), c.field(k)) : fallback;
}

int64_t positive(const JsonObject& c, std::initializer_list<const char*> keys, std::optional<int64_t> fallback) {
    const char* k = first_key(c, keys);
    if (k == nullptr) {
        if (!fallback) c.fail_field(*keys.begin(), "is required");
        return *fallback;
    }
    const int64_t v = c.get_int(k);
    if (v <= 0) c.fail_field(k, fmt::format("must be positive, got {}", v));
    return v;
}

bool flag(const JsonObject& c, std::initializer_list<const char*> keys, bool fallback) {
    const char* k = first_key(c, keys);
    return k ? c.get_bool(k) : fallback;
}

std::vector<LayerKind> parse_layers(const JsonObject& c) {
    std::vector<LayerKind> kinds;
    const char* list_key = first_key(c, {"layers_block_type", "layer_types"});
    if (list_key != nullptr) {
        const auto names = c.get_string_list(list_key);
        for (size_t i = 0; i < names.size(); ++i) {
            const std::string& t = names[i];
            if (t == "mamba" || t == "linear_attention") kinds.push_back(LayerKind::Mamba);
            else if (t == "attention" || t == "full_attention") kinds.push_back(LayerKind::Attention);
            else if (t == "mlp") kinds.push_back(LayerKind::Mlp);
            else if (t == "moe") kinds.push_back(LayerKind::Moe);
            else
                fail("{}: {}[{}] '{}' is not a NemotronH layer type (mamba/linear_attention, attention/"
                     "full_attention, mlp, moe)", c.source(), c.field(list_key), i, t);
        }
    } else if (c.has("hybrid_override_pattern")) {
        const std::string p = c.get_string("hybrid_override_pattern");
        for (size_t i = 0; i < p.size(); ++i) {
            switch (p[i]) {
                case 'M': kinds.push_back(LayerKind::Mamba); break;
                case '*': kinds.push_back(LayerKind::Attention); break;
                case '-': kinds.push_back(LayerKind::Mlp); break;
                case 'E': kinds.push_back(LayerKind::Moe); break;
                default:
                    fail("{}: hybrid_override_pattern character {} '{}' is not one of M (Mamba2), * (attention), "
                         "- (MLP), E (MoE)", c.source(), i, p[i]);
            }
        }
    } else {
        fail("{}: NemotronH needs hybrid_override_pattern or layers_block_type (the mixer of each layer)", c.source());
    }
    if (kinds.empty()) fail("{}: NemotronH layer list is empty", c.source());
    if (c.has("num_hidden_layers") && !c.is_null("num_hidden_layers") &&
        c.get_int("num_hidden_layers") != static_cast<int64_t>(kinds.size()))
        fail("{}: num_hidden_layers {} disagrees with the {} layers of {}", c.source(), c.get_int("num_hidden_layers"),
             kinds.size(), list_key ? list_key : "hybrid_override_pattern");
    return kinds;
}

}  // namespace

ModelConfig parse_nemotron_h_config(const nlohmann::json& config, const std::string& source) {
    JsonObject c(config, source);
    ModelConfig m;
    m.arch = Arch::NemotronH;
    m.arch_name = "NemotronHForCausalLM";
    m.layer_kinds = parse_layers(c);
    m.n_layers = static_cast<int64_t>(m.layer_kinds.size());
    m.n_embd = positive(c, {"hidden_size"}, std::nullopt);
    m.vocab_size = positive(c, {"vocab_size"}, std::nullopt);
    m.max_position_embeddings = positive(c, {"max_position_embeddings"}, 4096);
    m.n_ff = positive(c, {"intermediate_size"}, 21504);

    const double eps = number(c, {"layer_norm_epsilon"}, 1e-5);
    if (!(eps > 0) || !std::isfinite(eps)) c.fail_field("layer_norm_epsilon", fmt::format("must be positive, got {}", eps));
    m.norm_eps = static_cast<float>(eps);

    // Attention (no RoPE: rope stays at its defaults and is not applied).
    m.n_heads = positive(c, {"num_attention_heads"}, 32);
    m.n_kv_heads = c.has("num_key_value_heads") && !c.is_null("num_key_value_heads")
                       ? positive(c, {"num_key_value_heads"}, std::nullopt)
                       : (c.has("num_key_value_heads") ? m.n_heads : 8);
    if (m.n_heads % m.n_kv_heads != 0)
        fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source, m.n_heads, m.n_kv_heads);
    if (c.has("head_dim") && c.is_null("head_dim")) {
        if (m.n_embd % m.n_heads != 0)
            fail("{}: hidden_size {} is not a multiple of num_attention_heads {}", source, m.n_embd, m.n_heads);
        m.head_dim = m.n_embd / m.n_heads;
    } else {
        m.head_dim = positive(c, {"head_dim"}, 128);
    }
    if (flag(c, {"attention_bias"}, false))
        c.fail_field("attention_bias", "true is not supported (NemotronH attention has no bias)");
    if (c.has("sliding_window") && !c.is_null("sliding_window"))
        c.fail_field("sliding_window", "is not supported for NemotronH (only null)");

    // MLP / experts activation.
    const std::string act = c.opt_string("mlp_hidden_act").value_or("relu2");
    if (act != "relu2") fail("{}: mlp_hidden_act '{}' is not supported (supported: relu2)", source, act);
    m.mlp_act = act;
    m.hidden_act = act;
    m.mlp_bias = flag(c, {"mlp_bias"}, false);

    // Mamba2.
    MambaConfig& mb = m.mamba;
    mb.n_heads = positive(c, {"mamba_num_heads"}, 128);
    mb.head_dim = positive(c, {"mamba_head_dim"}, 64);
    mb.state_size = positive(c, {"ssm_state_size"}, 128);
    mb.n_groups = positive(c, {"n_groups", "mamba_n_groups"}, 8);
    mb.conv_kernel = positive(c, {"conv_kernel", "mamba_d_conv"}, 4);
    mb.chunk_size = positive(c, {"chunk_size", "mamba_chunk_size"}, 128);
    mb.conv_bias = flag(c, {"use_conv_bias", "mamba_conv_bias"}, true);
    mb.proj_bias = flag(c, {"use_bias"}, false);
    if (mb.n_heads % mb.n_groups != 0)
        fail("{}: mamba_num_heads {} is not a multiple of n_groups {}", source, mb.n_heads, mb.n_groups);
    const std::string mact = c.opt_string("mamba_hidden_act").value_or("silu");
    if (mact != "silu" && mact != "swish")
        fail("{}: mamba_hidden_act '{}' is not supported (supported: silu)", source, mact);
    if (const char* k = first_key(c, {"time_step_limit", "mamba_dt_limit"})) {
        const nlohmann::json& v = *c.find(k);
        if (!v.is_array() || v.size() != 2)
            c.fail_field(k, fmt::format("must be a list of two numbers, got {}", describe_json_value(v)));
        mb.dt_min = static_cast<float>(config_float(c, v[0], c.field(k) + "[0]"));
        mb.dt_max = static_cast<float>(config_float(c, v[1], c.field(k) + "[1]"));
        if (std::isnan(mb.dt_min) || std::isnan(mb.dt_max) || mb.dt_min > mb.dt_max)
            c.fail_field(k, fmt::format("must be [low, high] with low <= high, got [{}, {}]", mb.dt_min, mb.dt_max));
    }
    mb.time_step_min = static_cast<float>(number(c, {"time_step_min", "mamba_dt_min"}, 0.001));
    mb.time_step_max = static_cast<float>(number(c, {"time_step_max", "mamba_dt_max"}, 0.1));
    mb.time_step_floor = static_cast<float>(number(c, {"time_step_floor", "mamba_dt_init_floor"}, 1e-4));

    // MoE: sigmoid router with a score-correction bias, grouped top-k, relu^2 experts, one shared expert.
    MoeConfig& moe = m.moe;
    moe.n_experts = positive(c, {"n_routed_experts"}, 8);
    moe.top_k = positive(c, {"num_experts_per_tok"}, 2);
    moe.n_ff = positive(c, {"moe_intermediate_size"}, 7688);
    moe.n_shared_experts = positive(c, {"n_shared_experts"}, 1);
    moe.n_ff_shared = positive(c, {"moe_shared_expert_intermediate_size"}, 7688);
    moe.scoring = MoeScoring::Sigmoid;
    moe.score_correction_bias = true;
    moe.n_group = positive(c, {"n_group"}, 1);
    moe.topk_group = positive(c, {"topk_group"}, 1);
    moe.norm_topk_prob = flag(c, {"norm_topk_prob"}, true);
    moe.routed_scaling_factor = static_cast<float>(number(c, {"routed_scaling_factor"}, 1.0));
    moe.gated_experts = false;
    if (c.has("moe_latent_size") && !c.is_null("moe_latent_size"))
        c.fail_field("moe_latent_size", "is not supported (only null)");
    if (m.has_layer(LayerKind::Moe)) {
        if (moe.top_k > moe.n_experts)
            fail("{}: num_experts_per_tok {} exceeds n_routed_experts {}", source, moe.top_k, moe.n_experts);
        if (moe.n_experts % moe.n_group != 0 || moe.topk_group > moe.n_group)
            fail("{}: n_routed_experts {} must split into n_group {} groups with topk_group {} <= n_group", source,
                 moe.n_experts, moe.n_group, moe.topk_group);
        // Each group contributes the sum of its best two scores (route_tokens_to_experts).
        if (moe.n_experts / moe.n_group < 2 && moe.n_group > 1)
            fail("{}: grouped routing needs at least 2 experts per group", source);
        if (moe.topk_group * (moe.n_experts / moe.n_group) < moe.top_k)
            fail("{}: topk_group {} groups of {} experts cannot supply num_experts_per_tok {}", source, moe.topk_group,
                 moe.n_experts / moe.n_group, moe.top_k);
    }
    if (flag(c, {"residual_in_fp32"}, false)) m.residual_in_fp32 = true;
    // num_nextn_predict_layers (MTP heads for speculative decoding) are extra weights the main model ignores.
    m.tied_embeddings = flag(c, {"tie_word_embeddings"}, false);
    m.dtype = config_detail::dtype(c);
    m.bos_token_ids = config_detail::token_ids(c, "bos_token_id", 1);
    m.eos_token_ids = config_detail::token_ids(c, "eos_token_id", 2);
    return m;
}

}  // namespace nibble
