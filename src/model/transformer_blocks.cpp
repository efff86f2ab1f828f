#include "model/transformer_blocks.h"

#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "ops/activation/activation.h"
#include "ops/attention/attention.h"
#include "ops/rmsnorm/rmsnorm.h"

namespace nibble {

TokenBatch flatten_batch(std::span<const ForwardSequence> seqs) {
    TokenBatch b;
    for (const auto& s : seqs) {
        NIBBLE_CHECK(!s.tokens.empty(), "forward: a sequence with no new tokens");
        b.seq_begin.push_back(static_cast<int64_t>(b.tokens.size()));
        for (size_t i = 0; i < s.tokens.size(); ++i) {
            b.tokens.push_back(s.tokens[i]);
            b.positions.push_back(s.kv.start_pos + static_cast<int64_t>(i));
        }
    }
    b.m = static_cast<int64_t>(b.tokens.size());
    return b;
}

AttentionWeights load_attention(const Checkpoint& ckpt, const QuantConfig& quant, const ModelConfig& c,
                                const std::string& p) {
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    AttentionWeights w;
    w.norm = load_vector(ckpt, p + "input_layernorm.weight", c.n_embd);
    w.q = load_linear(ckpt, quant, {p + "self_attn.q_proj", q_dim, c.n_embd, c.qkv_bias});
    w.k = load_linear(ckpt, quant, {p + "self_attn.k_proj", kv_dim, c.n_embd, c.qkv_bias});
    w.v = load_linear(ckpt, quant, {p + "self_attn.v_proj", kv_dim, c.n_embd, c.qkv_bias});
    w.o = load_linear(ckpt, quant, {p + "self_attn.o_proj", c.n_embd, q_dim, c.o_bias});
    if (c.qk_norm) {
        w.q_norm = load_vector(ckpt, p + "self_attn.q_norm.weight", c.head_dim);
        w.k_norm = load_vector(ckpt, p + "self_attn.k_norm.weight", c.head_dim);
    }
    return w;
}

void attention_cpu(ThreadPool& pool, const ModelConfig& c, const AttentionWeights& w, const RopeTable& rope,
                   std::span<const ForwardSequence> seqs, const TokenBatch& batch, KvCache& cache, int64_t layer,
                   const ModelLinearFn& linear, const float* x, float* out) {
    const int64_t m = batch.m, d = c.n_embd, hd = c.head_dim;
    const int64_t q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd;
    std::vector<float> h(static_cast<size_t>(m * d)), q(static_cast<size_t>(m * q_dim)),
        k(static_cast<size_t>(m * kv_dim)), v(static_cast<size_t>(m * kv_dim)), attn(static_cast<size_t>(m * q_dim));
    rmsnorm_cpu(x, m, d, w.norm.data(), c.norm_eps, h.data());
    linear(w.q, h.data(), m, q.data());
    linear(w.k, h.data(), m, k.data());
    linear(w.v, h.data(), m, v.data());
    if (!w.q_norm.empty()) {
        rmsnorm_cpu(q.data(), m * c.n_heads, hd, w.q_norm.data(), c.norm_eps, q.data());
        rmsnorm_cpu(k.data(), m * c.n_kv_heads, hd, w.k_norm.data(), c.norm_eps, k.data());
    }
    rope_apply_cpu(q.data(), m, c.n_heads, hd, batch.positions.data(), rope);
    rope_apply_cpu(k.data(), m, c.n_kv_heads, hd, batch.positions.data(), rope);
    const AttentionParams params{.n_heads = c.n_heads,
                                 .n_kv_heads = c.n_kv_heads,
                                 .head_dim = hd,
                                 .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                                 .sliding_window = c.sliding_window};
    for (size_t si = 0; si < seqs.size(); ++si) {
        const int64_t row = batch.seq_begin[si], n = static_cast<int64_t>(seqs[si].tokens.size());
        kv_cache_write_cpu(cache, layer, seqs[si].kv, n, k.data() + row * kv_dim, v.data() + row * kv_dim);
        paged_attention_cpu(pool, q.data() + row * q_dim, n, cache, layer, seqs[si].kv, params,
                            attn.data() + row * q_dim);
    }
    linear(w.o, attn.data(), m, out);
}

void attention_block_cpu(ThreadPool& pool, const ModelConfig& c, const AttentionWeights& w, const RopeTable& rope,
                         std::span<const ForwardSequence> seqs, const TokenBatch& batch, KvCache& cache,
                         int64_t layer, const ModelLinearFn& linear, float* x) {
    std::vector<float> out(static_cast<size_t>(batch.m * c.n_embd));
    attention_cpu(pool, c, w, rope, seqs, batch, cache, layer, linear, x, out.data());
    for (size_t i = 0; i < out.size(); ++i) x[i] += out[i];
}

void swiglu_mlp_cpu(const LinearWeight& gate, const LinearWeight& up, const LinearWeight& down, const float* h,
                    int64_t m, const ModelLinearFn& linear, float* out) {
    const int64_t n_ff = up.n_out;
    std::vector<float> g(static_cast<size_t>(m * n_ff)), u(static_cast<size_t>(m * n_ff));
    linear(gate, h, m, g.data());
    linear(up, h, m, u.data());
    silu_mul_cpu(g.data(), u.data(), m * n_ff, g.data());
    linear(down, g.data(), m, out);
}

void final_logits_cpu(const ModelConfig& c, std::span<const ForwardSequence> seqs, const TokenBatch& batch,
                      const float* x, const std::vector<float>& final_norm, const LinearWeight& lm_head,
                      const ModelLinearFn& linear, std::vector<float>& logits) {
    const int64_t d = c.n_embd;
    std::vector<int64_t> rows;
    for (size_t si = 0; si < seqs.size(); ++si) {
        const int64_t n = static_cast<int64_t>(seqs[si].tokens.size());
        if (seqs[si].all_logits)
            for (int64_t i = 0; i < n; ++i) rows.push_back(batch.seq_begin[si] + i);
        else
            rows.push_back(batch.seq_begin[si] + n - 1);
    }
    const int64_t r = static_cast<int64_t>(rows.size());
    std::vector<float> last(static_cast<size_t>(r * d));
    for (int64_t i = 0; i < r; ++i) std::copy_n(x + rows[static_cast<size_t>(i)] * d, d, last.data() + i * d);
    rmsnorm_cpu(last.data(), r, d, final_norm.data(), c.norm_eps, last.data());
    logits.resize(static_cast<size_t>(r * c.vocab_size));
    linear(lm_head, last.data(), r, logits.data());
}

void KvScales::add_layer(const Checkpoint& ckpt, const std::string& attn_prefix) {
    auto one = [&](const std::string& modelopt, const std::string& ct) {
        const std::string* name = ckpt.has(modelopt) ? &modelopt : ckpt.has(ct) ? &ct : nullptr;
        if (name == nullptr) return 1.0f;
        any = true;
        const float value = load_scalar(ckpt, *name);
        NIBBLE_CHECK(std::isfinite(value) && value > 0.0f, "tensor {}: KV cache scale {} must be finite and positive",
                     *name, value);
        return value;
    };
    k.push_back(one(attn_prefix + "k_proj.k_scale", attn_prefix + "k_scale"));
    v.push_back(one(attn_prefix + "v_proj.v_scale", attn_prefix + "v_scale"));
}

void KvScales::finish() {
    if (any) return;
    k.clear();
    v.clear();
}

LinearWeight tied_lm_head(const Tensor& embed, const std::string& embed_name) {
    LinearWeight w;
    w.name = "lm_head (tied to " + embed_name + ")";
    w.format = WeightFormat::Dense;
    w.dtype = embed.dtype;
    w.data = embed.data;
    w.n_out = embed.shape[0];
    w.n_in = embed.shape[1];
    return w;
}

KvCacheShape attention_kv_cache_shape(const ModelConfig& config, int64_t n_kv_layers, int64_t n_blocks,
                                      int64_t block_size, KvDtype dtype, const std::vector<float>& k_scales,
                                      const std::vector<float>& v_scales) {
    return KvCacheShape{.n_layers = n_kv_layers,
                        .n_blocks = n_blocks,
                        .block_size = block_size,
                        .n_kv_heads = config.n_kv_heads,
                        .head_dim = config.head_dim,
                        .dtype = dtype,
                        .k_scales = k_scales,
                        .v_scales = v_scales};
}

}  // namespace nibble
