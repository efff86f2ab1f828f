// Device sampling (ops/sampling/sample_cuda.h) against the host's draw rule (engine/sampler.h
// sample_token(logits, params, u)) on fresh random logits, at real vocabulary sizes and filter mixes: the chosen
// tokens must be equal.
//
// Both sides weigh tokens with sampling_weight.h (bit-identical float weights; min-p and top-k are then exact)
// and sum the weights in double, in different orders: a sum of n positive terms is off by at most
// (n - 1) 2^-53 of itself in any order, so a normalized cumulative weight by at most 2 n 2^-53. A row is
// compared only when u and the top-p cut lie at least delta = 4 x 2 vocab 2^-53 (relative) from their
// boundaries: else fresh logits and u are drawn (redraws are counted and printed; they are rare).
// Ties are planted on purpose: copies of the largest logit, and of the k-th largest straddling the top-k cut,
// where both sides keep the lowest ids.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "device_test_util.h"
#include "engine/sampler.h"
#include "ops/sampling/sample_cuda.h"
#include "ops/sampling/sampling_weight.h"

namespace nibble {
namespace {

// Whether u and the top-p cut of one row lie at least delta (relative) from the boundaries where the order of
// the double sums could decide. Computed as the host rule does.
bool clear_of_boundaries(std::span<const float> logits, const SamplingParams& p, double u, double delta) {
    if (p.temperature == 0.0f) return true;  // the first maximum: exact on both sides
    const size_t vocab = logits.size();
    std::vector<int32_t> ids(vocab);
    std::iota(ids.begin(), ids.end(), 0);
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
        const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
        return la > lb || (la == lb && a < b);
    });
    const size_t k = p.top_k > 0 ? std::min<size_t>(static_cast<size_t>(p.top_k), vocab) : vocab;
    const float top = logits[static_cast<size_t>(ids[0])], inv_t = sampling_inv_temperature(p.temperature);
    std::vector<double> w(k);
    double total = 0.0;
    for (size_t i = 0; i < k; ++i) total += w[i] = sampling_weight(logits[static_cast<size_t>(ids[i])], top, inv_t);
    size_t keep = k;
    if (p.top_p < 1.0f) {
        double cum = 0.0;
        for (size_t i = 0; i < k; ++i) {
            const double before = cum;
            cum += w[i] / total;
            if (cum >= p.top_p) {
                if (cum - p.top_p < delta || (i > 0 && p.top_p - before < delta)) return false;
                keep = i + 1;
                break;
            }
        }
    }
    std::vector<std::pair<int32_t, double>> kept;
    double mass = 0.0;
    for (size_t i = 0; i < keep; ++i)
        if (p.min_p <= 0.0f || w[i] >= p.min_p) {
            kept.push_back({ids[i], w[i]});
            mass += w[i];
        }
    std::sort(kept.begin(), kept.end());
    double cum = 0.0;
    for (size_t i = 0; i < kept.size(); ++i) {
        const double before = cum;
        cum += kept[i].second / mass;
        if (cum > u) return cum - u >= delta && (i == 0 || u - before >= delta);
    }
    return 1.0 - u >= delta;
}

struct Mix {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
};

