// OpenAI request validation: each bad input is a 400 naming the offending field (OpenAI's documented
// ranges: temperature [0, 2], top_p (0, 1], penalties [-2, 2], logit_bias [-100, 100], top_logprobs
// [0, 20]), and good requests fill GenerationRequest as the API reference describes.
#include <gtest/gtest.h>

#include "server/api_error.h"
#include "server/openai_request.h"

namespace nibble::server {
namespace {

RequestLimits limits() {
    RequestLimits l;
    l.vocab_size = 512;
    return l;
}

ojson chat_body(const std::string& extra) {
    return ojson::parse(R"({"model": "m", "messages": [{"role": "user", "content": "hi"}])" +
                        (extra.empty() ? "" : ", " + extra) + "}");
}

// The ApiError a chat body raises (status 0 when it parses).
ApiError chat_error(const ojson& body) {
    try {
        parse_chat_request(body, limits());
    } catch (const ApiError& e) {
        return e;
    }
    return ApiError(0, "");
}

void expect_bad(const std::string& extra, const std::string& param) {
    const ApiError e = chat_error(chat_body(extra));
    EXPECT_EQ(e.status, 400) << extra;
    EXPECT_EQ(e.param, param) << extra << ": " << e.what();
    const ojson body = e.body();
    EXPECT_TRUE(body["error"]["message"].is_string());
    EXPECT_EQ(body["error"]["type"], "invalid_request_error");
}

TEST(OpenAiRequest, ChatFieldsFillTheGenerationRequest) {
    const ChatRequest r = parse_chat_request(
        chat_body(R"("max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                     "seed": 42, "n": 2, "stop": ["\n\n", "END"], "presence_penalty": 0.5, "frequency_penalty": -0.5,
                     "logit_bias": {"17": -100, "3": 5.5}, "logprobs": true, "top_logprobs": 3, "stream": true,
                     "stream_options": {"include_usage": true}, "user": "ignored")"),
        limits());
    EXPECT_EQ(r.max_tokens, 7);
    EXPECT_FLOAT_EQ(r.generation.sampling.temperature, 0.5f);
    EXPECT_FLOAT_EQ(r.generation.sampling.top_p, 0.9f);
    EXPECT_EQ(r.generation.sampling.top_k, 40);
    EXPECT_FLOAT_EQ(r.generation.sampling.min_p, 0.05f);
    EXPECT_EQ(r.generation.sampling.seed, 42u);
    EXPECT_EQ(r.generation.n, 2);
    EXPECT_EQ(r.stop, (std::vector<std::string>{"\n\n", "END"}));
    EXPECT_FLOAT_EQ(r.generation.presence_penalty, 0.5f);
    EXPECT_FLOAT_EQ(r.generation.frequency_penalty, -0.5f);
    EXPECT_EQ(r.generation.logit_bias.at(17), -100.0f);
    EXPECT_EQ(r.generation.logit_bias.at(3), 5.5f);
    EXPECT_TRUE(r.logprobs);
    EXPECT_EQ(r.generation.top_logprobs, 3);
    EXPECT_TRUE(r.stream);
    EXPECT_TRUE(r.include_usage);
    EXPECT_EQ(r.tool_choice, ToolChoice::None);
}

TEST(OpenAiRequest, MessagesChecked) {
    EXPECT_EQ(chat_error(ojson::parse(R"({"model": "m"})")).param, "messages");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": []})")).param, "messages");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": "hi"})")).param, "messages");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": [{"role": "wizard", "content": "x"}]})")).param,
              "messages[0].role");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": [{"content": "x"}]})")).param, "messages[0].role");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": [{"role": "user"}]})")).param, "messages[0].content");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": [{"role": "user", "content": 5}]})")).param,
              "messages[0].content");
    EXPECT_EQ(chat_error(ojson::parse(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})")).param,
              "messages[0].content");
    EXPECT_EQ(chat_error(ojson::parse(R"([1, 2])")).status, 400);
    // Text parts are joined; an assistant turn may carry only tool calls, whose arguments become a mapping.
    const ChatRequest r = parse_chat_request(
        ojson::parse(R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
            "text": "b"}]}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function":
            {"name": "f", "arguments": "{\"x\": 1}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "2"}]})"),
        limits());
    EXPECT_EQ(r.messages[0]["content"], "ab");
    EXPECT_TRUE(r.messages[1]["content"].is_null());
    EXPECT_EQ(r.messages[1]["tool_calls"][0]["function"]["arguments"]["x"], 1);
}

