// nibble quantize on NemotronH against tests/golden/nemotron_h_fixtures.py's torch export
// (nemotron_h_nvfp4_modelopt: ModelOpt's recipe in torch with its Nemotron-H exclusions: the attention layer,
// the Mamba layer before it, conv1d, embeddings and lm_head BF16; the router F32), and `nibble logits` on the
// result against the transformers logits of that export.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "quant_test_util.h"
#include "base/thread_pool.h"
#include "checkpoint/quant_config.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "quant/quantize.h"
#include "tensor/convert.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using namespace quant_test;

std::vector<float> floats(const TensorInfo& t) {
    std::vector<float> v(static_cast<size_t>(t.shape.numel()));
    decode_to_float(t.data, t.dtype, t.shape.numel(), v.data());
    return v;
}

QuantConfig quant_config_of(const fs::path& dir) {
    std::ifstream in(dir / "config.json");
    return load_quant_config(dir.string(), nlohmann::json::parse(in));
}

std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char c : s) {
        if (c == '\'')
            out += "'\\''";
        else
            out += c;
    }
    return out + "'";
}

class QuantizeNemotron : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        out_ = new TempDir("modelopt");
        ThreadPool pool(2);
        QuantizeOptions opt{.src_dir = (fixture("nemotron_h") / "model").string(), .dst_dir = out_->path.string(),
                            .progress = false};
        reports_ = quantize_checkpoint(opt, pool);
    }
    static void TearDownTestSuite() {
        delete out_;
        out_ = nullptr;
    }
    static inline TempDir* out_ = nullptr;
    static inline std::vector<TensorReport> reports_;
};

TEST_F(QuantizeNemotron, TensorsBitIdenticalToTorchModelOptExport) {
    Checkpoint ours(out_->path.string());
    Checkpoint ref((fixture("nemotron_h_nvfp4_modelopt") / "model").string());
    Checkpoint src((fixture("nemotron_h") / "model").string());
    ASSERT_EQ(ours.names(), ref.names());
    int quantized = 0;
    for (const auto& name : ref.names()) {
        const TensorInfo& o = ours.get(name);
        if (name.ends_with(".input_scale")) {  // calibrated in the export; the default without calibration here
            ASSERT_EQ(o.dtype, DType::F32) << name;
            EXPECT_EQ(floats(o)[0], kDefaultInputScale) << name;
            continue;
        }
        if (name.ends_with(".weight_scale_2")) ++quantized;
        if (name.ends_with("mixer.gate.weight")) {
            // The router: copied as the source stores it (BF16 here), the export holds the same values as F32.
            EXPECT_TRUE(same_bytes(o, src.get(name))) << name;
            EXPECT_EQ(ref.get(name).dtype, DType::F32) << name;
            EXPECT_EQ(floats(o), floats(ref.get(name))) << name;
            continue;
        }
        EXPECT_TRUE(same_bytes(o, ref.get(name))) << name;
    }
    // Layers 0 and 5 (Mamba): in/out_proj; layer 1 (MLP): up/down; layer 4 (MoE): 4 experts x up/down and the
    // shared expert's up/down. Layers 2 (Mamba before attention) and 3 (attention) stay BF16.
    EXPECT_EQ(quantized, 2 + 2 + 2 + 8 + 2);
    int n_nvfp4 = 0;
    for (const auto& r : reports_) n_nvfp4 += r.action == "nvfp4";
    EXPECT_EQ(n_nvfp4, quantized);
    for (const char* kept : {"backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.A_log",
                             "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.dt_bias",
                             "backbone.layers.2.mixer.in_proj.weight", "backbone.layers.3.mixer.q_proj.weight",
                             "backbone.layers.4.mixer.gate.e_score_correction_bias", "lm_head.weight"})
        EXPECT_TRUE(same_bytes(ours.get(kept), src.get(kept))) << kept;
}

