#include "model/nemotron_h.h"
#include "model/transformer_blocks.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "base/error.h"
#include "ops/attention/attention.h"
#include "ops/embed/embed.h"
#include "ops/rmsnorm/rmsnorm.h"
#include "ops/ssm/ssm.h"
#include "tensor/convert.h"

namespace nibble {

namespace {

bool dense_float(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

std::vector<float> load_floats(const Checkpoint& ck, const std::string& name, const Shape& shape) {
    const TensorInfo& t = ck.get(name);
    NIBBLE_CHECK(dense_float(t.dtype) && t.shape == shape, "tensor {} in {}: expected F32, F16 or BF16 {}, got {} {}",
                 name, t.file, shape.str(), dtype_name(t.dtype), t.shape.str());
    return tensor_to_floats(t.view());
}

// "backbone." in published checkpoints, "model." where transformers 5 saved the model itself.
std::string checkpoint_prefix(const Checkpoint* ck) {
    if (ck == nullptr || ck->has("backbone.embeddings.weight")) return "backbone.";
    return "model.";
}

}  // namespace

std::vector<WeightSpec> nemotron_h_expected_weights(const ModelConfig& c) {
    std::vector<WeightSpec> out;
    auto dense = [&](const std::string& name, Shape shape) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Dense;
        w.name = name;
        w.shape = shape;
    };
    auto linear = [&](const std::string& module, int64_t n_out, int64_t n_in, bool bias) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Linear;
        w.linear = {module, n_out, n_in, bias};
    };
    const MambaConfig& mb = c.mamba;
    const int64_t d = c.n_embd;
    dense("backbone.embeddings.weight", Shape{c.vocab_size, d});
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const std::string p = fmt::format("backbone.layers.{}.", il);
        dense(p + "norm.weight", Shape{d});
        switch (c.layer_kinds[static_cast<size_t>(il)]) {
            case LayerKind::Mamba:
                linear(p + "mixer.in_proj", mb.in_proj_dim(), d, mb.proj_bias);
                dense(p + "mixer.conv1d.weight", Shape{mb.conv_dim(), 1, mb.conv_kernel});
                if (mb.conv_bias) dense(p + "mixer.conv1d.bias", Shape{mb.conv_dim()});
                for (const char* n : {"dt_bias", "A_log", "D"}) dense(p + "mixer." + n, Shape{mb.n_heads});
                dense(p + "mixer.norm.weight", Shape{mb.d_inner()});
                linear(p + "mixer.out_proj", d, mb.d_inner(), mb.proj_bias);
                break;
            case LayerKind::Attention:
                linear(p + "mixer.q_proj", c.n_heads * c.head_dim, d, false);
                linear(p + "mixer.k_proj", c.n_kv_heads * c.head_dim, d, false);
                linear(p + "mixer.v_proj", c.n_kv_heads * c.head_dim, d, false);
                linear(p + "mixer.o_proj", d, c.n_heads * c.head_dim, false);
                break;
            case LayerKind::Mlp:
                linear(p + "mixer.up_proj", c.n_ff, d, c.mlp_bias);
                linear(p + "mixer.down_proj", d, c.n_ff, c.mlp_bias);
                break;
            case LayerKind::Moe:
                dense(p + "mixer.gate.weight", Shape{c.moe.n_experts, d});
                out.back().f32_when_quantized = true;
                dense(p + "mixer.gate.e_score_correction_bias", Shape{c.moe.n_experts});
                out.back().f32 = true;
                for (int64_t e = 0; e < c.moe.n_experts; ++e) {
                    linear(fmt::format("{}mixer.experts.{}.up_proj", p, e), c.moe.n_ff, d, c.mlp_bias);
                    linear(fmt::format("{}mixer.experts.{}.down_proj", p, e), d, c.moe.n_ff, c.mlp_bias);
                }
                linear(p + "mixer.shared_experts.up_proj", c.moe.n_ff_shared, d, c.mlp_bias);
                linear(p + "mixer.shared_experts.down_proj", d, c.moe.n_ff_shared, c.mlp_bias);
                break;
        }
    }
    dense("backbone.norm_f.weight", Shape{d});
    if (!c.tied_embeddings) linear("lm_head", c.vocab_size, d, false);
    return out;
}

