#include "model/qwen_moe.h"

#include <cmath>
#include <fmt/format.h>

#include "base/error.h"
#include "ops/embed/embed.h"
#include "ops/rmsnorm/rmsnorm.h"

namespace nibble {

namespace {

// The module names of one layer (prefix "model.layers.{il}.").
std::string layer_prefix(int64_t il) { return fmt::format("model.layers.{}.", il); }
std::string expert_prefix(int64_t il, int64_t e) { return fmt::format("model.layers.{}.mlp.experts.{}.", il, e); }

}  // namespace

std::vector<WeightSpec> qwen_moe_expected_weights(const ModelConfig& c) {
    std::vector<WeightSpec> out;
    auto dense = [&](const std::string& name, Shape shape) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Dense;
        w.name = name;
        w.shape = shape;
    };
    auto linear = [&](LinearSpec l) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Linear;
        w.linear = std::move(l);
    };
    auto mlp = [&](const std::string& p, int64_t n_ff) {
        linear({p + "gate_proj", n_ff, c.n_embd, false});
        linear({p + "up_proj", n_ff, c.n_embd, false});
        linear({p + "down_proj", c.n_embd, n_ff, false});
    };
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    dense("model.embed_tokens.weight", Shape{c.vocab_size, c.n_embd});
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const std::string p = layer_prefix(il);
        dense(p + "input_layernorm.weight", Shape{c.n_embd});
        linear({p + "self_attn.q_proj", q_dim, c.n_embd, c.qkv_bias});
        linear({p + "self_attn.k_proj", kv_dim, c.n_embd, c.qkv_bias});
        linear({p + "self_attn.v_proj", kv_dim, c.n_embd, c.qkv_bias});
        linear({p + "self_attn.o_proj", c.n_embd, q_dim, c.o_bias});
        if (c.qk_norm) {
            dense(p + "self_attn.q_norm.weight", Shape{c.head_dim});
            dense(p + "self_attn.k_norm.weight", Shape{c.head_dim});
        }
        dense(p + "post_attention_layernorm.weight", Shape{c.n_embd});
        if (!c.is_moe_layer(il)) {
            mlp(p + "mlp.", c.n_ff);
            continue;
        }
        linear({p + "mlp.gate", c.moe.n_experts, c.n_embd, false});
        for (int64_t e = 0; e < c.moe.n_experts; ++e) mlp(expert_prefix(il, e), c.moe.n_ff);
        if (c.moe.n_shared_experts > 0) {
            mlp(p + "mlp.shared_expert.", c.moe.n_ff_shared);
            if (c.moe.shared_expert_gate) linear({p + "mlp.shared_expert_gate", 1, c.n_embd, false});
        }
    }
    dense("model.norm.weight", Shape{c.n_embd});
    if (!c.tied_embeddings) linear({"lm_head", c.vocab_size, c.n_embd, false});
    return out;
}

