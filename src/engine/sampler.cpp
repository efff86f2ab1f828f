#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "base/error.h"

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

namespace {
int32_t argmax(std::span<const float> logits) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}
// A uniform double in [0, 1) from 53 random bits: the same on every standard library.
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1p-53; }
}  // namespace

int32_t sample_token(std::span<const float> logits, const SamplingParams& p, std::mt19937_64& rng) {
    NIBBLE_CHECK(!logits.empty(), "sample_token: empty logits");
    if (p.temperature == 0.0f) return argmax(logits);
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

    // Softmax of logits / temperature over the kept tokens, in double.
    const double inv_t = 1.0 / p.temperature;
    const double top = logits[static_cast<size_t>(ids[0])];
    std::vector<double> prob(k);
    double total = 0.0;
    for (size_t i = 0; i < k; ++i) total += prob[i] = std::exp((logits[static_cast<size_t>(ids[i])] - top) * inv_t);
    for (auto& v : prob) v /= total;

    // top-p: the smallest prefix whose mass reaches top_p (at least one token).
    size_t keep = k;
    if (p.top_p < 1.0f) {
        double mass = 0.0;
        for (size_t i = 0; i < k; ++i) {
            mass += prob[i];
            if (mass >= p.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    // min-p: relative to the most likely token (prob[0]).
    if (p.min_p > 0.0f) {
        const double floor = p.min_p * prob[0];
        size_t n = 1;
        while (n < keep && prob[n] >= floor) ++n;
        keep = n;
    }
    double mass = 0.0;
    for (size_t i = 0; i < keep; ++i) mass += prob[i];
    double u = uniform01(rng) * mass;
    for (size_t i = 0; i < keep; ++i) {
        u -= prob[i];
        if (u < 0.0) return ids[i];
    }
    return ids[keep - 1];
}

}  // namespace nibble
