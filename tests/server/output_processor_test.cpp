// The per-choice output pipeline over a real byte-level BPE tokenizer (the golden fixtures' one): text
// delivered token by token must equal Tokenizer::decode of the same ids, cut before the first stop string
// (found even when it spans tokens), with the stop reported so the engine can end the sequence.
#include <gtest/gtest.h>

#include "server/output_processor.h"

namespace nibble::server {
namespace {

const tokenizer::Tokenizer& fixture_tokenizer() {
    static const tokenizer::Tokenizer tok =
        tokenizer::Tokenizer::load(std::string(NIBBLE_SOURCE_DIR) + "/tests/golden/fixtures/llama_gqa/model");
    return tok;
}

std::vector<int32_t> ids_of(const std::string& text) {
    std::vector<int32_t> ids;
    for (uint32_t id : fixture_tokenizer().encode(text)) ids.push_back(static_cast<int32_t>(id));
    return ids;
}

struct Result {
    std::string content, reasoning, finish;
    std::vector<ParsedToolCall> calls;
    bool stop_hit = false;
    int64_t tokens = 0;
};

// Feeds `ids` `per_step` at a time; the last output carries `finish` unless a stop string ended it first.
Result feed(const std::vector<int32_t>& ids, OutputOptions options, size_t per_step, FinishReason finish) {
    OutputProcessor p(fixture_tokenizer(), std::move(options));
    Result r;
    for (size_t at = 0; at < ids.size() && !p.finished(); at += per_step) {
        SequenceOutput out;
        out.tokens.assign(ids.begin() + static_cast<long>(at),
                          ids.begin() + static_cast<long>(std::min(ids.size(), at + per_step)));
        if (at + per_step >= ids.size()) out.finish = finish;
        ChoiceDelta d = p.process(out);
        r.content += d.content;
        r.reasoning += d.reasoning;
        for (auto& c : d.tool_calls) r.calls.push_back(c);
        if (d.finish_reason) r.finish = *d.finish_reason;
        r.stop_hit |= d.stop_string_hit;
    }
    r.tokens = p.num_tokens();
    return r;
}

const std::string kText = "Once upon a time there was a small model that wanted to run on every machine.";

TEST(OutputProcessor, StreamedTextEqualsWholeDecode) {
    const auto ids = ids_of(kText);
    std::vector<uint32_t> u(ids.begin(), ids.end());
    const std::string whole = fixture_tokenizer().decode(u);
    for (size_t step : {1, 2, 5, 100}) {
        const Result r = feed(ids, {}, step, FinishReason::Length);
        EXPECT_EQ(r.content, whole) << step;
        EXPECT_EQ(r.finish, "length");
        EXPECT_EQ(r.tokens, static_cast<int64_t>(ids.size()));
    }
}

TEST(OutputProcessor, StopStringsCutBeforeTheStringEvenAcrossTokens) {
    const auto ids = ids_of(kText);
    for (const std::string stop : {"small model", "e", " wanted to", "machine."}) {
        OutputOptions o;
        o.stop = {"never there", stop};
        const std::string expected = kText.substr(0, kText.find(stop));
        for (size_t step : {1, 3}) {
            const Result r = feed(ids, o, step, FinishReason::Length);
            EXPECT_EQ(r.content, expected) << stop;
            EXPECT_EQ(r.finish, "stop") << stop;
            EXPECT_TRUE(r.stop_hit);
        }
    }
}

TEST(OutputProcessor, EosTokenTextIsNotOutput) {
    auto ids = ids_of("Hello, world!");
    ids.push_back(511);  // <|endoftext|>
    OutputOptions o;
    o.stop_token_ids = {511};
    o.skip_special_tokens = false;
    const Result r = feed(ids, o, 1, FinishReason::Stop);
    EXPECT_EQ(r.content, "Hello, world!");
    EXPECT_EQ(r.finish, "stop");
}

TEST(OutputProcessor, ReasoningAndToolCallsThroughTheTokenizer) {
    const std::string out = "<think>I should call the tool.</think><tool_call>\n{\"name\": \"get_weather\", "
                            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    OutputOptions o;
    o.reasoning = ReasoningParserKind::Qwen3;
    o.tools = ToolParserKind::Hermes;
    const Result r = feed(ids_of(out), o, 1, FinishReason::Stop);
    EXPECT_EQ(r.reasoning, "I should call the tool.");
    EXPECT_EQ(r.content, "");
    ASSERT_EQ(r.calls.size(), 1u);
    EXPECT_EQ(r.calls[0].name, "get_weather");
    EXPECT_EQ(nlohmann::json::parse(r.calls[0].arguments), nlohmann::json::parse(R"({"city": "Paris"})"));
    EXPECT_EQ(r.finish, "tool_calls");
}

TEST(OutputProcessor, ForcedToolCallPrefixIsParsedNotOutput) {
    // tool_choice named: the prompt ended with the call's opening; the model writes the rest. deepseek_r1
    // would start the output in reasoning, but a forced call is not thought.
    const std::string call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                             "</function>\n</tool_call>";
    OutputOptions o;
    o.reasoning = ReasoningParserKind::DeepSeekR1;
    o.tools = ToolParserKind::Qwen3Coder;
    o.forced_prefix = forced_call_prefix(ToolParserKind::Qwen3Coder, "get_weather");
    o.only_tool = "get_weather";
    ASSERT_EQ(call.substr(0, o.forced_prefix.size()), o.forced_prefix);
    const auto rest = ids_of(call.substr(o.forced_prefix.size()));
    for (size_t step : {1, 4, 100}) {
        const Result r = feed(rest, o, step, FinishReason::Stop);
        EXPECT_EQ(r.content, "");
        EXPECT_EQ(r.reasoning, "");
        ASSERT_EQ(r.calls.size(), 1u);
        EXPECT_EQ(r.calls[0].name, "get_weather");
        EXPECT_EQ(nlohmann::json::parse(r.calls[0].arguments), nlohmann::json::parse(R"({"city": "Paris"})"));
        EXPECT_EQ(r.finish, "tool_calls");
        // Cut off by max_tokens before the call closes: finish length, no call, only the model's text.
        const std::vector<int32_t> cut(rest.begin(), rest.begin() + static_cast<long>(rest.size() / 2));
        std::vector<uint32_t> u(cut.begin(), cut.end());
        ASSERT_EQ(fixture_tokenizer().decode(u).find("</function>"), std::string::npos);
        const Result c = feed(cut, o, step, FinishReason::Length);
        EXPECT_EQ(c.finish, "length");
        EXPECT_TRUE(c.calls.empty());
        EXPECT_EQ(c.content, fixture_tokenizer().decode(u));
    }
}

}  // namespace
}  // namespace nibble::server
