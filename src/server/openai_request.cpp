// Validation of OpenAI request bodies: types first (a wrong type is a 400 naming the field), then ranges
// (OpenAI's documented ones, vLLM's where OpenAI has none).
#include "server/openai_request.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <set>

#include "server/api_error.h"

namespace nibble::server {

namespace {

template <class... Args>
[[noreturn]] void bad(const std::string& param, fmt::format_string<Args...> format, Args&&... args) {
    throw ApiError(400, fmt::format(format, std::forward<Args>(args)...), param);
}

const ojson* field(const ojson& body, const char* name) {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
}

std::optional<bool> get_bool(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) bad(name, "'{}' must be a boolean, got {}", name, v->dump());
    return v->get<bool>();
}

std::optional<int64_t> get_int(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) bad(name, "'{}' must be an integer, got {}", name, v->dump());
    return v->get<int64_t>();
}

std::optional<double> get_number(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_number()) bad(name, "'{}' must be a number, got {}", name, v->dump());
    return v->get<double>();
}

std::optional<std::string> get_string(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_string()) bad(name, "'{}' must be a string, got {}", name, v->dump());
    return v->get<std::string>();
}

void check_range(const char* name, double value, double lo, double hi) {
    if (!(value >= lo && value <= hi)) bad(name, "'{}' must be in [{}, {}], got {}", name, lo, hi, value);
}

std::vector<int32_t> token_ids(const ojson& v, const char* name, int64_t vocab_size) {
    std::vector<int32_t> ids;
    for (const auto& id : v) {
        if (!id.is_number_integer()) bad(name, "'{}' must hold integer token ids, got {}", name, id.dump());
        const int64_t x = id.get<int64_t>();
        if (x < 0 || (vocab_size > 0 && x >= vocab_size))
            bad(name, "'{}': token id {} is out of the vocabulary [0, {})", name, x, vocab_size);
        ids.push_back(static_cast<int32_t>(x));
    }
    return ids;
}

