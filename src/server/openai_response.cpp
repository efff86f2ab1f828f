// JSON shapes of OpenAI responses; field order follows OpenAI's own responses.
#include "server/openai_response.h"

#include <cmath>
#include <limits>

namespace nibble::server {

namespace {

ojson byte_list(const std::string& s) {
    ojson bytes = ojson::array();
    for (unsigned char c : s) bytes.push_back(static_cast<int>(c));
    return bytes;
}

// JSON has no -inf: a token with probability 0 gets the most negative float, as vLLM reports it.
ojson logprob_value(float lp) {
    if (std::isfinite(lp)) return lp;
    return -9999.0;
}

}  // namespace

ojson usage_json(const Usage& u) {
    return ojson{{"prompt_tokens", u.prompt_tokens},
                 {"total_tokens", u.prompt_tokens + u.completion_tokens},
                 {"completion_tokens", u.completion_tokens},
                 {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

ojson tool_call_json(const ParsedToolCall& call, const std::string& id, int index) {
    ojson j = ojson::object();
    if (index >= 0) j["index"] = index;
    j["id"] = id;
    j["type"] = "function";
    j["function"] = {{"name", call.name}, {"arguments", call.arguments}};
    return j;
}

ojson chat_logprobs_json(const std::vector<TokenLogprobEntry>& entries) {
    ojson content = ojson::array();
    for (const auto& e : entries) {
        ojson top = ojson::array();
        for (const auto& [token, lp] : e.top)
            top.push_back({{"token", token}, {"logprob", logprob_value(lp)}, {"bytes", byte_list(token)}});
        content.push_back({{"token", e.token},
                           {"logprob", logprob_value(e.logprob)},
                           {"bytes", byte_list(e.token)},
                           {"top_logprobs", std::move(top)}});
    }
    return ojson{{"content", std::move(content)}};
}

ojson completion_logprobs_json(const std::vector<TokenLogprobEntry>& entries, int64_t& offset) {
    ojson tokens = ojson::array(), token_logprobs = ojson::array(), top_logprobs = ojson::array(),
          text_offset = ojson::array();
    for (const auto& e : entries) {
        tokens.push_back(e.token);
        token_logprobs.push_back(logprob_value(e.logprob));
        ojson top = ojson::object();
        for (const auto& [token, lp] : e.top) top[token] = logprob_value(lp);
        top_logprobs.push_back(std::move(top));
        text_offset.push_back(offset);
        offset += static_cast<int64_t>(e.token.size());
    }
    return ojson{{"tokens", std::move(tokens)},
                 {"token_logprobs", std::move(token_logprobs)},
                 {"top_logprobs", std::move(top_logprobs)},
                 {"text_offset", std::move(text_offset)}};
}

}  // namespace nibble::server
