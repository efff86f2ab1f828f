// The sharded CPU forward against the unsharded one on the golden fixtures of the llama family (dense,
// biases, tied embeddings, sliding window, QK-norm, NVFP4 ModelOpt, NVFP4 compressed-tensors, FP8 ModelOpt),
// at tensor-parallel sizes 1, 2 and 4 (4 > n_kv_heads = 2: KV heads replicated), ranks as threads of one
// process talking through InProcessGroup.
//
// Tolerance. TP = 1 must be bit-identical: the same ops in the same order (the collectives of one rank copy).
// For TP > 1 only the summation order changes: a row-parallel output (o_proj, down_proj) is the sum of N
// partial dot products of K/N terms instead of one dot product of K terms, the all-reduce adds them in rank
// order, and the row-parallel bias joins rank 0's partial. The number of rounded additions per output does not
// grow, so each such sum keeps float32's bound gamma_K * sum|terms| (gamma_K = K u / (1 - K u), u = 2^-24),
// the same bound the unsharded forward has: both forwards are float32 evaluations of the same model of the
// accuracy golden_test.cpp derives, tol = max(8 * fp64_gap, 1e-5 * max(1, max|logit|)) from the exact one
// (fp64_gap: the fixture's measured float32-vs-float64 gap). Hence |sharded - unsharded| <= 2 tol. Every
// other op (column-parallel dot products, norms, RoPE, attention per head, the embedding gather and the logits
// gather) computes each value exactly as the unsharded forward does. A wrong head slice, a bias added twice
// or missed, or a wrong vocabulary offset moves logits by ~1e-2 or more, far outside 2 tol (~7e-5).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <utility>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "parallel/in_process_group.h"
#include "parallel/llama_rank.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kLlamaFamilyCases = {
    "llama_gqa",    "llama3_rope_tied",     "llama_attn_bias", "mistral",           "qwen2_bias",
    "qwen3_qknorm", "qwen3_nvfp4_modelopt", "llama_nvfp4_ct",  "llama_fp8_modelopt",
};

fs::path fixture(const std::string& name) { return fs::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures" / name; }

struct Reference {
    std::vector<int32_t> tokens;
    double tol = 0;  // golden_test.cpp's tolerance against the exact forward
};

Reference load_reference(const fs::path& dir) {
    Reference ref;
    const SafetensorsFile expected((dir / "expected.safetensors").string());
    const TensorInfo* tokens = expected.find("tokens");
    EXPECT_TRUE(tokens != nullptr && tokens->dtype == DType::I32);
    if (tokens == nullptr) return ref;
    ref.tokens.resize(static_cast<size_t>(tokens->shape.numel()));
    std::memcpy(ref.tokens.data(), tokens->data, ref.tokens.size() * sizeof(int32_t));
    const double gap = std::stod(expected.metadata().at("fp64_gap"));
    const double max_abs = std::stod(expected.metadata().at("max_abs_logit"));
    ref.tol = std::max(8.0 * gap, 1e-5 * std::max(1.0, max_abs));
    return ref;
}

// One sequence owning blocks 0, 1, ... of its cache.
struct Sequence {
    std::vector<int32_t> block_table;
    int64_t pos = 0;
    ForwardSequence step(std::span<const int32_t> tokens, bool all_logits) const {
        return ForwardSequence{.tokens = tokens,
                               .kv = {.block_table = block_table.data(),
                                      .n_table = static_cast<int64_t>(block_table.size()),
                                      .start_pos = pos},
                               .all_logits = all_logits};
    }
};

// N ranks of the sharded model, their pools, caches and the in-process group.
class ShardedRun {
public:
    ShardedRun(const fs::path& model_dir, int n, int64_t n_blocks) : group_(n) {
        auto ckpt = std::make_shared<const Checkpoint>(model_dir.string());
        for (int r = 0; r < n; ++r) {
            pools_.push_back(std::make_unique<ThreadPool>(1));
            ranks_.push_back(load_llama_rank(model_dir.string(), ckpt, group_.communicator(r), *pools_.back()));
            caches_.push_back(std::make_unique<KvCache>(ranks_.back()->kv_cache_shape(n_blocks, 16)));
        }
    }
    const LlamaRankModel& rank(int r) const { return *ranks_[static_cast<size_t>(r)]; }
    // Rank 0's logits; every rank's must be bit-identical to them.
    std::vector<float> forward(const ForwardSequence& seq) { return forward_batch(std::span(&seq, 1)); }
    std::vector<float> forward_batch(std::span<const ForwardSequence> seqs) {
        std::vector<std::vector<float>> logits(ranks_.size());
        group_.run([&](int r) {
            ranks_[static_cast<size_t>(r)]->forward(seqs, *caches_[static_cast<size_t>(r)], logits[static_cast<size_t>(r)]);
        });
        for (size_t r = 1; r < logits.size(); ++r) EXPECT_EQ(logits[r], logits[0]) << "rank " << r;
        return logits[0];
    }

private:
    InProcessGroup group_;
    std::vector<std::unique_ptr<ThreadPool>> pools_;
    std::vector<std::unique_ptr<LlamaRankModel>> ranks_;
    std::vector<std::unique_ptr<KvCache>> caches_;
};

int32_t argmax(const float* row, int64_t vocab) { return static_cast<int32_t>(std::max_element(row, row + vocab) - row); }

// Largest |a - b|; fails when a size differs.
double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    double d = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d = std::max(d, std::fabs(double(a[i]) - double(b[i])));
    return d;
}

