// model/real_shapes: every published shape parses into a config its architecture's tensor list accepts, with the
// layer counts and widths the model cards state, and the quantization a ModelOpt NVFP4 export carries.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>

#include "base/error.h"
#include "base/thread_pool.h"
#include "model/model.h"
#include "model/real_shapes.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

int64_t linears(const std::vector<WeightSpec>& weights) {
    return std::count_if(weights.begin(), weights.end(),
                         [](const WeightSpec& w) { return w.kind == WeightSpec::Kind::Linear; });
}

TEST(RealShapes, EveryNameGivesAConfigItsArchitectureAccepts) {
    const std::vector<std::string> names = real_shape_names();
    ASSERT_EQ(names.size(), 6u);
    for (const std::string& name : names) {
        SCOPED_TRACE(name);
        const RealShape s = real_shape(name);
        EXPECT_EQ(s.config.dtype, DType::BF16);
        EXPECT_FALSE(s.config.tied_embeddings);
        const std::vector<WeightSpec> weights = expected_weights(s.config);
        EXPECT_GT(linears(weights), s.config.n_layers);
        EXPECT_EQ(s.quant.method, QuantMethod::ModelOptNvfp4);
        EXPECT_EQ(s.quant.group_size, 16);
        EXPECT_TRUE(s.quant.is_excluded("lm_head"));
        EXPECT_FALSE(real_shape(name, {.nvfp4 = true, .lm_head_nvfp4 = true}).quant.is_excluded("lm_head"));
        EXPECT_EQ(real_shape(name, {.nvfp4 = false}).quant.method, QuantMethod::None);
    }
}

TEST(RealShapes, UnknownNameListsTheKnownOnes) {
    try {
        real_shape_config("llama3-7b");
        FAIL() << "no error";
    } catch (const Error& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find("llama3-7b"), std::string::npos) << what;
        EXPECT_NE(what.find("nemotron-3-nano-30b-a3b"), std::string::npos) << what;
    }
}

// Qwen3-30B-A3B: 48 layers, all MoE (decoder_sparse_step 1, no mlp_only_layers), 128 experts of 768, 8 per token,
// 32 query and 4 KV heads of 128; the router (mlp.gate) stays BF16 in the NVFP4 export, the experts do not.
TEST(RealShapes, Qwen3MoeShape) {
    const RealShape s = real_shape("qwen3-30b-a3b");
    const ModelConfig& c = s.config;
    EXPECT_EQ(c.arch, Arch::Qwen3Moe);
    EXPECT_EQ(c.n_embd, 2048);
    EXPECT_EQ(c.n_layers, 48);
    EXPECT_EQ(c.n_heads, 32);
    EXPECT_EQ(c.n_kv_heads, 4);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_TRUE(c.qk_norm);
    EXPECT_EQ(c.moe.n_experts, 128);
    EXPECT_EQ(c.moe.top_k, 8);
    EXPECT_EQ(c.moe.n_ff, 768);
    EXPECT_EQ(c.moe.n_shared_experts, 0);
    EXPECT_TRUE(c.moe.norm_topk_prob);
    EXPECT_EQ(c.vocab_size, 151936);
    for (int64_t il = 0; il < c.n_layers; ++il) EXPECT_TRUE(c.is_moe_layer(il)) << il;
    // per layer: q k v o, the router, 128 x (gate, up, down); plus lm_head
    EXPECT_EQ(linears(expected_weights(c)), 48 * (4 + 1 + 128 * 3) + 1);
    EXPECT_TRUE(s.quant.is_excluded("model.layers.7.mlp.gate"));
    EXPECT_FALSE(s.quant.is_excluded("model.layers.7.mlp.experts.3.gate_proj"));
    EXPECT_FALSE(s.quant.is_excluded("model.layers.7.self_attn.q_proj"));
    EXPECT_EQ(s.quant.kv_cache, KvCacheQuant::None);
}

