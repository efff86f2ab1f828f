// tokenizer.json "pre_tokenizer": a flat list of stages (Sequence is flattened) that cut normalized
// text into pre-tokens, the words the model then encodes one by one. Supported: Split (String or Regex
// pattern; behaviours Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous; invert),
// ByteLevel (add_prefix_space, use_regex), Metaspace (replacement, prepend_scheme, split), Digits,
// Punctuation, Sequence; anything else is refused by name when loading.
//
// Layout: pre-tokens are spans [begin, end) of one byte buffer; stages that only cut (Split, Digits,
// Punctuation) refine the spans in place, stages that rewrite text (ByteLevel, Metaspace) write a new
// buffer. No per-token allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "tokenizer/regex.h"

namespace nibble::tokenizer {

struct PreTokens {
    struct Span {
        uint32_t begin, end;
        bool at_text_start;  // starts at offset 0 of the original text (Metaspace prepend_scheme "first")
    };
    std::string buffer;
    std::vector<Span> spans;
};

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

class PreTokenizer {
public:
    static PreTokenizer from_json(const nlohmann::json& j);

    bool empty() const { return stages_.empty(); }
    // Runs every stage over `pieces` (`scratch` is reused working memory).
    void apply(PreTokens& pieces, PreTokens& scratch) const;

private:
    struct Split { std::shared_ptr<const Regex> regex; SplitBehavior behavior; bool invert; };
    struct ByteLevel { bool add_prefix_space; bool use_regex; };
    struct Metaspace { std::string replacement; char32_t replacement_cp; enum { always, first, never } prepend; bool split; };
    struct Digits { bool individual; };
    struct Punctuation { SplitBehavior behavior; };
    using Stage = std::variant<Split, ByteLevel, Metaspace, Digits, Punctuation>;

    static void parse(const nlohmann::json& j, std::vector<Stage>& stages);
    std::vector<Stage> stages_;
    std::shared_ptr<const Regex> gpt2_regex_;  // ByteLevel's use_regex split, compiled once
};

}  // namespace nibble::tokenizer
