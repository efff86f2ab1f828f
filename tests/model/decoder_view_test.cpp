// Model::decoder_view of the MoE models (model/decoder_view.h), on the golden fixtures: Qwen3-MoE gives a
// view whose MoE layers hold the router and every expert's weights in the checkpoint's formats (dense layers
// from mlp_only_layers keep the dense MLP); Qwen2-MoE's view adds each MoE layer's shared expert and its gate.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "base/thread_pool.h"
#include "model/model.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

fs::path fixture(const std::string& name) {
    return fs::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures" / name / "model";
}

void expect_moe_view(const std::string& name, WeightFormat expert_format) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(fixture(name).string(), pool);
    const ModelConfig& c = model->config();
    ASSERT_EQ(c.arch, Arch::Qwen3Moe) << name;
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view)) << name;
    ASSERT_EQ(static_cast<int64_t>(view.layers.size()), c.n_layers) << name;
    int moe_layers = 0, dense_layers = 0;
    for (size_t il = 0; il < view.layers.size(); ++il) {
        const DecoderLayerView& L = view.layers[il];
        const std::string p = "model.layers." + std::to_string(il) + ".";
        ASSERT_NE(L.q, nullptr);
        EXPECT_EQ(L.q->name, p + "self_attn.q_proj");
        EXPECT_EQ(L.moe(), c.is_moe_layer(static_cast<int64_t>(il))) << name << " layer " << il;
        if (!L.moe()) {
            ++dense_layers;
            ASSERT_NE(L.gate, nullptr);
            EXPECT_EQ(L.gate->name, p + "mlp.gate_proj");
            EXPECT_EQ(L.gate->n_out, c.n_ff);
            EXPECT_TRUE(L.expert_gate.empty() && L.expert_up.empty() && L.expert_down.empty());
            continue;
        }
        ++moe_layers;
        EXPECT_EQ(L.gate, nullptr);
        EXPECT_EQ(L.router->name, p + "mlp.gate");
        EXPECT_EQ(L.router->format, WeightFormat::Dense) << "routers stay unquantized";
        EXPECT_EQ(L.router->n_out, c.moe.n_experts);
        ASSERT_EQ(static_cast<int64_t>(L.expert_gate.size()), c.moe.n_experts);
        ASSERT_EQ(static_cast<int64_t>(L.expert_up.size()), c.moe.n_experts);
        ASSERT_EQ(static_cast<int64_t>(L.expert_down.size()), c.moe.n_experts);
        for (int64_t e = 0; e < c.moe.n_experts; ++e) {
            const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
            const LinearWeight& g = *L.expert_gate[static_cast<size_t>(e)];
            const LinearWeight& u = *L.expert_up[static_cast<size_t>(e)];
            const LinearWeight& d = *L.expert_down[static_cast<size_t>(e)];
            EXPECT_EQ(g.name, x + "gate_proj");
            EXPECT_EQ(u.name, x + "up_proj");
            EXPECT_EQ(d.name, x + "down_proj");
            EXPECT_EQ(g.format, expert_format) << g.name;
            EXPECT_EQ(d.format, expert_format) << d.name;
            EXPECT_TRUE(g.n_out == c.moe.n_ff && g.n_in == c.n_embd) << g.name;
            EXPECT_TRUE(u.n_out == c.moe.n_ff && u.n_in == c.n_embd) << u.name;
            EXPECT_TRUE(d.n_out == c.n_embd && d.n_in == c.moe.n_ff) << d.name;
        }
    }
    EXPECT_GT(moe_layers, 0) << name;
    EXPECT_EQ(moe_layers + dense_layers, c.n_layers);
    EXPECT_NE(view.final_norm, nullptr);
    EXPECT_NE(view.lm_head, nullptr);
}

TEST(DecoderView, Qwen3MoeNvfp4ModelOpt) { expect_moe_view("qwen3_moe_nvfp4_modelopt", WeightFormat::Nvfp4); }

TEST(DecoderView, Qwen3MoeBf16) { expect_moe_view("qwen3_moe", WeightFormat::Dense); }

TEST(DecoderView, Qwen2MoeSharedExpert) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(fixture("qwen2_moe").string(), pool);
    const ModelConfig& c = model->config();
    ASSERT_GT(c.moe.n_shared_experts, 0);
    ASSERT_TRUE(c.moe.shared_expert_gate);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    ASSERT_EQ(static_cast<int64_t>(view.layers.size()), c.n_layers);
    int moe_layers = 0;
    for (size_t il = 0; il < view.layers.size(); ++il) {
        const DecoderLayerView& L = view.layers[il];
        const std::string p = "model.layers." + std::to_string(il) + ".mlp.";
        EXPECT_EQ(L.moe(), c.is_moe_layer(static_cast<int64_t>(il))) << "layer " << il;
        if (!L.moe()) {
            EXPECT_FALSE(L.has_shared_expert()) << "layer " << il;
            EXPECT_EQ(L.shared_expert_gate, nullptr);
            continue;
        }
        ++moe_layers;
        EXPECT_EQ(static_cast<int64_t>(L.expert_up.size()), c.moe.n_experts);
        ASSERT_TRUE(L.has_shared_expert());
        ASSERT_NE(L.shared_gate, nullptr);
        ASSERT_NE(L.shared_down, nullptr);
        ASSERT_NE(L.shared_expert_gate, nullptr);
        EXPECT_EQ(L.shared_gate->name, p + "shared_expert.gate_proj");
        EXPECT_EQ(L.shared_up->name, p + "shared_expert.up_proj");
        EXPECT_EQ(L.shared_down->name, p + "shared_expert.down_proj");
        EXPECT_EQ(L.shared_expert_gate->name, p + "shared_expert_gate");
        EXPECT_TRUE(L.shared_up->n_out == c.moe.n_ff_shared && L.shared_up->n_in == c.n_embd);
        EXPECT_TRUE(L.shared_down->n_out == c.n_embd && L.shared_down->n_in == c.moe.n_ff_shared);
        EXPECT_TRUE(L.shared_expert_gate->n_out == 1 && L.shared_expert_gate->n_in == c.n_embd);
    }
    EXPECT_GT(moe_layers, 0);
}

}  // namespace
}  // namespace nibble
