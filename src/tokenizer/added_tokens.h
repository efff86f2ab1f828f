// Added tokens (tokenizer.json "added_tokens", plus tokenizer_config.json's added_tokens_decoder) and
// the splitter that finds them in text before the model runs, as HF tokenizers' AddedVocabulary does:
// leftmost-longest matching, non-normalized tokens matched on the raw text and normalized ones on the
// normalized pieces, with the single_word / lstrip / rstrip rules. Special tokens are always matched
// (split_special_tokens off).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::tokenizer {

struct AddedToken {
    uint32_t id = 0;
    std::string content;
    bool special = false;
    bool lstrip = false;       // swallow whitespace on its left
    bool rstrip = false;       // swallow whitespace on its right
    bool single_word = false;  // match only when not inside a word
    bool normalized = false;   // match on normalized text (else on raw text)
};

// A piece of text: [begin, end) of the input, and the added token it is (-1 for plain text).
struct Segment {
    size_t begin, end;
    int64_t token = -1;  // index into the AddedTokenMatcher's tokens, or -1
};

class AddedTokenMatcher {
public:
    AddedTokenMatcher() = default;
    explicit AddedTokenMatcher(std::vector<AddedToken> tokens);

    bool empty() const { return tokens_.empty(); }
    const AddedToken& token(size_t index) const { return tokens_[index]; }
    // Splits `text` into plain segments and matched tokens, covering all of it in order (plain
    // segments may be empty only when the whole text is).
    void split(std::string_view text, std::vector<Segment>& out) const;

private:
    struct Node {
        std::vector<std::pair<uint8_t, int32_t>> children;  // sorted by byte
        int32_t token = -1;
    };
    int32_t child(int32_t node, uint8_t b) const;
    // Longest token matching at text[pos], or -1.
    int64_t longest_at(std::string_view text, size_t pos, size_t& end) const;

    std::vector<AddedToken> tokens_;
    std::vector<Node> nodes_;              // nodes_[0] is the root
    std::array<int32_t, 256> root_ = filled_root();  // root's children by first byte (-1 none)
    static std::array<int32_t, 256> filled_root() {
        std::array<int32_t, 256> r;
        r.fill(-1);
        return r;
    }
};

}  // namespace nibble::tokenizer