TEST_F(QuantizeNemotron, ExclusionsMatchExportAndLoaderAccepts) {
    const QuantConfig qc = quant_config_of(out_->path);
    const QuantConfig ref_qc = quant_config_of(fixture("nemotron_h_nvfp4_modelopt") / "model");
    EXPECT_EQ(qc.method, ref_qc.method);
    std::ifstream in(out_->path / "hf_quant_config.json");
    const auto hf = nlohmann::json::parse(in);
    EXPECT_EQ(hf["quantization"]["quant_algo"], "NVFP4");
    ThreadPool pool(2);
    auto model = load_model(out_->path.string(), pool);
    int n_dense = 0, n_nvfp4 = 0;
    for (const LinearWeight* w : model->linear_weights()) {
        EXPECT_EQ(qc.is_excluded(w->name), ref_qc.is_excluded(w->name)) << w->name;
        EXPECT_EQ(w->format == WeightFormat::Dense, ref_qc.is_excluded(w->name)) << w->name;
        (w->format == WeightFormat::Nvfp4 ? n_nvfp4 : n_dense)++;
    }
    EXPECT_EQ(n_nvfp4, 16);
    EXPECT_EQ(n_dense, 2 + 4 + 1);  // layer 2's in/out_proj, layer 3's q/k/v/o, lm_head
}

TEST_F(QuantizeNemotron, LogitsMatchTransformersOnTheExport) {
    // The export's reference logits come from transformers with the dequantized weights, the same values our
    // export dequantizes to; tolerance as tests/golden/golden_test.cpp derives it.
    const fs::path ref_dir = fixture("nemotron_h_nvfp4_modelopt");
    SafetensorsFile expected((ref_dir / "expected.safetensors").string());
    const TensorInfo* tok = expected.find("tokens");
    const TensorInfo* lg = expected.find("logits");
    ASSERT_TRUE(tok && lg);
    const std::vector<float> ref = floats(*lg);
    const int64_t n = lg->shape[0], vocab = lg->shape[1];
    std::string tokens;
    for (int64_t i = 0; i < tok->shape.numel(); ++i) {
        int32_t t;
        std::memcpy(&t, static_cast<const uint8_t*>(tok->data) + i * 4, 4);
        if (i) tokens += ',';
        tokens += std::to_string(t);
    }
    const double gap = std::stod(expected.metadata().at("fp64_gap"));
    const double max_abs = std::stod(expected.metadata().at("max_abs_logit"));
    const double tol = std::max(8.0 * gap, 1e-5 * std::max(1.0, max_abs));

    const fs::path got_path = out_->path.parent_path() / (out_->path.filename().string() + "-logits.safetensors");
    const fs::path log = out_->path.parent_path() / (out_->path.filename().string() + "-logits.log");
    const std::string cmd = shell_quote(NIBBLE_BINARY) + " logits --model " + shell_quote(out_->path.string()) +
                            " --tokens " + tokens + " --out " + shell_quote(got_path.string()) + " > " +
                            shell_quote(log.string()) + " 2>&1";
    const int rc = std::system(cmd.c_str());
    std::ifstream log_in(log);
    std::stringstream log_text;
    log_text << log_in.rdbuf();
    fs::remove(log);
    ASSERT_EQ(rc, 0) << cmd << "\n" << log_text.str();
    std::vector<float> got;
    {
        SafetensorsFile got_file(got_path.string());
        const TensorInfo* g = got_file.find("logits");
        ASSERT_NE(g, nullptr);
        ASSERT_EQ(g->shape, (Shape{n, vocab}));
        got = floats(*g);
    }
    fs::remove(got_path);
    double max_diff = 0;
    for (size_t i = 0; i < got.size(); ++i) max_diff = std::max(max_diff, std::fabs(double(got[i]) - ref[i]));
    EXPECT_LE(max_diff, tol);
    for (int64_t i = 0; i < n; ++i) {
        const auto row = [&](const std::vector<float>& v) {
            return std::max_element(v.begin() + i * vocab, v.begin() + (i + 1) * vocab) - (v.begin() + i * vocab);
        };
        EXPECT_EQ(row(got), row(ref)) << "argmax at position " << i;
    }
}

TEST(QuantizeNemotronOptions, ArchitectureExclusionsCanBeTurnedOff) {
    TempDir out("all");
    ThreadPool pool(2);
    QuantizeOptions opt{.src_dir = (fixture("nemotron_h") / "model").string(), .dst_dir = out.path.string(),
                        .architecture_exclusions = false, .progress = false};
    quantize_checkpoint(opt, pool);
    Checkpoint ours(out.path.string());
    EXPECT_EQ(ours.get("backbone.layers.2.mixer.in_proj.weight").dtype, DType::U8);
    EXPECT_EQ(ours.get("backbone.layers.3.mixer.q_proj.weight").dtype, DType::U8);
    EXPECT_EQ(ours.get("lm_head.weight").dtype, DType::BF16);
}

}  // namespace
}  // namespace nibble
