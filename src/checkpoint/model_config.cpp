// config.json -> ModelConfig. The defaults and rules below are read from transformers' config classes
// (models/{llama,mistral,qwen2,qwen3}/configuration_*.py) and modeling_rope_utils.py, 4.x and 5.x:
//  - transformers 5 folds the legacy rope_scaling dict into rope_parameters (rope_scaling wins when both
//    are given) and moves rope_theta / partial_rotary_factor into it with setdefault, so a value inside
//    the dict wins over the top-level key. Where a file gives both with different values we refuse rather
//    than guess which transformers version it was written for.
//  - rope_type falls back to the legacy key "type", then to "default".
//  - llama3 requires factor, low_freq_factor, high_freq_factor, original_max_position_embeddings;
//    linear requires factor (_validate_*_parameters).
//  - Qwen2/Qwen3 use sliding-window attention only when use_sliding_window is true, sliding_window is not
//    null, and then only on layers i >= max_window_layers (or as layer_types says in transformers 5).
#include "checkpoint/model_config.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>

#include "base/error.h"
#include "checkpoint/json_fields.h"
#include "checkpoint/model_config_detail.h"

namespace nibble {

namespace {

// The per-architecture defaults of the transformers config classes, where they differ.
struct ArchDefaults {
    Arch arch;
    std::string_view name;
    std::optional<int64_t> n_kv_heads;      // nullopt: num_attention_heads
    std::optional<int64_t> head_dim;        // nullopt: hidden_size / num_attention_heads
    int64_t max_position_embeddings;
    std::optional<int64_t> bos_token_id, eos_token_id;
};

constexpr std::array<ArchDefaults, 6> kArchs{{
    {Arch::Llama, "LlamaForCausalLM", std::nullopt, std::nullopt, 2048, 1, 2},
    {Arch::Mistral, "MistralForCausalLM", 8, std::nullopt, 4096 * 32, 1, 2},
    {Arch::Qwen2, "Qwen2ForCausalLM", 32, std::nullopt, 32768, std::nullopt, std::nullopt},
    {Arch::Qwen3, "Qwen3ForCausalLM", 32, 128, 32768, std::nullopt, std::nullopt},
    {Arch::Qwen2Moe, "Qwen2MoeForCausalLM", 16, std::nullopt, 32768, std::nullopt, std::nullopt},
    {Arch::Qwen3Moe, "Qwen3MoeForCausalLM", 4, std::nullopt, 32768, std::nullopt, std::nullopt},
}};

constexpr double kDefaultRopeTheta = 10000.0;      // default_theta of RotaryEmbeddingConfigMixin
constexpr int64_t kMistralSlidingWindow = 4096;    // MistralConfig.sliding_window
constexpr int64_t kQwenSlidingWindow = 4096;       // Qwen2Config / Qwen3Config.sliding_window
constexpr int64_t kQwenMaxWindowLayers = 28;       // Qwen2Config / Qwen3Config.max_window_layers

const ArchDefaults& arch_defaults(const JsonObject& c) {
    auto archs = c.get_string_list("architectures");
    if (archs.empty()) c.fail_field("architectures", "is an empty list");
    for (const auto& a : kArchs)
        if (a.name == archs[0]) return a;
    fail("{}: architectures[0] '{}' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, "
         "Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
         "NemotronHForCausalLM)",
         c.source(), archs[0]);
}

int64_t positive_int(const JsonObject& c, std::string_view key, std::optional<int64_t> fallback) {
    int64_t v = fallback && !c.has(key) ? *fallback : c.get_int(key);
    if (v <= 0) c.fail_field(key, fmt::format("must be positive, got {}", v));
    return v;
}

// int, list of ints, or null (no such token).
std::vector<int64_t> token_ids(const JsonObject& c, std::string_view key, std::optional<int64_t> fallback) {
    const auto* v = c.find(key);
    if (v == nullptr) return fallback ? std::vector<int64_t>{*fallback} : std::vector<int64_t>{};
    if (v->is_null()) return {};
    auto one = [&](const nlohmann::json& x, const std::string& where) {
        if (!x.is_number_integer() || (!x.is_number_unsigned() && x.get<int64_t>() < 0))
            fail("{}: field '{}' must be a non-negative integer or a list of them, got {}", c.source(), where,
                 describe_json_value(x));
        return x.get<int64_t>();
    };
    if (!v->is_array()) return {one(*v, c.field(key))};
    std::vector<int64_t> ids;
    for (size_t i = 0; i < v->size(); ++i) ids.push_back(one((*v)[i], fmt::format("{}[{}]", c.field(key), i)));
    return ids;
}

DType parse_dtype(const JsonObject& c) {
    auto torch_dtype = c.opt_string("torch_dtype", NullIs::Absent);
    auto dtype = c.opt_string("dtype", NullIs::Absent);
    if (torch_dtype && dtype && *torch_dtype != *dtype)
        fail("{}: torch_dtype '{}' and dtype '{}' disagree", c.source(), *torch_dtype, *dtype);
    if (!torch_dtype && !dtype) return DType::F32;  // transformers loads float32 when the config is silent
    const std::string& name = dtype ? *dtype : *torch_dtype;
    const char* key = dtype ? "dtype" : "torch_dtype";
    // torch attribute names, as transformers resolves them with getattr(torch, name).
    if (name == "bfloat16") return DType::BF16;
    if (name == "float16" || name == "half") return DType::F16;
    if (name == "float32" || name == "float") return DType::F32;
    fail("{}: {} '{}' is not supported (supported: float32, float16, bfloat16)", c.source(), key, name);
}

// A rope parameter given both at the top level and inside the rope dict.
std::optional<double> rope_number(const JsonObject& c, const std::optional<JsonObject>& dict,
                                  std::string_view key) {
    auto top = c.opt_number(key, NullIs::Absent);
    auto inner = dict ? dict->opt_number(key, NullIs::Absent) : std::nullopt;
    if (top && inner && *top != *inner)
        fail("{}: {} {} and {} {} disagree", c.source(), key, *top, dict->field(key), *inner);
    return inner ? inner : top;
}

RopeConfig parse_rope(const JsonObject& c, int64_t head_dim) {
    auto scaling = c.opt_object("rope_scaling", NullIs::Absent);
    auto params = c.opt_object("rope_parameters", NullIs::Absent);
    if (scaling && params && scaling->json() != params->json())
        fail("{}: rope_scaling and rope_parameters are both given and differ", c.source());
    const std::optional<JsonObject>& dict = scaling ? scaling : params;
    if (dict && (dict->has("full_attention") || dict->has("sliding_attention")))
        fail("{}: per-layer-type {} is not supported", c.source(), scaling ? "rope_scaling" : "rope_parameters");

    RopeConfig rope;
    rope.theta = static_cast<float>(rope_number(c, dict, "rope_theta").value_or(kDefaultRopeTheta));
    if (!(rope.theta > 0) || !std::isfinite(rope.theta))
        fail("{}: rope_theta must be a positive number, got {}", c.source(), rope.theta);
    rope.partial_rotary_factor = static_cast<float>(rope_number(c, dict, "partial_rotary_factor").value_or(1.0));
    if (!(rope.partial_rotary_factor > 0 && rope.partial_rotary_factor <= 1))
        fail("{}: partial_rotary_factor must be in (0, 1], got {}", c.source(), rope.partial_rotary_factor);
    auto rotary_dim = static_cast<int64_t>(static_cast<double>(head_dim) * rope.partial_rotary_factor);
    if (rotary_dim < 2 || rotary_dim % 2 != 0)
        fail("{}: head_dim {} x partial_rotary_factor {} gives {} rotated dims; RoPE needs an even number",
             c.source(), head_dim, rope.partial_rotary_factor, rotary_dim);
    if (!dict) return rope;

    std::string type_key = "rope_type";
    auto type = dict->opt_string("rope_type", NullIs::Absent);
    if (!type) {
        type = dict->opt_string("type", NullIs::Absent);
        if (type) type_key = "type";
    }
    const std::string name = type.value_or("default");
    auto positive = [&](std::string_view key) {
        double v = dict->get_number(key);
        if (!(v > 0) || !std::isfinite(v))
            dict->fail_field(key, fmt::format("must be a positive number, got {}", v));
        return static_cast<float>(v);
    };
    if (name == "default") {
        rope.type = RopeType::Default;
    } else if (name == "linear") {
        rope.type = RopeType::Linear;
        rope.factor = positive("factor");
    } else if (name == "llama3") {
        rope.type = RopeType::Llama3;
        rope.factor = positive("factor");
        rope.low_freq_factor = positive("low_freq_factor");
        rope.high_freq_factor = positive("high_freq_factor");
        rope.original_max_position = dict->get_int("original_max_position_embeddings");
        if (rope.original_max_position <= 0)
            dict->fail_field("original_max_position_embeddings", "must be positive");
        // The smoothing step divides by (high_freq_factor - low_freq_factor).
        if (!(rope.high_freq_factor > rope.low_freq_factor))
            fail("{}: {} must be greater than {} ({} <= {})", c.source(), dict->field("high_freq_factor"),
                 dict->field("low_freq_factor"), rope.high_freq_factor, rope.low_freq_factor);
    } else {
        fail("{}: {} '{}' is not supported (supported: default, linear, llama3)", c.source(),
             dict->field(type_key), name);
    }
    return rope;
}

// Sliding-window size, 0 for full attention everywhere; refuses per-layer mixes we do not implement.
int64_t parse_sliding_window(const JsonObject& c, Arch arch, int64_t n_layers) {
    if (arch == Arch::Mistral) {
        if (!c.has("sliding_window")) return kMistralSlidingWindow;
        auto w = c.opt_int("sliding_window", NullIs::Absent);
        if (w && *w <= 0) c.fail_field("sliding_window", fmt::format("must be positive or null, got {}", *w));
        return w.value_or(0);
    }
    const bool moe = arch == Arch::Qwen2Moe || arch == Arch::Qwen3Moe;
    if (arch != Arch::Qwen2 && arch != Arch::Qwen3 && !moe) return 0;  // Llama has no sliding window
    bool use = c.opt_bool("use_sliding_window").value_or(false);
    auto window = c.has("sliding_window") ? c.opt_int("sliding_window", NullIs::Absent)
                                          : std::optional<int64_t>(kQwenSlidingWindow);
    auto layer_types = c.opt_string_list("layer_types", NullIs::Absent);
    bool any_sliding = false;
    if (layer_types) {
        if (static_cast<int64_t>(layer_types->size()) != n_layers)
            c.fail_field("layer_types", fmt::format("has {} entries for {} layers", layer_types->size(), n_layers));
        for (size_t i = 0; i < layer_types->size(); ++i) {
            const auto& t = (*layer_types)[i];
            if (t != "full_attention" && t != "sliding_attention")
                fail("{}: layer_types[{}] '{}' is not supported (supported: full_attention)", c.source(), i, t);
            any_sliding |= t == "sliding_attention";
        }
    } else if (moe) {
        // Qwen3MoeConfig slides every layer when use_sliding_window is set; Qwen2MoeConfig the layers below
        // max_window_layers (transformers 5) or above it (4.x): either way some layer would.
        any_sliding = true;
    } else {
        int64_t max_window_layers = c.opt_int("max_window_layers").value_or(kQwenMaxWindowLayers);
        any_sliding = max_window_layers < n_layers;
    }
    if (use && window && any_sliding)
        fail("{}: use_sliding_window=true is not supported (some layers would use sliding-window attention, "
             "per {}; only full attention is implemented for {})",
             c.source(), layer_types ? "layer_types" : "max_window_layers",
             arch_name(arch));
    return 0;
}

// The MoE fields of Qwen2MoeConfig / Qwen3MoeConfig (model_config.h).
void parse_qwen_moe(const JsonObject& c, ModelConfig& m) {
    MoeConfig& moe = m.moe;
    // transformers 5's Qwen3MoeConfig maps num_experts to num_local_experts (attribute_map), so a config it
    // writes may carry either spelling.
    auto experts = c.opt_int("num_experts", NullIs::Absent);
    auto local = c.opt_int("num_local_experts", NullIs::Absent);
    if (experts && local && *experts != *local)
        fail("{}: num_experts {} and num_local_experts {} disagree", c.source(), *experts, *local);
    if (!experts && !local) c.fail_field("num_experts", "is required (nor is num_local_experts given)");
    moe.n_experts = experts ? *experts : *local;
    if (moe.n_experts < 0) c.fail_field(experts ? "num_experts" : "num_local_experts", "must not be negative");
    moe.scoring = MoeScoring::Softmax;
    moe.gated_experts = true;
    moe.norm_topk_prob = c.opt_bool("norm_topk_prob").value_or(false);
    if (moe.n_experts > 0) {
        moe.top_k = c.get_int("num_experts_per_tok");
        if (moe.top_k < 1 || moe.top_k > moe.n_experts)
            c.fail_field("num_experts_per_tok",
                         fmt::format("must be between 1 and the {} experts, got {}", moe.n_experts, moe.top_k));
        moe.n_ff = positive_int(c, "moe_intermediate_size", std::nullopt);
    }
    if (m.arch == Arch::Qwen2Moe) {
        // Qwen2MoeSparseMoeBlock always has one shared expert (an MLP of shared_expert_intermediate_size)
        // whose output is scaled by sigmoid(shared_expert_gate x).
        moe.n_shared_experts = 1;
        moe.n_ff_shared = positive_int(c, "shared_expert_intermediate_size", std::nullopt);
        moe.shared_expert_gate = true;
    }
    m.decoder_sparse_step = c.opt_int("decoder_sparse_step").value_or(1);
    if (m.decoder_sparse_step < 1)
        c.fail_field("decoder_sparse_step", fmt::format("must be at least 1, got {}", m.decoder_sparse_step));
    if (const auto* v = c.find("mlp_only_layers"); v != nullptr && !v->is_null()) {
        if (!v->is_array()) c.fail_field("mlp_only_layers", "must be a list of layer indices or null");
        for (size_t i = 0; i < v->size(); ++i) {
            const auto& x = (*v)[i];
            if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() >= m.n_layers)
                fail("{}: {}[{}] must be a layer index in 0..{}, got {}", c.source(), c.field("mlp_only_layers"),
                     i, m.n_layers - 1, describe_json_value(x));
            m.mlp_only_layers.push_back(x.get<int64_t>());
        }
    }
}

}  // namespace

