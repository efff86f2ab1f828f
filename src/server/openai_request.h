// OpenAI request bodies (/v1/chat/completions, /v1/completions) parsed and validated into plain structs.
// Every problem is an ApiError (400, naming the field in `param`); nothing here knows the tokenizer or the
// engine beyond the limits passed in. Unknown fields are ignored, as OpenAI-compatible servers do.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/request.h"

namespace nibble::server {

using ojson = nlohmann::ordered_json;

struct RequestLimits {
    int64_t vocab_size = 0;  // logit_bias and stop_token_ids ids must be below it
    int max_n = 128;         // choices per request
    int max_top_logprobs = 20;
};

enum class ToolChoice { None, Auto, Required, Named };

// Fields both endpoints share.
struct CommonRequest {
    std::string model;                  // "" when absent
    GenerationRequest generation;       // prompt still empty; max_tokens filled in once the prompt is known
    std::optional<int64_t> max_tokens;  // as given (max_tokens or max_completion_tokens)
    std::vector<std::string> stop;      // stop strings
    bool stream = false;
    bool include_usage = false;         // stream_options.include_usage
    bool skip_special_tokens = true;
    bool logprobs = false;              // report logprobs of the chosen tokens
    bool tokens_as_ids = false;         // vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"
};

struct ChatRequest : CommonRequest {
    ojson messages = ojson::array();    // roles and content checked; text parts joined into strings
    std::optional<ojson> tools;         // [{type: function, function: {name, description, parameters}}]
    ToolChoice tool_choice = ToolChoice::None;
    std::string tool_choice_name;       // with ToolChoice::Named
    bool add_generation_prompt = true;
    bool continue_final_message = false;
    ojson chat_template_kwargs = ojson::object();
};

struct CompletionRequest : CommonRequest {
    std::optional<std::string> prompt_text;  // a string prompt, or ...
    std::vector<int32_t> prompt_ids;         // ... token ids
    bool echo = false;                       // prepend the prompt to the returned text
};

ChatRequest parse_chat_request(const ojson& body, const RequestLimits& limits);
CompletionRequest parse_completion_request(const ojson& body, const RequestLimits& limits);

// The body as JSON, or a 400 saying why it is not.
ojson parse_json_body(const std::string& body);

}  // namespace nibble::server
