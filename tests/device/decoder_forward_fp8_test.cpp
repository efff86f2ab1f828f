// The whole CUDA forward over FP8 weights (ModelOpt FP8: E4M3 linears with a per-tensor weight_scale) against
// the CPU reference, as decoder_forward_test.cpp compares the other formats (its header explains the
// tolerances): decode steps run gemv_fp8 (F32 activations: every step; BF16: steps of at most
// DecoderForward::kGemvMaxRows rows), the 112-row BF16 prefill the dequantize + cuBLASLt GEMM. The CPU computes
// with the same E4M3 codes dequantized in float32, so the weight format adds no error of its own: the
// tolerances are those of BF16 weights.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "decoder_forward_util.h"
#include "shared_qkv_scale.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

// src's BF16 checkpoint with every q/k/v/o/gate/up/down projection in FP8 as ModelOpt stores it: codes
// e4m3(w / s) with s = amax / 448 per tensor, weight_scale = s, input_scale 1 (unused by weight-only
// inference), hf_quant_config.json quant_algo FP8 with lm_head excluded.
fs::path to_fp8(const fs::path& src, const fs::path& dst) {
    fs::create_directories(dst);
    fs::copy_file(src / "config.json", dst / "config.json", fs::copy_options::overwrite_existing);
    std::ofstream(dst / "hf_quant_config.json") << nlohmann::json::parse(R"({
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": null, "exclude_modules": ["lm_head"]}})")
                                                       .dump(2);
    const Checkpoint ck(src.string());
    auto is_projection = [](const std::string& name) {
        return name.ends_with("_proj.weight") && name.find("layers.") != std::string::npos;
    };
    struct Fp8Tensor {
        std::string module;
        std::vector<uint8_t> codes;
        float scale = 1.0f;
        Shape shape;
    };
    std::vector<Fp8Tensor> fp8;
    std::vector<const TensorInfo*> dense;
    for (const std::string& name : ck.names()) {
        const TensorInfo& t = ck.get(name);
        if (!is_projection(name)) {
            dense.push_back(&t);
            continue;
        }
        EXPECT_EQ(t.dtype, DType::BF16) << name;
        const auto* bits = reinterpret_cast<const uint16_t*>(t.data);
        const size_t n = static_cast<size_t>(t.shape.numel());
        float amax = 0;
        for (size_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(bf16_to_float(bits[i])));
        Fp8Tensor f{name.substr(0, name.size() - std::string(".weight").size()), std::vector<uint8_t>(n),
                    amax / 448.0f, t.shape};
        for (size_t i = 0; i < n; ++i) f.codes[i] = e4m3_from_float(bf16_to_float(bits[i]) / f.scale);
        fp8.push_back(std::move(f));
    }
    // Widest dtypes first, so every tensor stays aligned to its element size.
    SafetensorsWriter w((dst / "model.safetensors").string());
    for (const Fp8Tensor& f : fp8) {
        w.declare(f.module + ".weight_scale", DType::F32, Shape{});
        w.declare(f.module + ".input_scale", DType::F32, Shape{});
    }
    for (const TensorInfo* t : dense) w.declare(t->name, t->dtype, t->shape);
    for (const Fp8Tensor& f : fp8) w.declare(f.module + ".weight", DType::F8_E4M3, f.shape);
    const float one = 1.0f;
    for (const Fp8Tensor& f : fp8) {
        w.write(f.module + ".weight_scale", &f.scale, 4);
        w.write(f.module + ".input_scale", &one, 4);
    }
    for (const TensorInfo* t : dense) w.write(t->name, t->data, t->nbytes);
    for (const Fp8Tensor& f : fp8) w.write(f.module + ".weight", f.codes.data(), f.codes.size());
    w.finish();
    return dst;
}

// The converted checkpoint loads as ModelOpt FP8 (host only: runs without a GPU too).
TEST(DecoderForwardFp8Checkpoint, LoadsAsModelOptFp8) {
    const fs::path root = fs::temp_directory_path() / ("nibble-fp8-ckpt-" + std::to_string(::getpid()));
    const fs::path m = to_fp8(test::write_checkpoint(root / "llama", {.head_dim = 128}, 10), root / "llama-fp8");
    {
        ThreadPool pool(0);
        const std::unique_ptr<Model> model = load_model(m.string(), pool);
        EXPECT_EQ(model->quant_config().method, QuantMethod::ModelOptFp8);
        const Checkpoint ck(m.string());
        const TensorInfo& q = ck.get("model.layers.0.self_attn.q_proj.weight");
        EXPECT_EQ(q.dtype, DType::F8_E4M3);
        EXPECT_EQ(ck.get("model.layers.1.mlp.down_proj.weight_scale").dtype, DType::F32);
        EXPECT_EQ(ck.get("lm_head.weight").dtype, DType::BF16);
    }
    fs::remove_all(root);
}

class DecoderForwardFp8Cuda : public ::testing::Test {
protected:
    void SetUp() override {
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
        root_ = fs::temp_directory_path() / ("nibble-forward-fp8-" + std::to_string(::getpid()));
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_;
};

// With q/k/v biases: gemv_fp8 adds them in its epilogue.
TEST_F(DecoderForwardFp8Cuda, LlamaFp8WeightsWithBias) {
    const fs::path m =
        to_fp8(test::write_checkpoint(root_ / "llama", {.bias = true, .head_dim = 128}, 11), root_ / "llama-fp8");
    test::compare_forward(m, DType::F32, KvDtype::Bf16, 2e-3, "llama fp8 / f32 act / bf16 kv");
    test::compare_forward(m, DType::BF16, KvDtype::Bf16, 6e-2, "llama fp8 / bf16 act / bf16 kv");
}

TEST_F(DecoderForwardFp8Cuda, Qwen3QkNormFp8Weights) {
    const fs::path m = to_fp8(
        test::write_checkpoint(root_ / "qwen3", {.arch = "Qwen3ForCausalLM", .qk_norm = true, .head_dim = 128}, 12),
        root_ / "qwen3-fp8");
    test::compare_forward(m, DType::F32, KvDtype::Fp8, 3e-2, "qwen3 fp8 / f32 act / fp8 kv");
}

// q, k and v with one per-tensor scale: the BF16 prefill runs them as one GEMM over their stacked
// dequantized copies, the three biases concatenated (fused), or as three GEMMs (fusion off).
TEST_F(DecoderForwardFp8Cuda, SharedScaleOneQkvGemm) {
    const fs::path shared =
        test::with_shared_qkv_amax(test::write_checkpoint(root_ / "llama", {.bias = true, .head_dim = 128}, 13),
                                   root_ / "llama-shared", 0.5f, test::fresh_seed());
    const fs::path m = to_fp8(shared, root_ / "llama-fp8");
    test::expect_qkv_prefill_fusion(m, true, "llama fp8 with biases, q/k/v one scale");
    test::compare_forward(m, DType::BF16, KvDtype::Bf16, 6e-2, "llama fp8 fused qkv gemm / bf16 act / bf16 kv");
    test::compare_forward(m, DType::BF16, KvDtype::Bf16, 6e-2, "llama fp8 fusion off / bf16 act / bf16 kv",
                          {.fused_gemv = false});
}

}  // namespace
}  // namespace nibble
