// Golden tests: `nibble logits` (the CPU reference forward) against the logits Hugging Face transformers
// computed for tiny random-weight checkpoints. Each fixture is a folder tests/golden/fixtures/<case>/ made by
// tests/golden/make_fixtures.py (README.md beside this file says how): model/ (a Hugging Face folder:
// config.json, model.safetensors, hf_quant_config.json where relevant) and expected.safetensors holding
// tokens I32 [n] and logits F32 [n, vocab] with __metadata__ fp64_gap, max_abs_logit and min_top2_margin.
//
// Tolerance, per fixture:  tol = max(8 * fp64_gap, 1e-5 * max(1, max|reference logit|)).
// Why: both sides compute in float32 from the same float32 weights (stored BF16/F16/F32 values widen
// exactly; quantized weights are e2m1 * e4m3 (exact) times one float32 scale, so at most one rounding
// apart), so the logits differ only by float32 rounding: summation order, fused multiply-adds, and the
// exp/rsqrt/sin/cos implementations. fp64_gap is max |transformers float32 - the same forward in float64|
// over the fixture: the reference's own rounding error, measured. An independent float32 forward has an
// error of the same order, and the two add (|ours - ref| <= |ours - exact| + |ref - exact|); the factor 8
// leaves room for ours being up to ~7x noisier (sequential dot products, whose error grows like K*eps rather
// than the sqrt(K)*eps of blocked sums; K <= 128 here). The floor, about 170 float32 ulps of the largest
// logit, keeps a fixture whose measured gap came out small by chance from failing on noise.
// Measured gaps are 1e-6 .. 4.4e-6 on logits of magnitude up to ~2.8, so tol is ~2.5e-5 .. 3.5e-5.
// What that still catches: a misread rms_norm_eps (1e-5 vs 1e-6) moves layer 0's normalisation by ~0.2%
// (the fixtures' embeddings have rms 0.05 so eps matters) and the logits by ~1e-3; a wrong RoPE frequency,
// head_dim, bias, norm weight or scale moves them by far more.
//
// Each fixture runs three ways: the whole sequence in one prefill, one token per step (pure decode through
// the paged KV cache, blocks of 16), and chunks of 7 (prefill continuing over cached blocks).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "golden_reference.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace {

namespace fs = std::filesystem;
using nibble::DType;
using nibble::SafetensorsFile;
using nibble::TensorInfo;

// The fixtures (golden_reference.h; GoldenFixtures.EveryFolderIsACase keeps the list and the folders equal).
using nibble::golden::kCases;
const std::vector<int> kChunks = {0, 1, 7};  // 0: the whole sequence at once

