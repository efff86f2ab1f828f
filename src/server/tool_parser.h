// Tool calls out of a model's text output, incrementally. push() takes each new piece of content and
// returns the content that is certainly not part of a call plus every call that completed; finish()
// flushes the rest (an unclosed call whose body still parses counts as a call, unless the output was cut
// off by max_tokens and qwen3_coder's </function> is missing; otherwise its text is returned as content). Whole calls are returned at once: a streamed tool call arrives as one delta with
// its id, name and complete arguments, which OpenAI's streaming format allows.
//
// Formats, by vLLM's --tool-call-parser names:
//   hermes       <tool_call>{"name": "f", "arguments": {...}}</tool_call>     (Hermes 2 Pro, Qwen2.5, Qwen3)
//   qwen3_coder  <tool_call><function=f><parameter=p>value</parameter>...</function></tool_call>
//                (Qwen3-Coder, Nemotron 3); each value is converted with the type the tool's JSON schema
//                gives the parameter (string when it gives none), one leading and trailing newline removed.
// Arguments are returned as a JSON string, as the OpenAI API carries them.
//
// tool_choice "required" or a named function is enforced without constrained decoding: the prompt gets the
// opening of a call in the parser's format (forced_call_prefix), the model continues inside the call, and
// the parser is started on that prefix (begin_forced) so it parses prefix + generated text, never emitting
// the prefix as content.
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

// The text that opens a tool call in `kind`'s format, appended to the rendered prompt: for tool_choice
// "required" (`function` empty) up to the function name, for a named choice up to its arguments.
//   hermes       "<tool_call>\n"            | "<tool_call>\n{\"name\": \"N\", \"arguments\": "
//   qwen3_coder  "<tool_call>\n<function="  | "<tool_call>\n<function=N>\n"
std::string forced_call_prefix(ToolParserKind kind, const std::string& function);

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

    // Before any push: the output continues `prefix` (forced_call_prefix), which the prompt already holds.
    // The parser starts inside that call; if it does not parse, the prefix is left out of the content.
    void begin_forced(std::string_view prefix);

    ToolDelta push(std::string_view text);
    // `truncated`: the output was cut off (finish_reason length), so a call missing its closing tags is
    // not complete (qwen3_coder would otherwise take a cut-off value as the argument).
    ToolDelta finish(bool truncated = false);

    // The body between <tool_call> and </tool_call> as a call, or nullopt when it does not parse.
    // `truncated`: every qwen3_coder <function=...> must be closed by </function>.
    std::optional<std::vector<ParsedToolCall>> parse_body(std::string_view body, bool truncated = false) const;

private:
    void drain(ToolDelta& out, bool final, bool truncated);
    void emit_content(ToolDelta& out, std::string text);

    ToolParserKind kind_;
    nlohmann::ordered_json tools_;
    bool in_call_ = false;
    bool any_call_ = false;  // after a call, whitespace-only text between calls is dropped
    std::string pending_;
    size_t forced_body_ = 0;  // bytes at the start of the current call's body that the prompt forced
};

}  // namespace nibble::server
