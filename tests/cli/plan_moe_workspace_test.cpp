// `nibble plan` for the CUDA backend (a --device-profile): the MoE workspace of the CUDA MoE forward as its own
// line and JSON field (memory_plan.h; the byte count is derived in tests/engine/memory_plan_cuda_forward_test.cpp).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "cli_test_util.h"

namespace {

constexpr int64_t kQwen3MoeWorkspace8192 = 738723360;  // Qwen3-30B-A3B, 8192 tokens x top-8

TEST(PlanCommandCuda, Qwen3MoeShowsItsMoeWorkspace) {
    const std::string args = "plan --synthetic qwen3-30b-a3b --device-profile h100 --max-model-len 8192 "
                             "--max-num-batched-tokens 8192";
    const auto j_run = nibble::test::run_nibble(args + " --json");
    ASSERT_EQ(j_run.rc, 0) << j_run.out;
    const nlohmann::json j = nlohmann::json::parse(j_run.out);
    EXPECT_EQ(j["moe_workspace_bytes"].get<int64_t>(), kQwen3MoeWorkspace8192);
    EXPECT_GT(j["gemm_scratch_bytes"].get<int64_t>(), 0);
    EXPECT_EQ(j["workspace_bytes"].get<int64_t>(),
              j["activation_bytes"].get<int64_t>() + j["logits_bytes"].get<int64_t>() +
                  j["attention_scratch_bytes"].get<int64_t>() + kQwen3MoeWorkspace8192 +
                  j["gemm_scratch_bytes"].get<int64_t>());

    const auto text = nibble::test::run_nibble(args);
    ASSERT_EQ(text.rc, 0) << text.out;
    EXPECT_NE(text.out.find("MoE workspace"), std::string::npos) << text.out;
    EXPECT_NE(text.out.find("704.50 MiB"), std::string::npos) << text.out;  // 738723360 / 2^20

    // A dense model has none.
    const auto dense = nibble::test::run_nibble("plan --synthetic llama3-8b --device-profile h100 --max-model-len 8192 --json");
    ASSERT_EQ(dense.rc, 0) << dense.out;
    EXPECT_EQ(nlohmann::json::parse(dense.out)["moe_workspace_bytes"].get<int64_t>(), 0);
}

}  // namespace