void parse_common(const ojson& body, const RequestLimits& limits, CommonRequest& r, bool chat) {
    if (!body.is_object()) bad("", "the request body must be a JSON object");
    r.model = get_string(body, "model").value_or("");
    GenerationRequest& g = r.generation;

    std::optional<int64_t> max_tokens = get_int(body, "max_tokens");
    if (chat) {
        if (auto m = get_int(body, "max_completion_tokens")) max_tokens = m;
    }
    if (max_tokens) {
        const char* name = field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
        if (*max_tokens < 1) bad(name, "'{}' must be at least 1, got {}", name, *max_tokens);
        r.max_tokens = max_tokens;
    }
    if (auto n = get_int(body, "n")) {
        if (*n < 1 || *n > limits.max_n) bad("n", "'n' must be in [1, {}], got {}", limits.max_n, *n);
        g.n = static_cast<int>(*n);
    }
    if (auto best_of = get_int(body, "best_of")) {
        if (*best_of != g.n) bad("best_of", "'best_of' other than n is not supported (got {}, n = {})", *best_of, g.n);
    }
    if (auto t = get_number(body, "temperature")) {
        check_range("temperature", *t, 0.0, 2.0);
        g.sampling.temperature = static_cast<float>(*t);
    }
    if (auto p = get_number(body, "top_p")) {
        if (!(*p > 0.0 && *p <= 1.0)) bad("top_p", "'top_p' must be in (0, 1], got {}", *p);
        g.sampling.top_p = static_cast<float>(*p);
    }
    if (auto k = get_int(body, "top_k")) {
        if (*k < -1 || *k > std::numeric_limits<int32_t>::max()) bad("top_k", "'top_k' must be -1, 0 or positive, got {}", *k);
        g.sampling.top_k = static_cast<int32_t>(*k);
    }
    if (auto p = get_number(body, "min_p")) {
        check_range("min_p", *p, 0.0, 1.0);
        g.sampling.min_p = static_cast<float>(*p);
    }
    if (const ojson* seed = field(body, "seed")) {
        if (!seed->is_number_integer()) bad("seed", "'seed' must be an integer, got {}", seed->dump());
        g.sampling.seed = seed->is_number_unsigned() ? seed->get<uint64_t>()
                                                     : static_cast<uint64_t>(seed->get<int64_t>());
    }
    if (auto p = get_number(body, "presence_penalty")) {
        check_range("presence_penalty", *p, -2.0, 2.0);
        g.presence_penalty = static_cast<float>(*p);
    }
    if (auto p = get_number(body, "frequency_penalty")) {
        check_range("frequency_penalty", *p, -2.0, 2.0);
        g.frequency_penalty = static_cast<float>(*p);
    }
    if (auto p = get_number(body, "repetition_penalty")) {
        if (!(*p > 0.0 && *p <= 10.0)) bad("repetition_penalty", "'repetition_penalty' must be in (0, 10], got {}", *p);
        g.repetition_penalty = static_cast<float>(*p);
    }
    if (const ojson* bias = field(body, "logit_bias")) {
        if (!bias->is_object()) bad("logit_bias", "'logit_bias' must be an object of token id -> bias");
        for (const auto& [key, value] : bias->items()) {
            int64_t id = -1;
            try {
                size_t used = 0;
                id = std::stoll(key, &used);
                if (used != key.size()) id = -1;
            } catch (const std::exception&) {
                id = -1;
            }
            if (id < 0 || (limits.vocab_size > 0 && id >= limits.vocab_size))
                bad("logit_bias", "'logit_bias' key '{}' is not a token id in [0, {})", key, limits.vocab_size);
            if (!value.is_number()) bad("logit_bias", "'logit_bias' values must be numbers, got {}", value.dump());
            const double b = value.get<double>();
            if (!(b >= -100.0 && b <= 100.0)) bad("logit_bias", "'logit_bias' values must be in [-100, 100], got {}", b);
            g.logit_bias[static_cast<int32_t>(id)] = static_cast<float>(b);
        }
    }
    if (const ojson* stop = field(body, "stop")) {
        if (stop->is_string()) {
            r.stop.push_back(stop->get<std::string>());
        } else if (stop->is_array()) {
            for (const auto& s : *stop) {
                if (!s.is_string()) bad("stop", "'stop' must be a string or an array of strings");
                r.stop.push_back(s.get<std::string>());
            }
        } else {
            bad("stop", "'stop' must be a string or an array of strings, got {}", stop->dump());
        }
        for (const auto& s : r.stop)
            if (s.empty()) bad("stop", "'stop' strings must not be empty");
    }
    if (const ojson* ids = field(body, "stop_token_ids")) {
        if (!ids->is_array()) bad("stop_token_ids", "'stop_token_ids' must be an array of token ids");
        g.stop_token_ids = token_ids(*ids, "stop_token_ids", limits.vocab_size);
    }
    if (auto m = get_int(body, "min_tokens")) {
        if (*m < 0) bad("min_tokens", "'min_tokens' must be non-negative, got {}", *m);
        if (r.max_tokens && *m > *r.max_tokens)
            bad("min_tokens", "'min_tokens' ({}) must not exceed max_tokens ({})", *m, *r.max_tokens);
        g.min_tokens = *m;
    }
    g.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
    r.skip_special_tokens = get_bool(body, "skip_special_tokens").value_or(true);
    r.tokens_as_ids = get_bool(body, "return_tokens_as_token_ids").value_or(false);
    r.stream = get_bool(body, "stream").value_or(false);
    if (const ojson* options = field(body, "stream_options")) {
        if (!options->is_object()) bad("stream_options", "'stream_options' must be an object");
        if (!r.stream) bad("stream_options", "'stream_options' is only allowed when 'stream' is true");
        r.include_usage = get_bool(*options, "include_usage").value_or(false);
    }
    if (const ojson* format = field(body, "response_format")) {
        const std::string type = format->is_object() && format->contains("type") && format->at("type").is_string()
                                     ? format->at("type").get<std::string>() : "";
        if (type != "text")
            bad("response_format", "'response_format' {} is not supported (only {{\"type\": \"text\"}})", format->dump());
    }
    if (field(body, "suffix")) bad("suffix", "'suffix' is not supported");
}

