// Splits a model's output text into reasoning (between <think> and </think>) and content, incrementally:
// push() takes each new piece of text and returns what became certain; finish() flushes what was held
// back (a possible partial tag). The concatenation of all returned pieces equals parsing the whole text.
//
// Parsers, by vLLM's --reasoning-parser names:
//   qwen3        the output is content unless it opens with <think> (or the prompt left a <think> open:
//                Qwen3 "thinking" templates put it in the generation prompt); reasoning ends at </think>.
//   deepseek_r1  the output starts in reasoning (the template opens <think>); an optional leading <think>
//   nemotron_v3  is dropped; reasoning ends at </think>. When the prompt already closed the block
//                (enable_thinking=false renders <think></think>), the output is all content.
#pragma once

#include <memory>
#include <string>
#include <string_view>

namespace nibble::server {

enum class ReasoningParserKind { Qwen3, DeepSeekR1, NemotronV3 };

// Parses a --reasoning-parser name; nibble::Error listing the supported names otherwise.
ReasoningParserKind reasoning_parser_kind(const std::string& name);

struct ReasoningDelta {
    std::string reasoning;
    std::string content;
};

class ReasoningParser {
public:
    // `prompt` is the rendered prompt: whether it ends inside an open <think> block decides the start state.
    ReasoningParser(ReasoningParserKind kind, std::string_view prompt);

    ReasoningDelta push(std::string_view text);
    ReasoningDelta finish();

private:
    enum class State { Start, Reasoning, Content };
    void drain(ReasoningDelta& out, bool final);

    State state_;
    bool may_open_;     // in Start: a leading <think> opens (or, already open, is dropped)
    bool open_at_start_;  // in Start: the output begins inside reasoning
    std::string pending_;  // text not yet classified (a possible partial tag at its end)
};

}  // namespace nibble::server
