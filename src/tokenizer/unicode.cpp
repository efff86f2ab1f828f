// ICU-backed character properties and normalization (see unicode.h).
#include "tokenizer/unicode.h"

#include <unicode/bytestream.h>
#include <unicode/casemap.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>

#include "base/error.h"
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {

bool is_whitespace(char32_t cp) { return u_isUWhiteSpace(static_cast<UChar32>(cp)); }

bool is_numeric(char32_t cp) {
    auto mask = U_GET_GC_MASK(static_cast<UChar32>(cp));
    return (mask & U_GC_N_MASK) != 0;
}

bool is_alphanumeric(char32_t cp) {
    auto mask = U_GET_GC_MASK(static_cast<UChar32>(cp));
    return (mask & (U_GC_L_MASK | U_GC_N_MASK)) != 0;
}

bool is_punctuation(char32_t cp) {
    if (cp < 0x80) {
        return (cp >= 0x21 && cp <= 0x2F) || (cp >= 0x3A && cp <= 0x40) || (cp >= 0x5B && cp <= 0x60) ||
               (cp >= 0x7B && cp <= 0x7E);
    }
    return (U_GET_GC_MASK(static_cast<UChar32>(cp)) & U_GC_P_MASK) != 0;
}

std::string normalize(std::string_view text, NormalForm form) {
    // ASCII is invariant under every normalization form.
    bool ascii = true;
    for (char c : text) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
    if (ascii) return std::string(text);
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* n = nullptr;
    switch (form) {
        case NormalForm::nfc: n = icu::Normalizer2::getNFCInstance(status); break;
        case NormalForm::nfd: n = icu::Normalizer2::getNFDInstance(status); break;
        case NormalForm::nfkc: n = icu::Normalizer2::getNFKCInstance(status); break;
        case NormalForm::nfkd: n = icu::Normalizer2::getNFKDInstance(status); break;
    }
    NIBBLE_CHECK(U_SUCCESS(status) && n != nullptr, "ICU normalizer unavailable: {}", u_errorName(status));
    std::string out;
    out.reserve(text.size());
    icu::StringByteSink<std::string> sink(&out);
    n->normalizeUTF8(0, icu::StringPiece(text.data(), static_cast<int32_t>(text.size())), sink, nullptr, status);
    NIBBLE_CHECK(U_SUCCESS(status), "ICU normalization failed: {}", u_errorName(status));
    return out;
}

std::string to_lower(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    icu::StringByteSink<std::string> sink(&out);
    UErrorCode status = U_ZERO_ERROR;
    icu::CaseMap::utf8ToLower("", 0, icu::StringPiece(text.data(), static_cast<int32_t>(text.size())), sink,
                              nullptr, status);
    NIBBLE_CHECK(U_SUCCESS(status), "ICU lowercase failed: {}", u_errorName(status));
    return out;
}

std::string_view trim_whitespace(std::string_view text, bool left, bool right) {
    size_t begin = 0, end = text.size();
    if (left) {
        while (begin < end) {
            size_t i = begin;
            if (!is_whitespace(next_code_point(text, i))) break;
            begin = i;
        }
    }
    if (right) {
        while (end > begin) {
            size_t start = end - 1;
            while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
            size_t i = start;
            if (!is_whitespace(next_code_point(text, i))) break;
            end = start;
        }
    }
    return text.substr(begin, end - begin);
}

}  // namespace nibble::tokenizer
