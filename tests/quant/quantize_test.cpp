// nibble quantize against NVFP4 checkpoints made independently by tests/golden/make_fixtures.py with
// PyTorch (ModelOpt's recipe written in torch, compressed-tensors' layout), and calibration against
// transformers' own forward hooks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

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

// Codes of two quantized tensors (E2M1 nibbles or E4M3 bytes) equal but for rare neighbours.
void expect_codes_close(const TensorInfo& a, const TensorInfo& b, bool nibbles) {
    ASSERT_EQ(a.shape, b.shape) << a.name;
    ASSERT_EQ(a.dtype, b.dtype) << a.name;
    const size_t n = nibbles ? a.nbytes * 2 : a.nbytes;
    size_t differing = 0;
    for (size_t i = 0; i < n; ++i) {
        const int ca = nibbles ? (a.data[i / 2] >> (4 * (i % 2))) & 0xf : a.data[i];
        const int cb = nibbles ? (b.data[i / 2] >> (4 * (i % 2))) & 0xf : b.data[i];
        if (ca == cb) continue;
        ++differing;
        const int sign = nibbles ? 8 : 0x80;
        EXPECT_EQ(ca & sign, cb & sign) << a.name << " element " << i << ": sign differs";
        EXPECT_EQ(std::abs((ca & (sign - 1)) - (cb & (sign - 1))), 1) << a.name << " element " << i;
    }
    EXPECT_LE(differing, std::max<size_t>(2, n / 50)) << a.name;
}

std::vector<int32_t> fixture_tokens(const std::string& name) {
    SafetensorsFile f((fixture(name) / "expected.safetensors").string());
    const TensorInfo* t = f.find("tokens");
    EXPECT_NE(t, nullptr);
    std::vector<int32_t> ids(static_cast<size_t>(t->shape.numel()));
    std::memcpy(ids.data(), t->data, ids.size() * 4);
    return ids;
}

TEST(Quantize, ModelOptLayoutIsBitIdenticalToTorchRecipe) {
    TempDir out;
    ThreadPool pool(2);
    // The torch recipe gives every tensor its own global scale; the default's shared ones for q/k/v and
    // gate/up are checked against this output in quantize_fusion_groups_test.cpp.
    QuantizeOptions opt{.src_dir = (fixture("qwen3_qknorm") / "model").string(),
                        .dst_dir = out.path.string(),
                        .fusion_group_global_scales = false,
                        .progress = false};
    const auto reports = quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    Checkpoint ref((fixture("qwen3_nvfp4_modelopt") / "model").string());
    ASSERT_EQ(ours.names(), ref.names());
    int n_scales = 0;
    for (const auto& name : ref.names()) {
        if (name.ends_with(".input_scale")) {
            // No calibration: the documented default.
            EXPECT_EQ(read_scalar(ours, name), kDefaultInputScale) << name;
            EXPECT_EQ(ours.get(name).shape.ndim, 0) << name;  // ModelOpt writes 0-d scalars
            ++n_scales;
            continue;
        }
        EXPECT_TRUE(same_bytes(ours.get(name), ref.get(name))) << name;
    }
    EXPECT_EQ(n_scales, 14);
    int quantized = 0;
    for (const auto& r : reports)
        if (r.action == "nvfp4") {
            ++quantized;
            // E2M1 with E4M3 block scales on Gaussian weights: relative RMS error about 0.09-0.10.
            EXPECT_GT(r.rel_rms_error, 0.05) << r.name;
            EXPECT_LT(r.rel_rms_error, 0.15) << r.name;
        }
    EXPECT_EQ(quantized, 14);  // 2 layers x 7 linears; tied lm_head is the embedding, never quantized

    // Config entries: what nibble itself (and vLLM) reads back.
    std::ifstream in(out.path / "config.json");
    const auto config = nlohmann::json::parse(in);
    const QuantConfig qc = load_quant_config(out.path.string(), config);
    EXPECT_EQ(qc.method, QuantMethod::ModelOptNvfp4);
    EXPECT_EQ(qc.group_size, 16);
    EXPECT_TRUE(fs::exists(out.path / "hf_quant_config.json"));
}

