// nibble quantize on MoE checkpoints against tests/golden/make_fixtures.py's torch export
// (qwen3_moe_nvfp4_modelopt: ModelOpt's recipe in torch, experts one tensor set per expert, the router left
// BF16 and listed in exclude_modules as ModelOpt's default config does), and MoE calibration against the
// generator's per-expert input maxima (tokens routed to each expert only).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "quant_test_util.h"
#include "base/thread_pool.h"
#include "checkpoint/quant_config.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "quant/calibrate.h"
#include "quant/quantize.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using namespace quant_test;

TEST(QuantizeMoe, ModelOptExpertsBitIdenticalToTorchRecipeRouterKept) {
    TempDir out("qwen3");
    ThreadPool pool(2);
    // One global scale per tensor, as the torch fixture (each expert's shared gate/up scale:
    // quantize_fusion_groups_test.cpp).
    QuantizeOptions opt{.src_dir = (fixture("qwen3_moe") / "model").string(),
                        .dst_dir = out.path.string(),
                        .fusion_group_global_scales = false,
                        .progress = false};
    const auto reports = quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    Checkpoint ref((fixture("qwen3_moe_nvfp4_modelopt") / "model").string());
    ASSERT_EQ(ours.names(), ref.names());
    int experts = 0;
    for (const auto& name : ref.names()) {
        if (name.ends_with(".input_scale")) {
            EXPECT_EQ(read_scalar(ours, name), kDefaultInputScale) << name;
            continue;
        }
        EXPECT_TRUE(same_bytes(ours.get(name), ref.get(name))) << name;
        if (name.find(".mlp.experts.") != std::string::npos && name.ends_with(".weight_scale_2")) ++experts;
    }
    EXPECT_EQ(experts, 8 * 3);  // layer 1: 8 experts x gate/up/down, one tensor set each
    // The router is copied as stored (BF16 [8, 64]), not quantized.
    const TensorInfo& router = ours.get("model.layers.1.mlp.gate.weight");
    EXPECT_EQ(router.dtype, DType::BF16);
    EXPECT_EQ(router.shape, (Shape{8, 64}));
    EXPECT_FALSE(ours.has("model.layers.1.mlp.gate.weight_scale"));
    int quantized = 0;
    for (const auto& r : reports) quantized += r.action == "nvfp4";
    EXPECT_EQ(quantized, 7 + 4 + 24);  // dense layer 0: 7 linears; layer 1: attention 4 + experts 24

    // Both exporters' config files list the router as excluded, as the torch export does.
    std::ifstream in(out.path / "hf_quant_config.json");
    const auto hf = nlohmann::json::parse(in);
    std::ifstream ref_in(fixture("qwen3_moe_nvfp4_modelopt") / "model" / "hf_quant_config.json");
    const auto ref_hf = nlohmann::json::parse(ref_in);
    auto sorted = [](nlohmann::json j) {
        std::vector<std::string> v = j.get<std::vector<std::string>>();
        std::sort(v.begin(), v.end());
        return v;
    };
    EXPECT_EQ(sorted(hf["quantization"]["exclude_modules"]), sorted(ref_hf["quantization"]["exclude_modules"]));
    std::ifstream cin(out.path / "config.json");
    const QuantConfig qc = load_quant_config(out.path.string(), nlohmann::json::parse(cin));
    EXPECT_TRUE(qc.is_excluded("model.layers.1.mlp.gate"));
    EXPECT_FALSE(qc.is_excluded("model.layers.1.mlp.experts.3.up_proj"));

    // The export loads back: experts NVFP4, router dense.
    auto model = load_model(out.path.string(), pool);
    int nvfp4_experts = 0, dense_routers = 0;
    for (const LinearWeight* w : model->linear_weights()) {
        if (w->name.find(".mlp.experts.") != std::string::npos) nvfp4_experts += w->format == WeightFormat::Nvfp4;
        if (w->name.ends_with(".mlp.gate")) dense_routers += w->format == WeightFormat::Dense;
    }
    EXPECT_EQ(nvfp4_experts, 24);
    EXPECT_EQ(dense_routers, 1);
}

TEST(QuantizeMoe, Qwen2MoeSharedExpertQuantizedGatesKept) {
    TempDir out("qwen2");
    ThreadPool pool(2);
    const fs::path src = fixture("qwen2_moe") / "model";
    QuantizeOptions opt{.src_dir = src.string(), .dst_dir = out.path.string(), .progress = false};
    quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    Checkpoint orig(src.string());
    for (const char* kept : {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert_gate.weight"})
        EXPECT_TRUE(same_bytes(ours.get(kept), orig.get(kept))) << kept;
    for (const char* q : {"model.layers.1.mlp.shared_expert.gate_proj", "model.layers.1.mlp.shared_expert.down_proj",
                          "model.layers.1.mlp.experts.0.up_proj", "model.layers.1.mlp.experts.3.down_proj"}) {
        EXPECT_EQ(ours.get(std::string(q) + ".weight").dtype, DType::U8) << q;
        EXPECT_EQ(ours.get(std::string(q) + ".weight_scale").dtype, DType::F8_E4M3) << q;
    }
    std::ifstream in(out.path / "config.json");
    const QuantConfig qc = load_quant_config(out.path.string(), nlohmann::json::parse(in));
    EXPECT_TRUE(qc.is_excluded("model.layers.1.mlp.gate"));
    EXPECT_TRUE(qc.is_excluded("model.layers.1.mlp.shared_expert_gate"));
    EXPECT_NO_THROW(load_model(out.path.string(), pool));
}

TEST(QuantizeMoe, CalibrationSeesOnlyRoutedTokens) {
    // The fixture's expert input_scale values are amax/2688 over the tokens the router sent to each expert,
    // computed by the generator in torch from transformers' MoE block input; the others come from forward
    // pre-hooks. An expert no token reached has input_scale 0 there and no entry here.
    ThreadPool pool(2);
    const std::string dir = (fixture("qwen3_moe_nvfp4_modelopt") / "model").string();
    auto model = load_model(dir, pool);
    SafetensorsFile expected((fixture("qwen3_moe_nvfp4_modelopt") / "expected.safetensors").string());
    const TensorInfo* t = expected.find("tokens");
    ASSERT_NE(t, nullptr);
    std::vector<int32_t> tokens(static_cast<size_t>(t->shape.numel()));
    std::memcpy(tokens.data(), t->data, tokens.size() * 4);
    const auto amax = calibrate_input_amax(*model, {tokens});
    Checkpoint ref(dir);
    int experts = 0, others = 0;
    for (const auto& name : ref.names()) {
        if (!name.ends_with(".input_scale")) continue;
        const std::string module = name.substr(0, name.size() - std::strlen(".input_scale"));
        const float want = read_scalar(ref, name) * 2688.0f;
        if (want == 0.0f) {
            EXPECT_EQ(amax.count(module), 0u) << module;
            continue;
        }
        ASSERT_TRUE(amax.count(module)) << module;
        EXPECT_NEAR(amax.at(module), want, 1e-4f * want) << module;
        (module.find(".experts.") != std::string::npos ? experts : others)++;
    }
    EXPECT_GE(experts, 3 * 6);  // most of the 8 experts see a token of the 40
    EXPECT_EQ(others, 11);
}

}  // namespace
}  // namespace nibble