QwenMoeModel::QwenMoeModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant, ThreadPool& pool)
    : ckpt_(std::move(ckpt)), config_(std::move(config)), quant_(std::move(quant)), pool_(pool) {
    const auto& c = config_;
    const Checkpoint& ck = *ckpt_;
    NIBBLE_CHECK(c.moe.scoring == MoeScoring::Softmax && c.moe.gated_experts && c.moe.n_shared_experts <= 1,
                 "{}: only the softmax router with SwiGLU experts and at most one shared expert is implemented",
                 c.arch_name);
    const std::string embed_name = "model.embed_tokens.weight";
    const TensorInfo& embed = ck.get(embed_name);
    NIBBLE_CHECK((embed.dtype == DType::F32 || embed.dtype == DType::F16 || embed.dtype == DType::BF16) &&
                     embed.shape == (Shape{c.vocab_size, c.n_embd}),
                 "tensor {} in {}: expected F32, F16 or BF16 {}, got {} {}", embed_name, embed.file,
                 Shape{c.vocab_size, c.n_embd}.str(), dtype_name(embed.dtype), embed.shape.str());
    embed_ = embed.view();

    auto load_mlp = [&](const std::string& p, int64_t n_ff) {
        MoeExpertWeights w;
        w.gate = load_linear(ck, quant_, {p + "gate_proj", n_ff, c.n_embd, false});
        w.up = load_linear(ck, quant_, {p + "up_proj", n_ff, c.n_embd, false});
        w.down = load_linear(ck, quant_, {p + "down_proj", c.n_embd, n_ff, false});
        return w;
    };
    KvScales kv_scales;
    layers_.resize(static_cast<size_t>(c.n_layers));
    for (int64_t il = 0; il < c.n_layers; ++il) {
        Layer& L = layers_[static_cast<size_t>(il)];
        const std::string p = layer_prefix(il);
        L.attn = load_attention(ck, quant_, c, p);
        L.mlp_norm = load_vector(ck, p + "post_attention_layernorm.weight", c.n_embd);
        L.moe = c.is_moe_layer(il);
        if (!L.moe) {
            MoeExpertWeights w = load_mlp(p + "mlp.", c.n_ff);
            L.gate = std::move(w.gate);
            L.up = std::move(w.up);
            L.down = std::move(w.down);
        } else {
            L.router = load_linear(ck, quant_, {p + "mlp.gate", c.moe.n_experts, c.n_embd, false});
            L.experts.reserve(static_cast<size_t>(c.moe.n_experts));
            for (int64_t e = 0; e < c.moe.n_experts; ++e) L.experts.push_back(load_mlp(expert_prefix(il, e), c.moe.n_ff));
            if (c.moe.n_shared_experts > 0) {
                L.has_shared = true;
                L.shared = load_mlp(p + "mlp.shared_expert.", c.moe.n_ff_shared);
                if (c.moe.shared_expert_gate)
                    L.shared_gate = load_linear(ck, quant_, {p + "mlp.shared_expert_gate", 1, c.n_embd, false});
            }
        }
        kv_scales.add_layer(ck, p + "self_attn.");
    }
    kv_scales.finish();
    k_scales_ = std::move(kv_scales.k);
    v_scales_ = std::move(kv_scales.v);
    final_norm_ = load_vector(ck, "model.norm.weight", c.n_embd);
    if (c.tied_embeddings) {
        lm_head_ = tied_lm_head(embed_, "model.embed_tokens");
    } else {
        lm_head_ = load_linear(ck, quant_, {"lm_head", c.vocab_size, c.n_embd, false});
    }
    rope_ = make_rope_table(c.rope, c.head_dim);
}

KvCacheShape QwenMoeModel::kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype) const {
    return attention_kv_cache_shape(config_, config_.n_layers, n_blocks, block_size, dtype, k_scales_, v_scales_);
}

std::vector<const LinearWeight*> QwenMoeModel::linear_weights() const {
    std::vector<const LinearWeight*> all;
    auto mlp = [&](const MoeExpertWeights& w) {
        for (const LinearWeight* l : {&w.gate, &w.up, &w.down}) all.push_back(l);
    };
    for (const auto& L : layers_) {
        for (const LinearWeight* w : {&L.attn.q, &L.attn.k, &L.attn.v, &L.attn.o}) all.push_back(w);
        if (!L.moe) {
            for (const LinearWeight* w : {&L.gate, &L.up, &L.down}) all.push_back(w);
            continue;
        }
        all.push_back(&L.router);
        for (const auto& e : L.experts) mlp(e);
        if (L.has_shared) {
            mlp(L.shared);
            if (config_.moe.shared_expert_gate) all.push_back(&L.shared_gate);
        }
    }
    if (!config_.tied_embeddings) all.push_back(&lm_head_);
    return all;
}