NemotronHModel::NemotronHModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant,
                               ThreadPool& pool)
    : ckpt_(std::move(ckpt)), config_(std::move(config)), quant_(std::move(quant)), pool_(pool) {
    const auto& c = config_;
    const MambaConfig& mb = c.mamba;
    const Checkpoint& ck = *ckpt_;
    const std::string prefix = checkpoint_prefix(&ck);
    const int64_t d = c.n_embd;

    const std::string embed_name = prefix + "embeddings.weight";
    const TensorInfo& embed = ck.get(embed_name);
    NIBBLE_CHECK(dense_float(embed.dtype) && embed.shape == (Shape{c.vocab_size, d}),
                 "tensor {} in {}: expected F32, F16 or BF16 {}, got {} {}", embed_name, embed.file,
                 Shape{c.vocab_size, d}.str(), dtype_name(embed.dtype), embed.shape.str());
    embed_ = embed.view();

    KvScales kv_scales;
    layers_.resize(static_cast<size_t>(c.n_layers));
    for (int64_t il = 0; il < c.n_layers; ++il) {
        Layer& L = layers_[static_cast<size_t>(il)];
        L.kind = c.layer_kinds[static_cast<size_t>(il)];
        const std::string p = fmt::format("{}layers.{}.", prefix, il);
        const std::string mx = p + "mixer.";
        L.norm = load_vector(ck, p + "norm.weight", d);
        switch (L.kind) {
            case LayerKind::Mamba: {
                L.cache_index = n_mamba_++;
                L.in_proj = load_linear(ck, quant_, {mx + "in_proj", mb.in_proj_dim(), d, mb.proj_bias});
                L.out_proj = load_linear(ck, quant_, {mx + "out_proj", d, mb.d_inner(), mb.proj_bias});
                L.conv_w = load_floats(ck, mx + "conv1d.weight", Shape{mb.conv_dim(), 1, mb.conv_kernel});
                if (mb.conv_bias) L.conv_b = load_vector(ck, mx + "conv1d.bias", mb.conv_dim());
                L.dt_bias = load_vector(ck, mx + "dt_bias", mb.n_heads);
                L.D = load_vector(ck, mx + "D", mb.n_heads);
                L.A = load_vector(ck, mx + "A_log", mb.n_heads);
                for (float& a : L.A) a = -std::exp(a);
                L.gated_norm = load_vector(ck, mx + "norm.weight", mb.d_inner());
                break;
            }
            case LayerKind::Attention: {
                L.cache_index = n_attention_++;
                const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
                L.q = load_linear(ck, quant_, {mx + "q_proj", q_dim, d, false});
                L.k = load_linear(ck, quant_, {mx + "k_proj", kv_dim, d, false});
                L.v = load_linear(ck, quant_, {mx + "v_proj", kv_dim, d, false});
                L.o = load_linear(ck, quant_, {mx + "o_proj", d, q_dim, false});
                kv_scales.add_layer(ck, mx);
                break;
            }
            case LayerKind::Mlp:
                L.up = load_linear(ck, quant_, {mx + "up_proj", c.n_ff, d, c.mlp_bias});
                L.down = load_linear(ck, quant_, {mx + "down_proj", d, c.n_ff, c.mlp_bias});
                break;
            case LayerKind::Moe: {
                const MoeConfig& moe = c.moe;
                // The router stays in float (F32 in ModelOpt exports): transformers computes it in float32.
                const TensorInfo& g = ck.get(mx + "gate.weight");
                NIBBLE_CHECK(dense_float(g.dtype) && g.shape == (Shape{moe.n_experts, d}),
                             "tensor {}gate.weight in {}: expected a float router [{}, {}], got {} {}", mx, g.file,
                             moe.n_experts, d, dtype_name(g.dtype), g.shape.str());
                L.router.name = mx + "gate";
                L.router.format = WeightFormat::Dense;
                L.router.dtype = g.dtype;
                L.router.data = g.data;
                L.router.n_out = moe.n_experts;
                L.router.n_in = d;
                L.correction_bias = load_vector(ck, mx + "gate.e_score_correction_bias", moe.n_experts);
                L.up = load_linear(ck, quant_, {mx + "shared_experts.up_proj", moe.n_ff_shared, d, c.mlp_bias});
                L.down = load_linear(ck, quant_, {mx + "shared_experts.down_proj", d, moe.n_ff_shared, c.mlp_bias});
                L.experts.resize(static_cast<size_t>(moe.n_experts));
                const std::string stacked_up = mx + "experts.up_proj", stacked_down = mx + "experts.down_proj";
                if (!ck.has(mx + "experts.0.up_proj.weight") && ck.has(stacked_up)) {
                    // transformers 5's own layout: [n_experts, out, in] per projection, unquantized.
                    const TensorInfo& up = ck.get(stacked_up);
                    const TensorInfo& down = ck.get(stacked_down);
                    NIBBLE_CHECK(dense_float(up.dtype) && up.shape == (Shape{moe.n_experts, moe.n_ff, d}) &&
                                     down.dtype == up.dtype && down.shape == (Shape{moe.n_experts, d, moe.n_ff}),
                                 "tensors {} / {} in {}: expected float [{}, {}, {}] / [{}, {}, {}], got {} {} / {} {}",
                                 stacked_up, stacked_down, up.file, moe.n_experts, moe.n_ff, d, moe.n_experts, d,
                                 moe.n_ff, dtype_name(up.dtype), up.shape.str(), dtype_name(down.dtype),
                                 down.shape.str());
                    const int64_t es = static_cast<int64_t>(dtype_size(up.dtype));
                    for (int64_t e = 0; e < moe.n_experts; ++e) {
                        auto view = [&](const TensorInfo& t, const std::string& name, int64_t n_out, int64_t n_in) {
                            LinearWeight w;
                            w.name = fmt::format("{}[{}]", name, e);
                            w.format = WeightFormat::Dense;
                            w.dtype = t.dtype;
                            w.data = static_cast<const uint8_t*>(t.data) + e * n_out * n_in * es;
                            w.n_out = n_out;
                            w.n_in = n_in;
                            return w;
                        };
                        L.experts[static_cast<size_t>(e)].up = view(up, stacked_up, moe.n_ff, d);
                        L.experts[static_cast<size_t>(e)].down = view(down, stacked_down, d, moe.n_ff);
                    }
                } else {
                    for (int64_t e = 0; e < moe.n_experts; ++e) {
                        const std::string ep = fmt::format("{}experts.{}.", mx, e);
                        MoeExpertWeights& E = L.experts[static_cast<size_t>(e)];
                        E.up = load_linear(ck, quant_, {ep + "up_proj", moe.n_ff, d, c.mlp_bias});
                        E.down = load_linear(ck, quant_, {ep + "down_proj", d, moe.n_ff, c.mlp_bias});
                    }
                }
                break;
            }
        }
    }
    kv_scales.finish();
    k_scales_ = std::move(kv_scales.k);
    v_scales_ = std::move(kv_scales.v);
    final_norm_ = load_vector(ck, prefix + "norm_f.weight", d);
    if (c.tied_embeddings) {
        lm_head_ = tied_lm_head(embed_, embed_name);
    } else {
        lm_head_ = load_linear(ck, quant_, {"lm_head", c.vocab_size, d, false});
    }
}

