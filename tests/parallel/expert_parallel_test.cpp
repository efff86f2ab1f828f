// Qwen3-MoE under --tensor-parallel-size: attention and dense MLP layers split as the llama family's, MoE
// layers by expert id (rank r holds experts [r*E/N, (r+1)*E/N), the router replicated). The layout's expert
// ranges tile the experts, the refusals name what does not divide, a rank's tensor list prices its own experts
// only, and shard_decoder_view hands each rank pointers to exactly its experts (no copies).
#include <gtest/gtest.h>

#include <deque>
#include <map>
#include <string>
#include <vector>

#include "base/error.h"
#include "model/qwen_moe.h"
#include "parallel/decoder_view_shard.h"
#include "parallel/tensor_parallel.h"
#include "parallel_test_util.h"

namespace nibble {
namespace {

using test::decoder_config;
using test::error_of;

// Qwen3-30B-A3B's shape fields (48 layers cut to 4; layer 1 made dense through mlp_only_layers).
ModelConfig qwen3_30b_a3b() {
    ModelConfig c = decoder_config({.arch = Arch::Qwen3Moe,
                                    .arch_name = "Qwen3MoeForCausalLM",
                                    .n_embd = 2048,
                                    .n_layers = 4,
                                    .n_heads = 32,
                                    .n_kv_heads = 4,
                                    .head_dim = 128,
                                    .n_ff = 6144,
                                    .vocab_size = 151936,
                                    .max_position_embeddings = 40960,
                                    .dtype = DType::BF16});
    c.qk_norm = true;
    c.moe.n_experts = 128;
    c.moe.top_k = 8;
    c.moe.n_ff = 768;
    c.moe.norm_topk_prob = true;
    c.mlp_only_layers = {1};
    return c;
}

TEST(ExpertParallelLayout, RanksHoldEqualRangesOfWholeExperts) {
    const ModelConfig c = qwen3_30b_a3b();
    for (int64_t n : {1, 2, 4, 8}) {
        int64_t next = 0;
        for (int64_t r = 0; r < n; ++r) {
            const TensorParallelLayout l = tensor_parallel_layout(c, n, r);
            EXPECT_EQ(l.experts, (IndexRange{next, next + 128 / n})) << "tp " << n << " rank " << r;
            next = l.experts.end;
            EXPECT_EQ(l.ff, (IndexRange{r * 6144 / n, (r + 1) * 6144 / n}));  // layer 1's dense MLP
            const ModelConfig rc = rank_config(c, l);
            EXPECT_EQ(rc.moe.n_experts, 128);  // the replicated router scores every expert
            EXPECT_EQ(rc.moe.top_k, 8);
            EXPECT_EQ(rc.moe.n_ff, 768);  // experts are never sliced
            EXPECT_EQ(rc.n_heads, 32 / n);
        }
        EXPECT_EQ(next, 128);
    }
    // A llama-family model has no experts.
    ModelConfig llama = c;
    llama.arch = Arch::Qwen3;
    llama.moe = MoeConfig{};
    llama.mlp_only_layers.clear();
    EXPECT_EQ(tensor_parallel_layout(llama, 2, 1).experts.size(), 0);
}

TEST(ExpertParallelLayout, RefusalsNameWhatDoesNotDivide) {
    ModelConfig c = qwen3_30b_a3b();
    c.moe.n_experts = 60;
    const std::string e = error_of([&] { check_tensor_parallel(c, 8); });
    EXPECT_NE(e.find("--tensor-parallel-size 8"), std::string::npos) << e;
    EXPECT_NE(e.find("num_experts 60"), std::string::npos) << e;
    EXPECT_EQ(e.find("num_attention_heads"), std::string::npos) << e;  // 32 heads divide by 8
    EXPECT_NO_THROW(check_tensor_parallel(c, 4));
    // The intermediate size counts only when some layer is dense.
    c = qwen3_30b_a3b();
    c.n_ff = 6008;  // not divisible by 16
    EXPECT_NE(error_of([&] { check_tensor_parallel(c, 16); }).find("intermediate_size 6008"), std::string::npos);
    c.mlp_only_layers.clear();
    EXPECT_NO_THROW(check_tensor_parallel(c, 16));
    EXPECT_EQ(tensor_parallel_layout(c, 16, 3).ff, (IndexRange{0, 6008}));  // unused: kept whole
    // Qwen2-MoE's shared expert has no split.
    c.arch = Arch::Qwen2Moe;
    c.arch_name = "Qwen2MoeForCausalLM";
    EXPECT_NE(error_of([&] { check_tensor_parallel(c, 2); }).find("Qwen2MoeForCausalLM has no tensor-parallel split"),
              std::string::npos);
}

TEST(ExpertParallelLayout, Nvfp4ChecksSkipTheMoeLayersMissingDownProj) {
    ModelConfig c = qwen3_30b_a3b();
    c.n_ff = 128;  // the dense layer's down_proj: 16 inputs a rank at TP 8, 8 at TP 16 (half a block)
    QuantConfig q;
    q.method = QuantMethod::ModelOptNvfp4;
    EXPECT_NO_THROW(check_tensor_parallel_quant(c, q, 8));
    const std::string e = error_of([&] { check_tensor_parallel_quant(c, q, 16); });
    EXPECT_NE(e.find("model.layers.1.mlp.down_proj"), std::string::npos) << e;  // the dense layer only
    EXPECT_EQ(e.find("model.layers.0.mlp.down_proj"), std::string::npos) << e;
}

TEST(ExpertParallelLayout, RankWeightsAddUpToTheModel) {
    const ModelConfig c = qwen3_30b_a3b();
    int64_t whole = 0, whole_experts = 0;
    for (const WeightSpec& w : qwen_moe_expected_weights(c)) {
        const int64_t n = w.kind == WeightSpec::Kind::Dense ? w.shape.numel() : w.linear.n_out * w.linear.n_in;
        whole += n;
        if (w.kind == WeightSpec::Kind::Linear && w.linear.module.find(".experts.") != std::string::npos)
            whole_experts += n;
    }
    // Per layer two norms and the QK-norms, the final norm, the 3 MoE layers' routers.
    const int64_t replicated = 4 * (2 * 2048 + 2 * 128) + 2048 + 3 * 128 * 2048;
    for (int64_t n : {2, 4}) {  // (at 8 the 4 KV heads are replicated too)
        int64_t sum = 0;
        std::map<std::string, int> holders;
        for (int64_t r = 0; r < n; ++r) {
            const TensorParallelLayout l = tensor_parallel_layout(c, n, r);
            int64_t experts = 0;
            for (const WeightSpec& w : llama_rank_expected_weights(c, n, r)) {
                sum += w.kind == WeightSpec::Kind::Dense ? w.shape.numel() : w.linear.n_out * w.linear.n_in;
                if (w.kind != WeightSpec::Kind::Linear) continue;
                const std::string& m = w.linear.module;
                if (m.find(".experts.") == std::string::npos) continue;
                ++holders[m];
                experts += w.linear.n_out * w.linear.n_in;
                // model.layers.{il}.mlp.experts.{e}.*: e inside the rank's range
                const size_t at = m.find(".experts.") + 9;
                const int64_t e = std::stoll(m.substr(at, m.find('.', at) - at));
                EXPECT_TRUE(e >= l.experts.begin && e < l.experts.end) << m << " on rank " << r;
            }
            EXPECT_EQ(experts * n, whole_experts) << "tp " << n;  // an equal share of the experts
        }
        EXPECT_EQ(static_cast<int64_t>(holders.size()), 3 * 3 * 128);  // 3 MoE layers, each expert once
        for (const auto& [m, count] : holders) EXPECT_EQ(count, 1) << m;
        // Replicated tensors count n times, everything else once.
        EXPECT_EQ(sum, whole + (n - 1) * replicated) << "tp " << n;
    }
}

// A tiny Qwen3-MoE view of dense F32 linears: layer 0 MoE (8 experts), layer 1 dense.
struct TinyView {
    ModelConfig config;
    std::deque<std::vector<float>> floats;
    std::deque<LinearWeight> linears;
    DecoderView view;

