#include "model/llama.h"

#include <cmath>
#include <fmt/format.h>

#include "base/error.h"
#include "model/weights.h"
#include "ops/embed/embed.h"
#include "ops/rmsnorm/rmsnorm.h"

namespace nibble {

LlamaSpec llama_spec(const ModelConfig& c) {
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    LlamaSpec spec;
    spec.embed = "model.embed_tokens.weight";
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const std::string p = fmt::format("model.layers.{}.", il);
        LlamaLayerSpec L;
        L.attn_norm = p + "input_layernorm.weight";
        L.mlp_norm = p + "post_attention_layernorm.weight";
        L.q = {p + "self_attn.q_proj", q_dim, c.n_embd, c.qkv_bias};
        L.k = {p + "self_attn.k_proj", kv_dim, c.n_embd, c.qkv_bias};
        L.v = {p + "self_attn.v_proj", kv_dim, c.n_embd, c.qkv_bias};
        L.o = {p + "self_attn.o_proj", c.n_embd, q_dim, c.o_bias};
        if (c.qk_norm) {
            L.q_norm = p + "self_attn.q_norm.weight";
            L.k_norm = p + "self_attn.k_norm.weight";
        }
        L.gate = {p + "mlp.gate_proj", c.n_ff, c.n_embd, c.mlp_bias};
        L.up = {p + "mlp.up_proj", c.n_ff, c.n_embd, c.mlp_bias};
        L.down = {p + "mlp.down_proj", c.n_embd, c.n_ff, c.mlp_bias};
        L.attn_prefix = p + "self_attn.";
        spec.layers.push_back(std::move(L));
    }
    spec.final_norm = "model.norm.weight";
    if (!c.tied_embeddings) spec.lm_head = LinearSpec{"lm_head", c.vocab_size, c.n_embd, false};
    return spec;
}

std::vector<WeightSpec> llama_expected_weights(const ModelConfig& c) {
    const LlamaSpec spec = llama_spec(c);
    std::vector<WeightSpec> out;
    auto dense = [&](const std::string& name, Shape shape) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Dense;
        w.name = name;
        w.shape = shape;
    };
    auto linear = [&](const LinearSpec& l) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Linear;
        w.linear = l;
    };
    dense(spec.embed, Shape{c.vocab_size, c.n_embd});
    for (const LlamaLayerSpec& L : spec.layers) {
        dense(L.attn_norm, Shape{c.n_embd});
        for (const LinearSpec* l : {&L.q, &L.k, &L.v, &L.o}) linear(*l);
        if (!L.q_norm.empty()) {
            dense(L.q_norm, Shape{c.head_dim});
            dense(L.k_norm, Shape{c.head_dim});
        }
        dense(L.mlp_norm, Shape{c.n_embd});
        for (const LinearSpec* l : {&L.gate, &L.up, &L.down}) linear(*l);
    }
    dense(spec.final_norm, Shape{c.n_embd});
    if (spec.lm_head) linear(*spec.lm_head);
    return out;
}

LlamaModel::LlamaModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant, ThreadPool& pool)
    : ckpt_(std::move(ckpt)), config_(std::move(config)), quant_(std::move(quant)), pool_(pool) {
    const auto& c = config_;
    const Checkpoint& ck = *ckpt_;
    const LlamaSpec spec = llama_spec(c);

    const TensorInfo& embed = ck.get(spec.embed);
    NIBBLE_CHECK((embed.dtype == DType::F32 || embed.dtype == DType::F16 || embed.dtype == DType::BF16) &&
                     embed.shape == (Shape{c.vocab_size, c.n_embd}),
                 "tensor {} in {}: expected F32, F16 or BF16 {}, got {} {}", spec.embed, embed.file,
                 Shape{c.vocab_size, c.n_embd}.str(), dtype_name(embed.dtype), embed.shape.str());
    embed_ = embed.view();

    layers_.resize(static_cast<size_t>(c.n_layers));
    KvScales kv_scales;
    for (int64_t il = 0; il < c.n_layers; ++il) {
        Layer& L = layers_[static_cast<size_t>(il)];
        const LlamaLayerSpec& S = spec.layers[static_cast<size_t>(il)];
        L.attn.norm = load_vector(ck, S.attn_norm, c.n_embd);
        L.mlp_norm = load_vector(ck, S.mlp_norm, c.n_embd);
        L.attn.q = load_linear(ck, quant_, S.q);
        L.attn.k = load_linear(ck, quant_, S.k);
        L.attn.v = load_linear(ck, quant_, S.v);
        L.attn.o = load_linear(ck, quant_, S.o);
        if (!S.q_norm.empty()) {
            L.attn.q_norm = load_vector(ck, S.q_norm, c.head_dim);
            L.attn.k_norm = load_vector(ck, S.k_norm, c.head_dim);
        }
        L.gate = load_linear(ck, quant_, S.gate);
        L.up = load_linear(ck, quant_, S.up);
        L.down = load_linear(ck, quant_, S.down);
        kv_scales.add_layer(ck, S.attn_prefix);
    }
    kv_scales.finish();
    k_scales_ = std::move(kv_scales.k);
    v_scales_ = std::move(kv_scales.v);
    final_norm_ = load_vector(ck, spec.final_norm, c.n_embd);
    if (!spec.lm_head) {
        lm_head_ = tied_lm_head(embed_, "model.embed_tokens");
    } else {
        lm_head_ = load_linear(ck, quant_, *spec.lm_head);
    }
    rope_ = make_rope_table(c.rope, c.head_dim);
}

