// Per-choice text pipeline: tokens -> detokenizer -> stop strings -> reasoning parser -> tool-call parser.
// A stop string is searched over the held text, so it is found even when it spans tokens; at most
// (longest stop - 1) bytes are held back, widened to a UTF-8 character boundary.
#include "server/output_processor.h"

#include <algorithm>

#include "base/error.h"

namespace nibble::server {

namespace {

// Largest cut <= pos that does not split a UTF-8 character of `s`.
size_t utf8_boundary(const std::string& s, size_t pos) {
    while (pos > 0 && pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) --pos;
    return pos;
}

}  // namespace

OutputProcessor::OutputProcessor(const tokenizer::Tokenizer& tokenizer, OutputOptions options)
    : tokenizer_(&tokenizer), options_(std::move(options)), detokenizer_(tokenizer, options_.skip_special_tokens) {
    for (const auto& s : options_.stop) max_stop_ = std::max(max_stop_, s.size());
    NIBBLE_CHECK(options_.forced_prefix.empty() || options_.tools, "a forced tool-call prefix needs a tool-call parser");
    if (options_.reasoning && options_.forced_prefix.empty()) reasoning_.emplace(*options_.reasoning, options_.prompt_text);
    if (options_.tools) {
        tool_parser_.emplace(*options_.tools, options_.tool_defs);
        if (!options_.forced_prefix.empty()) tool_parser_->begin_forced(options_.forced_prefix);
    }
}

void OutputProcessor::emit_text(std::string text, ChoiceDelta& delta, bool final, bool truncated) {
    std::string content;
    if (reasoning_) {
        ReasoningDelta r = reasoning_->push(text);
        if (final) {
            ReasoningDelta f = reasoning_->finish();
            r.reasoning += f.reasoning;
            r.content += f.content;
        }
        delta.reasoning += r.reasoning;
        content = std::move(r.content);
    } else {
        content = std::move(text);
    }
    if (tool_parser_) {
        ToolDelta t = tool_parser_->push(content);
        if (final) {
            ToolDelta f = tool_parser_->finish(truncated);
            t.content += f.content;
            for (auto& c : f.calls) t.calls.push_back(std::move(c));
        }
        delta.content += t.content;
        for (auto& c : t.calls) {
            if (!options_.only_tool.empty() && c.name != options_.only_tool) continue;
            ++num_calls_;
            delta.tool_calls.push_back(std::move(c));
        }
    } else {
        delta.content += content;
    }
}

void OutputProcessor::finish(ChoiceDelta& delta, const std::string& reason) {
    finished_ = true;
    emit_text(std::move(held_), delta, true, reason == "length");
    held_.clear();
    delta.finish_reason = (num_calls_ > 0 && reason != "abort") ? "tool_calls" : reason;
}

std::string OutputProcessor::token_text(int32_t id) const {
    if (options_.tokens_as_ids) return "token_id:" + std::to_string(id);
    return tokenizer_->decode(std::vector<uint32_t>{static_cast<uint32_t>(id)}, false);
}

ChoiceDelta OutputProcessor::process(const SequenceOutput& output) {
    ChoiceDelta delta;
    if (finished_) return delta;
    for (size_t i = 0; i < output.tokens.size(); ++i) {
        const int32_t id = output.tokens[i];
        ++num_tokens_;
        if (!output.logprobs.empty() && i < output.logprobs.size()) {
            TokenLogprobEntry e;
            e.token = token_text(id);
            e.logprob = output.logprobs[i];
            if (i < output.top_logprobs.size())
                for (const auto& t : output.top_logprobs[i])
                    e.top.emplace_back(token_text(t.token), t.logprob);
            delta.logprobs.push_back(std::move(e));
        }
        // The token that ended the sequence (EOS, a stop id) is not part of the text.
        const bool last = i + 1 == output.tokens.size();
        if (last && output.finish == FinishReason::Stop && options_.stop_token_ids.count(id)) continue;
        held_ += detokenizer_.push(static_cast<uint32_t>(id));
        // Earliest stop string in the held text.
        size_t cut = std::string::npos;
        for (const auto& s : options_.stop) cut = std::min(cut, held_.find(s));
        if (cut != std::string::npos) {
            held_.resize(cut);
            delta.stop_string_hit = true;
            finish(delta, "stop");
            return delta;
        }
    }
    if (output.finish) {
        held_ += detokenizer_.finish();
        size_t cut = std::string::npos;
        for (const auto& s : options_.stop) cut = std::min(cut, held_.find(s));
        if (cut != std::string::npos) held_.resize(cut);
        const char* reason = *output.finish == FinishReason::Stop     ? "stop"
                             : *output.finish == FinishReason::Length ? "length"
                                                                      : "abort";
        finish(delta, cut != std::string::npos ? "stop" : reason);
        return delta;
    }
    const size_t keep = max_stop_ > 0 ? std::min(held_.size(), max_stop_ - 1) : 0;
    const size_t emit = utf8_boundary(held_, held_.size() - keep);
    emit_text(held_.substr(0, emit), delta, false);
    held_.erase(0, emit);
    return delta;
}

}  // namespace nibble::server
