// What a client asks the engine for, and what the engine hands back per step. Token-level only: text
// (chat templates, detokenization, stop strings, reasoning and tool parsing) is the server's business.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/sampler.h"

namespace nibble {

struct GenerationRequest {
    std::string id;                     // unique among requests in flight
    std::vector<int32_t> prompt;        // token ids, non-empty
    SamplingParams sampling;
    int64_t max_tokens = 16;            // generated tokens per sequence, at most
    int64_t min_tokens = 0;             // EOS and stop ids are masked until this many were generated
    bool ignore_eos = false;
    std::vector<int32_t> stop_token_ids;  // besides the model's EOS ids
    int n = 1;                          // independent samples of the same prompt (share its KV blocks)
    float presence_penalty = 0.0f;      // OpenAI semantics, [-2, 2]
    float frequency_penalty = 0.0f;     // OpenAI semantics, [-2, 2]
    float repetition_penalty = 1.0f;    // HF/vLLM semantics, > 0 (over prompt and output tokens)
    std::map<int32_t, float> logit_bias;  // added to the logits before sampling
    int top_logprobs = -1;              // -1: no logprobs; 0: the chosen token's; k: plus the k most likely
};

enum class FinishReason {
    Stop,    // EOS, a stop token id, or a stop string (reported by the server)
    Length,  // max_tokens or max_model_len reached
    Abort,   // cancelled (client gone) or failed
};

// New tokens of one of the request's n sequences since the last step.
struct SequenceOutput {
    int index = 0;                      // which of the n choices
    std::vector<int32_t> tokens;        // new tokens (usually one)
    std::vector<float> logprobs;        // [tokens.size()] when requested (log-softmax of the raw logits)
    std::vector<std::vector<TokenLogprob>> top_logprobs;  // [tokens.size()][top_logprobs]
    std::optional<FinishReason> finish;  // set on the last output of this sequence
};

struct RequestOutput {
    std::string request_id;
    std::vector<SequenceOutput> outputs;  // only sequences that changed this step
    int64_t prompt_tokens = 0;
    int64_t cached_prompt_tokens = 0;   // prompt tokens served from the prefix cache
    bool finished = false;              // every sequence of the request has finished
    std::string error;                  // non-empty if the request failed (then finished = true)
};

}  // namespace nibble
