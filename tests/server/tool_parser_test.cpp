// Tool-call parsers on canned outputs in the formats the model cards document: Hermes/Qwen2.5
// (<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, the example of Qwen's function-calling
// guide) and Qwen3-Coder's XML-ish calls. Fed whole and in arbitrary splits; arguments compared as JSON.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <random>

#include "base/error.h"
#include "server/tool_parser.h"

namespace nibble::server {
namespace {

using ojson = nlohmann::ordered_json;

struct Parsed {
    std::string content;
    std::vector<ParsedToolCall> calls;
};

Parsed run(ToolParserKind kind, const ojson& tools, const std::vector<std::string>& pieces) {
    ToolCallParser p(kind, tools);
    Parsed out;
    auto take = [&](ToolDelta d) {
        out.content += d.content;
        for (auto& c : d.calls) out.calls.push_back(std::move(c));
    };
    for (const auto& piece : pieces) take(p.push(piece));
    take(p.finish());
    return out;
}

void expect_parse(ToolParserKind kind, const ojson& tools, const std::string& output, const std::string& content,
                  const std::vector<std::pair<std::string, ojson>>& calls) {
    auto check = [&](const Parsed& got, const std::string& what) {
        EXPECT_EQ(got.content, content) << what;
        ASSERT_EQ(got.calls.size(), calls.size()) << what;
        for (size_t i = 0; i < calls.size(); ++i) {
            EXPECT_EQ(got.calls[i].name, calls[i].first) << what;
            EXPECT_EQ(ojson::parse(got.calls[i].arguments), calls[i].second) << what;
        }
    };
    check(run(kind, tools, {output}), "whole");
    std::vector<std::string> bytes;
    for (char c : output) bytes.emplace_back(1, c);
    check(run(kind, tools, bytes), "byte by byte");
    std::mt19937 rng(99);
    for (int trial = 0; trial < 200; ++trial) {
        std::vector<std::string> pieces;
        size_t at = 0;
        while (at < output.size()) {
            const size_t n = std::uniform_int_distribution<size_t>(0, 16)(rng);
            pieces.push_back(output.substr(at, n));
            at += n;
        }
        check(run(kind, tools, pieces), "trial " + std::to_string(trial));
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

TEST(ToolParser, Names) {
    EXPECT_EQ(tool_parser_kind("hermes"), ToolParserKind::Hermes);
    EXPECT_EQ(tool_parser_kind("qwen3_coder"), ToolParserKind::Qwen3Coder);
    EXPECT_THROW(tool_parser_kind("mistral"), Error);
}

}  // namespace
}  // namespace nibble::server