void sample_case(std::mt19937_64& rng, int64_t vocab) {
    SCOPED_TRACE("vocab=" + std::to_string(vocab));
    const std::vector<Mix> mixes = {
        {0.0f, 0, 1.0f, 0.0f},         // greedy
        {1.0f, 0, 1.0f, 0.0f},         // temperature only
        {0.3f, 0, 1.0f, 0.0f},
        {2.0f, 0, 1.0f, 0.0f},
        {1.0f, 1, 1.0f, 0.0f},         // top_k = 1
        {0.3f, 50, 1.0f, 0.0f},
        {2.0f, 1000, 1.0f, 0.0f},
        {1.0f, -1, 1e-4f, 0.0f},       // top_p tiny: the top token
        {1.0f, 0, 0.9f, 0.0f},
        {2.0f, 0, 0.5f, 0.0f},
        {1.0f, 0, 1.0f, 0.9f},         // min_p high
        {0.3f, 0, 1.0f, 0.05f},
        {1.0f, 40, 0.8f, 0.05f},       // all three
        {2.0f, 5000, 0.95f, 0.01f},
        {0.7f, -1, 0.95f, 0.0f},
        {1.0f, static_cast<int32_t>(vocab) + 5, 1.0f, 0.0f},  // top_k beyond the vocabulary: all
    };
    const int per_mix = 3;
    const int64_t rows = static_cast<int64_t>(mixes.size()) * per_mix;
    const double delta = 4 * 2 * static_cast<double>(vocab) * 0x1p-53;
    std::vector<float> logits(static_cast<size_t>(rows * vocab));
    std::vector<cuda::RowSamplingParams> params(static_cast<size_t>(rows));
    std::uniform_int_distribution<int64_t> any_id(0, vocab - 1);
    int redraws = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const Mix& m = mixes[static_cast<size_t>(r / per_mix)];
        const SamplingParams sp{.temperature = m.temperature, .top_k = m.top_k, .top_p = m.top_p, .min_p = m.min_p};
        std::span<float> row(logits.data() + r * vocab, static_cast<size_t>(vocab));
        double u = 0.0;
        for (int attempt = 0;; ++attempt) {
            ASSERT_LT(attempt, 200) << "row " << r << ": no draw clear of the boundaries";
            const std::vector<float> fresh = test::random_normal(rng, static_cast<size_t>(vocab), 1.0f + (r % 4));
            std::copy(fresh.begin(), fresh.end(), row.begin());
            if (r % per_mix == 1) {  // copies of the largest logit: the lowest id among them comes first
                const float top = *std::max_element(row.begin(), row.end());
                for (int c = 0; c < 3; ++c) row[static_cast<size_t>(any_id(rng))] = top;
            }
            if (r % per_mix == 2 && m.top_k > 1 && m.top_k < vocab) {  // ties across the top-k cut
                std::vector<float> sorted(row.begin(), row.end());
                std::nth_element(sorted.begin(), sorted.begin() + (m.top_k - 1), sorted.end(), std::greater<float>());
                const float kth = sorted[static_cast<size_t>(m.top_k - 1)];
                for (int c = 0; c < 3; ++c) {
                    const size_t id = static_cast<size_t>(any_id(rng));
                    if (row[id] < kth) row[id] = kth;
                }
            }
            u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
            if (clear_of_boundaries(row, sp, u, delta)) break;
            ++redraws;
        }
        params[static_cast<size_t>(r)] = {.temperature = m.temperature, .top_k = m.top_k, .top_p = m.top_p,
                                          .min_p = m.min_p, .u = u};
    }
    cuda::DeviceBuffer d_logits = test::upload_vec(logits), d_params = test::upload_vec(params);
    cuda::DeviceBuffer d_tokens(static_cast<size_t>(rows) * 4);
    d_tokens.fill_bytes(0xff);  // -1: a row never written fails
    cuda::sample_rows(d_logits.as<float>(), rows, vocab, d_params.as<cuda::RowSamplingParams>(),
                      d_tokens.as<int32_t>(), nullptr);
    const std::vector<int32_t> got = test::download_vec<int32_t>(d_tokens, static_cast<size_t>(rows));
    int64_t greedy_rows = 0, distinct = 0;
    std::vector<int32_t> seen;
    for (int64_t r = 0; r < rows; ++r) {
        const cuda::RowSamplingParams& q = params[static_cast<size_t>(r)];
        const SamplingParams sp{.temperature = q.temperature, .top_k = q.top_k, .top_p = q.top_p, .min_p = q.min_p};
        const int32_t want =
            sample_token(std::span<const float>(logits.data() + r * vocab, static_cast<size_t>(vocab)), sp, q.u);
        EXPECT_EQ(got[static_cast<size_t>(r)], want)
            << "row " << r << ": temperature " << q.temperature << " top_k " << q.top_k << " top_p " << q.top_p
            << " min_p " << q.min_p << " u " << q.u;
        greedy_rows += q.temperature == 0.0f;
        seen.push_back(want);
    }
    // Timing, for the record (no assertion): the whole batch, and one row per filter kind.
    cudaEvent_t start, stop;
    NIBBLE_CUDA_CHECK(cudaEventCreate(&start));
    NIBBLE_CUDA_CHECK(cudaEventCreate(&stop));
    auto time_us = [&](int64_t n_rows, const cuda::DeviceBuffer& rows) {
        cuda::sample_rows(d_logits.as<float>(), n_rows, vocab, rows.as<cuda::RowSamplingParams>(),
                          d_tokens.as<int32_t>(), nullptr);  // warm-up
        NIBBLE_CUDA_CHECK(cudaEventRecord(start, nullptr));
        for (int i = 0; i < 10; ++i)
            cuda::sample_rows(d_logits.as<float>(), n_rows, vocab, rows.as<cuda::RowSamplingParams>(),
                              d_tokens.as<int32_t>(), nullptr);
        NIBBLE_CUDA_CHECK(cudaEventRecord(stop, nullptr));
        NIBBLE_CUDA_CHECK(cudaEventSynchronize(stop));
        float ms = 0.0f;
        NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        return 100.0 * ms;  // per launch, in microseconds
    };
    std::printf("[  detail  ] vocab %lld: %lld rows in %.1f us", static_cast<long long>(vocab),
                static_cast<long long>(rows), time_us(rows, d_params));
    for (const Mix& m : {Mix{1.0f, 0, 1.0f, 0.0f}, Mix{1.0f, 50, 1.0f, 0.0f}, Mix{1.0f, 0, 0.9f, 0.0f},
                         Mix{0.7f, 50, 0.95f, 0.05f}}) {
        const cuda::DeviceBuffer one = test::upload_vec(std::vector<cuda::RowSamplingParams>{
            {.temperature = m.temperature, .top_k = m.top_k, .top_p = m.top_p, .min_p = m.min_p, .u = 0.5}});
        std::printf("; 1 row (top_k %d top_p %g min_p %g) %.1f us", m.top_k, m.top_p, m.min_p, time_us(1, one));
    }
    std::printf("\n");
    NIBBLE_CUDA_CHECK(cudaEventDestroy(start));
    NIBBLE_CUDA_CHECK(cudaEventDestroy(stop));

    std::sort(seen.begin(), seen.end());
    distinct = std::unique(seen.begin(), seen.end()) - seen.begin();
    std::printf("[  detail  ] vocab %lld: %lld rows (%lld greedy), %lld distinct tokens, %d redraws near boundaries "
                "(delta %.3g)\n",
                static_cast<long long>(vocab), static_cast<long long>(rows), static_cast<long long>(greedy_rows),
                static_cast<long long>(distinct), redraws, delta);
}

