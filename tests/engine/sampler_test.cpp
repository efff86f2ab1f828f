// Sampler: greedy, filters, determinism, and frequencies against the exact distribution.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "base/error.h"
#include "engine/sampler.h"

namespace nibble {
namespace {

TEST(Sampler, GreedyTakesArgmaxLowestIdOnTies) {
    std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
    std::mt19937_64 rng(1);
    EXPECT_EQ(sample_token(logits, {.temperature = 0.0f}, rng), 1);
    EXPECT_EQ(sample_token(logits, {.temperature = 1.0f, .top_k = 1}, rng), 1);
}

// Draws n samples and checks every token's frequency against `expected` within 5 standard deviations.
void expect_frequencies(const std::vector<float>& logits, const SamplingParams& p, const std::vector<double>& expected) {
    std::mt19937_64 rng(42);
    const int n = 200000;
    std::vector<int> count(logits.size());
    for (int i = 0; i < n; ++i) ++count[static_cast<size_t>(sample_token(logits, p, rng))];
    for (size_t t = 0; t < logits.size(); ++t) {
        const double sd = std::sqrt(n * expected[t] * (1 - expected[t])) + 1e-9;
        EXPECT_NEAR(count[t], n * expected[t], 5 * sd + 0.5) << "token " << t;
    }
}

std::vector<double> softmax(const std::vector<float>& l, double t) {
    std::vector<double> p;
    double s = 0;
    for (float v : l) s += std::exp(v / t);
    for (float v : l) p.push_back(std::exp(v / t) / s);
    return p;
}

TEST(Sampler, FrequenciesFollowTemperatureSoftmax) {
    const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -1.0f};
    expect_frequencies(logits, {.temperature = 1.0f}, softmax(logits, 1.0));
    expect_frequencies(logits, {.temperature = 0.5f}, softmax(logits, 0.5));
}

TEST(Sampler, TopKTopPMinPRenormalizeTheKeptTokens) {
    const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
    // top_k = 2 keeps 0.5 and 0.3 -> 0.625, 0.375
    expect_frequencies(logits, {.temperature = 1.0f, .top_k = 2}, {0.625, 0.375, 0, 0});
    // top_p = 0.9: 0.5 + 0.3 = 0.8 < 0.9, + 0.15 = 0.95 >= 0.9 keeps three
    expect_frequencies(logits, {.temperature = 1.0f, .top_p = 0.9f}, {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0});
    // min_p = 0.5: keep p >= 0.25 -> 0.5, 0.3
    expect_frequencies(logits, {.temperature = 1.0f, .min_p = 0.5f}, {0.625, 0.375, 0, 0});
}

TEST(Sampler, SameSeedSameTokens) {
    std::vector<float> logits(100);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i));
    SamplingParams p{.temperature = 0.8f, .top_p = 0.95f, .seed = 1234};
    auto a = make_sampling_rng(p), b = make_sampling_rng(p);
    for (int i = 0; i < 50; ++i) EXPECT_EQ(sample_token(logits, p, a), sample_token(logits, p, b));
}

TEST(Sampler, ValidateNamesTheField) {
    EXPECT_EQ(SamplingParams{}.validate(), "");
    EXPECT_NE(SamplingParams{.top_p = 0.0f}.validate().find("top_p"), std::string::npos);
    EXPECT_NE(SamplingParams{.temperature = -1.0f}.validate().find("temperature"), std::string::npos);
    EXPECT_NE(SamplingParams{.top_k = -2}.validate().find("top_k"), std::string::npos);
    EXPECT_NE(SamplingParams{.min_p = 2.0f}.validate().find("min_p"), std::string::npos);
}

// Penalties by their published formulas: OpenAI's "mu[j] - c[j] * alpha_frequency - float(c[j] > 0) *
// alpha_presence" over output counts, and HF's RepetitionPenaltyLogitsProcessor "score < 0 ? score * p :
// score / p" once per distinct token of prompt and output.
TEST(Sampler, PenaltiesFollowOpenAIAndHFFormulas) {
    const std::vector<float> base = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f};
    const std::vector<int32_t> prompt = {0, 4, 4}, output = {1, 3, 3, 3, 0};
    std::vector<float> l = base;
    apply_penalties(l, {.presence_penalty = 0.5f, .frequency_penalty = 0.25f, .repetition_penalty = 1.0f}, prompt, output);
    const std::vector<int> count = {1, 1, 0, 3, 0, 0};
    for (size_t j = 0; j < base.size(); ++j)
        EXPECT_FLOAT_EQ(l[j], base[j] - count[j] * 0.25f - (count[j] > 0 ? 0.5f : 0.0f)) << j;
    l = base;
    apply_penalties(l, {.presence_penalty = 0.0f, .frequency_penalty = 0.0f, .repetition_penalty = 2.0f}, prompt, output);
    const std::vector<bool> seen = {true, true, false, true, true, false};
    for (size_t j = 0; j < base.size(); ++j) {
        const float want = !seen[j] ? base[j] : base[j] < 0 ? base[j] * 2.0f : base[j] / 2.0f;
        EXPECT_FLOAT_EQ(l[j], want) << j;
    }
}

TEST(Sampler, LogitBiasAndMaskSteerGreedy) {
    std::vector<float> l = {1.0f, 5.0f, 2.0f};
    apply_logit_bias(l, {{0, 10.0f}, {1, -1.0f}});
    EXPECT_FLOAT_EQ(l[0], 11.0f);
    EXPECT_FLOAT_EQ(l[1], 4.0f);
    mask_tokens(l, std::vector<int32_t>{0});
    EXPECT_EQ(l[0], -std::numeric_limits<float>::infinity());
    std::mt19937_64 rng(1);
    EXPECT_EQ(sample_token(l, {.temperature = 0.0f}, rng), 1);
    EXPECT_THROW(apply_logit_bias(l, {{3, 1.0f}}), Error);
}

TEST(Sampler, LogSoftmaxAndTopLogprobs) {
    const std::vector<float> l = {1.0f, 3.0f, 3.0f, -2.0f};
    const auto lp = log_softmax(l);
    long double z = 0;
    for (float v : l) z += std::exp(static_cast<long double>(v));
    for (size_t j = 0; j < l.size(); ++j) EXPECT_NEAR(lp[j], static_cast<double>(l[j] - std::log(z)), 1e-6);
    const auto top = top_logprobs(lp, 3);
    ASSERT_EQ(top.size(), 3u);
    EXPECT_EQ(top[0].token, 1);  // ties: lowest id first
    EXPECT_EQ(top[1].token, 2);
    EXPECT_EQ(top[2].token, 0);
    EXPECT_TRUE(top_logprobs(lp, 0).empty());
    EXPECT_EQ(top_logprobs(lp, 10).size(), 4u);
}

TEST(Sampler, StreamsOfOneSeedDifferPerIndexAndRepeat) {
    SamplingParams p{.temperature = 1.0f, .seed = 7};
    auto a0 = make_sampling_rng(p, 0), a1 = make_sampling_rng(p, 1), b1 = make_sampling_rng(p, 1);
    EXPECT_EQ(a0(), std::mt19937_64(7)());
    const uint64_t x = a1();
    EXPECT_EQ(x, b1());
    EXPECT_EQ(x, std::mt19937_64(8)());
}

}  // namespace
}  // namespace nibble