class LlamaTensorParallel : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(LlamaTensorParallel, EqualsTheUnshardedForwardAndDecodesTheSameTokens) {
    const auto& [name, n] = GetParam();
    const fs::path dir = fixture(name);
    const fs::path model_dir = dir / "model";
    const Reference ref = load_reference(dir);
    ASSERT_FALSE(ref.tokens.empty());
    constexpr int kDecodeSteps = 4;
    const int64_t total = static_cast<int64_t>(ref.tokens.size()) + kDecodeSteps;
    const int64_t n_blocks = (total + 15) / 16;

    ThreadPool pool(1);
    const std::unique_ptr<Model> whole = load_model(model_dir.string(), pool);
    const int64_t vocab = whole->config().vocab_size;
    KvCache whole_cache(whole->kv_cache_shape(n_blocks, 16));
    ShardedRun sharded(model_dir, n, n_blocks);
    EXPECT_EQ(sharded.rank(0).kv_cache_shape(1, 16).n_kv_heads,
              std::max<int64_t>(1, whole->config().n_kv_heads / n));

    Sequence seq;
    for (int64_t b = 0; b < n_blocks; ++b) seq.block_table.push_back(static_cast<int32_t>(b));
    const double tol = n == 1 ? 0.0 : 2.0 * ref.tol;

    // Prefill with logits for every prompt token.
    std::vector<float> expected, got;
    const ForwardSequence prefill = seq.step(ref.tokens, true);
    whole->forward(std::span(&prefill, 1), whole_cache, expected);
    got = sharded.forward(prefill);
    double worst = max_diff(got, expected);
    EXPECT_LE(worst, tol) << "prefill";
    seq.pos = static_cast<int64_t>(ref.tokens.size());

