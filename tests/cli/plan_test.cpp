// `nibble plan` end to end: the JSON object's keys and values on a golden fixture (weights against the bytes
// its safetensors file really holds), the human table, and the refusal of a plan that does not fit.
#include <gtest/gtest.h>

#include "cli_test_util.h"

#include <array>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/safetensors.h"

namespace {

namespace fs = std::filesystem;

using Result = nibble::test::CommandResult;

Result run(const std::string& args) { return nibble::test::run_nibble("plan " + args); }

fs::path fixture(const std::string& name) { return nibble::test::fixture_model(name); }

TEST(PlanCommand, JsonHasThePlanAndMatchesTheCheckpoint) {
    const fs::path dir = fixture("qwen3_nvfp4_modelopt");
    const Result r = run(dir.string() + " --json --device-memory 1073741824 --max-model-len 128 --kv-cache-dtype nvfp4 "
                                        "--max-num-seqs 8 --max-num-batched-tokens 512");
    ASSERT_EQ(r.rc, 0) << r.out;
    const nlohmann::json j = nlohmann::json::parse(r.out);
    for (const char* key : {"weights_bytes", "kv_bytes_per_token", "kv_tokens", "max_concurrency", "workspace_bytes",
                            "kv_blocks", "kv_cache_dtype", "device_memory", "weights_bytes_by_format"})
        EXPECT_TRUE(j.contains(key)) << key;
    const nibble::Checkpoint ckpt(dir.string());
    int64_t real = 0;
    for (const auto& name : ckpt.names()) real += static_cast<int64_t>(ckpt.get(name).nbytes);
    EXPECT_EQ(j["weights_bytes"].get<int64_t>(), real);
    EXPECT_EQ(j["kv_cache_dtype"], "nvfp4");
    // Qwen3 fixture: 2 layers, 2 KV heads of head_dim 32: K and V, 16 packed bytes + 2 scales per head row.
    EXPECT_EQ(j["kv_bytes_per_token"].get<int64_t>(), 2 * 2 * 2 * (16 + 2));
    const int64_t tokens = j["kv_tokens"].get<int64_t>();
    EXPECT_EQ(tokens, j["kv_blocks"].get<int64_t>() * 16);
    EXPECT_DOUBLE_EQ(j["max_concurrency"].get<double>(), static_cast<double>(tokens) / 128);
    // usable 0.9 GiB minus weights and workspace, in whole blocks of 16 tokens
    const int64_t budget = j["usable_memory"].get<int64_t>() - real - j["workspace_bytes"].get<int64_t>();
    EXPECT_EQ(j["kv_blocks"].get<int64_t>(), budget / (16 * 2 * 2 * 2 * (16 + 2)));
}

TEST(PlanCommand, HumanTableAndAutoDtype) {
    const Result r = run(fixture("llama_gqa").string() + " --device-memory 1073741824 --max-model-len 40");
    ASSERT_EQ(r.rc, 0) << r.out;
    for (const char* row : {"weights", "workspace", "KV per token", "KV cache", "KV tokens", "max concurrency"})
        EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing in\n" << r.out;
    EXPECT_NE(r.out.find("MiB"), std::string::npos) << r.out;
    // --device-memory means no GPU is planned for, so auto is the CPU reference's f32.
    EXPECT_NE(r.out.find("f32"), std::string::npos) << r.out;
}

TEST(PlanCommand, RefusesWhatDoesNotFit) {
    const Result small = run(fixture("llama_gqa").string() + " --device-memory 100000 --max-model-len 40");
    EXPECT_EQ(small.rc, 1);
    EXPECT_NE(small.out.find("does not fit"), std::string::npos) << small.out;
    EXPECT_NE(small.out.find(" by "), std::string::npos) << small.out;
    const Result dtype = run(fixture("llama_gqa").string() + " --device-memory 1073741824 --kv-cache-dtype fp8_e5m2");
    EXPECT_EQ(dtype.rc, 1);
    EXPECT_NE(dtype.out.find("fp8_e5m2"), std::string::npos) << dtype.out;
}

}  // namespace
