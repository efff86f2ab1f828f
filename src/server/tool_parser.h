// Tool calls out of a model's text output, incrementally. push() takes each new piece of content and
// returns the content that is certainly not part of a call plus every call that completed; finish()
// flushes the rest (an unclosed call whose body still parses counts as a call; otherwise its text is
// returned as content). Whole calls are returned at once: a streamed tool call arrives as one delta with
// its id, name and complete arguments, which OpenAI's streaming format allows.
//
// Formats, by vLLM's --tool-call-parser names:
//   hermes       <tool_call>{"name": "f", "arguments": {...}}</tool_call>     (Hermes 2 Pro, Qwen2.5, Qwen3)
//   qwen3_coder  <tool_call><function=f><parameter=p>value</parameter>...</function></tool_call>
//                (Qwen3-Coder, Nemotron 3); each value is converted with the type the tool's JSON schema
//                gives the parameter (string when it gives none), one leading and trailing newline removed.
// Arguments are returned as a JSON string, as the OpenAI API carries them.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::server {

enum class ToolParserKind { Hermes, Qwen3Coder };

// Parses a --tool-call-parser name; nibble::Error listing the supported names otherwise.
ToolParserKind tool_parser_kind(const std::string& name);

struct ParsedToolCall {
    std::string name;
    std::string arguments;  // a JSON object, serialized
};

struct ToolDelta {
    std::string content;
    std::vector<ParsedToolCall> calls;
};

class ToolCallParser {
public:
    // `tools`: the request's tools array (qwen3_coder reads parameter types from it); may be null.
    ToolCallParser(ToolParserKind kind, nlohmann::ordered_json tools);

    ToolDelta push(std::string_view text);
    ToolDelta finish();

    // The body between <tool_call> and </tool_call> as a call, or nullopt when it does not parse.
    std::optional<std::vector<ParsedToolCall>> parse_body(std::string_view body) const;

private:
    void drain(ToolDelta& out, bool final);
    void emit_content(ToolDelta& out, std::string text);

    ToolParserKind kind_;
    nlohmann::ordered_json tools_;
    bool in_call_ = false;
    bool any_call_ = false;  // after a call, whitespace-only text between calls is dropped
    std::string pending_;
};

}  // namespace nibble::server
