// Added-token matching (see added_tokens.h).
#include "tokenizer/added_tokens.h"

#include <algorithm>

#include "tokenizer/unicode.h"
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {
namespace {

bool is_word_char(char32_t cp) { return cp == '_' || is_alphanumeric(cp); }

char32_t last_code_point(std::string_view s) {
    size_t start = s.size() - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    return next_code_point(s, start);
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(std::vector<AddedToken> tokens) : tokens_(std::move(tokens)) {
    root_.fill(-1);
    nodes_.emplace_back();
    for (size_t t = 0; t < tokens_.size(); ++t) {
        const std::string& s = tokens_[t].content;
        if (s.empty()) continue;
        int32_t node = 0;
        for (size_t k = 0; k < s.size(); ++k) {
            auto b = static_cast<uint8_t>(s[k]);
            int32_t next = child(node, b);
            if (next < 0) {
                next = static_cast<int32_t>(nodes_.size());
                nodes_.emplace_back();
                auto& ch = nodes_[node].children;
                ch.insert(std::lower_bound(ch.begin(), ch.end(), std::make_pair(b, int32_t{-1})), {b, next});
                if (node == 0) root_[b] = next;
            }
            node = next;
        }
        nodes_[node].token = static_cast<int32_t>(t);
    }
}

int32_t AddedTokenMatcher::child(int32_t node, uint8_t b) const {
    if (node == 0) return root_[b];
    const auto& ch = nodes_[node].children;
    auto it = std::lower_bound(ch.begin(), ch.end(), std::make_pair(b, int32_t{-1}));
    return it != ch.end() && it->first == b ? it->second : -1;
}

int64_t AddedTokenMatcher::longest_at(std::string_view text, size_t pos, size_t& end) const {
    int32_t node = root_[static_cast<uint8_t>(text[pos])];
    int64_t best = -1;
    size_t k = pos + 1;
    while (node >= 0) {
        if (nodes_[node].token >= 0) {
            best = nodes_[node].token;
            end = k;
        }
        if (k >= text.size()) break;
        node = child(node, static_cast<uint8_t>(text[k]));
        ++k;
    }
    return best;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<Segment>& out) const {
    const size_t first = out.size();
    size_t start_offset = 0;  // end of the last emitted piece
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = 0;
        int64_t t = tokens_.empty() ? -1 : longest_at(text, pos, end);
        if (t < 0) {
            ++pos;
            continue;
        }
        const AddedToken& tok = tokens_[t];
        size_t start = pos, stop = end;
        if (tok.single_word) {
            bool start_space = start == 0 || !is_word_char(last_code_point(text.substr(0, start)));
            size_t k = stop;
            bool stop_space = stop == text.size() || !is_word_char(next_code_point(text, k));
            if (!start_space || !stop_space) {
                ++pos;
                continue;
            }
        }
        if (tok.lstrip) {
            std::string_view left = text.substr(start_offset, start - start_offset);
            start = start_offset + trim_whitespace(left, false, true).size();
        }
        if (tok.rstrip) {
            std::string_view right = text.substr(stop);
            stop += right.size() - trim_whitespace(right, true, false).size();
        }
        if (start_offset < start) out.push_back({start_offset, start, -1});
        out.push_back({start, stop, t});
        start_offset = stop;
        pos = stop;
    }
    if (start_offset < text.size() || out.size() == first) out.push_back({start_offset, text.size(), -1});
}

}  // namespace nibble::tokenizer
