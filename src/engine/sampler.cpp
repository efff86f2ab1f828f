#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/error.h"
#include "ops/sampling/sampling_weight.h"

namespace nibble {

std::string SamplingParams::validate() const {
    if (!(temperature >= 0.0f) || !std::isfinite(temperature))
        return fmt::format("temperature must be a finite number >= 0, got {}", temperature);
    if (top_k < -1) return fmt::format("top_k must be -1, 0 or positive, got {}", top_k);
    if (!(top_p > 0.0f && top_p <= 1.0f)) return fmt::format("top_p must be in (0, 1], got {}", top_p);
    if (!(min_p >= 0.0f && min_p <= 1.0f)) return fmt::format("min_p must be in [0, 1], got {}", min_p);
    return {};
}

std::mt19937_64 make_sampling_rng(const SamplingParams& params) {
    if (params.seed) return std::mt19937_64(*params.seed);
    std::random_device rd;
    return std::mt19937_64((static_cast<uint64_t>(rd()) << 32) ^ rd());
}

std::mt19937_64 make_sampling_rng(const SamplingParams& params, int index) {
    if (!params.seed) return make_sampling_rng(params);
    return std::mt19937_64(*params.seed + static_cast<uint64_t>(index));
}

namespace {
float& logit_at(std::span<float> logits, int32_t id) {
    NIBBLE_CHECK(id >= 0 && static_cast<size_t>(id) < logits.size(), "token id {} is outside the vocabulary [0, {})",
                 id, logits.size());
    return logits[static_cast<size_t>(id)];
}
}  // namespace

void mask_tokens(std::span<float> logits, std::span<const int32_t> ids) {
    for (int32_t id : ids) logit_at(logits, id) = -std::numeric_limits<float>::infinity();
}

void apply_logit_bias(std::span<float> logits, const std::map<int32_t, float>& bias) {
    for (const auto& [id, b] : bias) logit_at(logits, id) += b;
}

void apply_penalties(std::span<float> logits, const PenaltyParams& p, std::span<const int32_t> prompt,
                     std::span<const int32_t> output) {
    if (p.repetition_penalty != 1.0f) {
        std::vector<bool> seen(logits.size(), false);
        auto penalize = [&](int32_t id) {
            float& l = logit_at(logits, id);
            if (seen[static_cast<size_t>(id)]) return;
            seen[static_cast<size_t>(id)] = true;
            l = l > 0.0f ? l / p.repetition_penalty : l * p.repetition_penalty;
        };
        for (int32_t id : prompt) penalize(id);
        for (int32_t id : output) penalize(id);
    }
    if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
        std::unordered_map<int32_t, int64_t> count;
        for (int32_t id : output) ++count[id];
        for (const auto& [id, c] : count)
            logit_at(logits, id) -= p.frequency_penalty * static_cast<float>(c) + p.presence_penalty;
    }
}

std::vector<float> log_softmax(std::span<const float> logits) {
    NIBBLE_CHECK(!logits.empty(), "log_softmax: empty logits");
    const double top = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (float l : logits) sum += std::exp(static_cast<double>(l) - top);
    const double log_z = top + std::log(sum);
    std::vector<float> out(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<float>(static_cast<double>(logits[i]) - log_z);
    return out;
}

std::vector<TokenLogprob> top_logprobs(std::span<const float> logprobs, int k) {
    const size_t n = std::min<size_t>(static_cast<size_t>(std::max(k, 0)), logprobs.size());
    std::vector<int32_t> ids(logprobs.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n), ids.end(), [&](int32_t a, int32_t b) {
        const float la = logprobs[static_cast<size_t>(a)], lb = logprobs[static_cast<size_t>(b)];
        return la > lb || (la == lb && a < b);
    });
    std::vector<TokenLogprob> out;
    for (size_t i = 0; i < n; ++i) out.push_back({ids[i], logprobs[static_cast<size_t>(ids[i])]});
    return out;
}

namespace {
int32_t argmax(std::span<const float> logits) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}
}  // namespace

double sampling_uniform(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1p-53; }

int32_t sample_token(std::span<const float> logits, const SamplingParams& p, std::mt19937_64& rng) {
    NIBBLE_CHECK(!logits.empty(), "sample_token: empty logits");
    if (p.temperature == 0.0f) return argmax(logits);
    return sample_token(logits, p, sampling_uniform(rng));
}

int32_t sample_token(std::span<const float> logits, const SamplingParams& p, double u) {
    NIBBLE_CHECK(!logits.empty(), "sample_token: empty logits");
    if (p.temperature == 0.0f) return argmax(logits);
    NIBBLE_CHECK(u >= 0.0 && u < 1.0, "sample_token: the uniform draw must be in [0, 1), got {}", u);
    const size_t vocab = logits.size();

    // Candidates by descending logit; top-k needs only the first k in order.
    std::vector<int32_t> ids(vocab);
    std::iota(ids.begin(), ids.end(), 0);
    const size_t k = p.top_k > 0 ? std::min<size_t>(static_cast<size_t>(p.top_k), vocab) : vocab;
    auto by_logit = [&](int32_t a, int32_t b) {
        return logits[static_cast<size_t>(a)] > logits[static_cast<size_t>(b)] ||
               (logits[static_cast<size_t>(a)] == logits[static_cast<size_t>(b)] && a < b);
    };
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(k), ids.end(), by_logit);
    ids.resize(k);

    // Weights exp((logit - top) / T) of the top-k tokens (sampling_weight.h: the device computes the same bits),
    // their sums in double.
    const float inv_t = sampling_inv_temperature(p.temperature);
    const float top = logits[static_cast<size_t>(ids[0])];
    std::vector<double> weight(k);
    double total = 0.0;
    for (size_t i = 0; i < k; ++i) total += weight[i] = sampling_weight(logits[static_cast<size_t>(ids[i])], top, inv_t);

    // top-p: the shortest prefix whose weight reaches top_p of the total (at least one token).
    size_t keep = k;
    if (p.top_p < 1.0f) {
        const double target = static_cast<double>(p.top_p) * total;
        double mass = 0.0;
        for (size_t i = 0; i < k; ++i) {
            mass += weight[i];
            if (mass >= target) {
                keep = i + 1;
                break;
            }
        }
    }
    // min-p: weight >= min_p x the top token's (which is 1); the top token always stays.
    std::vector<std::pair<int32_t, double>> kept;
    for (size_t i = 0; i < keep; ++i)
        if (i == 0 || p.min_p <= 0.0f || weight[i] >= static_cast<double>(p.min_p)) kept.push_back({ids[i], weight[i]});
    // The draw walks the kept tokens by ascending id (an order a device can scan in parallel).
    std::sort(kept.begin(), kept.end());
    double mass = 0.0;
    for (const auto& [id, q] : kept) mass += q;
    const double target = u * mass;
    double cumulative = 0.0;
    for (const auto& [id, q] : kept) {
        cumulative += q;
        if (cumulative > target) return id;
    }
    return kept.back().first;
}

}  // namespace nibble
