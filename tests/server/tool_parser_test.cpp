// Tool-call parsers on canned outputs in the formats the model cards document: Hermes/Qwen2.5
// (<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, the example of Qwen's function-calling
// guide) and Qwen3-Coder's XML-ish calls. Fed whole and in arbitrary splits; arguments compared as JSON.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <random>
#include <tuple>

#include "base/error.h"
#include "server/tool_parser.h"

namespace nibble::server {
namespace {

using ojson = nlohmann::ordered_json;

struct Parsed {
    std::string content;
    std::vector<ParsedToolCall> calls;
};

Parsed run(ToolParserKind kind, const ojson& tools, const std::vector<std::string>& pieces,
           const std::string& forced = "", bool truncated = false) {
    ToolCallParser p(kind, tools);
    if (!forced.empty()) p.begin_forced(forced);
    Parsed out;
    auto take = [&](ToolDelta d) {
        out.content += d.content;
        for (auto& c : d.calls) out.calls.push_back(std::move(c));
    };
    for (const auto& piece : pieces) take(p.push(piece));
    take(p.finish(truncated));
    return out;
}

// `forced`: the prompt ended with this call opening, so `output` is only what the model wrote after it.
void expect_parse(ToolParserKind kind, const ojson& tools, const std::string& output, const std::string& content,
                  const std::vector<std::pair<std::string, ojson>>& calls, const std::string& forced = "",
                  bool truncated = false) {
    auto check = [&](const Parsed& got, const std::string& what) {
        EXPECT_EQ(got.content, content) << what;
        ASSERT_EQ(got.calls.size(), calls.size()) << what;
        for (size_t i = 0; i < calls.size(); ++i) {
            EXPECT_EQ(got.calls[i].name, calls[i].first) << what;
            EXPECT_EQ(ojson::parse(got.calls[i].arguments), calls[i].second) << what;
        }
    };
    check(run(kind, tools, {output}, forced, truncated), "whole");
    std::vector<std::string> bytes;
    for (char c : output) bytes.emplace_back(1, c);
    check(run(kind, tools, bytes, forced, truncated), "byte by byte");
    std::mt19937 rng(99);
    for (int trial = 0; trial < 200; ++trial) {
        std::vector<std::string> pieces;
        size_t at = 0;
        while (at < output.size()) {
            const size_t n = std::uniform_int_distribution<size_t>(0, 16)(rng);
            pieces.push_back(output.substr(at, n));
            at += n;
        }
        check(run(kind, tools, pieces, forced, truncated), "trial " + std::to_string(trial));
        if (::testing::Test::HasFailure()) return;
    }
}

TEST(ToolParser, HermesTwoCallsAsInQwensGuide) {
    const std::string out =
        "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": \"San Francisco, CA, USA\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_temperature_date\", \"arguments\": {\"location\": \"San Francisco, "
        "CA, USA\", \"date\": \"2024-10-01\"}}\n</tool_call>";
    expect_parse(ToolParserKind::Hermes, nullptr, out, "",
                 {{"get_current_temperature", {{"location", "San Francisco, CA, USA"}}},
                  {"get_temperature_date", {{"location", "San Francisco, CA, USA"}, {"date", "2024-10-01"}}}});
}

TEST(ToolParser, HermesContentBeforeCallAndPlainText) {
    expect_parse(ToolParserKind::Hermes, nullptr,
                 "Let me check the weather.\n<tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                 "Let me check the weather.\n", {{"w", {{"city", "Paris"}}}});
    // No call: text that merely mentions tags' characters passes through untouched.
    expect_parse(ToolParserKind::Hermes, nullptr, "a < b and <tool is not a call", "a < b and <tool is not a call", {});
}

TEST(ToolParser, HermesMalformedCallIsContent) {
    expect_parse(ToolParserKind::Hermes, nullptr, "<tool_call>\n{not json}\n</tool_call>",
                 "<tool_call>\n{not json}\n</tool_call>", {});
    // Cut off by max_tokens before </tool_call> but complete JSON: still a call.
    expect_parse(ToolParserKind::Hermes, nullptr, "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n", "",
                 {{"f", ojson::object()}});
}

TEST(ToolParser, Qwen3CoderTypedParameters) {
    const ojson tools = ojson::parse(R"([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}, "hours": {"type": "array"}, "zip": {"type": "string"}}}}}])");
    const std::string out =
        "I'll look that up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=hours>\n[6, 12]\n"
        "</parameter>\n<parameter=zip>\n75001\n</parameter>\n</function>\n</tool_call>";
    expect_parse(ToolParserKind::Qwen3Coder, tools, out, "I'll look that up.\n",
                 {{"get_weather", ojson::parse(R"({"city": "Paris", "days": 3, "metric": true, "hours": [6, 12],
                                                  "zip": "75001"})")}});
}

TEST(ToolParser, Qwen3CoderMultilineValueAndTwoCalls) {
    const std::string out =
        "<tool_call>\n<function=write_file>\n<parameter=path>\nmain.py\n</parameter>\n<parameter=content>\n"
        "def main():\n    print(\"hi\")\n\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=run>\n"
        "<parameter=cmd>\npython main.py\n</parameter>\n</function>\n</tool_call>";
    expect_parse(ToolParserKind::Qwen3Coder, nullptr, out, "",
                 {{"write_file", {{"path", "main.py"}, {"content", "def main():\n    print(\"hi\")\n"}}},
                  {"run", {{"cmd", "python main.py"}}}});
}

// Calls as the model cards write them (Qwen's function-calling guide; Qwen3-Coder's chat template).
const std::string kHermesCall =
    "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": \"San Francisco, CA, USA\"}}\n"
    "</tool_call>";
const std::string kCoderCall =
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>";

TEST(ToolParser, ForcedPrefixOpensTheModelCardsCall) {
    // tool_choice required / named: the prompt suffix must be the start of what the model would write.
    for (const auto& [kind, call, name] :
         {std::tuple{ToolParserKind::Hermes, kHermesCall, std::string("get_current_temperature")},
          std::tuple{ToolParserKind::Qwen3Coder, kCoderCall, std::string("get_weather")}}) {
        const std::string required = forced_call_prefix(kind, "");
        const std::string named = forced_call_prefix(kind, name);
        EXPECT_EQ(call.substr(0, required.size()), required);
        EXPECT_EQ(call.substr(0, named.size()), named);
        // The named prefix carries the name and stops before the arguments.
        EXPECT_GT(named.size(), required.size() + name.size());
        EXPECT_EQ(call.find(name), named.find(name));
        EXPECT_EQ(named.find(kind == ToolParserKind::Hermes ? "{\"location\"" : "<parameter="), std::string::npos);
    }
    // A name that JSON must escape is escaped: the prefix plus arguments is valid JSON with that name.
    const std::string odd = "say \"hi\"\\now";
    const std::string p = forced_call_prefix(ToolParserKind::Hermes, odd);
    EXPECT_EQ(ojson::parse(p.substr(std::string("<tool_call>").size()) + "{}}").at("name"), odd);
}

TEST(ToolParser, ForcedPrefixParsedWithTheGeneratedRest) {
    // Whatever the split between prompt and output, prefix + output parses as the whole call does.
    const ojson temp = {{"location", "San Francisco, CA, USA"}};
    for (const std::string& name : {std::string(), std::string("get_current_temperature")}) {
        const std::string forced = forced_call_prefix(ToolParserKind::Hermes, name);
        expect_parse(ToolParserKind::Hermes, nullptr, kHermesCall.substr(forced.size()), "",
                     {{"get_current_temperature", temp}}, forced);
    }
    for (const std::string& name : {std::string(), std::string("get_weather")}) {
        const std::string forced = forced_call_prefix(ToolParserKind::Qwen3Coder, name);
        expect_parse(ToolParserKind::Qwen3Coder, nullptr, kCoderCall.substr(forced.size()), "",
                     {{"get_weather", {{"city", "Paris"}}}}, forced);
    }
    // A second call after the forced one is parsed as usual.
    const std::string forced = forced_call_prefix(ToolParserKind::Hermes, "");
    expect_parse(ToolParserKind::Hermes, nullptr,
                 kHermesCall.substr(forced.size()) + "\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>", "",
                 {{"get_current_temperature", temp}, {"g", ojson::object()}}, forced);
}

TEST(ToolParser, ForcedCallThatDoesNotParseIsOnlyTheModelsText) {
    // The model refused to write a call: its text is content, the prompt's prefix is not.
    const std::string hermes = forced_call_prefix(ToolParserKind::Hermes, "");
    expect_parse(ToolParserKind::Hermes, nullptr, "I would rather not.", "I would rather not.", {}, hermes);
    expect_parse(ToolParserKind::Hermes, nullptr, "oops</tool_call>", "oops</tool_call>", {}, hermes);
    // Cut off by max_tokens inside the arguments: no call, and no arguments made up.
    const std::string named = forced_call_prefix(ToolParserKind::Hermes, "get_current_temperature");
    expect_parse(ToolParserKind::Hermes, nullptr, "{\"location\": \"San Fr", "{\"location\": \"San Fr", {}, named, true);
    const std::string coder = forced_call_prefix(ToolParserKind::Qwen3Coder, "get_weather");
    expect_parse(ToolParserKind::Qwen3Coder, nullptr, "<parameter=city>\nPar", "<parameter=city>\nPar", {}, coder, true);
    // Nothing generated at all.
    expect_parse(ToolParserKind::Qwen3Coder, nullptr, "", "", {}, coder, true);
    // Not cut off (the model stopped): an unclosed qwen3_coder call still counts, as without forcing.
    expect_parse(ToolParserKind::Qwen3Coder, nullptr, "<parameter=city>\nParis\n</parameter>\n", "",
                 {{"get_weather", {{"city", "Paris"}}}}, coder);
}

TEST(ToolParser, Names) {
    EXPECT_EQ(tool_parser_kind("hermes"), ToolParserKind::Hermes);
    EXPECT_EQ(tool_parser_kind("qwen3_coder"), ToolParserKind::Qwen3Coder);
    EXPECT_THROW(tool_parser_kind("mistral"), Error);
}

}  // namespace
}  // namespace nibble::server
