// PCRE2 wrapper (see regex.h).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/regex.h"

#include <pcre2.h>

#include "base/error.h"
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {
namespace {

struct MatchData {
    pcre2_match_data* data;
    explicit MatchData(const pcre2_code* code) : data(pcre2_match_data_create_from_pattern(code, nullptr)) {
        NIBBLE_CHECK(data != nullptr, "regex: out of memory for match data");
    }
    ~MatchData() { pcre2_match_data_free(data); }
    MatchData(const MatchData&) = delete;
    MatchData& operator=(const MatchData&) = delete;
};

std::string pcre2_message(int code) {
    PCRE2_UCHAR buffer[256];
    pcre2_get_error_message(code, buffer, sizeof(buffer));
    return reinterpret_cast<const char*>(buffer);
}

}  // namespace

Regex::Regex(std::string_view pattern, std::string_view where) : pattern_(pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    auto* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern_.data()), pattern_.size(),
                               PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code == nullptr) {
        fail("{}: regex '{}' does not compile at offset {}: {}", where, pattern_, offset, pcre2_message(error));
    }
    // JIT is an optimisation: when the library lacks it, pcre2_match interprets the pattern instead.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Regex::find_all(std::string_view subject, const std::function<void(size_t, size_t)>& on_match) const {
    auto* code = static_cast<const pcre2_code*>(code_);
    MatchData md(code);
    auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
    size_t pos = 0;
    while (pos <= subject.size()) {
        int rc = pcre2_match(code, s, subject.size(), pos, PCRE2_NO_UTF_CHECK, md.data, nullptr);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
            // Deep backtracking on a huge input: the interpreter uses the heap, so retry without JIT.
            rc = pcre2_match(code, s, subject.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md.data, nullptr);
        }
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) fail("regex '{}': matching failed: {}", pattern_, pcre2_message(rc));
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.data);
        size_t start = ov[0], end = ov[1];
        on_match(start, end);
        if (end > start) {
            pos = end;
        } else {
            if (end >= subject.size()) break;
            pos = end + utf8_len(static_cast<unsigned char>(subject[end]));
        }
    }
}

std::string Regex::replace_all(std::string_view subject, std::string_view replacement) const {
    std::string out;
    size_t prev = 0;
    find_all(subject, [&](size_t start, size_t end) {
        out.append(subject.substr(prev, start - prev));
        out.append(replacement);
        prev = end;
    });
    out.append(subject.substr(prev));
    return out;
}

std::string regex_escape(std::string_view literal) {
    // \Q...\E quotes everything except a literal "\E", which is spliced in escaped.
    std::string out = "\\Q";
    for (size_t i = 0; i < literal.size(); ++i) {
        if (literal[i] == '\\' && i + 1 < literal.size() && literal[i + 1] == 'E') {
            out += "\\E\\\\E\\Q";
            ++i;
        } else {
            out.push_back(literal[i]);
        }
    }
    out += "\\E";
    return out;
}

}  // namespace nibble::tokenizer
