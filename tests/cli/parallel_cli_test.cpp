// The multi-GPU flags end to end: `nibble plan --tensor-parallel-size N` (and vLLM's -tp) prints the per-GPU
// plan of a golden fixture, weights against the rank's shards of the real checkpoint; an impossible N is
// refused naming what does not divide; `nibble serve -tp 2` refuses to start where it cannot run the split
// (--device cpu, the built-in model, a CPU-only build, a node without the GPUs) instead of serving on one device.
#include <gtest/gtest.h>

#include "cli_test_util.h"
#if defined(NIBBLE_HAVE_CUDA)
#include "cuda/device_info.h"
#endif

#include <array>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace {

namespace fs = std::filesystem;

using Result = nibble::test::CommandResult;

Result run(const std::string& args) { return nibble::test::run_nibble(args); }

std::string fixture(const std::string& name) { return nibble::test::fixture_model(name).string(); }

const std::string kPlanFlags = " --json --device-memory 1073741824 --max-model-len 128 --kv-cache-dtype bf16 "
                               "--max-num-seqs 8 --max-num-batched-tokens 512";

TEST(ParallelCli, PlanIsPerGpu) {
    // llama_gqa: 2 layers, hidden 64, 4 heads / 2 KV heads of 16, intermediate 128, vocab 512, BF16 weights.
    const Result one = run("plan " + fixture("llama_gqa") + kPlanFlags);
    const Result two = run("plan " + fixture("llama_gqa") + kPlanFlags + " --tensor-parallel-size 2");
    const Result two_short = run("plan " + fixture("llama_gqa") + kPlanFlags + " -tp 2");
    ASSERT_EQ(one.rc, 0) << one.out;
    ASSERT_EQ(two.rc, 0) << two.out;
    ASSERT_EQ(two_short.rc, 0) << two_short.out;
    const nlohmann::json j1 = nlohmann::json::parse(one.out), j2 = nlohmann::json::parse(two.out);
    EXPECT_EQ(nlohmann::json::parse(two_short.out), j2);
    EXPECT_EQ(j1["tensor_parallel_size"], 1);
    EXPECT_EQ(j2["tensor_parallel_size"], 2);
    EXPECT_EQ(j2["kv_heads_per_gpu"], 1);
    EXPECT_EQ(j2["model_weights_bytes"], j1["weights_bytes"]);
    // Per rank: half of embed and lm_head, half of every projection, norms (2 per layer + final) whole; BF16.
    const int64_t d = 64, layers = 2;
    const int64_t per_layer = 2 * d + (2 * 16) * d + 2 * (1 * 16) * d + d * (2 * 16) + 3 * 64 * d;
    EXPECT_EQ(j2["weights_bytes"].get<int64_t>(), 2 * (2 * 256 * d + layers * per_layer + d));
    // K and V, 2 layers, one KV head of 16 per GPU, bf16.
    EXPECT_EQ(j2["kv_bytes_per_token"].get<int64_t>(), 2 * 2 * 1 * 16 * 2);
    EXPECT_EQ(j1["kv_bytes_per_token"].get<int64_t>(), 2 * j2["kv_bytes_per_token"].get<int64_t>());

    const Result table = run("plan " + fixture("llama_gqa") + " --device-memory 1073741824 --max-model-len 128 -tp 2");
    ASSERT_EQ(table.rc, 0) << table.out;
    EXPECT_NE(table.out.find("tensor-parallel size 2 (1 node): every figure below is per GPU"), std::string::npos)
        << table.out;
    EXPECT_NE(table.out.find("1 KV heads per GPU"), std::string::npos) << table.out;
}

TEST(ParallelCli, ImpossibleSplitsAreRefused) {
    const Result three = run("plan " + fixture("llama_gqa") + kPlanFlags + " --tensor-parallel-size 3");
    EXPECT_EQ(three.rc, 1);
    EXPECT_NE(three.out.find("--tensor-parallel-size 3 cannot split LlamaForCausalLM: num_attention_heads 4"),
              std::string::npos)
        << three.out;
    const Result nodes = run("plan " + fixture("llama_gqa") + kPlanFlags + " -tp 2 --nnodes 4");
    EXPECT_EQ(nodes.rc, 1);
    EXPECT_NE(nodes.out.find("multiple of --nnodes 4"), std::string::npos) << nodes.out;
    // Qwen3-MoE splits its experts by id now; the hybrid NemotronH has no split.
    const Result hybrid = run("plan " + fixture("nemotron_h") + kPlanFlags + " -tp 2");
    EXPECT_EQ(hybrid.rc, 1);
    EXPECT_NE(hybrid.out.find("NemotronHForCausalLM has no tensor-parallel split"), std::string::npos) << hybrid.out;
}

TEST(ParallelCli, ServeRefusesTensorParallelWhereItCannotRunItInsteadOfRunningOneGpu) {
    // The CPU backend has no tensor parallelism, in any build.
    const Result cpu = run("serve " + fixture("llama_gqa") + " --port 0 -tp 2 --device cpu");
    EXPECT_EQ(cpu.rc, 1);
    EXPECT_NE(cpu.out.find("--tensor-parallel-size 2 with --device cpu: the CPU backend has no tensor parallelism"),
              std::string::npos)
        << cpu.out;
    EXPECT_EQ(cpu.out.find("serving"), std::string::npos) << cpu.out;
    // Nor does the built-in tiny model (served on one device only).
    const Result tiny = run("serve --port 0 -tp 2");
    EXPECT_EQ(tiny.rc, 1);
    EXPECT_NE(tiny.out.find("give a MODEL_DIR"), std::string::npos) << tiny.out;
    // The flag nibble serve passes to the processes it starts is not for size 1.
    const Result hidden = run("serve " + fixture("llama_gqa") + " --port 0 --tp-local-rank 1");
    EXPECT_EQ(hidden.rc, 1);
    EXPECT_NE(hidden.out.find("--tp-local-rank"), std::string::npos) << hidden.out;

#if defined(NIBBLE_HAVE_CUDA)
    // A CUDA build refuses when this node lacks the GPUs (CI machines have none); with two it would serve
    // (scripts/tp-serve-check.sh checks that on a 2-GPU machine).
    if (nibble::cuda::device_count() >= 2) GTEST_SKIP() << "this machine has 2 GPUs: nibble serve -tp 2 would serve";
#endif
    const Result r = run("serve " + fixture("llama_gqa") + " --port 0 -tp 2");
    EXPECT_EQ(r.rc, 1);
    EXPECT_EQ(r.out.find("serving"), std::string::npos) << r.out;
#if defined(NIBBLE_HAVE_CUDA)
    EXPECT_NE(r.out.find("needs 2 GPUs on this node; it has"), std::string::npos) << r.out;
#else
    EXPECT_NE(r.out.find("--tensor-parallel-size 2 (--nnodes 1): tensor parallelism runs on the CUDA backend"),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("this build has none"), std::string::npos) << r.out;
#endif
}

}  // namespace