KvCacheShape NemotronHModel::kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype) const {
    return attention_kv_cache_shape(config_, n_attention_, n_blocks, block_size, dtype, k_scales_, v_scales_);
}

MambaStateShape NemotronHModel::mamba_state_shape(SsmStateDtype dtype) const {
    const MambaConfig& mb = config_.mamba;
    return MambaStateShape{.n_layers = n_mamba_,
                           .conv_rows = mb.conv_kernel - 1,
                           .conv_dim = mb.conv_dim(),
                           .n_heads = mb.n_heads,
                           .head_dim = mb.head_dim,
                           .state_size = mb.state_size,
                           .ssm_dtype = dtype};
}

std::vector<const LinearWeight*> NemotronHModel::linear_weights() const {
    std::vector<const LinearWeight*> all;
    for (const Layer& L : layers_) {
        switch (L.kind) {
            case LayerKind::Mamba: all.insert(all.end(), {&L.in_proj, &L.out_proj}); break;
            case LayerKind::Attention: all.insert(all.end(), {&L.q, &L.k, &L.v, &L.o}); break;
            case LayerKind::Mlp: all.insert(all.end(), {&L.up, &L.down}); break;
            case LayerKind::Moe:
                for (const MoeExpertWeights& E : L.experts) all.insert(all.end(), {&E.up, &E.down});
                all.insert(all.end(), {&L.up, &L.down});
                break;
        }
    }
    if (!config_.tied_embeddings) all.push_back(&lm_head_);
    return all;
}

