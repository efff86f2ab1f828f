// GPT-2 byte <-> unicode tables (see byte_level.h).
#include "tokenizer/byte_level.h"

#include "tokenizer/utf8.h"

namespace nibble::tokenizer {
namespace {

// Bytes that stand for themselves: '!'..'~', '¡'..'¬', '®'..'ÿ'.
bool is_self_mapped(int b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct Tables {
    std::array<char32_t, 256> code_point{};
    std::array<std::string, 256> utf8{};
    std::array<int16_t, 324> byte_of{};  // indexed by code point (all are < 0x144)
    Tables() {
        byte_of.fill(-1);
        char32_t next = 0x100;
        for (int b = 0; b < 256; ++b) {
            code_point[b] = is_self_mapped(b) ? static_cast<char32_t>(b) : next++;
            append_utf8(utf8[b], code_point[b]);
            byte_of[code_point[b]] = static_cast<int16_t>(b);
        }
    }
};

const Tables& tables() {
    static const Tables t;  // immutable after construction
    return t;
}

}  // namespace

const std::array<std::string, 256>& byte_to_unicode() { return tables().utf8; }

void byte_level_encode(std::string_view bytes, std::string& out) {
    const auto& t = tables().utf8;
    for (char c : bytes) out.append(t[static_cast<unsigned char>(c)]);
}

bool unicode_to_byte(char32_t cp, uint8_t& byte) {
    const auto& t = tables();
    if (cp >= t.byte_of.size() || t.byte_of[cp] < 0) return false;
    byte = static_cast<uint8_t>(t.byte_of[cp]);
    return true;
}

}  // namespace nibble::tokenizer