// Content as templates expect it: a string (text parts joined), or null where allowed.
ojson content_of(const ojson& message, size_t i, const std::string& role) {
    const std::string param = fmt::format("messages[{}].content", i);
    auto it = message.find("content");
    if (it == message.end() || it->is_null()) {
        if (role == "assistant") return nullptr;  // an assistant turn that only calls tools
        bad(param, "'{}' is required for role '{}'", param, role);
    }
    if (it->is_string()) return *it;
    if (!it->is_array()) bad(param, "'{}' must be a string or an array of content parts", param);
    std::string text;
    for (const auto& part : *it) {
        if (!part.is_object() || !part.contains("type") || !part.at("type").is_string())
            bad(param, "'{}' parts must be objects with a 'type'", param);
        const std::string type = part.at("type").get<std::string>();
        if (type != "text") bad(param, "'{}': content parts of type '{}' are not supported (text only)", param, type);
        if (!part.contains("text") || !part.at("text").is_string())
            bad(param, "'{}': a text part needs a string 'text'", param);
        text += part.at("text").get<std::string>();
    }
    return text;
}

ojson parse_messages(const ojson& body) {
    const ojson* messages = field(body, "messages");
    if (!messages) bad("messages", "'messages' is required");
    if (!messages->is_array()) bad("messages", "'messages' must be an array");
    if (messages->empty()) bad("messages", "'messages' must not be empty");
    static const std::set<std::string> roles = {"system", "developer", "user", "assistant", "tool"};
    ojson out = ojson::array();
    for (size_t i = 0; i < messages->size(); ++i) {
        const ojson& m = (*messages)[i];
        if (!m.is_object()) bad(fmt::format("messages[{}]", i), "'messages[{}]' must be an object", i);
        auto role_it = m.find("role");
        if (role_it == m.end() || !role_it->is_string())
            bad(fmt::format("messages[{}].role", i), "'messages[{}].role' is required and must be a string", i);
        const std::string role = role_it->get<std::string>();
        if (!roles.count(role))
            bad(fmt::format("messages[{}].role", i),
                "'messages[{}].role' must be one of system, developer, user, assistant, tool; got '{}'", i, role);
        ojson msg = m;  // keeps name, tool_call_id, reasoning_content ... for the template
        msg["content"] = content_of(m, i, role);
        if (auto calls = m.find("tool_calls"); calls != m.end() && !calls->is_null()) {
            const std::string param = fmt::format("messages[{}].tool_calls", i);
            if (role != "assistant" || !calls->is_array()) bad(param, "'{}' must be an array on an assistant message", param);
            ojson fixed = ojson::array();
            for (const auto& call : *calls) {
                if (!call.is_object() || !call.contains("function") || !call.at("function").is_object())
                    bad(param, "'{}' entries need a 'function' object", param);
                ojson c = call;
                // Templates index arguments as a mapping; the API carries them as a JSON string.
                ojson& args = c["function"]["arguments"];
                if (args.is_string()) {
                    try {
                        args = ojson::parse(args.get<std::string>());
                    } catch (const nlohmann::json::exception&) {
                        bad(param, "'{}': function.arguments is not valid JSON", param);
                    }
                }
                fixed.push_back(std::move(c));
            }
            msg["tool_calls"] = std::move(fixed);
        }
        out.push_back(std::move(msg));
    }
    return out;
}

}  // namespace

ojson parse_json_body(const std::string& body) {
    try {
        return ojson::parse(body);
    } catch (const nlohmann::json::exception& e) {
        throw ApiError(400, fmt::format("the request body is not valid JSON: {}", e.what()));
    }
}