    // Greedy decode, one token per step through the paged caches.
    std::vector<int32_t> whole_tokens, sharded_tokens;
    int32_t next_whole = argmax(expected.data() + expected.size() - static_cast<size_t>(vocab), vocab);
    int32_t next_sharded = argmax(got.data() + got.size() - static_cast<size_t>(vocab), vocab);
    for (int step = 0; step < kDecodeSteps; ++step) {
        whole_tokens.push_back(next_whole);
        sharded_tokens.push_back(next_sharded);
        ASSERT_EQ(next_sharded, next_whole) << "step " << step;
        const std::vector<int32_t> token{next_whole};
        const ForwardSequence decode = seq.step(token, false);
        whole->forward(std::span(&decode, 1), whole_cache, expected);
        got = sharded.forward(decode);
        const double d = max_diff(got, expected);
        EXPECT_LE(d, tol) << "decode step " << step;
        worst = std::max(worst, d);
        ++seq.pos;
        next_whole = argmax(expected.data(), vocab);
        next_sharded = argmax(got.data(), vocab);
    }
    EXPECT_EQ(sharded_tokens, whole_tokens);
    std::printf("%s TP=%d: max |sharded - unsharded| = %.3g (tolerance %.3g), greedy tokens identical\n", name.c_str(), n,
                worst, tol);
}

INSTANTIATE_TEST_SUITE_P(GoldenFixtures, LlamaTensorParallel,
                         ::testing::Combine(::testing::ValuesIn(kLlamaFamilyCases), ::testing::Values(1, 2, 4)),
                         [](const auto& info) {
                             return std::get<0>(info.param) + "_tp" + std::to_string(std::get<1>(info.param));
                         });

// A batch of two sequences of different lengths, one wanting every row's logits and one only its last: the
// sharded forward gathers the logits of exactly those rows, in sequence order.
TEST(LlamaTensorParallelBatch, TwoSequencesOfDifferentLengths) {
    for (const auto& [name, n] : {std::pair<std::string, int>{"llama_attn_bias", 2}, {"qwen3_nvfp4_modelopt", 4}}) {
        SCOPED_TRACE(name);
        const fs::path model_dir = fixture(name) / "model";
        const Reference ref = load_reference(fixture(name));
        ASSERT_GE(ref.tokens.size(), 9u);
        ThreadPool pool(1);
        const std::unique_ptr<Model> whole = load_model(model_dir.string(), pool);
        KvCache whole_cache(whole->kv_cache_shape(2, 16));
        ShardedRun sharded(model_dir, n, 2);
        const std::vector<int32_t> a(ref.tokens.begin(), ref.tokens.begin() + 5), b(ref.tokens.begin() + 1, ref.tokens.begin() + 9);
        const std::vector<int32_t> table_a{0}, table_b{1};
        const std::vector<ForwardSequence> batch = {
            {.tokens = a, .kv = {.block_table = table_a.data(), .n_table = 1, .start_pos = 0}, .all_logits = true},
            {.tokens = b, .kv = {.block_table = table_b.data(), .n_table = 1, .start_pos = 0}, .all_logits = false}};
        std::vector<float> expected;
        whole->forward(batch, whole_cache, expected);
        EXPECT_EQ(expected.size(), static_cast<size_t>(6 * whole->config().vocab_size));  // 5 rows of a, 1 of b
        EXPECT_LE(max_diff(sharded.forward_batch(batch), expected), 2.0 * ref.tol);
    }
}

// The row-parallel NVFP4 slices of the NVFP4 fixtures are copies (whole 16-value blocks); everything else
// is a view into the checkpoint.
TEST(LlamaTensorParallelShards, Nvfp4FixtureShardsAreWholeBlocks) {
    const fs::path model_dir = fixture("qwen3_nvfp4_modelopt") / "model";
    ShardedRun run(model_dir, 4, 1);
    for (int r = 0; r < 4; ++r) {
        for (const LinearWeight* w : run.rank(r).linear_weights()) {
            if (w->format != WeightFormat::Nvfp4) continue;
            EXPECT_EQ(w->n_in % 16, 0) << w->name;
        }
        const LlamaShardPlan& plan = run.rank(r).shard_plan();
        EXPECT_EQ(plan.o.kind, ShardKind::RowParallel);
        EXPECT_EQ(plan.o.range.size(), 4 * 32 / 4);  // one query head of head_dim 32 per rank
    }
}

}  // namespace
}  // namespace nibble