    TinyView() {
        config = decoder_config({.arch = Arch::Qwen3Moe,
                                 .arch_name = "Qwen3MoeForCausalLM",
                                 .n_embd = 32,
                                 .n_layers = 2,
                                 .n_heads = 4,
                                 .n_kv_heads = 2,
                                 .head_dim = 8,
                                 .n_ff = 64,
                                 .vocab_size = 10});
        ModelConfig& c = config;
        c.moe.n_experts = 8;
        c.moe.top_k = 2;
        c.moe.n_ff = 16;
        c.mlp_only_layers = {1};
        auto vec = [&](int64_t n) { return &floats.emplace_back(static_cast<size_t>(n), 0.5f); };
        auto lin = [&](const std::string& name, int64_t n_out, int64_t n_in) {
            LinearWeight& w = linears.emplace_back();
            w.name = name;
            w.dtype = DType::F32;
            w.n_out = n_out;
            w.n_in = n_in;
            w.data = vec(n_out * n_in)->data();
            return &w;
        };
        view.embed = Tensor{vec(c.vocab_size * c.n_embd)->data(), DType::F32, Shape{c.vocab_size, c.n_embd}};
        for (int64_t il = 0; il < 2; ++il) {
            const std::string p = "model.layers." + std::to_string(il) + ".";
            DecoderLayerView L;
            L.attn_norm = L.mlp_norm = vec(c.n_embd);
            L.q_norm = L.k_norm = vec(c.head_dim);
            L.q = lin(p + "self_attn.q_proj", 32, 32);
            L.k = lin(p + "self_attn.k_proj", 16, 32);
            L.v = lin(p + "self_attn.v_proj", 16, 32);
            L.o = lin(p + "self_attn.o_proj", 32, 32);
            if (il == 0) {
                L.router = lin(p + "mlp.gate", 8, 32);
                for (int64_t e = 0; e < 8; ++e) {
                    const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
                    L.expert_gate.push_back(lin(x + "gate_proj", 16, 32));
                    L.expert_up.push_back(lin(x + "up_proj", 16, 32));
                    L.expert_down.push_back(lin(x + "down_proj", 32, 16));
                }
            } else {
                L.gate = lin(p + "mlp.gate_proj", 64, 32);
                L.up = lin(p + "mlp.up_proj", 64, 32);
                L.down = lin(p + "mlp.down_proj", 32, 64);
            }
            view.layers.push_back(L);
        }
        view.final_norm = vec(c.n_embd);
        view.lm_head = lin("lm_head", 10, 32);
    }
};

TEST(ExpertParallelShard, EachRankPointsAtItsOwnExperts) {
    const TinyView t;
    const QuantConfig none;
    const DecoderLayerView& full = t.view.layers[0];
    for (int64_t n : {2, 4}) {  // (4 heads, 10 vocabulary rows: no more)
        for (int64_t r = 0; r < n; ++r) {
            const auto s = shard_decoder_view(t.config, none, t.view, n, r);
            EXPECT_EQ(s->config.moe.n_experts, 8);
            EXPECT_EQ(s->layout.experts, (IndexRange{r * 8 / n, (r + 1) * 8 / n}));
            const DecoderLayerView& L = s->view.layers[0];
            ASSERT_TRUE(L.moe());
            EXPECT_EQ(L.router, full.router);  // replicated: the model's own weight
            ASSERT_EQ(static_cast<int64_t>(L.expert_gate.size()), 8 / n);
            ASSERT_EQ(L.expert_up.size(), L.expert_gate.size());
            ASSERT_EQ(L.expert_down.size(), L.expert_gate.size());
            for (int64_t i = 0; i < 8 / n; ++i) {  // the same objects: no copies
                EXPECT_EQ(L.expert_gate[static_cast<size_t>(i)], full.expert_gate[static_cast<size_t>(r * 8 / n + i)]);
                EXPECT_EQ(L.expert_up[static_cast<size_t>(i)], full.expert_up[static_cast<size_t>(r * 8 / n + i)]);
                EXPECT_EQ(L.expert_down[static_cast<size_t>(i)], full.expert_down[static_cast<size_t>(r * 8 / n + i)]);
            }
            EXPECT_EQ(L.gate, nullptr);
            // Attention split as the llama family's; the dense layer's MLP column/row-parallel.
            EXPECT_EQ(L.q->n_out, 32 / n);
            EXPECT_EQ(L.o->n_in, 32 / n);
            const DecoderLayerView& D = s->view.layers[1];
            ASSERT_FALSE(D.moe());
            EXPECT_EQ(D.gate->n_out, 64 / n);
            EXPECT_EQ(D.down->n_in, 64 / n);
            EXPECT_TRUE(D.expert_gate.empty());
        }
    }
    // 8 experts do not split 16 ways (the heads neither): the refusal names them.
    const std::string e = error_of([&] { shard_decoder_view(t.config, none, t.view, 16, 0); });
    EXPECT_NE(e.find("num_experts 8"), std::string::npos) << e;
    // A view whose expert lists disagree with the config is refused, naming the router.
    TinyView bad;
    bad.view.layers[0].expert_up.pop_back();
    const std::string b = error_of([&] { shard_decoder_view(bad.config, none, bad.view, 2, 0); });
    EXPECT_NE(b.find("model.layers.0.mlp.gate has 7 experts"), std::string::npos) << b;
}

// At 4 ranks the 2 KV heads are fewer than the ranks: each is replicated on 2 (rank r holds KV head r / 2, the
// one its query head r reads), and the views the CUDA upload reads point at exactly those rows: q, k and v
// rows (views into the model's memory), o_proj's columns, and the embedding's vocabulary rows (ceil(10 / 4) = 3
// per rank, the last rank 1).
TEST(ExpertParallelShard, FourRanksReplicateTheKvHeadsAndSliceTheRest) {
    const TinyView t;
    const QuantConfig none;
    const int64_t hd = t.config.head_dim, d = t.config.n_embd;
    const auto* embed_rows = static_cast<const float*>(t.view.embed.data);
    for (int64_t r = 0; r < 4; ++r) {
        const auto s = shard_decoder_view(t.config, none, t.view, 4, r);
        EXPECT_EQ(s->layout.kv_replicas, 2);
        EXPECT_EQ(s->layout.kv_heads, (IndexRange{r / 2, r / 2 + 1})) << "rank " << r;
        EXPECT_EQ(s->config.n_heads, 1);
        EXPECT_EQ(s->config.n_kv_heads, 1);
        ASSERT_EQ(s->view.layers.size(), t.view.layers.size());
        for (size_t il = 0; il < t.view.layers.size(); ++il) {
            const DecoderLayerView &L = s->view.layers[il], &full = t.view.layers[il];
            const auto* q_rows = static_cast<const float*>(full.q->data);
            const auto* k_rows = static_cast<const float*>(full.k->data);
            EXPECT_EQ(L.q->n_out, hd);
            EXPECT_EQ(static_cast<const float*>(L.q->data), q_rows + r * hd * d) << "rank " << r << " layer " << il;
            EXPECT_EQ(L.k->n_out, hd);
            EXPECT_EQ(static_cast<const float*>(L.k->data), k_rows + (r / 2) * hd * d)
                << "rank " << r << " layer " << il;
            EXPECT_EQ(L.v->n_out, hd);
            EXPECT_EQ(L.o->n_in, hd);
            EXPECT_EQ(L.o->n_out, d);
        }
        const int64_t rows = r < 3 ? 3 : 1;
        EXPECT_EQ(s->view.embed.shape, (Shape{rows, d})) << "rank " << r;
        EXPECT_EQ(static_cast<const float*>(s->view.embed.data), embed_rows + r * 3 * d) << "rank " << r;
        EXPECT_EQ(s->view.lm_head->n_out, rows) << "rank " << r;
        EXPECT_EQ(s->layout.vocab_per_rank, 3);
    }
}

}  // namespace
}  // namespace nibble
