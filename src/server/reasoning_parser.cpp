// The <think> splitter. Held back at any time: only a suffix of pending_ that is a prefix of the tag being
// looked for, so reasoning and content stream with at most len("</think>") - 1 bytes of delay.
#include "server/reasoning_parser.h"

#include "base/error.h"

namespace nibble::server {

namespace {

constexpr std::string_view kOpen = "<think>";
constexpr std::string_view kClose = "</think>";

// Length of the longest suffix of `text` that is a proper prefix of `tag`.
size_t partial_suffix(std::string_view text, std::string_view tag) {
    for (size_t n = std::min(text.size(), tag.size() - 1); n > 0; --n)
        if (text.substr(text.size() - n) == tag.substr(0, n)) return n;
    return 0;
}

// Whether the prompt ends inside an open <think> block.
bool prompt_leaves_think_open(std::string_view prompt) {
    const size_t open = prompt.rfind(kOpen);
    if (open == std::string_view::npos) return false;
    const size_t close = prompt.rfind(kClose);
    return close == std::string_view::npos || close < open;
}

bool prompt_closed_think(std::string_view prompt) {
    const size_t close = prompt.rfind(kClose);
    if (close == std::string_view::npos) return false;
    const size_t open = prompt.rfind(kOpen);
    // Only a block closed at the very end of the prompt (after the last user turn) counts.
    return (open == std::string_view::npos || open < close) &&
           prompt.substr(close + kClose.size()).find_first_not_of(" \t\r\n") == std::string_view::npos;
}

}  // namespace

ReasoningParserKind reasoning_parser_kind(const std::string& name) {
    if (name == "qwen3") return ReasoningParserKind::Qwen3;
    if (name == "deepseek_r1") return ReasoningParserKind::DeepSeekR1;
    if (name == "nemotron_v3") return ReasoningParserKind::NemotronV3;
    fail("--reasoning-parser {} is not supported (supported: qwen3, deepseek_r1, nemotron_v3)", name);
}

ReasoningParser::ReasoningParser(ReasoningParserKind kind, std::string_view prompt) {
    state_ = State::Start;
    may_open_ = true;
    if (prompt_leaves_think_open(prompt)) {
        open_at_start_ = true;
    } else if (kind == ReasoningParserKind::Qwen3) {
        open_at_start_ = false;
    } else {
        // R1-style models think unless the prompt closed the block for them.
        open_at_start_ = !prompt_closed_think(prompt);
        if (!open_at_start_) may_open_ = false;
    }
}

void ReasoningParser::drain(ReasoningDelta& out, bool final) {
    for (;;) {
        if (state_ == State::Start) {
            // Leading whitespace before a <think> is kept with whichever side the text lands on.
            const size_t lead = pending_.find_first_not_of(" \t\r\n");
            if (lead == std::string::npos) {
                if (!final) return;
                state_ = open_at_start_ ? State::Reasoning : State::Content;
                continue;
            }
            std::string_view rest = std::string_view(pending_).substr(lead);
            if (may_open_ && rest.size() < kOpen.size() && kOpen.substr(0, rest.size()) == rest && !final) return;
            if (may_open_ && rest.substr(0, kOpen.size()) == kOpen) {
                pending_.erase(0, lead + kOpen.size());
                state_ = State::Reasoning;
            } else {
                state_ = open_at_start_ ? State::Reasoning : State::Content;
            }
            continue;
        }
        if (state_ == State::Content) {
            out.content += pending_;
            pending_.clear();
            return;
        }
        // Reasoning: up to </think>.
        const size_t close = pending_.find(kClose);
        if (close != std::string::npos) {
            out.reasoning += pending_.substr(0, close);
            pending_.erase(0, close + kClose.size());
            state_ = State::Content;
            continue;
        }
        const size_t keep = final ? 0 : partial_suffix(pending_, kClose);
        out.reasoning += pending_.substr(0, pending_.size() - keep);
        pending_.erase(0, pending_.size() - keep);
        return;
    }
}

ReasoningDelta ReasoningParser::push(std::string_view text) {
    pending_ += text;
    ReasoningDelta out;
    drain(out, false);
    return out;
}

ReasoningDelta ReasoningParser::finish() {
    ReasoningDelta out;
    drain(out, true);
    return out;
}

}  // namespace nibble::server
