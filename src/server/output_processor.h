// Turns one sequence's tokens, as the engine hands them over, into what a choice of an OpenAI response
// carries: text through the incremental detokenizer, cut before the first stop string; then, when enabled,
// reasoning split off (<think>) and tool calls parsed out of the content; logprobs with token strings.
// One OutputProcessor per choice; the HTTP layer owns it and calls it outside the engine thread.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "engine/request.h"
#include "server/reasoning_parser.h"
#include "server/tool_parser.h"
#include "tokenizer/tokenizer.h"

namespace nibble::server {

struct OutputOptions {
    std::vector<std::string> stop;           // stop strings (the text is cut before the first one)
    std::set<int32_t> stop_token_ids;        // EOS and stop ids: their text is not part of the output
    bool skip_special_tokens = true;
    bool tokens_as_ids = false;              // logprob tokens as "token_id:N" (vLLM's return_tokens_as_token_ids)
    std::optional<ReasoningParserKind> reasoning;
    std::string prompt_text;                 // the rendered prompt (reasoning start state)
    std::optional<ToolParserKind> tools;     // parse tool calls out of the content
    nlohmann::ordered_json tool_defs;        // the request's tools (parameter types)
    std::string only_tool;                   // named tool_choice: calls of other functions are dropped
    std::string forced_prefix;               // tool_choice required/named: the call opening the prompt ends
                                             // with (forced_call_prefix); parsed first, never content; the
                                             // output is then not split into reasoning (it is a call)
};

struct TokenLogprobEntry {
    std::string token;                       // the token's text
    float logprob = 0.0f;
    std::vector<std::pair<std::string, float>> top;  // most likely tokens at this position
};

struct ChoiceDelta {
    std::string content;
    std::string reasoning;
    std::vector<ParsedToolCall> tool_calls;
    std::vector<TokenLogprobEntry> logprobs;
    std::optional<std::string> finish_reason;  // stop, length, tool_calls, abort; set once, at the end
    bool stop_string_hit = false;            // the caller ends the sequence in the engine (finish_sequence)

    bool empty() const {
        return content.empty() && reasoning.empty() && tool_calls.empty() && logprobs.empty() && !finish_reason;
    }
};

class OutputProcessor {
public:
    OutputProcessor(const tokenizer::Tokenizer& tokenizer, OutputOptions options);

    // The engine's output for this sequence. After the finish (finish_reason set), further outputs are
    // ignored (the engine may still deliver tokens generated before it saw finish_sequence).
    ChoiceDelta process(const SequenceOutput& output);

    bool finished() const { return finished_; }
    int64_t num_tokens() const { return num_tokens_; }  // tokens that count as generated (up to the stop)
    bool called_tools() const { return num_calls_ > 0; }

private:
    void emit_text(std::string text, ChoiceDelta& delta, bool final, bool truncated = false);
    void finish(ChoiceDelta& delta, const std::string& reason);
    std::string token_text(int32_t id) const;

    const tokenizer::Tokenizer* tokenizer_;
    OutputOptions options_;
    tokenizer::Detokenizer detokenizer_;
    std::optional<ReasoningParser> reasoning_;
    std::optional<ToolCallParser> tool_parser_;
    std::string held_;             // text not yet emitted: may be the start of a stop string
    size_t max_stop_ = 0;          // longest stop string, bytes
    bool finished_ = false;
    int64_t num_tokens_ = 0;
    int num_calls_ = 0;
};

}  // namespace nibble::server
