// Unicode character properties and normalization forms the tokenizer needs, backed by ICU.
#pragma once

#include <string>
#include <string_view>

namespace nibble::tokenizer {

enum class NormalForm { nfc, nfd, nfkc, nfkd };

bool is_whitespace(char32_t cp);    // Unicode White_Space (Rust's char::is_whitespace)
bool is_numeric(char32_t cp);       // general category N* (Rust's char::is_numeric)
bool is_alphanumeric(char32_t cp);  // L* or N* (Rust's char::is_alphanumeric)
bool is_punctuation(char32_t cp);   // ASCII punctuation or general category P* (HF's is_punc)

// `text` (valid UTF-8) in the given normalization form.
std::string normalize(std::string_view text, NormalForm form);
// Full Unicode lowercase mapping of `text` (root locale).
std::string to_lower(std::string_view text);

// Trims Unicode whitespace from the left and/or right of `text`.
std::string_view trim_whitespace(std::string_view text, bool left, bool right);

}  // namespace nibble::tokenizer
