// OpenAI response bodies: chat.completion, chat.completion.chunk, text_completion (whole and streamed),
// usage, logprobs in both endpoints' shapes. Pure functions of what the output processors produced.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "server/output_processor.h"

namespace nibble::server {

using ojson = nlohmann::ordered_json;

struct Usage {
    int64_t prompt_tokens = 0;
    int64_t completion_tokens = 0;
    int64_t cached_tokens = 0;
};

ojson usage_json(const Usage& usage);

// A tool call as the API shows it: {"id", "type": "function", "function": {"name", "arguments"}};
// with `index` >= 0 (streamed deltas) an "index" field first.
ojson tool_call_json(const ParsedToolCall& call, const std::string& id, int index);

// Chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
ojson chat_logprobs_json(const std::vector<TokenLogprobEntry>& entries);

// Completions logprobs: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"};
// `offset` is the text length before the first of these tokens, updated past them.
ojson completion_logprobs_json(const std::vector<TokenLogprobEntry>& entries, int64_t& offset);

}  // namespace nibble::server
