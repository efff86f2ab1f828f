// Lexer of the chat-template interpreter. Follows jinja2's lexer with transformers' settings
// (trim_blocks=True, lstrip_blocks=True): `{%-`/`{{-`/`{#-` strip all whitespace before the tag,
// `-%}`/`-}}`/`-#}` all whitespace after it, a plain `%}` or `#}` eats one following newline, and
// spaces/tabs between a line start and `{%` or `{#` are dropped unless the tag opens with `+`.
#include "tokenizer/chat_template_ast.h"
#include "tokenizer/utf8.h"

#include "base/error.h"

#include <algorithm>
#include <cstring>

namespace nibble::jinja {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
// Byte length of the whitespace character (Python's str.isspace(), which jinja2's \s and
// str.rstrip() use) starting at s[i], or 0.
size_t space_len(const std::string& s, size_t i) {
    auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) return (is_space(static_cast<char>(b)) || (b >= 0x1c && b <= 0x1f)) ? 1 : 0;
    auto at = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0; };
    if (b == 0xc2 && (at(1) == 0x85 || at(1) == 0xa0)) return 2;
    if (b == 0xe1 && at(1) == 0x9a && at(2) == 0x80) return 3;                      // U+1680
    if (b == 0xe2 && at(1) == 0x80 && (at(2) <= 0x8a || at(2) == 0xa8 || at(2) == 0xa9 || at(2) == 0xaf))
        return 3;                                                                   // U+2000-200A, 2028, 2029, 202F
    if (b == 0xe2 && at(1) == 0x81 && at(2) == 0x9f) return 3;                      // U+205F
    if (b == 0xe3 && at(1) == 0x80 && at(2) == 0x80) return 3;                      // U+3000
    return 0;
}
// Length of `text` without its trailing whitespace (Python's str.rstrip()).
size_t rstripped_size(const std::string& text) {
    size_t end = 0;
    for (size_t i = 0; i < text.size();) {
        size_t n = space_len(text, i);
        if (n == 0) {
            auto b = static_cast<unsigned char>(text[i]);
            i += b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 1;
            end = std::min(i, text.size());
        } else {
            i += n;
        }
    }
    return end;
}
// Whether text[from:] is non-empty and all whitespace.
bool all_space_from(const std::string& text, size_t from) {
    if (from >= text.size()) return false;
    for (size_t i = from; i < text.size();) {
        size_t n = space_len(text, i);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_name_char(char c) { return is_name_start(c) || is_digit(c); }

using tokenizer::append_utf8;  // one UTF-8 encoder for the whole tokenizer module (utf8.h)

class Lexer {
public:
    Lexer(const std::string& source, const std::string& origin) : origin_(origin) {
        // jinja2 reads \r\n and \r as \n and drops one trailing newline (keep_trailing_newline=False).
        src_.reserve(source.size());
        for (size_t i = 0; i < source.size(); ++i) {
            if (source[i] == '\r') {
                src_ += '\n';
                if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
            } else {
                src_ += source[i];
            }
        }
        if (!src_.empty() && src_.back() == '\n') src_.pop_back();
    }

    std::vector<Token> run() {
        bool line_starting = true;
        while (pos_ < src_.size()) {
            size_t p = find_tag(pos_);
            if (p == std::string::npos) {
                emit_data(src_.substr(pos_), src_.size());
                break;
            }
            char kind = src_[p + 1];
            char sign = p + 2 < src_.size() && (src_[p + 2] == '-' || src_[p + 2] == '+') ? src_[p + 2] : 0;
            std::string text = src_.substr(pos_, p - pos_);
            if (sign == '-') {
                text.resize(rstripped_size(text));
            } else if (sign != '+' && kind != '{') {
                size_t l_pos = text.rfind('\n');
                l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
                if ((l_pos > 0 || line_starting) && all_space_from(text, l_pos)) text.resize(l_pos);
            }
            emit_data(std::move(text), p);
            advance_to(p + 2 + (sign ? 1 : 0));
            if (kind == '#') {
                lex_comment();
            } else if (kind == '%' && at_raw()) {
                lex_raw();
            } else {
                lex_tag(kind == '{');
            }
            line_starting = pos_ > 0 && src_[pos_ - 1] == '\n';
        }
        tokens_.push_back({TokenType::eof, "", line_});
        return std::move(tokens_);
    }

private:
    [[noreturn]] void error(const std::string& message) {
        fail("chat template {}:{}: syntax error: {}", origin_, line_, message);
    }

    size_t find_tag(size_t from) const {
        for (size_t p = src_.find('{', from); p != std::string::npos; p = src_.find('{', p + 1)) {
            if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) return p;
        }
        return std::string::npos;
    }

    void advance_to(size_t to) {
        for (size_t k = pos_; k < to && k < src_.size(); ++k)
            if (src_[k] == '\n') ++line_;
        pos_ = to;
    }

    void skip_space() {
        size_t q = pos_;
        while (q < src_.size()) {
            size_t n = space_len(src_, q);
            if (n == 0) break;
            q += n;
        }
        advance_to(q);
    }

    // Data is emitted before advancing over it, so it carries the line where it starts.
    void emit_data(std::string text, size_t /*end*/) {
        if (!text.empty()) tokens_.push_back({TokenType::data, std::move(text), line_});
    }

    void lex_comment() {
        size_t q = src_.find("#}", pos_);
        if (q == std::string::npos) error("missing end of comment tag");
        char sign = q > pos_ && (src_[q - 1] == '-' || src_[q - 1] == '+') ? src_[q - 1] : 0;
        advance_to(q + 2);
        if (sign == '-') skip_space();
        else if (sign == 0 && pos_ < src_.size() && src_[pos_] == '\n') advance_to(pos_ + 1);
    }

    // `{% raw %}` (the opening `{%` and sign already consumed).
    bool at_raw() const {
        size_t q = pos_;
        while (q < src_.size() && is_space(src_[q])) ++q;
        if (src_.compare(q, 3, "raw") != 0) return false;
        q += 3;
        if (q < src_.size() && is_name_char(src_[q])) return false;
        while (q < src_.size() && is_space(src_[q])) ++q;
        return src_.compare(q, 2, "%}") == 0 || src_.compare(q, 3, "-%}") == 0;
    }

    void lex_raw() {
        size_t q = src_.find("%}", pos_);
        bool strip_after = src_[q - 1] == '-';
        advance_to(q + 2);
        if (strip_after) skip_space();
        // Find `{%[-+]? endraw [-+]?%}`.
        size_t search = pos_;
        while (true) {
            size_t p = src_.find("{%", search);
            if (p == std::string::npos) error("missing end of raw directive");
            size_t k = p + 2;
            char sign = k < src_.size() && (src_[k] == '-' || src_[k] == '+') ? src_[k] : 0;
            if (sign) ++k;
            while (k < src_.size() && is_space(src_[k])) ++k;
            if (src_.compare(k, 6, "endraw") != 0) {
                search = p + 2;
                continue;
            }
            k += 6;
            while (k < src_.size() && is_space(src_[k])) ++k;
            char end_sign = k < src_.size() && (src_[k] == '-' || src_[k] == '+') ? src_[k] : 0;
            if (end_sign) ++k;
            if (src_.compare(k, 2, "%}") != 0) error("missing end of raw directive");
            std::string text = src_.substr(pos_, p - pos_);
            if (sign == '-') {
                text.resize(rstripped_size(text));
            } else if (sign != '+') {
                size_t l_pos = text.rfind('\n');
                l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
                if (l_pos > 0 && all_space_from(text, l_pos)) text.resize(l_pos);
            }
            emit_data(std::move(text), p);
            advance_to(k + 2);
            if (end_sign == '-') skip_space();
            else if (end_sign == 0 && pos_ < src_.size() && src_[pos_] == '\n') advance_to(pos_ + 1);
            return;
        }
    }

    void lex_tag(bool variable) {
        tokens_.push_back({variable ? TokenType::variable_begin : TokenType::block_begin, "", line_});
        std::vector<char> balance;
        while (true) {
            skip_space();
            if (pos_ >= src_.size()) error(variable ? "unexpected end of template, expected '}}'"
                                                    : "unexpected end of template, expected '%}'");
            if (balance.empty()) {
                const char* end = variable ? "}}" : "%}";
                if (src_[pos_] == '-' && src_.compare(pos_ + 1, 2, end) == 0) {
                    tokens_.push_back({variable ? TokenType::variable_end : TokenType::block_end, "", line_});
                    advance_to(pos_ + 3);
                    skip_space();
                    return;
                }
                if (!variable && src_[pos_] == '+' && src_.compare(pos_ + 1, 2, end) == 0) {
                    tokens_.push_back({TokenType::block_end, "", line_});
                    advance_to(pos_ + 3);
                    return;
                }
                if (src_.compare(pos_, 2, end) == 0) {
                    tokens_.push_back({variable ? TokenType::variable_end : TokenType::block_end, "", line_});
                    advance_to(pos_ + 2);
                    if (!variable && pos_ < src_.size() && src_[pos_] == '\n') advance_to(pos_ + 1);
                    return;
                }
            }
            char c = src_[pos_];
            if (c == '\'' || c == '"') {
                lex_string(c);
            } else if (is_digit(c)) {
                lex_number();
            } else if (is_name_start(c)) {
                size_t q = pos_;
                while (q < src_.size() && is_name_char(src_[q])) ++q;
                tokens_.push_back({TokenType::name, src_.substr(pos_, q - pos_), line_});
                advance_to(q);
            } else {
                static const char* const ops[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%",
                                                  "~", "[", "]", "(", ")", "{", "}", ">", "<", "=", ".",
                                                  ":", "|", ",", ";"};
                const char* found = nullptr;
                for (const char* op : ops) {
                    if (src_.compare(pos_, std::strlen(op), op) == 0) {
                        found = op;
                        break;
                    }
                }
                if (!found) error(std::string("unexpected char '") + c + "'");
                std::string op = found;
                if (op == "(" || op == "[" || op == "{") {
                    balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
                } else if (op == ")" || op == "]" || op == "}") {
                    if (balance.empty()) error("unexpected '" + op + "'");
                    if (balance.back() != op[0])
                        error("unexpected '" + op + "', expected '" + std::string(1, balance.back()) + "'");
                    balance.pop_back();
                }
                tokens_.push_back({TokenType::op, op, line_});
                advance_to(pos_ + op.size());
            }
        }
    }

    void lex_number() {
        size_t q = pos_;
        auto digits = [&]() {
            while (q < src_.size() && (is_digit(src_[q]) || (src_[q] == '_' && q + 1 < src_.size() && is_digit(src_[q + 1]))))
                ++q;
        };
        digits();
        bool is_float = false;
        bool after_dot = pos_ > 0 && src_[pos_ - 1] == '.';
        if (!after_dot && q + 1 < src_.size() && src_[q] == '.' && is_digit(src_[q + 1])) {
            ++q;
            digits();
            is_float = true;
        }
        if (!after_dot && q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
            size_t e = q + 1;
            if (e < src_.size() && (src_[e] == '+' || src_[e] == '-')) ++e;
            if (e < src_.size() && is_digit(src_[e])) {
                q = e;
                digits();
                is_float = true;
            }
        }
        std::string text;
        for (size_t k = pos_; k < q; ++k)
            if (src_[k] != '_') text += src_[k];
        tokens_.push_back({is_float ? TokenType::floating : TokenType::integer, text, line_});
        advance_to(q);
    }

    // A quoted literal, decoded as Python's unicode-escape codec does.
    void lex_string(char quote) {
        size_t q = pos_ + 1;
        while (q < src_.size() && src_[q] != quote) {
            if (src_[q] == '\\') ++q;
            ++q;
        }
        if (q >= src_.size()) error("unexpected end of string");
        std::string raw = src_.substr(pos_ + 1, q - pos_ - 1);
        std::string out;
        for (size_t k = 0; k < raw.size(); ++k) {
            if (raw[k] != '\\' || k + 1 >= raw.size()) {
                out += raw[k];
                continue;
            }
            char e = raw[++k];
            auto hex = [&](size_t n) -> bool {
                uint32_t cp = 0;
                for (size_t m = 1; m <= n; ++m) {
                    if (k + m >= raw.size()) return false;
                    char h = raw[k + m];
                    int d = is_digit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10
                                                    : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
                    if (d < 0) return false;
                    cp = cp * 16 + static_cast<uint32_t>(d);
                }
                if (cp > 0x10ffff) return false;
                append_utf8(out, cp);
                k += n;
                return true;
            };
            switch (e) {
            case '\n': break;
            case '\\': out += '\\'; break;
            case '\'': out += '\''; break;
            case '"': out += '"'; break;
            case 'a': out += '\a'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'v': out += '\v'; break;
            case 'x':
                if (!hex(2)) error("truncated \\xXX escape in string literal");
                break;
            case 'u':
                if (!hex(4)) error("truncated \\uXXXX escape in string literal");
                break;
            case 'U':
                if (!hex(8)) error("truncated \\UXXXXXXXX escape in string literal");
                break;
            default:
                if (e >= '0' && e <= '7') {
                    uint32_t cp = static_cast<uint32_t>(e - '0');
                    for (int m = 0; m < 2 && k + 1 < raw.size() && raw[k + 1] >= '0' && raw[k + 1] <= '7'; ++m)
                        cp = cp * 8 + static_cast<uint32_t>(raw[++k] - '0');
                    append_utf8(out, cp);
                } else {
                    out += '\\';
                    out += e;
                }
            }
        }
        tokens_.push_back({TokenType::string, std::move(out), line_});
        advance_to(q + 1);
    }

    std::string src_;
    std::string origin_;
    size_t pos_ = 0;
    int line_ = 1;
    std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> tokenize(const std::string& source, const std::string& origin) {
    return Lexer(source, origin).run();
}

}  // namespace nibble::jinja