// ModelOpt's Nemotron-H NVFP4 recipe (Nemotron-3-Nano's model card) keeps every attention layer and the Mamba
// layer right before it in BF16, as "<prefix>layers.{i}.mixer*" patterns.
std::vector<std::string> NemotronHModel::default_quant_exclusions() const {
    std::vector<std::string> out;
    for (size_t i = 0; i < layers_.size(); ++i) {
        const Layer& L = layers_[i];
        const bool feeds_attention = i + 1 < layers_.size() && layers_[i + 1].kind == LayerKind::Attention;
        if (L.kind == LayerKind::Attention || (L.kind == LayerKind::Mamba && feeds_attention)) {
            const std::string& w = L.kind == LayerKind::Attention ? L.q.name : L.in_proj.name;  // ...mixer.q_proj
            out.push_back(w.substr(0, w.rfind('.')) + "*");
        }
    }
    return out;
}

bool NemotronHModel::hybrid_view(HybridView& out) const {
    out = HybridView{};
    out.embed = embed_;
    for (const Layer& L : layers_) {
        HybridLayerView& v = out.layers.emplace_back();
        v.kind = L.kind;
        v.cache_index = L.cache_index;
        v.norm = &L.norm;
        switch (L.kind) {
            case LayerKind::Mamba:
                v.in_proj = &L.in_proj;
                v.out_proj = &L.out_proj;
                v.conv_w = &L.conv_w;
                v.conv_b = &L.conv_b;
                v.A = &L.A;
                v.D = &L.D;
                v.dt_bias = &L.dt_bias;
                v.gated_norm = &L.gated_norm;
                break;
            case LayerKind::Attention:
                v.q = &L.q;
                v.k = &L.k;
                v.v = &L.v;
                v.o = &L.o;
                break;
            case LayerKind::Mlp:
                v.up = &L.up;
                v.down = &L.down;
                break;
            case LayerKind::Moe:
                v.up = &L.up;
                v.down = &L.down;
                v.router = &L.router;
                v.correction_bias = &L.correction_bias;
                for (const MoeExpertWeights& E : L.experts) {
                    v.expert_up.push_back(&E.up);
                    v.expert_down.push_back(&E.down);
                }
                break;
        }
    }
    out.final_norm = &final_norm_;
    out.lm_head = &lm_head_;
    out.tied_lm_head = config_.tied_embeddings;
    out.n_attention = n_attention_;
    out.n_mamba = n_mamba_;
    out.k_scales = k_scales_;
    out.v_scales = v_scales_;
    return true;
}

