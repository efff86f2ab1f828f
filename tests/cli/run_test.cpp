// `nibble run` end to end on golden fixture models: greedy text equals the greedy continuation computed by
// recomputing the whole sequence with Model::forward at every step (no KV cache reuse: an independent
// path), a seed reproduces its text, and bad flags are refused by name.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <memory>
#include <string>

#include "base/thread_pool.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace nibble {
namespace {

std::string fixture(const std::string& name) {
    return std::string(NIBBLE_SOURCE_DIR) + "/tests/golden/fixtures/" + name + "/model";
}

struct CommandResult {
    int status;
    std::string out;
};

CommandResult run_command(const std::string& args) {
    const std::string cmd = std::string(NIBBLE_BINARY) + " " + args + " 2>&1";
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
    std::string out;
    std::array<char, 4096> buf{};
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), pipe.get())) > 0) out.append(buf.data(), n);
    const int status = pclose(pipe.release());
    return {status, out};
}

std::string stdout_only(const std::string& args) {
    const std::string cmd = std::string(NIBBLE_BINARY) + " " + args + " 2>/dev/null";
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
    std::string out;
    std::array<char, 4096> buf{};
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), pipe.get())) > 0) out.append(buf.data(), n);
    return out;
}

// Greedy continuation by full recomputation: a fresh cache and one prefill of the whole sequence per step.
std::vector<uint32_t> greedy_by_recompute(Model& model, std::vector<int32_t> tokens, int steps) {
    std::vector<uint32_t> out;
    for (int s = 0; s < steps; ++s) {
        const int64_t n = static_cast<int64_t>(tokens.size());
        const int64_t blocks = (n + 15) / 16;
        KvCache cache(model.kv_cache_shape(blocks, 16));
        std::vector<int32_t> table(static_cast<size_t>(blocks));
        for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(blocks - 1 - b);
        ForwardSequence seq{.tokens = tokens, .kv = {.block_table = table.data(), .n_table = blocks, .start_pos = 0}};
        std::vector<float> logits;
        model.forward(std::span(&seq, 1), cache, logits);
        const int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        out.push_back(static_cast<uint32_t>(next));
        tokens.push_back(next);
    }
    return out;
}

TEST(RunCommand, GreedyTextEqualsRecomputedGreedyContinuation) {
    for (const std::string name : {"llama_gqa", "qwen3_nvfp4_modelopt", "llama3_rope_tied"}) {
        const std::string dir = fixture(name);
        const std::string prompt = "Once upon a time";
        const int steps = 24;
        ThreadPool pool(2);
        auto model = load_model(dir, pool);
        auto tok = tokenizer::Tokenizer::load(dir);
        const auto ids = tok.encode(prompt, true);
        const auto expected_ids = greedy_by_recompute(*model, std::vector<int32_t>(ids.begin(), ids.end()), steps);
        const std::string expected = tok.decode(expected_ids, true) + "\n";
        const std::string got = stdout_only("run --model " + dir + " --prompt '" + prompt +
                                            "' --temperature 0 --ignore-eos --max-tokens " + std::to_string(steps));
        EXPECT_EQ(got, expected) << name;
    }
}

TEST(RunCommand, SameSeedSameTextDifferentSeedDifferentText) {
    const std::string base = "run --model " + fixture("llama_gqa") +
                             " --prompt 'Hello' --chat --temperature 1.0 --ignore-eos --max-tokens 32 --seed ";
    const std::string a = stdout_only(base + "7"), b = stdout_only(base + "7"), c = stdout_only(base + "8");
    EXPECT_FALSE(a.empty());
    EXPECT_EQ(a, b);
    EXPECT_NE(a, c);
}

// --device cpu is the reference backend whatever the machine has; auto falls back to it for models the CUDA
// backend cannot run (these fixtures' head_dim 16), so both print the same greedy text.
TEST(RunCommand, DeviceCpuAndAutoAgreeOnFixtures) {
    const std::string base = "run --model " + fixture("llama_gqa") + " --prompt hello --max-tokens 6 --temperature 0";
    const std::string cpu = stdout_only(base + " --device cpu");
    EXPECT_FALSE(cpu.empty());
    EXPECT_EQ(stdout_only(base + " --device auto"), cpu);
}

TEST(RunCommand, BadFlagsAreRefusedByName) {
    auto r = run_command("run --model " + fixture("llama_gqa") + " --prompt hi --top-p 0");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("top_p must be in (0, 1]"), std::string::npos) << r.out;
    r = run_command("run --model " + fixture("llama_gqa") + " --prompt hi --device tpu");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("--device must be auto, cuda or cpu, got 'tpu'"), std::string::npos) << r.out;
    r = run_command("run --model /nonexistent --prompt hi");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.out.find("/nonexistent"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace nibble
