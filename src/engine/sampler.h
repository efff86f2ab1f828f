// Token sampling from one row of logits: temperature, top-k, top-p, min-p, with a per-request random
// generator so that the same seed gives the same tokens. Greedy (argmax, lowest id on ties) at
// temperature 0. The filters apply in vLLM's order: temperature, then top-k, then top-p, then min-p,
// each on the distribution the previous one left.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>

namespace nibble {

struct SamplingParams {
    float temperature = 1.0f;  // 0: greedy
    int32_t top_k = 0;         // keep the k most likely tokens; 0 or -1: all
    float top_p = 1.0f;        // keep the smallest set whose probability reaches top_p; (0, 1]
    float min_p = 0.0f;        // drop tokens less likely than min_p x the most likely one; [0, 1]
    std::optional<uint64_t> seed;

    // Empty when valid, else a message naming the field ("top_p must be in (0, 1], got 0").
    std::string validate() const;
};

// The random stream of one request: seeded from params.seed, or from std::random_device when unset.
std::mt19937_64 make_sampling_rng(const SamplingParams& params);

// Draws a token id from logits [vocab].
int32_t sample_token(std::span<const float> logits, const SamplingParams& params, std::mt19937_64& rng);

}  // namespace nibble