bool QwenMoeModel::decoder_view(DecoderView& out) const {
    out = DecoderView{};
    out.embed = embed_;
    for (const Layer& L : layers_) {
        DecoderLayerView v{.attn_norm = &L.attn.norm,
                           .mlp_norm = &L.mlp_norm,
                           .q_norm = &L.attn.q_norm,
                           .k_norm = &L.attn.k_norm,
                           .q = &L.attn.q,
                           .k = &L.attn.k,
                           .v = &L.attn.v,
                           .o = &L.attn.o};
        if (L.moe) {
            v.router = &L.router;
            for (const MoeExpertWeights& e : L.experts) {
                v.expert_gate.push_back(&e.gate);
                v.expert_up.push_back(&e.up);
                v.expert_down.push_back(&e.down);
            }
            if (L.has_shared) {
                v.shared_gate = &L.shared.gate;
                v.shared_up = &L.shared.up;
                v.shared_down = &L.shared.down;
                if (config_.moe.shared_expert_gate) v.shared_expert_gate = &L.shared_gate;
            }
        } else {
            v.gate = &L.gate;
            v.up = &L.up;
            v.down = &L.down;
        }
        out.layers.push_back(std::move(v));
    }
    out.final_norm = &final_norm_;
    out.lm_head = &lm_head_;
    out.tied_lm_head = config_.tied_embeddings;
    out.rope = rope_;
    out.k_scales = k_scales_;
    out.v_scales = v_scales_;
    return true;
}

int64_t QwenMoeModel::weight_bytes() const {
    int64_t total = embed_.numel() * static_cast<int64_t>(dtype_size(embed_.dtype));
    for (const LinearWeight* w : linear_weights()) total += w->stored_bytes();
    return total;
}

void QwenMoeModel::linear(const LinearWeight& w, const float* x, int64_t m, float* y) {
    if (observer_ != nullptr) observer_->observe(w, x, m);
    linear_cpu(pool_, x, m, w, y);
}

void QwenMoeModel::moe_block(const Layer& L, const float* h, int64_t m, float* out) {
    const auto& c = config_;
    const int64_t d = c.n_embd;
    const MoeLinearFn lin = [this](const LinearWeight& w, const float* x, int64_t rows, float* y) { linear(w, x, rows, y); };
    std::vector<float> router_logits(static_cast<size_t>(m * c.moe.n_experts));
    linear(L.router, h, m, router_logits.data());
    const MoeRouting routing =
        moe_route_softmax_cpu(router_logits.data(), m, c.moe.n_experts, c.moe.top_k, c.moe.norm_topk_prob);
    moe_experts_cpu(h, d, L.experts, routing, MoeActivation::SwiGlu, lin, out);
    if (!L.has_shared) return;
    // Qwen2-MoE: out += sigmoid(shared_expert_gate h) * shared_expert(h)
    std::vector<float> shared(static_cast<size_t>(m * d));
    swiglu_mlp_cpu(L.shared.gate, L.shared.up, L.shared.down, h, m, lin, shared.data());
    std::vector<float> g(static_cast<size_t>(m), 1.0f);
    if (c.moe.shared_expert_gate) linear(L.shared_gate, h, m, g.data());
    for (int64_t t = 0; t < m; ++t) {
        const float s = c.moe.shared_expert_gate ? 1.0f / (1.0f + std::exp(-g[static_cast<size_t>(t)])) : 1.0f;
        for (int64_t i = 0; i < d; ++i) out[t * d + i] += s * shared[static_cast<size_t>(t * d + i)];
    }
}

void QwenMoeModel::forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) {
    const auto& c = config_;
    const int64_t d = c.n_embd;
    const TokenBatch batch = flatten_batch(seqs);
    const int64_t m = batch.m;
    const ModelLinearFn lin = [this](const LinearWeight& w, const float* x, int64_t rows, float* y) { linear(w, x, rows, y); };

    std::vector<float> x(static_cast<size_t>(m * d)), h(static_cast<size_t>(m * d)), mlp(static_cast<size_t>(m * d));
    embed_cpu(embed_, batch.tokens.data(), m, x.data());
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const Layer& L = layers_[static_cast<size_t>(il)];
        attention_block_cpu(pool_, c, L.attn, rope_, seqs, batch, cache, il, lin, x.data());
        rmsnorm_cpu(x.data(), m, d, L.mlp_norm.data(), c.norm_eps, h.data());
        if (L.moe)
            moe_block(L, h.data(), m, mlp.data());
        else
            swiglu_mlp_cpu(L.gate, L.up, L.down, h.data(), m, lin, mlp.data());
        for (size_t i = 0; i < x.size(); ++i) x[i] += mlp[i];
    }
    final_logits_cpu(c, seqs, batch, x.data(), final_norm_, lm_head_, lin, logits);
}

}  // namespace nibble
