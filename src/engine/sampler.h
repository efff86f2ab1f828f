// Token sampling from one row of logits: temperature, top-k, top-p, min-p, with a per-sequence random
// generator so that the same seed gives the same tokens. Greedy (argmax, lowest id on ties) at
// temperature 0. The filters apply in vLLM's order: temperature, then top-k, then top-p, then min-p,
// each on the distribution the previous one left.
// Before sampling, the engine shapes the logits as vLLM's sampler does: tokens masked (EOS and stop ids
// under min_tokens), logit_bias added, then penalties (repetition, then frequency and presence).
// Logprobs are the log-softmax of the RAW logits, before any of that (vLLM's default logprobs mode).
#pragma once

#include <cstdint>
#include <optional>
#include <map>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace nibble {

struct SamplingParams {
    float temperature = 1.0f;  // 0: greedy
    int32_t top_k = 0;         // keep the k most likely tokens; 0 or -1: all
    float top_p = 1.0f;        // keep the smallest set whose probability reaches top_p; (0, 1]
    float min_p = 0.0f;        // drop tokens less likely than min_p x the most likely one; [0, 1]
    std::optional<uint64_t> seed = std::nullopt;

    // Empty when valid, else a message naming the field ("top_p must be in (0, 1], got 0").
    std::string validate() const;
};

// The random stream of one request: seeded from params.seed, or from std::random_device when unset.
std::mt19937_64 make_sampling_rng(const SamplingParams& params);
// The stream of sequence `index` of a request with n samples: seed + index, so each sample differs and is
// reproducible; random when the seed is unset.
std::mt19937_64 make_sampling_rng(const SamplingParams& params, int index);

struct PenaltyParams {
    float presence_penalty = 0.0f;    // OpenAI: logit -= presence if the token occurs in the output
    float frequency_penalty = 0.0f;   // OpenAI: logit -= frequency x its count in the output
    float repetition_penalty = 1.0f;  // HF/vLLM: a token of prompt or output has logit / p if > 0, else x p
};

// Sets logits[id] = -inf for each id (EOS and stop ids while fewer than min_tokens were generated).
void mask_tokens(std::span<float> logits, std::span<const int32_t> ids);
// logits[id] += bias for each entry.
void apply_logit_bias(std::span<float> logits, const std::map<int32_t, float>& bias);
// Repetition penalty over prompt and output tokens, then frequency and presence penalties over the output.
void apply_penalties(std::span<float> logits, const PenaltyParams& params, std::span<const int32_t> prompt,
                     std::span<const int32_t> output);

struct TokenLogprob {
    int32_t token = 0;
    float logprob = 0.0f;
};

// log_softmax(logits) computed in double: [vocab].
std::vector<float> log_softmax(std::span<const float> logits);
// The k largest entries of logprobs, descending (lowest id first on ties).
std::vector<TokenLogprob> top_logprobs(std::span<const float> logprobs, int k);

// The one uniform number a non-greedy draw consumes: 53 random bits as a double in [0, 1), the same on every
// standard library. The device sampler gets this value per row, drawn on the host from the sequence's stream.
double sampling_uniform(std::mt19937_64& rng);

// Draws a token id from logits [vocab]: greedy at temperature 0 (consuming nothing from rng), else
// sample_token(logits, params, sampling_uniform(rng)).
int32_t sample_token(std::span<const float> logits, const SamplingParams& params, std::mt19937_64& rng);

// The draw rule that the host and the device (ops/sampling/sample_cuda.h) share. Each token weighs
// exp((logit - top) / T) as ops/sampling/sampling_weight.h computes it (bit-identical on both), sums are in
// double. The filters pick the kept tokens: top-k by logit (lowest id first on ties); then the shortest
// prefix of those, by descending logit with lowest id first on ties, whose weight reaches top_p of theirs;
// then those of weight >= min_p (the top token's weight is 1). The kept tokens are walked in ascending id
// order: the token is the first whose cumulative weight exceeds u x the kept weight (the largest kept id if
// rounding leaves none). u in [0, 1). Greedy (argmax, lowest id on ties) at temperature 0, u unused.
int32_t sample_token(std::span<const float> logits, const SamplingParams& params, double u);

}  // namespace nibble
