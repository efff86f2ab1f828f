// UTF-8 helpers for the tokenizer: validation, code point iteration, and a streaming lossy decoder that
// holds back an incomplete trailing sequence and replaces invalid bytes with U+FFFD exactly as Rust's
// String::from_utf8_lossy does (one U+FFFD per maximal invalid subpart, per the Unicode recommendation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace nibble::tokenizer {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Byte offset of the first invalid UTF-8 sequence in `s`, or npos when `s` is valid.
size_t find_invalid_utf8(std::string_view s);

// Length in bytes of the (valid) UTF-8 sequence starting with lead byte `b`; 1 for anything else.
inline size_t utf8_len(unsigned char b) {
    if (b < 0x80) return 1;
    if ((b >> 5) == 0x6) return 2;
    if ((b >> 4) == 0xE) return 3;
    if ((b >> 3) == 0x1E) return 4;
    return 1;
}

// Decodes the code point at s[i] (s must be valid UTF-8) and advances i past it.
char32_t next_code_point(std::string_view s, size_t& i);

// Appends the UTF-8 encoding of `cp` to `out`.
void append_utf8(std::string& out, char32_t cp);

// Streaming from_utf8_lossy: push() bytes, get back only complete characters (or U+FFFD for invalid
// subparts); finish() flushes a truncated trailing sequence as one U+FFFD.
class Utf8LossyStream {
public:
    // Appends the decodable part of `bytes` (with what was held back before) to `out`.
    void push(std::string_view bytes, std::string& out);
    // Flushes what is held back (a truncated sequence becomes one U+FFFD) and resets.
    void finish(std::string& out);

private:
    unsigned char pending_[4] = {};  // an incomplete but so far valid sequence
    size_t n_pending_ = 0;
};

// from_utf8_lossy of a whole byte string.
std::string utf8_lossy(std::string_view bytes);

}  // namespace nibble::tokenizer