ChatRequest parse_chat_request(const ojson& body, const RequestLimits& limits) {
    ChatRequest r;
    parse_common(body, limits, r, true);
    r.messages = parse_messages(body);
    if (auto logprobs = get_bool(body, "logprobs")) r.logprobs = *logprobs;
    if (auto top = get_int(body, "top_logprobs")) {
        if (*top < 0 || *top > limits.max_top_logprobs)
            bad("top_logprobs", "'top_logprobs' must be in [0, {}], got {}", limits.max_top_logprobs, *top);
        if (!r.logprobs) bad("top_logprobs", "'top_logprobs' needs 'logprobs' to be true");
        r.generation.top_logprobs = static_cast<int>(*top);
    } else if (r.logprobs) {
        r.generation.top_logprobs = 0;
    }
    std::set<std::string> names;
    if (const ojson* tools = field(body, "tools")) {
        if (!tools->is_array()) bad("tools", "'tools' must be an array");
        for (size_t i = 0; i < tools->size(); ++i) {
            const ojson& t = (*tools)[i];
            const std::string param = fmt::format("tools[{}]", i);
            if (!t.is_object() || t.value("type", "") != "function")
                bad(param, "'{}' must be an object with type 'function'", param);
            if (!t.contains("function") || !t.at("function").is_object())
                bad(param, "'{}.function' must be an object", param);
            const ojson& f = t.at("function");
            if (!f.contains("name") || !f.at("name").is_string() || f.at("name").get<std::string>().empty())
                bad(param, "'{}.function.name' must be a non-empty string", param);
            if (f.contains("parameters") && !f.at("parameters").is_object() && !f.at("parameters").is_null())
                bad(param, "'{}.function.parameters' must be a JSON schema object", param);
            names.insert(f.at("name").get<std::string>());
        }
        if (!tools->empty()) r.tools = *tools;
    }
    r.tool_choice = r.tools ? ToolChoice::Auto : ToolChoice::None;
    if (const ojson* choice = field(body, "tool_choice")) {
        if (choice->is_string()) {
            const std::string c = choice->get<std::string>();
            if (c == "none") r.tool_choice = ToolChoice::None;
            else if (c == "auto") r.tool_choice = ToolChoice::Auto;
            else if (c == "required") r.tool_choice = ToolChoice::Required;
            else bad("tool_choice", "'tool_choice' must be none, auto, required or a named function; got '{}'", c);
        } else if (choice->is_object()) {
            const ojson* f = field(*choice, "function");
            if (!f || !f->is_object() || !f->contains("name") || !f->at("name").is_string())
                bad("tool_choice", "'tool_choice' object must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}");
            r.tool_choice = ToolChoice::Named;
            r.tool_choice_name = f->at("name").get<std::string>();
            if (!names.count(r.tool_choice_name))
                bad("tool_choice", "'tool_choice' names function '{}', which is not in 'tools'", r.tool_choice_name);
        } else {
            bad("tool_choice", "'tool_choice' must be a string or an object");
        }
        if (!r.tools && r.tool_choice != ToolChoice::None)
            bad("tool_choice", "'tool_choice' other than none needs 'tools'");
    }
    r.add_generation_prompt = get_bool(body, "add_generation_prompt").value_or(true);
    r.continue_final_message = get_bool(body, "continue_final_message").value_or(false);
    if (r.continue_final_message && r.add_generation_prompt && field(body, "add_generation_prompt"))
        bad("continue_final_message", "'continue_final_message' and 'add_generation_prompt' cannot both be true");
    if (r.continue_final_message) r.add_generation_prompt = false;
    if (const ojson* kwargs = field(body, "chat_template_kwargs")) {
        if (!kwargs->is_object()) bad("chat_template_kwargs", "'chat_template_kwargs' must be an object");
        r.chat_template_kwargs = *kwargs;
    }
    return r;
}

CompletionRequest parse_completion_request(const ojson& body, const RequestLimits& limits) {
    CompletionRequest r;
    parse_common(body, limits, r, false);
    if (!r.max_tokens) r.max_tokens = 16;  // OpenAI's default for completions
    const ojson* prompt = field(body, "prompt");
    if (!prompt) bad("prompt", "'prompt' is required");
    const ojson* p = prompt;
    // A list of one prompt is the same as the prompt; several prompts in one request are not supported.
    if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
    if (p->is_string()) {
        if (p->get<std::string>().empty()) bad("prompt", "'prompt' must not be empty");
        r.prompt_text = p->get<std::string>();
    } else if (p->is_array() && !p->empty() && (*p)[0].is_number_integer()) {
        r.prompt_ids = token_ids(*p, "prompt", limits.vocab_size);
    } else if (p->is_array() && p->size() > 1) {
        bad("prompt", "several prompts in one request are not supported; send one request per prompt");
    } else {
        bad("prompt", "'prompt' must be a non-empty string or array of token ids");
    }
    r.echo = get_bool(body, "echo").value_or(false);
    if (auto lp = get_int(body, "logprobs")) {
        if (*lp < 0 || *lp > limits.max_top_logprobs)
            bad("logprobs", "'logprobs' must be in [0, {}], got {}", limits.max_top_logprobs, *lp);
        r.logprobs = true;
        r.generation.top_logprobs = static_cast<int>(*lp);
    }
    return r;
}

}  // namespace nibble::server