fs::path fixtures_dir() { return fs::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures"; }

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

std::string read_text(const fs::path& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::vector<float> read_f32(const TensorInfo& t) {
    std::vector<float> v(static_cast<size_t>(t.shape.numel()));
    std::memcpy(v.data(), t.data, v.size() * sizeof(float));
    return v;
}

using nibble::golden::load_reference;
using nibble::golden::Reference;

std::string token_list(const std::vector<int32_t>& tokens) {
    std::string s;
    for (size_t i = 0; i < tokens.size(); ++i) {
        if (i) s += ',';
        s += std::to_string(tokens[i]);
    }
    return s;
}

size_t argmax_row(const float* row, int64_t vocab) {
    return static_cast<size_t>(std::max_element(row, row + vocab) - row);
}

TEST(GoldenFixtures, EveryFolderIsACase) {
    std::vector<std::string> folders;
    for (const auto& entry : fs::directory_iterator(fixtures_dir()))
        if (entry.is_directory()) folders.push_back(entry.path().filename().string());
    std::sort(folders.begin(), folders.end());
    std::vector<std::string> cases = kCases;
    std::sort(cases.begin(), cases.end());
    EXPECT_EQ(folders, cases)
        << "tests/golden/fixtures and kCases in golden_reference.h must name the same cases";
    for (const auto& name : cases)
        for (const char* file : {"model/config.json", "model/model.safetensors", "expected.safetensors"})
            EXPECT_TRUE(fs::is_regular_file(fixtures_dir() / name / file)) << name << " lacks " << file;
}

// Strict argmax equality below is only meaningful where no position is a near-tie within tolerance.
TEST(GoldenFixtures, TopTwoMarginsExceedTolerance) {
    for (const auto& name : kCases) {
        const Reference ref = load_reference(fixtures_dir() / name);
        EXPECT_GT(ref.min_top2_margin, 2 * ref.tol) << name;
        for (int64_t i = 0; i < ref.n; ++i) {
            std::vector<float> row(ref.logits.begin() + i * ref.vocab,
                                   ref.logits.begin() + (i + 1) * ref.vocab);
            std::partial_sort(row.begin(), row.begin() + 2, row.end(), std::greater<float>());
            EXPECT_GE(row[0] - row[1], ref.min_top2_margin * (1 - 1e-6)) << name << " position " << i;
        }
    }
}

class GoldenLogits : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(GoldenLogits, MatchTransformers) {
    const auto& [name, chunk] = GetParam();
    const fs::path dir = fixtures_dir() / name;
    const Reference ref = load_reference(dir);
    ASSERT_GT(ref.n, 0);

    const std::string tag = "golden_" + name + "_chunk" + std::to_string(chunk);
    const fs::path out = fs::path(::testing::TempDir()) / (tag + ".safetensors");
    const fs::path log = fs::path(::testing::TempDir()) / (tag + ".log");
    fs::remove(out);
    const std::string cmd = shell_quote(NIBBLE_BINARY) + " logits --model " +
                            shell_quote((dir / "model").string()) + " --tokens " + token_list(ref.tokens) +
                            " --chunk " + std::to_string(chunk) + " --out " + shell_quote(out.string()) +
                            " > " + shell_quote(log.string()) + " 2>&1";
    const int rc = std::system(cmd.c_str());
    ASSERT_EQ(rc, 0) << cmd << "\n" << read_text(log);

    SafetensorsFile got_file(out.string());
    const TensorInfo* got_info = got_file.find("logits");
    ASSERT_NE(got_info, nullptr) << out << " has no tensor logits";
    ASSERT_EQ(got_info->dtype, DType::F32);
    ASSERT_EQ(got_info->shape, (nibble::Shape{ref.n, ref.vocab}));
    const std::vector<float> got = read_f32(*got_info);

    double max_diff = 0;
    int64_t worst = 0;
    for (int64_t i = 0; i < ref.n * ref.vocab; ++i) {
        const float g = got[static_cast<size_t>(i)];
        ASSERT_TRUE(std::isfinite(g)) << "logit " << i / ref.vocab << "," << i % ref.vocab << " is " << g;
        const double d = std::fabs(static_cast<double>(g) - ref.logits[static_cast<size_t>(i)]);
        if (d > max_diff) {
            max_diff = d;
            worst = i;
        }
    }
    for (int64_t i = 0; i < ref.n; ++i)
        EXPECT_EQ(argmax_row(got.data() + i * ref.vocab, ref.vocab),
                  argmax_row(ref.logits.data() + i * ref.vocab, ref.vocab))
            << "argmax at position " << i;
    EXPECT_LE(max_diff, ref.tol) << "worst at position " << worst / ref.vocab << ", token "
                                 << worst % ref.vocab << ": got " << got[static_cast<size_t>(worst)]
                                 << ", transformers " << ref.logits[static_cast<size_t>(worst)];
    std::ostringstream diff_text, tol_text;
    diff_text << std::setprecision(3) << max_diff;
    tol_text << std::setprecision(3) << ref.tol;
    RecordProperty("max_abs_diff", diff_text.str());
    RecordProperty("tolerance", tol_text.str());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenLogits,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::ValuesIn(kChunks)),
                         [](const auto& info) {
                             return std::get<0>(info.param) + "_chunk" +
                                    std::to_string(std::get<1>(info.param));
                         });

// KV cache formats: the same fixtures through `nibble logits --kv-cache-dtype bf16|fp8|nvfp4` (no fixture
// has k_scale/v_scale, so the per-layer scale is the default 1.0). Storing K and V in a format perturbs each
// cached value by up to the format's relative error u (BF16: unit roundoff 2^-8; FP8 E4M3: 2^-4 in its
// normal range; NVFP4: E2M1's half-gap of up to one group-scale step, i.e. up to (1 + 2^-4) / 6 of the
// group's largest value, ~0.18); attention and the layers after it carry that perturbation to the logits.
// Tolerance: tol + gain * u * max(1, max|logit|). The gain was measured on these fixtures: the worst
// max|diff| / (u * max(1, max|logit|)) over the llama-family and Nemotron-H cases and both chunkings came out
// 1.75 for BF16, 1.72 for FP8 and 2.61 for NVFP4 (nemotron_h_nvfp4_modelopt; the llama family's worst 1.75):
// the logit error tracks u closely in all three formats. gain = 5, about twice the worst. For NVFP4 that is
// loose (about 0.9 x max|logit|): it catches a broken cache (garbage, zeros, NaN), not a subtle error; the precise checks are tests/ops/kv_cache_test.cpp
// (byte layout, attention equal to attention over the dequantized values) and, here, that one-token-per-step
// decode and one whole prefill agree to float rounding (tol) over the same quantized cache. Each run must
// also differ from the exact cache by more than tol (the format is really applied), and keep the argmax where
// the reference's top-2 margin exceeds twice the tolerance (a near-tie the format may flip is skipped).
// MoE fixtures are held to all of that except the tolerance and the argmax: top-k routing is discontinuous,
// so a perturbation as small as BF16's switches an expert for some token and moves the logits by a step
// unrelated to u (measured: qwen3_moe_nvfp4_modelopt 0.19 and qwen2_moe 0.14 with a BF16 cache, gains 18.8
// and 13.2, about the same absolute jump as with FP8).
struct KvDtypeCase {
    std::string name;
    double u;     // the format's relative error, as above
    double gain;  // measured worst gain x ~2 (above)
};
const std::vector<KvDtypeCase> kKvDtypes = {
    {"bf16", 0x1p-8, 5.0}, {"fp8", 0x1p-4, 5.0}, {"nvfp4", (1 + 0x1p-4) / 6, 5.0}};

class GoldenKvDtype : public ::testing::TestWithParam<std::tuple<std::string, KvDtypeCase, int>> {};

TEST_P(GoldenKvDtype, StayWithinFormatTolerance) {
    const auto& [name, kv, chunk] = GetParam();
    const fs::path dir = fixtures_dir() / name;
    const Reference ref = load_reference(dir);
    ASSERT_GT(ref.n, 0);
    double max_abs = 0;
    for (float x : ref.logits) max_abs = std::max(max_abs, std::fabs(static_cast<double>(x)));
    const double tol = ref.tol + kv.gain * kv.u * std::max(1.0, max_abs);

    auto run = [&](int chunk_size) -> std::vector<float> {
        // Named by this test's own case too: the chunked case also runs chunk 0, which must not share (and
        // remove) the file of the chunk-0 case running beside it under ctest -j.
        const std::string tag = "golden_kv_" + name + "_" + kv.name + "_case" + std::to_string(chunk) + "_chunk" +
                                std::to_string(chunk_size);
        const fs::path out = fs::path(::testing::TempDir()) / (tag + ".safetensors");
        const fs::path log = fs::path(::testing::TempDir()) / (tag + ".log");
        fs::remove(out);
        const std::string cmd = shell_quote(NIBBLE_BINARY) + " logits --model " +
                                shell_quote((dir / "model").string()) + " --tokens " + token_list(ref.tokens) +
                                " --chunk " + std::to_string(chunk_size) + " --kv-cache-dtype " + kv.name +
                                " --out " + shell_quote(out.string()) + " > " + shell_quote(log.string()) + " 2>&1";
        const int rc = std::system(cmd.c_str());
        EXPECT_EQ(rc, 0) << cmd << "\n" << read_text(log);
        if (rc != 0) return {};
        SafetensorsFile got_file(out.string());
        const TensorInfo* got_info = got_file.find("logits");
        EXPECT_NE(got_info, nullptr) << out << " has no tensor logits";
        if (got_info == nullptr || got_info->shape != nibble::Shape{ref.n, ref.vocab}) return {};
        return read_f32(*got_info);
    };
    const std::vector<float> got = run(chunk);
    ASSERT_EQ(got.size(), ref.logits.size());
    if (chunk != 0) {
        const std::vector<float> prefill = run(0);
        ASSERT_EQ(prefill.size(), got.size());
        double chunk_diff = 0;
        for (size_t i = 0; i < got.size(); ++i)
            chunk_diff = std::max(chunk_diff, std::fabs(static_cast<double>(got[i]) - prefill[i]));
        EXPECT_LE(chunk_diff, ref.tol) << "decode through the quantized cache differs from one prefill";
    }

    double max_diff = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_TRUE(std::isfinite(got[i])) << "logit " << i;
        max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[i]) - ref.logits[i]));
    }
    const bool routed = name.find("moe") != std::string::npos;  // see above
    if (!routed) {
        EXPECT_LE(max_diff, tol) << "gain " << max_diff / (kv.u * std::max(1.0, max_abs));
    }
    EXPECT_GT(max_diff, ref.tol) << "a quantized KV cache must differ from the exact one by more than rounding";
    int checked = 0;
    for (int64_t i = 0; i < ref.n; ++i) {
        std::vector<float> row(ref.logits.begin() + i * ref.vocab, ref.logits.begin() + (i + 1) * ref.vocab);
        std::partial_sort(row.begin(), row.begin() + 2, row.end(), std::greater<float>());
        if (routed || row[0] - row[1] <= 2 * tol) continue;  // a near-tie the format may legitimately flip
        ++checked;
        EXPECT_EQ(argmax_row(got.data() + i * ref.vocab, ref.vocab),
                  argmax_row(ref.logits.data() + i * ref.vocab, ref.vocab))
            << "argmax at position " << i;
    }
    std::ostringstream gain;
    gain << std::setprecision(3) << max_diff / (kv.u * std::max(1.0, max_abs));
    RecordProperty("gain", gain.str());
    RecordProperty("top1_positions_checked", checked);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenKvDtype,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::ValuesIn(kKvDtypes),
                                            ::testing::Values(0, 1)),
                         [](const auto& info) {
                             return std::get<0>(info.param) + "_" + std::get<1>(info.param).name + "_chunk" +
                                    std::to_string(std::get<2>(info.param));
                         });