KvCacheShape LlamaModel::kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype) const {
    return attention_kv_cache_shape(config_, config_.n_layers, n_blocks, block_size, dtype, k_scales_, v_scales_);
}

std::vector<const LinearWeight*> LlamaModel::linear_weights() const {
    std::vector<const LinearWeight*> all;
    for (const auto& L : layers_)
        for (const LinearWeight* w : {&L.attn.q, &L.attn.k, &L.attn.v, &L.attn.o, &L.gate, &L.up, &L.down}) all.push_back(w);
    if (!config_.tied_embeddings) all.push_back(&lm_head_);
    return all;
}

bool LlamaModel::decoder_view(DecoderView& out) const {
    out = DecoderView{};
    out.embed = embed_;
    for (const Layer& L : layers_)
        out.layers.push_back({.attn_norm = &L.attn.norm,
                              .mlp_norm = &L.mlp_norm,
                              .q_norm = &L.attn.q_norm,
                              .k_norm = &L.attn.k_norm,
                              .q = &L.attn.q,
                              .k = &L.attn.k,
                              .v = &L.attn.v,
                              .o = &L.attn.o,
                              .gate = &L.gate,
                              .up = &L.up,
                              .down = &L.down});
    out.final_norm = &final_norm_;
    out.lm_head = &lm_head_;
    out.tied_lm_head = config_.tied_embeddings;
    out.rope = rope_;
    out.k_scales = k_scales_;
    out.v_scales = v_scales_;
    return true;
}

int64_t LlamaModel::weight_bytes() const {
    int64_t total = embed_.numel() * static_cast<int64_t>(dtype_size(embed_.dtype));
    for (const LinearWeight* w : linear_weights()) total += w->stored_bytes();
    return total;
}

void LlamaModel::linear(const LinearWeight& w, const float* x, int64_t m, float* y) {
    if (observer_ != nullptr) observer_->observe(w, x, m);
    linear_cpu(pool_, x, m, w, y);
}

void LlamaModel::forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) {
    const auto& c = config_;
    const int64_t d = c.n_embd;
    const TokenBatch batch = flatten_batch(seqs);
    const int64_t m = batch.m;
    const ModelLinearFn lin = [this](const LinearWeight& w, const float* x, int64_t rows, float* y) { linear(w, x, rows, y); };

    // Activations, [m, n_embd] row-major.
    std::vector<float> x(static_cast<size_t>(m * d)), h(static_cast<size_t>(m * d)), proj(static_cast<size_t>(m * d));
    embed_cpu(embed_, batch.tokens.data(), m, x.data());
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const Layer& L = layers_[static_cast<size_t>(il)];
        attention_block_cpu(pool_, c, L.attn, rope_, seqs, batch, cache, il, lin, x.data());
        rmsnorm_cpu(x.data(), m, d, L.mlp_norm.data(), c.norm_eps, h.data());
        swiglu_mlp_cpu(L.gate, L.up, L.down, h.data(), m, lin, proj.data());
        for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    }
    final_logits_cpu(c, seqs, batch, x.data(), final_norm_, lm_head_, lin, logits);
}

}  // namespace nibble
