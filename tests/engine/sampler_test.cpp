// Sampler: greedy, filters, determinism, and frequencies against the exact distribution.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <vector>

#include "base/error.h"
#include "engine/sampler.h"
#include "ops/sampling/sampling_weight.h"

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

// The shared draw rule (sampler.h): one uniform from 53 bits of one draw, kept tokens walked by ascending id.
TEST(Sampler, OneUniformPerNonGreedyDrawGreedyNone) {
    std::mt19937_64 fresh(99);
    const uint64_t first = fresh(), second = fresh();
    std::mt19937_64 rng(99);
    EXPECT_EQ(sampling_uniform(rng), static_cast<double>(first >> 11) * 0x1p-53);
    EXPECT_EQ(rng(), second);

    const std::vector<float> logits = {0.3f, -1.0f, 2.0f, 0.7f, 1.1f};
    std::mt19937_64 a(5), untouched(5);
    EXPECT_EQ(sample_token(logits, {.temperature = 0.0f}, a), 2);
    EXPECT_EQ(a(), untouched());  // greedy consumed nothing
    std::mt19937_64 b(6), c(6);
    const SamplingParams p{.temperature = 0.9f, .top_k = 4, .top_p = 0.9f, .min_p = 0.05f};
    for (int i = 0; i < 200; ++i) {
        const double u = sampling_uniform(c);
        EXPECT_EQ(sample_token(logits, p, b), sample_token(logits, p, u));
    }
    EXPECT_EQ(b(), c());  // one uniform per draw on both paths
}

TEST(Sampler, DrawWalksKeptTokensByAscendingId) {
    const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f), std::log(0.3f)};
    const SamplingParams all{.temperature = 1.0f};
    // Cumulative by id: 0.1, 0.5, 0.7, 1.0 (the first id whose cumulative exceeds u).
    EXPECT_EQ(sample_token(logits, all, 0.0), 0);
    EXPECT_EQ(sample_token(logits, all, 0.05), 0);
    EXPECT_EQ(sample_token(logits, all, 0.3), 1);
    EXPECT_EQ(sample_token(logits, all, 0.6), 2);
    EXPECT_EQ(sample_token(logits, all, 0.95), 3);
    EXPECT_EQ(sample_token(logits, all, 1.0 - 0x1p-53), 3);
    // top_k = 2 keeps ids 1 (4/7) and 3 (3/7), walked as 1 then 3.
    const SamplingParams k2{.temperature = 1.0f, .top_k = 2};
    EXPECT_EQ(sample_token(logits, k2, 0.0), 1);
    EXPECT_EQ(sample_token(logits, k2, 0.5), 1);
    EXPECT_EQ(sample_token(logits, k2, 0.6), 3);
    EXPECT_THROW(sample_token(logits, all, 1.0), Error);
    EXPECT_THROW(sample_token(logits, all, -0.1), Error);
}

// Each filter's kept set, seen through a fine grid of u: exactly the expected tokens come out, each over a
// share of the grid equal to its renormalized probability (within one grid step per boundary).
TEST(Sampler, EachFilterKeepsItsSet) {
    // Probabilities 0.05, 0.3, 0.1, 0.25, 0.2, 0.1: by descending probability ids 1, 3, 4, then the tie 2, 5
    // (lowest id first), then 0.
    const std::vector<double> prob = {0.05, 0.3, 0.1, 0.25, 0.2, 0.1};
    std::vector<float> logits;
    for (double q : prob) logits.push_back(static_cast<float>(std::log(q)));
    struct Case {
        SamplingParams p;
        std::vector<int32_t> kept;
    };
    const std::vector<Case> cases = {
        {{.temperature = 1.0f, .top_k = 3}, {1, 3, 4}},
        {{.temperature = 1.0f, .top_k = 4}, {1, 2, 3, 4}},  // the tie at the cut: id 2 before id 5
        {{.temperature = 1.0f, .top_p = 0.7f}, {1, 3, 4}},  // 0.3 + 0.25 + 0.2 = 0.75 reaches 0.7
        {{.temperature = 1.0f, .top_p = 0.5f}, {1, 3}},
        {{.temperature = 1.0f, .min_p = 0.5f}, {1, 3, 4}},  // p >= 0.15
        {{.temperature = 1.0f, .min_p = 0.3f}, {1, 2, 3, 4, 5}},  // p >= 0.09
        // top-k 4 -> 0.3, 0.25, 0.2, 0.1 over 0.85; top_p 0.8 keeps three (0.882); min_p 0.7 of 0.353: two.
        {{.temperature = 1.0f, .top_k = 4, .top_p = 0.8f, .min_p = 0.7f}, {1, 3}},
    };
    const int grid = 100000;
    for (const Case& c : cases) {
        double mass = 0.0;
        for (int32_t id : c.kept) mass += prob[static_cast<size_t>(id)];
        std::map<int32_t, int> hits;
        for (int i = 0; i < grid; ++i) ++hits[sample_token(logits, c.p, (i + 0.5) / grid)];
        std::vector<int32_t> got;
        for (const auto& [id, n] : hits) {
            got.push_back(id);
            EXPECT_NEAR(static_cast<double>(n) / grid, prob[static_cast<size_t>(id)] / mass, 2.0 / grid)
                << "token " << id << " top_k " << c.p.top_k << " top_p " << c.p.top_p << " min_p " << c.p.min_p;
        }
        EXPECT_EQ(got, c.kept) << "top_k " << c.p.top_k << " top_p " << c.p.top_p << " min_p " << c.p.min_p;
    }
}

