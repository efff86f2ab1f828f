// `nibble tune --device-profile NAME --list` and `nibble plan --device-profile NAME` end to end on golden
// fixtures (no GPU needed): the listing names the profile and each variant's verdict; tuning a profile that
// is not here is refused; the plan's roofline accounts for every weight byte the memory plan counts.
#include <gtest/gtest.h>

#include "cli_test_util.h"

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace {

namespace fs = std::filesystem;

using Result = nibble::test::CommandResult;

Result run(const std::string& args) { return nibble::test::run_nibble(args); }

fs::path fixture(const std::string& name) { return nibble::test::fixture_model(name); }

TEST(TuneCommand, ListsVariantsForAProfile) {
    const Result r = run("tune " + fixture("qwen3_nvfp4_modelopt").string() + " --device-profile gb10 --list");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("[gb10]: compute capability 12.1, 48 SMs, shared memory 101376 B per block"), std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("gemv_nvfp4 ("), std::string::npos) << r.out;
    // GB10 runs sm_121a machine code only: a build configured with it lists the GEMVs as eligible, any other
    // build excludes them for that reason (a 90a-only development build, say).
    const size_t targets = r.out.find("build targets: ");
    ASSERT_NE(targets, std::string::npos) << r.out;
    const std::string target_line = r.out.substr(targets, r.out.find('\n', targets) - targets);
    if (target_line.find("121a") != std::string::npos) {
        EXPECT_NE(r.out.find("eligible  mma.nt1"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("eligible  cuda_core.mt1"), std::string::npos) << r.out;
    } else {
        EXPECT_NE(r.out.find("this build holds no code for compute capability 12.1"), std::string::npos) << r.out;
    }
    // head_dim 32: no attention kernel serves it, which the listing says rather than hides.
    EXPECT_NE(r.out.find("no registered variant serves these shapes"), std::string::npos) << r.out;
}

TEST(TuneCommand, RefusesToTuneAnAbsentProfileAndUnknownNames) {
    const std::string dir = fixture("qwen3_nvfp4_modelopt").string();
    Result r = run("tune " + dir + " --device-profile gb10");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("can only be listed (add --list)"), std::string::npos) << r.out;
    r = run("tune " + dir + " --device-profile a100 --list");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("'a100' is not a known profile (known: gb10, rtx5090, b200, h100, h200)"), std::string::npos)
        << r.out;
}

TEST(PlanCommand, RooflineOnAProfile) {
    const fs::path dir = fixture("qwen3_nvfp4_modelopt");
    const Result r = run("plan " + dir.string() + " --device-profile gb10 --json --max-model-len 128 --context-depth 100");
    ASSERT_EQ(r.rc, 0) << r.out;
    const nlohmann::json j = nlohmann::json::parse(r.out);
    ASSERT_TRUE(j.contains("roofline")) << r.out;
    const nlohmann::json& rf = j["roofline"];
    EXPECT_EQ(rf["device_profile"], "gb10");
    EXPECT_EQ(j["device"], "NVIDIA GB10 (DGX Spark)");
    EXPECT_EQ(rf["context_depth"], 100);
    int64_t sum = 0;
    for (const auto& [what, bytes] : rf["decode_bytes"].items()) sum += bytes.get<int64_t>();
    EXPECT_EQ(sum, rf["decode_bytes_per_token"].get<int64_t>());
    EXPECT_DOUBLE_EQ(rf["decode_tokens_per_s"].get<double>(), 273e9 / static_cast<double>(sum));
    // Every byte of the memory plan's weights is read per token, except the embedding (one row gathered).
    std::ifstream in(dir / "config.json");
    const nlohmann::json config = nlohmann::json::parse(in);
    const int64_t n_embd = config["hidden_size"], vocab = config["vocab_size"];
    const int64_t dense = 2;  // the fixture's BF16 (or F16) tensors
    const int64_t kv = rf["decode_bytes"]["KV cache at 100 tokens"].get<int64_t>();
    EXPECT_EQ(kv, 100 * j["kv_bytes_per_token"].get<int64_t>());
    // The plan (a device profile: the CUDA upload) keeps norms and biases F32, 2 bytes more a value than the
    // roofline's checkpoint dtype.
    const int64_t f32 = j["weights_bytes_by_format"].value("f32", int64_t{0});
    EXPECT_EQ(sum - kv - n_embd * dense + vocab * n_embd * dense + f32 / 2, j["weights_bytes"].get<int64_t>());
    EXPECT_GT(rf["prefill_tokens_per_s"].get<double>(), 0.0);

    const Result text = run("plan " + dir.string() + " --device-profile gb10 --max-model-len 128");
    ASSERT_EQ(text.rc, 0) << text.out;
    EXPECT_NE(text.out.find("roofline on NVIDIA GB10 (DGX Spark) [gb10]: 273 GB/s"), std::string::npos) << text.out;
    EXPECT_NE(text.out.find("decode, batch 1"), std::string::npos) << text.out;
    EXPECT_NE(text.out.find("lm_head"), std::string::npos) << text.out;
}

}  // namespace
