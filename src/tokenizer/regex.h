// A compiled PCRE2 regular expression for tokenizer patterns: UTF + UCP mode (so \s, \d, \w and
// \p{...} follow Unicode, as the Oniguruma engine behind Hugging Face tokenizers does), JIT-compiled when
// the PCRE2 build supports it. Immutable after construction and safe to share between threads.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace nibble::tokenizer {

class Regex {
public:
    // Compiles `pattern`; throws nibble::Error naming `where` and the PCRE2 message when it is invalid.
    Regex(std::string_view pattern, std::string_view where);
    ~Regex();
    Regex(const Regex&) = delete;
    Regex& operator=(const Regex&) = delete;

    // Calls on_match(start, end) for each successive non-overlapping match in `subject` (valid UTF-8),
    // left to right; after an empty match the search resumes one character later.
    void find_all(std::string_view subject, const std::function<void(size_t, size_t)>& on_match) const;

    // `subject` with every match replaced by `replacement` (taken literally).
    std::string replace_all(std::string_view subject, std::string_view replacement) const;

    const std::string& pattern() const { return pattern_; }

private:
    std::string pattern_;
    void* code_ = nullptr;  // pcre2_code_8*
};

// Escapes `literal` so that it matches itself in a PCRE2 pattern.
std::string regex_escape(std::string_view literal);

}  // namespace nibble::tokenizer