int64_t NemotronHModel::weight_bytes() const {
    int64_t total = embed_.numel() * static_cast<int64_t>(dtype_size(embed_.dtype));
    for (const LinearWeight* w : linear_weights()) total += w->stored_bytes();
    for (const Layer& L : layers_) {
        if (L.kind == LayerKind::Moe) total += L.router.stored_bytes();
        if (L.kind == LayerKind::Mamba)
            total += static_cast<int64_t>(L.conv_w.size() + L.conv_b.size() + 3 * L.A.size() + L.gated_norm.size()) *
                     static_cast<int64_t>(dtype_size(embed_.dtype));
    }
    return total;
}

void NemotronHModel::linear(const LinearWeight& w, const float* x, int64_t m, float* y) {
    if (observer_ != nullptr) observer_->observe(w, x, m);
    linear_cpu(pool_, x, m, w, y);
}

void NemotronHModel::relu2_mlp(const LinearWeight& up, const LinearWeight& down, const float* x, int64_t m,
                               float* y) {
    std::vector<float> hidden(static_cast<size_t>(m * up.n_out));
    linear(up, x, m, hidden.data());
    for (float& v : hidden) v = v > 0.0f ? v * v : 0.0f;  // relu(x)^2
    linear(down, hidden.data(), m, y);
}

