// GPT-2's byte-level alphabet: each of the 256 byte values maps to one printable code point (printable
// Latin-1 bytes map to themselves, the rest to U+0100 onwards in byte order), so that any byte string
// becomes a string of "visible" characters that BPE vocabularies store. Immutable tables.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace nibble::tokenizer {

// UTF-8 encoding of the code point that stands for each byte value: [256] strings of 1 or 2 bytes.
const std::array<std::string, 256>& byte_to_unicode();

// Appends the byte-level form of `bytes` to `out`.
void byte_level_encode(std::string_view bytes, std::string& out);

// Maps the code point `cp` back to its byte; returns false if `cp` is not in the alphabet.
bool unicode_to_byte(char32_t cp, uint8_t& byte);

}  // namespace nibble::tokenizer