// Nemotron-3-Nano-30B-A3B: 52 layers, 23 Mamba2 + 23 MoE + 6 attention; Mamba d_inner 64 x 64 = 4096, in_proj
// 2 x 4096 + 2 x 8 x 128 + 64 = 10304 rows; 128 relu^2 experts of 1856, 6 per token, a shared expert of 3712.
TEST(RealShapes, NemotronNanoShape) {
    const RealShape s = real_shape("nemotron-3-nano-30b-a3b");
    const ModelConfig& c = s.config;
    EXPECT_EQ(c.arch, Arch::NemotronH);
    EXPECT_EQ(c.n_embd, 2688);
    EXPECT_EQ(c.n_layers, 52);
    EXPECT_EQ(c.count_layers(LayerKind::Mamba), 23);
    EXPECT_EQ(c.count_layers(LayerKind::Moe), 23);
    EXPECT_EQ(c.count_layers(LayerKind::Attention), 6);
    EXPECT_EQ(c.count_layers(LayerKind::Mlp), 0);
    EXPECT_EQ(c.mamba.d_inner(), 4096);
    EXPECT_EQ(c.mamba.in_proj_dim(), 10304);
    EXPECT_EQ(c.mamba.conv_dim(), 6144);
    EXPECT_EQ(c.n_heads, 32);
    EXPECT_EQ(c.n_kv_heads, 2);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.moe.n_experts, 128);
    EXPECT_EQ(c.moe.top_k, 6);
    EXPECT_EQ(c.moe.n_ff, 1856);
    EXPECT_EQ(c.moe.n_shared_experts, 1);
    EXPECT_EQ(c.moe.n_ff_shared, 3712);
    EXPECT_FALSE(c.moe.gated_experts);
    EXPECT_EQ(c.moe.scoring, MoeScoring::Sigmoid);
    EXPECT_FLOAT_EQ(c.moe.routed_scaling_factor, 2.5f);
    EXPECT_EQ(c.vocab_size, 131072);
    // per layer: Mamba in/out, attention q/k/v/o, MoE 128 x (up, down) + shared (up, down); plus lm_head
    EXPECT_EQ(linears(expected_weights(c)), 23 * 2 + 6 * 4 + 23 * (128 * 2 + 2) + 1);
    // BF16 in the NVFP4 export: the 6 attention layers (5, 12, 19, 26, 33, 42) and the Mamba layer before each.
    const std::vector<std::string> expected = {
        "backbone.layers.4.mixer*",  "backbone.layers.5.mixer*",  "backbone.layers.11.mixer*", "backbone.layers.12.mixer*",
        "backbone.layers.18.mixer*", "backbone.layers.19.mixer*", "backbone.layers.25.mixer*", "backbone.layers.26.mixer*",
        "backbone.layers.32.mixer*", "backbone.layers.33.mixer*", "backbone.layers.41.mixer*", "backbone.layers.42.mixer*"};
    EXPECT_EQ(nemotron_h_modelopt_exclusions(c), expected);
    EXPECT_TRUE(s.quant.is_excluded("backbone.layers.4.mixer.in_proj"));
    EXPECT_TRUE(s.quant.is_excluded("backbone.layers.5.mixer.o_proj"));
    EXPECT_FALSE(s.quant.is_excluded("backbone.layers.2.mixer.in_proj"));  // a Mamba layer before a MoE layer
    EXPECT_FALSE(s.quant.is_excluded("backbone.layers.1.mixer.experts.0.up_proj"));
    EXPECT_FALSE(s.quant.is_excluded("backbone.layers.1.mixer.shared_experts.down_proj"));
    EXPECT_EQ(s.quant.kv_cache, KvCacheQuant::Fp8);
}

// The exclusion rule over a config is the one the loaded model applies to its own layers (golden fixture
// nemotron_h, pattern M-M*EM: layers 2 (Mamba before attention) and 3 (attention)).
TEST(RealShapes, NemotronExclusionsMatchTheLoadedModel) {
    const fs::path dir = fs::path(NIBBLE_SOURCE_DIR) / "tests/golden/fixtures/nemotron_h/model";
    ThreadPool pool(1);
    const auto model = load_model(dir.string(), pool);
    EXPECT_EQ(nemotron_h_modelopt_exclusions(model->config()), model->default_quant_exclusions());
    EXPECT_EQ(model->default_quant_exclusions(),
              (std::vector<std::string>{"backbone.layers.2.mixer*", "backbone.layers.3.mixer*"}));
}

TEST(RealShapes, DenseShapes) {
    const ModelConfig l8 = real_shape_config("llama3-8b");
    EXPECT_EQ(l8.arch, Arch::Llama);
    EXPECT_EQ(l8.n_embd, 4096);
    EXPECT_EQ(l8.n_layers, 32);
    EXPECT_EQ(l8.n_kv_heads, 8);
    EXPECT_EQ(l8.head_dim, 128);
    EXPECT_EQ(l8.n_ff, 14336);
    EXPECT_EQ(l8.vocab_size, 128256);
    EXPECT_EQ(l8.rope.type, RopeType::Llama3);
    const ModelConfig l70 = real_shape_config("llama3-70b");
    EXPECT_EQ(l70.n_layers, 80);
    EXPECT_EQ(l70.n_heads, 64);
    EXPECT_EQ(l70.n_ff, 28672);
    const ModelConfig q8 = real_shape_config("qwen3-8b");
    EXPECT_EQ(q8.arch, Arch::Qwen3);
    EXPECT_EQ(q8.n_layers, 36);
    EXPECT_TRUE(q8.qk_norm);
    EXPECT_EQ(q8.vocab_size, 151936);
    const ModelConfig m7 = real_shape_config("mistral-7b");
    EXPECT_EQ(m7.arch, Arch::Mistral);
    EXPECT_EQ(m7.sliding_window, 0);
    EXPECT_EQ(m7.vocab_size, 32768);
}

}  // namespace
}  // namespace nibble