TEST(SampleCuda, MatchesHostDrawRule) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t vocab : {1000, 32000, 151936, 262144}) sample_case(rng, vocab);
}

// u at the ends of [0, 1): the first kept id for u = 0 (and a denormal u), the last for the largest double
// below 1, with and without filters, on a row whose length is no multiple of the scan tile.
TEST(SampleCuda, EdgesOfU) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t vocab = 4099;
    std::vector<float> row = test::random_normal(rng, static_cast<size_t>(vocab), 2.0f);
    const std::vector<double> us = {0.0, 1e-300, 1.0 - 0x1p-53};
    std::vector<float> logits;
    std::vector<cuda::RowSamplingParams> params;
    for (double u : us)
        for (const Mix& m : {Mix{1.0f, 0, 1.0f, 0.0f}, Mix{0.5f, 10, 0.7f, 0.1f}}) {
            logits.insert(logits.end(), row.begin(), row.end());
            params.push_back({.temperature = m.temperature, .top_k = m.top_k, .top_p = m.top_p, .min_p = m.min_p,
                              .u = u});
        }
    const int64_t rows = static_cast<int64_t>(params.size());
    cuda::DeviceBuffer d_logits = test::upload_vec(logits), d_params = test::upload_vec(params);
    cuda::DeviceBuffer d_tokens(static_cast<size_t>(rows) * 4);
    d_tokens.fill_bytes(0xff);
    cuda::sample_rows(d_logits.as<float>(), rows, vocab, d_params.as<cuda::RowSamplingParams>(),
                      d_tokens.as<int32_t>(), nullptr);
    const std::vector<int32_t> got = test::download_vec<int32_t>(d_tokens, static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
        const cuda::RowSamplingParams& q = params[static_cast<size_t>(r)];
        const SamplingParams sp{.temperature = q.temperature, .top_k = q.top_k, .top_p = q.top_p, .min_p = q.min_p};
        EXPECT_EQ(got[static_cast<size_t>(r)], sample_token(row, sp, q.u)) << "row " << r << " u " << q.u;
    }
}

}  // namespace
}  // namespace nibble