// Pearson's chi-square of many seeded draws against the filtered, renormalized distribution: with d degrees of
// freedom its mean is d and its standard deviation sqrt(2 d); the bound d + 6 sqrt(2 d) fails a correct
// sampler with probability below 1e-5.
TEST(Sampler, ChiSquareOfFilteredDraws) {
    std::vector<float> logits(12);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::cos(1.7f * static_cast<float>(i)) * 2.0f;
    const SamplingParams p{.temperature = 0.7f, .top_k = 9, .top_p = 0.95f, .min_p = 0.02f};
    // The expected distribution, computed here independently: sort, filter, renormalize.
    std::vector<int32_t> ids(logits.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    ids.resize(9);
    std::vector<double> w;
    double total = 0;
    for (int32_t id : ids) total += w.emplace_back(std::exp((logits[id] - logits[ids[0]]) / 0.7));
    size_t keep = 0;
    for (double cum = 0; keep < w.size() && cum < 0.95;) cum += w[keep++] / total;
    while (keep > 1 && w[keep - 1] < 0.02) --keep;
    std::vector<double> expected(logits.size(), 0.0);
    double mass = 0;
    for (size_t i = 0; i < keep; ++i) mass += w[i];
    for (size_t i = 0; i < keep; ++i) expected[static_cast<size_t>(ids[i])] = w[i] / mass;
    ASSERT_GE(keep, 4u);  // a distribution worth testing

    std::mt19937_64 rng(2024);
    const int n = 200000;
    std::vector<int> count(logits.size());
    for (int i = 0; i < n; ++i) ++count[static_cast<size_t>(sample_token(logits, p, rng))];
    double chi2 = 0;
    for (size_t t = 0; t < logits.size(); ++t) {
        if (expected[t] == 0) {
            EXPECT_EQ(count[t], 0) << "token " << t << " was filtered out";
            continue;
        }
        const double e = n * expected[t];
        chi2 += (count[t] - e) * (count[t] - e) / e;
    }
    const double dof = static_cast<double>(keep - 1);
    EXPECT_LT(chi2, dof + 6 * std::sqrt(2 * dof)) << keep << " kept tokens";
}

// The weight both samplers share (ops/sampling/sampling_weight.h): within 4 float ulp (2^-21 relative) of
// e^x in double over [-86, 0], exactly 1 at 0, 0 below -86 and for NaN.
TEST(Sampler, SamplingExpIsCloseToExp) {
    double worst = 0.0;
    for (int i = 0; i <= 2000000; ++i) {
        const float x = -86.0f * static_cast<float>(i) / 2000000.0f;
        const double want = std::exp(static_cast<double>(x));
        worst = std::max(worst, std::fabs(sampling_exp(x) - want) / want);
    }
    EXPECT_LT(worst, 0x1p-21);
    EXPECT_EQ(sampling_exp(0.0f), 1.0f);
    EXPECT_EQ(sampling_exp(-0.0f), 1.0f);
    EXPECT_EQ(sampling_weight(3.5f, 3.5f, sampling_inv_temperature(0.7f)), 1.0f);
    EXPECT_EQ(sampling_exp(-86.5f), 0.0f);
    EXPECT_EQ(sampling_exp(-std::numeric_limits<float>::infinity()), 0.0f);
    EXPECT_EQ(sampling_exp(std::nanf("")), 0.0f);
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