bool ModelConfig::is_moe_layer(int64_t il) const {
    if (moe.n_experts <= 0 || (il + 1) % decoder_sparse_step != 0) return false;
    return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), il) == mlp_only_layers.end();
}

std::string_view arch_name(Arch arch) {
    if (arch == Arch::NemotronH) return "NemotronHForCausalLM";
    for (const auto& a : kArchs)
        if (a.arch == arch) return a.name;
    return "unknown";
}

ModelConfig parse_model_config(const nlohmann::json& config, const std::string& source) {
    JsonObject c(config, source);
    if (auto archs = c.opt_string_list("architectures"); archs && !archs->empty() && (*archs)[0] == "NemotronHForCausalLM")
        return parse_nemotron_h_config(config, source);
    const ArchDefaults& defaults = arch_defaults(c);

    ModelConfig m;
    m.arch = defaults.arch;
    m.arch_name = std::string(defaults.name);
    m.n_embd = positive_int(c, "hidden_size", std::nullopt);
    m.n_layers = positive_int(c, "num_hidden_layers", std::nullopt);
    m.n_heads = positive_int(c, "num_attention_heads", std::nullopt);
    m.n_ff = positive_int(c, "intermediate_size", std::nullopt);
    m.vocab_size = positive_int(c, "vocab_size", std::nullopt);
    m.max_position_embeddings = positive_int(c, "max_position_embeddings", defaults.max_position_embeddings);

    // Absent takes the class default; an explicit null means "same as num_attention_heads" (every class's
    // __init__ / __post_init__ maps None to num_attention_heads).
    if (!c.has("num_key_value_heads"))
        m.n_kv_heads = defaults.n_kv_heads.value_or(m.n_heads);
    else
        m.n_kv_heads = c.opt_int("num_key_value_heads", NullIs::Absent).value_or(m.n_heads);
    if (m.n_kv_heads <= 0 || m.n_heads % m.n_kv_heads != 0)
        fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source, m.n_heads,
             m.n_kv_heads);

    std::optional<int64_t> head_dim = c.has("head_dim") ? c.opt_int("head_dim", NullIs::Absent) : defaults.head_dim;
    if (head_dim) {
        if (*head_dim <= 0) c.fail_field("head_dim", fmt::format("must be positive, got {}", *head_dim));
        m.head_dim = *head_dim;
    } else {
        if (m.n_embd % m.n_heads != 0)
            fail("{}: hidden_size {} is not a multiple of num_attention_heads {} (and head_dim is not given)",
                 source, m.n_embd, m.n_heads);
        m.head_dim = m.n_embd / m.n_heads;
    }

    double eps = c.opt_number("rms_norm_eps").value_or(1e-6);
    if (!(eps > 0) || !std::isfinite(eps)) c.fail_field("rms_norm_eps", fmt::format("must be positive, got {}", eps));
    m.norm_eps = static_cast<float>(eps);

    std::string act = c.opt_string("hidden_act").value_or("silu");
    // transformers' ACT2FN maps both names to SiLU.
    if (act != "silu" && act != "swish")
        fail("{}: hidden_act '{}' is not supported (supported: silu)", source, act);
    m.hidden_act = "silu";

    m.tied_embeddings = c.opt_bool("tie_word_embeddings").value_or(false);

    switch (m.arch) {
    case Arch::Llama: {
        // LlamaAttention: q/k/v/o all take bias=config.attention_bias; LlamaMLP: bias=config.mlp_bias.
        bool attention_bias = c.opt_bool("attention_bias").value_or(false);
        m.qkv_bias = m.o_bias = attention_bias;
        m.mlp_bias = c.opt_bool("mlp_bias").value_or(false);
        break;
    }
    case Arch::Mistral: break;  // no bias anywhere; MistralConfig has no bias keys
    case Arch::Qwen2:
        m.qkv_bias = true;  // Qwen2Attention: q/k/v bias=True, o_proj bias=False, whatever the config says
        break;
    case Arch::NemotronH: break;  // parsed by parse_nemotron_h_config
    case Arch::Qwen3: {
        bool attention_bias = c.opt_bool("attention_bias").value_or(false);
        m.qkv_bias = m.o_bias = attention_bias;
        m.qk_norm = true;
        break;
    }
    case Arch::Qwen2Moe:
        // Qwen2MoeAttention: q/k/v bias = qkv_bias (transformers 5, default true; always true in 4.x), o_proj none.
        m.qkv_bias = c.opt_bool("qkv_bias").value_or(true);
        parse_qwen_moe(c, m);
        break;
    case Arch::Qwen3Moe: {
        bool attention_bias = c.opt_bool("attention_bias").value_or(false);
        m.qkv_bias = m.o_bias = attention_bias;
        m.qk_norm = true;
        parse_qwen_moe(c, m);
        break;
    }
    }

    m.sliding_window = parse_sliding_window(c, m.arch, m.n_layers);
    m.rope = parse_rope(c, m.head_dim);
    m.dtype = parse_dtype(c);
    m.bos_token_ids = token_ids(c, "bos_token_id", defaults.bos_token_id);
    m.eos_token_ids = token_ids(c, "eos_token_id", defaults.eos_token_id);
    return m;
}

DType config_detail::dtype(const JsonObject& c) { return parse_dtype(c); }
std::vector<int64_t> config_detail::token_ids(const JsonObject& c, std::string_view key,
                                              std::optional<int64_t> fallback) {
    return nibble::token_ids(c, key, fallback);
}

bool ModelConfig::has_layer(LayerKind kind) const { return count_layers(kind) > 0; }

int64_t ModelConfig::count_layers(LayerKind kind) const {
    if (layer_kinds.empty()) return kind == LayerKind::Attention || kind == LayerKind::Mlp ? n_layers : 0;
    int64_t n = 0;
    for (LayerKind k : layer_kinds) n += k == kind ? 1 : 0;
    return n;
}

ModelConfig load_model_config(const std::string& dir) {
    std::string path = dir + "/config.json";
    return parse_model_config(read_json_file(path), path);
}

}  // namespace nibble
