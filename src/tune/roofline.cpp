#include "tune/roofline.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "model/model.h"
#include "tensor/nvfp4.h"

namespace nibble::tune {

namespace {

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

bool ends_with(const std::string& s, std::string_view tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// A MoE router's tensors: Qwen-MoE's mlp.gate linear, NemotronH's mixer.gate.weight and its correction bias.
bool router(const std::string& name) {
    return ends_with(name, ".mlp.gate") || contains(name, ".gate.weight") || contains(name, "e_score_correction_bias");
}

// Which share a linear's bytes go to.
std::string linear_share(const std::string& module) {
    if (module == "lm_head" || contains(module, ".lm_head")) return "lm_head";
    if (contains(module, ".experts.")) return "MoE experts (active)";
    if (contains(module, "shared_expert")) return "MoE shared experts";  // Qwen2-MoE shared_expert(_gate), NemotronH shared_experts
    if (router(module)) return "MoE routers";
    if (contains(module, "q_proj") || contains(module, "k_proj") || contains(module, "v_proj") ||
        contains(module, "o_proj") || contains(module, "qkv_proj"))
        return "attention projections";
    if (contains(module, "in_proj") || contains(module, "out_proj")) return "Mamba mixers";
    return "MLP";
}

}  // namespace

Roofline compute_roofline(const ModelConfig& c, const QuantConfig& quant, const DeviceProfile& d,
                          const RooflineOptions& o) {
    const int64_t dense_size = static_cast<int64_t>(dtype_size(c.dtype));
    const bool nvfp4 = quant.method == QuantMethod::ModelOptNvfp4 || quant.method == QuantMethod::CompressedTensorsNvfp4;
    const double active_experts =
        c.moe.n_experts > 0 ? static_cast<double>(c.moe.top_k) / static_cast<double>(c.moe.n_experts) : 1.0;
    std::map<std::string, double> bytes;
    Roofline r;
    for (const WeightSpec& w : expected_weights(c)) {
        if (w.kind == WeightSpec::Kind::Dense) {
            const int64_t elem = (w.f32 || (w.f32_when_quantized && quant.method != QuantMethod::None)) ? 4 : dense_size;
            const bool embedding = contains(w.name, "embed_tokens") || contains(w.name, "embeddings");
            if (embedding) {
                // Gathered: one row per token; a tied lm_head reads the whole matrix.
                bytes["embedding (one row gathered)"] += static_cast<double>(c.n_embd * elem);
                if (c.tied_embeddings) bytes["lm_head"] += static_cast<double>(w.shape.numel() * elem);
            } else if (router(w.name)) {
                bytes["MoE routers"] += static_cast<double>(w.shape.numel() * elem);
            } else {
                bytes["norms and other"] += static_cast<double>(w.shape.numel() * elem);
            }
            continue;
        }
        const LinearSpec& l = w.linear;
        const std::string share = linear_share(l.module);
        const double scale = share == "MoE experts (active)" ? active_experts : 1.0;
        const int64_t nk = l.n_out * l.n_in;
        const bool quantized = quant.method != QuantMethod::None && !quant.is_excluded(l.module);
        const int64_t activation_scale = quant.weight_only ? 0 : 4;
        int64_t b = l.bias ? l.n_out * dense_size : 0;
        if (!quantized) b += nk * dense_size;
        else if (nvfp4) b += nk / 2 + nk / kNvfp4BlockSize + 4 + activation_scale;
        else b += nk + 4 + activation_scale;  // FP8
        bytes[share] += scale * static_cast<double>(b);
        if (share == "lm_head") continue;
        const double flops = 2.0 * static_cast<double>(nk) * scale;
        if (quantized && nvfp4) r.prefill_fp4_flops += flops;
        else r.prefill_bf16_flops += flops;
    }
    const int64_t attention_layers =
        c.layer_kinds.empty() ? c.n_layers : c.count_layers(LayerKind::Attention);
    r.prefill_bf16_flops += 4.0 * static_cast<double>(attention_layers * c.n_heads * c.head_dim) *
                            (static_cast<double>(o.prefill_tokens) / 2.0);
    if (o.kv_bytes_per_token > 0 && o.context_depth > 0)
        bytes[fmt::format("KV cache at {} tokens", o.context_depth)] +=
            static_cast<double>(o.kv_bytes_per_token) * static_cast<double>(o.context_depth);

    if (o.recurrent_state_bytes > 0)
        bytes["Mamba state (read and written)"] += 2.0 * static_cast<double>(o.recurrent_state_bytes);

    for (const auto& [what, b] : bytes) {
        const int64_t v = static_cast<int64_t>(b + 0.5);
        if (v <= 0) continue;
        r.decode_bytes.push_back({what, v});
        r.decode_bytes_total += v;
    }
    std::sort(r.decode_bytes.begin(), r.decode_bytes.end(), [](const ByteShare& a, const ByteShare& b) {
        return a.bytes != b.bytes ? a.bytes > b.bytes : a.what < b.what;
    });
    if (d.memory_bandwidth > 0 && r.decode_bytes_total > 0)
        r.decode_tokens_per_s = d.memory_bandwidth / static_cast<double>(r.decode_bytes_total);
    r.fp4_on_bf16 = d.fp4_flops <= 0;
    const double fp4_rate = r.fp4_on_bf16 ? d.bf16_flops : d.fp4_flops;
    if (fp4_rate > 0 && d.bf16_flops > 0) {
        const double seconds = r.prefill_fp4_flops / fp4_rate + r.prefill_bf16_flops / d.bf16_flops;
        if (seconds > 0) r.prefill_tokens_per_s = 1.0 / seconds;
    }
    return r;
}

}  // namespace nibble::tune