TEST(Quantize, CompressedTensorsLayoutMatchesLlmCompressorNames) {
    TempDir out;
    ThreadPool pool(2);
    QuantizeOptions opt{.src_dir = (fixture("llama_gqa") / "model").string(),
                        .dst_dir = out.path.string(),
                        .layout = QuantLayout::CompressedTensors,
                        .fusion_group_global_scales = false,  // as the torch fixture: one per tensor
                        .progress = false};
    quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    Checkpoint ref((fixture("llama_nvfp4_ct") / "model").string());
    ASSERT_EQ(ours.names(), ref.names());
    for (const auto& name : ref.names()) {
        if (name.ends_with(".input_global_scale")) {
            EXPECT_EQ(read_scalar(ours, name), 1.0f / kDefaultInputScale) << name;
        } else if (name.ends_with(".weight_global_scale")) {
            // The reciprocal of ModelOpt's amax/2688, against torch's 2688/amax: one rounding apart.
            EXPECT_NEAR(read_scalar(ours, name), read_scalar(ref, name), 2e-7f * read_scalar(ref, name)) << name;
            EXPECT_EQ(ours.get(name).shape, ref.get(name).shape) << name;
        } else if (name.ends_with(".weight_packed") || name.ends_with(".weight_scale")) {
            // nibble applies ModelOpt's arithmetic in both layouts (block scale e4m3(amax_b / (6 * g)),
            // element x / (scale * g), g = amax/2688); llm-compressor computes e4m3(amax_b / 6 * G) and
            // x / (scale / G) with G = 2688/amax. The roundings differ in the last bit, which moves a value
            // across a rounding boundary only when it sits within an ulp of one: a few codes per tensor,
            // each to the neighbouring code.
            expect_codes_close(ours.get(name), ref.get(name), name.ends_with(".weight_packed"));
        } else {
            EXPECT_TRUE(same_bytes(ours.get(name), ref.get(name))) << name;
        }
    }
    std::ifstream in(out.path / "config.json");
    const QuantConfig qc = load_quant_config(out.path.string(), nlohmann::json::parse(in));
    EXPECT_EQ(qc.method, QuantMethod::CompressedTensorsNvfp4);
    EXPECT_TRUE(qc.is_excluded("lm_head"));
    EXPECT_FALSE(qc.is_excluded("model.layers.0.mlp.up_proj"));
}

TEST(Quantize, CalibrationMatchesTransformersForwardHooks) {
    // The fixture's input_scale values are amax(|input|)/2688 recorded by transformers forward pre-hooks
    // on its own token sequence, with the dequantized weights in place.
    ThreadPool pool(2);
    const std::string dir = (fixture("qwen3_nvfp4_modelopt") / "model").string();
    auto model = load_model(dir, pool);
    const auto amax = calibrate_input_amax(*model, {fixture_tokens("qwen3_nvfp4_modelopt")});
    Checkpoint ref(dir);
    int checked = 0;
    for (const auto& name : ref.names()) {
        if (!name.ends_with(".input_scale")) continue;
        const std::string module = name.substr(0, name.size() - std::strlen(".input_scale"));
        ASSERT_TRUE(amax.count(module)) << module;
        const float expected = read_scalar(ref, name) * 2688.0f;
        // Both are float32 forwards of the same weights: activations agree to ~1e-6 relative.
        EXPECT_NEAR(amax.at(module), expected, 1e-4f * expected) << module;
        ++checked;
    }
    EXPECT_EQ(checked, 14);
}

TEST(Quantize, CalibratedScalesAreWritten) {
    TempDir out;
    ThreadPool pool(2);
    QuantizeOptions opt{.src_dir = (fixture("qwen3_qknorm") / "model").string(), .dst_dir = out.path.string(),
                        .progress = false};
    opt.input_amax["model.layers.1.mlp.down_proj"] = 26.88f;
    quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    EXPECT_FLOAT_EQ(read_scalar(ours, "model.layers.1.mlp.down_proj.input_scale"), 0.01f);
    EXPECT_EQ(read_scalar(ours, "model.layers.0.mlp.down_proj.input_scale"), kDefaultInputScale);
}

TEST(Quantize, ExcludePatternsKeepModulesDense) {
    TempDir out;
    ThreadPool pool(2);
    QuantizeOptions opt{.src_dir = (fixture("llama_gqa") / "model").string(),
                        .dst_dir = out.path.string(),
                        .exclude = {"lm_head", "*.self_attn.*"},
                        .progress = false};
    quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    EXPECT_EQ(ours.get("model.layers.0.self_attn.q_proj.weight").dtype, DType::BF16);
    EXPECT_EQ(ours.get("model.layers.0.mlp.up_proj.weight").dtype, DType::U8);
    EXPECT_EQ(ours.get("lm_head.weight").dtype, DType::BF16);
    std::ifstream in(out.path / "config.json");
    const QuantConfig qc = load_quant_config(out.path.string(), nlohmann::json::parse(in));
    EXPECT_TRUE(qc.is_excluded("model.layers.1.self_attn.o_proj"));
    EXPECT_FALSE(qc.is_excluded("model.layers.1.mlp.down_proj"));
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
    try {
        f();
        ADD_FAILURE() << "expected an error";
    } catch (const std::exception& e) {
        for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
}

TEST(Quantize, RefusesBadRequests) {
    ThreadPool pool(1);
    TempDir out;
    expect_error([&] {
        quantize_checkpoint({.src_dir = (fixture("qwen3_nvfp4_modelopt") / "model").string(),
                             .dst_dir = out.path.string(), .progress = false}, pool);
    }, {"already quantized"});
    expect_error([&] {
        quantize_checkpoint({.src_dir = (fixture("llama_gqa") / "model").string(), .dst_dir = out.path.string(),
                             .exclude = {"*.nothing_matches"}, .progress = false}, pool);
    }, {"*.nothing_matches", "matches no linear module"});
}

}  // namespace
}  // namespace nibble