// dequantized.safetensors holds layer 0's q_proj and down_proj (and, for MoE, experts.0.down_proj) dequantized to float32 by the generator's
// torch code (torch's own float8 casts and table lookups). Our codecs must read model.safetensors to the same
// values: bit-identical for ModelOpt (same left-to-right float32 products), within 2 ulps for
// compressed-tensors (torch divides the block scale by the stored 2688/amax; we multiply by its reciprocal).
struct DequantCase {
    std::string name;
    enum { ModelOptNvfp4, CtNvfp4, ModelOptFp8 } kind;
};

class GoldenDequant : public ::testing::TestWithParam<DequantCase> {};

float scalar_f32(const TensorInfo& t) {
    EXPECT_EQ(t.dtype, DType::F32) << t.name;
    EXPECT_EQ(t.shape.numel(), 1) << t.name;
    float v = 0;
    std::memcpy(&v, t.data, sizeof v);
    return v;
}

TEST_P(GoldenDequant, CodecsMatchTorch) {
    const DequantCase& c = GetParam();
    const fs::path dir = fixtures_dir() / c.name;
    SafetensorsFile model((dir / "model" / "model.safetensors").string());
    SafetensorsFile reference((dir / "dequantized.safetensors").string());
    ASSERT_GE(reference.tensors().size(), 2u);
    for (const TensorInfo& want : reference.tensors()) {
        ASSERT_EQ(want.dtype, DType::F32);
        ASSERT_EQ(want.shape.ndim, 2);
        const int64_t n = want.shape[0], k = want.shape[1];
        const std::string module = want.name.substr(0, want.name.size() - std::string(".weight").size());
        auto get = [&](const std::string& suffix) -> const TensorInfo& {
            const TensorInfo* t = model.find(module + "." + suffix);
            if (!t) throw std::runtime_error(module + "." + suffix + " missing in " + model.path());
            return *t;
        };
        std::vector<float> got(static_cast<size_t>(n * k));
        if (c.kind == DequantCase::ModelOptFp8) {
            const TensorInfo& w = get("weight");
            ASSERT_EQ(w.dtype, DType::F8_E4M3);
            ASSERT_EQ(w.shape, (nibble::Shape{n, k}));
            const float scale = scalar_f32(get("weight_scale"));
            for (int64_t i = 0; i < n * k; ++i)
                got[static_cast<size_t>(i)] = nibble::e4m3_to_float(w.data[i]) * scale;
        } else {
            const bool ct = c.kind == DequantCase::CtNvfp4;
            const TensorInfo& packed = get(ct ? "weight_packed" : "weight");
            const TensorInfo& scales = get("weight_scale");
            ASSERT_EQ(packed.dtype, DType::U8);
            ASSERT_EQ(packed.shape, (nibble::Shape{n, k / 2}));
            ASSERT_EQ(scales.dtype, DType::F8_E4M3);
            ASSERT_EQ(scales.shape, (nibble::Shape{n, k / nibble::kNvfp4BlockSize}));
            const float global =
                ct ? 1.0f / scalar_f32(get("weight_global_scale")) : scalar_f32(get("weight_scale_2"));
            const int64_t n_blocks = k / nibble::kNvfp4BlockSize;
            for (int64_t r = 0; r < n; ++r)
                nibble::nvfp4_dequantize_row(packed.data + r * (k / 2), scales.data + r * n_blocks, k, global,
                                             got.data() + r * k);
        }
        const std::vector<float> expect = read_f32(want);
        for (int64_t i = 0; i < n * k; ++i) {
            const float g = got[static_cast<size_t>(i)], e = expect[static_cast<size_t>(i)];
            const float allowed = c.kind == DequantCase::CtNvfp4 ? 2 * std::fabs(e) * 0x1p-23f : 0.0f;
            ASSERT_LE(std::fabs(g - e), allowed) << want.name << " element " << i / k << "," << i % k;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenDequant,
                         ::testing::Values(DequantCase{"qwen3_nvfp4_modelopt", DequantCase::ModelOptNvfp4},
                                           DequantCase{"qwen3_moe_nvfp4_modelopt", DequantCase::ModelOptNvfp4},
                                           DequantCase{"nemotron_h_nvfp4_modelopt", DequantCase::ModelOptNvfp4},
                                           DequantCase{"llama_nvfp4_ct", DequantCase::CtNvfp4},
                                           DequantCase{"llama_fp8_modelopt", DequantCase::ModelOptFp8}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