void NemotronHModel::forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) {
    const auto& c = config_;
    const MambaConfig& mb = c.mamba;
    const int64_t d = c.n_embd, hd = c.head_dim;
    const int64_t q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd;
    const int64_t in_dim = mb.in_proj_dim(), conv_dim = mb.conv_dim(), d_inner = mb.d_inner();

    std::vector<int32_t> tokens;
    std::vector<int64_t> seq_begin;
    for (const auto& s : seqs) {
        NIBBLE_CHECK(!s.tokens.empty(), "forward: a sequence with no new tokens");
        if (n_mamba_ > 0) {
            NIBBLE_CHECK(s.state != nullptr, "forward: {} needs a Mamba state per sequence", c.arch_name);
            const MambaStateShape& sh = s.state->shape();
            NIBBLE_CHECK(sh.n_layers == n_mamba_ && sh.conv_dim == conv_dim && sh.ssm_elems() == mb.n_heads * mb.head_dim * mb.state_size,
                         "forward: Mamba state shaped for another model");
            if (s.kv.start_pos == 0) s.state->reset();
        }
        seq_begin.push_back(static_cast<int64_t>(tokens.size()));
        tokens.insert(tokens.end(), s.tokens.begin(), s.tokens.end());
    }
    const int64_t m = static_cast<int64_t>(tokens.size());

    std::vector<float> x(static_cast<size_t>(m * d)), h(static_cast<size_t>(m * d)), proj(static_cast<size_t>(m * d));
    embed_cpu(embed_, tokens.data(), m, x.data());
    const AttentionParams attn_params{.n_heads = c.n_heads,
                                      .n_kv_heads = c.n_kv_heads,
                                      .head_dim = hd,
                                      .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                                      .sliding_window = 0};
    const SsmScanParams scan_base{.n_heads = mb.n_heads,
                                  .head_dim = mb.head_dim,
                                  .state_size = mb.state_size,
                                  .n_groups = mb.n_groups,
                                  .dt_min = mb.dt_min,
                                  .dt_max = mb.dt_max};
    std::vector<float> ssm_scratch(static_cast<size_t>(mb.n_heads * mb.head_dim * mb.state_size));

    for (int64_t il = 0; il < c.n_layers; ++il) {
        const Layer& L = layers_[static_cast<size_t>(il)];
        rmsnorm_cpu(x.data(), m, d, L.norm.data(), c.norm_eps, h.data());
        switch (L.kind) {
            case LayerKind::Mamba: {
                std::vector<float> zxbcdt(static_cast<size_t>(m * in_dim)), xbc(static_cast<size_t>(m * conv_dim)),
                    y(static_cast<size_t>(m * d_inner));
                linear(L.in_proj, h.data(), m, zxbcdt.data());
                SsmScanParams sp = scan_base;
                sp.A = L.A.data();
                sp.D = L.D.data();
                sp.dt_bias = L.dt_bias.data();
                for (size_t si = 0; si < seqs.size(); ++si) {
                    const int64_t r0 = seq_begin[si], n = static_cast<int64_t>(seqs[si].tokens.size());
                    MambaState& st = *seqs[si].state;
                    mamba_conv1d_cpu(zxbcdt.data() + r0 * in_dim + d_inner, in_dim, n, conv_dim, L.conv_w.data(),
                                     L.conv_b.empty() ? nullptr : L.conv_b.data(), mb.conv_kernel,
                                     st.conv(L.cache_index), xbc.data() + r0 * conv_dim);
                    st.load_ssm(L.cache_index, ssm_scratch.data());
                    ssm_scan_cpu(pool_, sp, n, xbc.data() + r0 * conv_dim, conv_dim,
                                 zxbcdt.data() + r0 * in_dim + d_inner + conv_dim, in_dim, ssm_scratch.data(),
                                 y.data() + r0 * d_inner);
                    st.store_ssm(L.cache_index, ssm_scratch.data());
                }
                gated_rmsnorm_cpu(y.data(), zxbcdt.data(), in_dim, m, d_inner, d_inner / mb.n_groups,
                                  L.gated_norm.data(), c.norm_eps, y.data());
                linear(L.out_proj, y.data(), m, proj.data());
                break;
            }
            case LayerKind::Attention: {
                std::vector<float> q(static_cast<size_t>(m * q_dim)), k(static_cast<size_t>(m * kv_dim)),
                    v(static_cast<size_t>(m * kv_dim)), attn(static_cast<size_t>(m * q_dim));
                linear(L.q, h.data(), m, q.data());
                linear(L.k, h.data(), m, k.data());
                linear(L.v, h.data(), m, v.data());
                for (size_t si = 0; si < seqs.size(); ++si) {
                    const int64_t row = seq_begin[si], n = static_cast<int64_t>(seqs[si].tokens.size());
                    kv_cache_write_cpu(cache, L.cache_index, seqs[si].kv, n, k.data() + row * kv_dim,
                                       v.data() + row * kv_dim);
                    paged_attention_cpu(pool_, q.data() + row * q_dim, n, cache, L.cache_index, seqs[si].kv,
                                        attn_params, attn.data() + row * q_dim);
                }
                linear(L.o, attn.data(), m, proj.data());
                break;
            }
            case LayerKind::Mlp: relu2_mlp(L.up, L.down, h.data(), m, proj.data()); break;
            case LayerKind::Moe: {
                const MoeConfig& moe = c.moe;
                std::vector<float> router_logits(static_cast<size_t>(m * moe.n_experts));
                linear_cpu(pool_, h.data(), m, L.router, router_logits.data());
                const MoeRouting routing = moe_route_sigmoid_cpu(
                    router_logits.data(), m, moe.n_experts, moe.top_k, L.correction_bias.data(), moe.n_group,
                    moe.topk_group, moe.norm_topk_prob, moe.routed_scaling_factor);
                moe_experts_cpu(h.data(), d, L.experts, routing, MoeActivation::Relu2,
                                [&](const LinearWeight& w, const float* in, int64_t rows, float* out) {
                                    linear(w, in, rows, out);
                                },
                                proj.data());
                std::vector<float> shared(static_cast<size_t>(m * d));
                relu2_mlp(L.up, L.down, h.data(), m, shared.data());
                for (size_t i = 0; i < proj.size(); ++i) proj[i] += shared[i];
                break;
            }
        }
        for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    }

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
    for (int64_t i = 0; i < r; ++i) std::copy_n(x.data() + rows[static_cast<size_t>(i)] * d, d, last.data() + i * d);
    rmsnorm_cpu(last.data(), r, d, final_norm_.data(), c.norm_eps, last.data());
    logits.resize(static_cast<size_t>(r * c.vocab_size));
    linear(lm_head_, last.data(), r, logits.data());
}

}  // namespace nibble
