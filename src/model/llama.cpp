#include "model/llama.h"

#include <cmath>
#include <fmt/format.h>

#include "base/error.h"
#include "model/weights.h"
#include "ops/activation/activation.h"
#include "ops/attention/attention.h"
#include "ops/embed/embed.h"
#include "ops/rmsnorm/rmsnorm.h"

namespace nibble {

LlamaModel::LlamaModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant, ThreadPool& pool)
    : ckpt_(std::move(ckpt)), config_(std::move(config)), quant_(std::move(quant)), pool_(pool) {
    const auto& c = config_;
    const Checkpoint& ck = *ckpt_;
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;

    const TensorInfo& embed = ck.get("model.embed_tokens.weight");
    NIBBLE_CHECK((embed.dtype == DType::F32 || embed.dtype == DType::F16 || embed.dtype == DType::BF16) &&
                     embed.shape == (Shape{c.vocab_size, c.n_embd}),
                 "tensor model.embed_tokens.weight in {}: expected F32, F16 or BF16 {}, got {} {}", embed.file,
                 Shape{c.vocab_size, c.n_embd}.str(), dtype_name(embed.dtype), embed.shape.str());
    embed_ = embed.view();

    layers_.resize(static_cast<size_t>(c.n_layers));
    for (int64_t il = 0; il < c.n_layers; ++il) {
        Layer& L = layers_[static_cast<size_t>(il)];
        const std::string p = fmt::format("model.layers.{}.", il);
        L.attn_norm = load_vector(ck, p + "input_layernorm.weight", c.n_embd);
        L.mlp_norm = load_vector(ck, p + "post_attention_layernorm.weight", c.n_embd);
        L.q = load_linear(ck, quant_, {p + "self_attn.q_proj", q_dim, c.n_embd, c.qkv_bias});
        L.k = load_linear(ck, quant_, {p + "self_attn.k_proj", kv_dim, c.n_embd, c.qkv_bias});
        L.v = load_linear(ck, quant_, {p + "self_attn.v_proj", kv_dim, c.n_embd, c.qkv_bias});
        L.o = load_linear(ck, quant_, {p + "self_attn.o_proj", c.n_embd, q_dim, c.o_bias});
        if (c.qk_norm) {
            L.q_norm = load_vector(ck, p + "self_attn.q_norm.weight", c.head_dim);
            L.k_norm = load_vector(ck, p + "self_attn.k_norm.weight", c.head_dim);
        }
        L.gate = load_linear(ck, quant_, {p + "mlp.gate_proj", c.n_ff, c.n_embd, c.mlp_bias});
        L.up = load_linear(ck, quant_, {p + "mlp.up_proj", c.n_ff, c.n_embd, c.mlp_bias});
        L.down = load_linear(ck, quant_, {p + "mlp.down_proj", c.n_embd, c.n_ff, c.mlp_bias});
    }
    final_norm_ = load_vector(ck, "model.norm.weight", c.n_embd);
    if (c.tied_embeddings) {
        lm_head_.name = "lm_head (tied to model.embed_tokens)";
        lm_head_.format = WeightFormat::Dense;
        lm_head_.dtype = embed_.dtype;
        lm_head_.data = embed_.data;
        lm_head_.n_out = c.vocab_size;
        lm_head_.n_in = c.n_embd;
    } else {
        lm_head_ = load_linear(ck, quant_, {"lm_head", c.vocab_size, c.n_embd, false});
    }
    rope_ = make_rope_table(c.rope, c.head_dim);
}

KvCacheShape LlamaModel::kv_cache_shape(int64_t n_blocks, int64_t block_size) const {
    return KvCacheShape{.n_layers = config_.n_layers,
                        .n_blocks = n_blocks,
                        .block_size = block_size,
                        .n_kv_heads = config_.n_kv_heads,
                        .head_dim = config_.head_dim};
}