TEST(OpenAiRequest, WrongTypesAndRanges) {
    expect_bad(R"("temperature": "hot")", "temperature");
    expect_bad(R"("temperature": 2.5)", "temperature");
    expect_bad(R"("temperature": -0.1)", "temperature");
    expect_bad(R"("top_p": 0)", "top_p");
    expect_bad(R"("top_p": 1.1)", "top_p");
    expect_bad(R"("top_k": -2)", "top_k");
    expect_bad(R"("min_p": 2)", "min_p");
    expect_bad(R"("max_tokens": 0)", "max_tokens");
    expect_bad(R"("max_tokens": 1.5)", "max_tokens");
    expect_bad(R"("max_tokens": "10")", "max_tokens");
    expect_bad(R"("n": 0)", "n");
    expect_bad(R"("n": 1000)", "n");
    expect_bad(R"("presence_penalty": 3)", "presence_penalty");
    expect_bad(R"("frequency_penalty": -2.5)", "frequency_penalty");
    expect_bad(R"("repetition_penalty": 0)", "repetition_penalty");
    expect_bad(R"("logit_bias": {"abc": 1})", "logit_bias");
    expect_bad(R"("logit_bias": {"512": 1})", "logit_bias");
    expect_bad(R"("logit_bias": {"5": 101})", "logit_bias");
    expect_bad(R"("logit_bias": [1])", "logit_bias");
    expect_bad(R"("stop": 5)", "stop");
    expect_bad(R"("stop": [""])", "stop");
    expect_bad(R"("seed": "x")", "seed");
    expect_bad(R"("stream": "yes")", "stream");
    expect_bad(R"("stream_options": {"include_usage": true})", "stream_options");
    expect_bad(R"("top_logprobs": 3)", "top_logprobs");
    expect_bad(R"("logprobs": true, "top_logprobs": 21)", "top_logprobs");
    expect_bad(R"("stop_token_ids": [600])", "stop_token_ids");
    expect_bad(R"("response_format": {"type": "json_object"})", "response_format");
    expect_bad(R"("min_tokens": 5, "max_tokens": 2)", "min_tokens");
}

TEST(OpenAiRequest, ToolsAndToolChoice) {
    const std::string tools =
        R"("tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])";
    EXPECT_EQ(parse_chat_request(chat_body(tools), limits()).tool_choice, ToolChoice::Auto);
    EXPECT_EQ(parse_chat_request(chat_body(tools + R"(, "tool_choice": "none")"), limits()).tool_choice,
              ToolChoice::None);
    EXPECT_EQ(parse_chat_request(chat_body(tools + R"(, "tool_choice": "required")"), limits()).tool_choice,
              ToolChoice::Required);
    const ChatRequest named = parse_chat_request(
        chat_body(tools + R"(, "tool_choice": {"type": "function", "function": {"name": "get_weather"}})"), limits());
    EXPECT_EQ(named.tool_choice, ToolChoice::Named);
    EXPECT_EQ(named.tool_choice_name, "get_weather");
    expect_bad(tools + R"(, "tool_choice": {"type": "function", "function": {"name": "nope"}})", "tool_choice");
    expect_bad(tools + R"(, "tool_choice": "sometimes")", "tool_choice");
    expect_bad(R"("tool_choice": "required")", "tool_choice");
    expect_bad(R"("tools": [{"type": "function", "function": {}}])", "tools[0]");
    expect_bad(R"("tools": [{"type": "retrieval"}])", "tools[0]");
}

TEST(OpenAiRequest, Completions) {
    const CompletionRequest a = parse_completion_request(ojson::parse(R"({"prompt": "Once", "logprobs": 2})"), limits());
    EXPECT_EQ(a.prompt_text, "Once");
    EXPECT_EQ(a.max_tokens, 16);  // OpenAI's default for completions
    EXPECT_EQ(a.generation.top_logprobs, 2);
    const CompletionRequest b = parse_completion_request(ojson::parse(R"({"prompt": [[1, 2, 3]]})"), limits());
    EXPECT_EQ(b.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
    for (const char* body : {R"({})", R"({"prompt": ""})", R"({"prompt": 5})", R"({"prompt": ["a", "b"]})",
                             R"({"prompt": [1, 999]})", R"({"prompt": "x", "logprobs": 30})",
                             R"({"prompt": "x", "suffix": "y"})", R"({"prompt": "x", "best_of": 3})"}) {
        try {
            parse_completion_request(ojson::parse(body), limits());
            ADD_FAILURE() << body << " was accepted";
        } catch (const ApiError& e) {
            EXPECT_EQ(e.status, 400) << body;
        }
    }
}

TEST(OpenAiRequest, MalformedJson) {
    try {
        parse_json_body("{\"messages\": [");
        ADD_FAILURE() << "accepted";
    } catch (const ApiError& e) {
        EXPECT_EQ(e.status, 400);
    }
}

}  // namespace
}  // namespace nibble::server
