// A golden fixture's reference as tests/golden/make_fixtures.py wrote it (expected.safetensors: tokens I32 [n],
// transformers' logits F32 [n, vocab], __metadata__ fp64_gap, max_abs_logit, min_top2_margin), the list of
// fixtures, and the tolerance golden_test.cpp derives (its header comment says why). Shared by the CPU golden
// tests and the device tests that run the same fixtures on CUDA.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"

namespace nibble::golden {

// Every fixture folder under tests/golden/fixtures (GoldenFixtures.EveryFolderIsACase keeps them equal).
inline const std::vector<std::string> kCases = {
    "llama_gqa",          "llama3_rope_tied", "llama_attn_bias",      "mistral",
    "qwen2_bias",         "qwen3_qknorm",     "qwen3_nvfp4_modelopt", "llama_nvfp4_ct",
    "llama_fp8_modelopt", "nemotron_h",       "nemotron_h_nvfp4_modelopt",
    "qwen3_moe",          "qwen3_moe_nvfp4_modelopt", "qwen2_moe",
};

struct Reference {
    std::vector<int32_t> tokens;
    std::vector<float> logits;  // [n, vocab]
    int64_t n = 0, vocab = 0;
    double tol = 0, max_abs = 0, min_top2_margin = 0;
};

inline double metadata_number(const SafetensorsFile& file, const std::string& key) {
    auto it = file.metadata().find(key);
    if (it == file.metadata().end()) {
        ADD_FAILURE() << file.path() << ": __metadata__ has no " << key;
        return NAN;
    }
    return std::stod(it->second);
}

// The fixture in `dir`; a malformed file adds test failures naming it and returns what could be read.
inline Reference load_reference(const std::filesystem::path& dir) {
    Reference ref;
    SafetensorsFile expected((dir / "expected.safetensors").string());
    const TensorInfo* tokens = expected.find("tokens");
    const TensorInfo* logits = expected.find("logits");
    EXPECT_TRUE(tokens && logits) << expected.path() << ": needs tensors tokens and logits";
    if (!tokens || !logits) return ref;
    EXPECT_EQ(tokens->dtype, DType::I32);
    EXPECT_EQ(tokens->shape.ndim, 1);
    EXPECT_EQ(logits->dtype, DType::F32);
    EXPECT_EQ(logits->shape.ndim, 2);
    if (tokens->dtype != DType::I32 || logits->dtype != DType::F32 || logits->shape.ndim != 2) return ref;
    ref.n = logits->shape[0];
    ref.vocab = logits->shape[1];
    EXPECT_EQ(tokens->shape.numel(), ref.n);
    ref.tokens.resize(static_cast<size_t>(tokens->shape.numel()));
    std::memcpy(ref.tokens.data(), tokens->data, ref.tokens.size() * sizeof(int32_t));
    ref.logits.resize(static_cast<size_t>(ref.n * ref.vocab));
    std::memcpy(ref.logits.data(), logits->data, ref.logits.size() * sizeof(float));
    const double gap = metadata_number(expected, "fp64_gap");
    ref.max_abs = metadata_number(expected, "max_abs_logit");
    ref.min_top2_margin = metadata_number(expected, "min_top2_margin");
    ref.tol = std::max(8.0 * gap, 1e-5 * std::max(1.0, ref.max_abs));
    return ref;
}

}  // namespace nibble::golden