std::vector<const LinearWeight*> LlamaModel::linear_weights() const {
    std::vector<const LinearWeight*> all;
    for (const auto& L : layers_)
        for (const LinearWeight* w : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) all.push_back(w);
    if (!config_.tied_embeddings) all.push_back(&lm_head_);
    return all;
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
    const int64_t d = c.n_embd, hd = c.head_dim;
    const int64_t q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd;

    // Flatten the batch: token rows of all sequences, one after another.
    std::vector<int32_t> tokens;
    std::vector<int64_t> positions;
    std::vector<int64_t> seq_begin;  // first row of each sequence
    for (const auto& s : seqs) {
        NIBBLE_CHECK(!s.tokens.empty(), "forward: a sequence with no new tokens");
        seq_begin.push_back(static_cast<int64_t>(tokens.size()));
        for (size_t i = 0; i < s.tokens.size(); ++i) {
            tokens.push_back(s.tokens[i]);
            positions.push_back(s.kv.start_pos + static_cast<int64_t>(i));
        }
    }
    const int64_t m = static_cast<int64_t>(tokens.size());

    // Activations, [m, width] row-major.
    std::vector<float> x(static_cast<size_t>(m * d)), h(static_cast<size_t>(m * d));
    std::vector<float> q(static_cast<size_t>(m * q_dim)), k(static_cast<size_t>(m * kv_dim)),
        v(static_cast<size_t>(m * kv_dim)), attn(static_cast<size_t>(m * q_dim));
    std::vector<float> gate(static_cast<size_t>(m * c.n_ff)), up(static_cast<size_t>(m * c.n_ff));
    std::vector<float> proj(static_cast<size_t>(m * d));

    embed_cpu(embed_, tokens.data(), m, x.data());
    const AttentionParams attn_params{.n_heads = c.n_heads,
                                      .n_kv_heads = c.n_kv_heads,
                                      .head_dim = hd,
                                      .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                                      .sliding_window = c.sliding_window};

    for (int64_t il = 0; il < c.n_layers; ++il) {
        const Layer& L = layers_[static_cast<size_t>(il)];
        // attention block
        rmsnorm_cpu(x.data(), m, d, L.attn_norm.data(), c.norm_eps, h.data());
        linear(L.q, h.data(), m, q.data());
        linear(L.k, h.data(), m, k.data());
        linear(L.v, h.data(), m, v.data());
        if (c.qk_norm) {
            rmsnorm_cpu(q.data(), m * c.n_heads, hd, L.q_norm.data(), c.norm_eps, q.data());
            rmsnorm_cpu(k.data(), m * c.n_kv_heads, hd, L.k_norm.data(), c.norm_eps, k.data());
        }
        rope_apply_cpu(q.data(), m, c.n_heads, hd, positions.data(), rope_);
        rope_apply_cpu(k.data(), m, c.n_kv_heads, hd, positions.data(), rope_);
        for (size_t si = 0; si < seqs.size(); ++si) {
            const int64_t row = seq_begin[si], n = static_cast<int64_t>(seqs[si].tokens.size());
            kv_cache_write_cpu(cache, il, seqs[si].kv, n, k.data() + row * kv_dim, v.data() + row * kv_dim);
            paged_attention_cpu(pool_, q.data() + row * q_dim, n, cache, il, seqs[si].kv, attn_params,
                                attn.data() + row * q_dim);
        }
        linear(L.o, attn.data(), m, proj.data());
        for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
        // MLP block
        rmsnorm_cpu(x.data(), m, d, L.mlp_norm.data(), c.norm_eps, h.data());
        linear(L.gate, h.data(), m, gate.data());
        linear(L.up, h.data(), m, up.data());
        silu_mul_cpu(gate.data(), up.data(), m * c.n_ff, gate.data());
        linear(L.down, gate.data(), m, proj.data());
        for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    }

    // Rows that need logits: every token, or each sequence's last.
    std::vector<int64_t> rows;
    for (size_t si = 0; si < seqs.size(); ++si) {
        const int64_t n = static_cast<int64_t>(seqs[si].tokens.size());
        if (seqs[si].all_logits)
            for (int64_t i = 0; i < n; ++i) rows.push_back(seq_begin[si] + i);
        else
            rows.push_back(seq_begin[si] + n - 1);
    }
    const int64_t r = static_cast<int64_t>(rows.size());
    std::vector<float> last(static_cast<size_t>(r * d));
    for (int64_t i = 0; i < r; ++i)
        std::copy_n(x.data() + rows[static_cast<size_t>(i)] * d, d, last.data() + i * d);
    rmsnorm_cpu(last.data(), r, d, final_norm_.data(), c.norm_eps, last.data());
    logits.resize(static_cast<size_t>(r * c.vocab_size));
    linear(lm_head_, last.data(), r, logits.data());
}

}  // namespace nibble
