// UTF-8 validation and lossy decoding (see utf8.h).
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {
namespace {

// Expected total length of a sequence with lead byte b, 0 if b can't start one.
size_t sequence_length(unsigned char b) {
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

// Whether `b` may follow at position `k` (1-based) of a sequence led by `lead` (Unicode Table 3-7).
bool valid_continuation(unsigned char lead, size_t k, unsigned char b) {
    if (k == 1) {
        if (lead == 0xE0) return b >= 0xA0 && b <= 0xBF;
        if (lead == 0xED) return b >= 0x80 && b <= 0x9F;
        if (lead == 0xF0) return b >= 0x90 && b <= 0xBF;
        if (lead == 0xF4) return b >= 0x80 && b <= 0x8F;
    }
    return b >= 0x80 && b <= 0xBF;
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        auto lead = static_cast<unsigned char>(s[i]);
        if (lead < 0x80) {
            ++i;
            continue;
        }
        size_t len = sequence_length(lead);
        if (len == 0 || i + len > s.size()) return i;
        for (size_t k = 1; k < len; ++k) {
            if (!valid_continuation(lead, k, static_cast<unsigned char>(s[i + k]))) return i;
        }
        i += len;
    }
    return std::string_view::npos;
}

char32_t next_code_point(std::string_view s, size_t& i) {
    auto b = static_cast<unsigned char>(s[i]);
    size_t len = utf8_len(b);
    if (i + len > s.size()) len = 1;
    char32_t cp;
    switch (len) {
        case 1: cp = b; break;
        case 2: cp = b & 0x1F; break;
        case 3: cp = b & 0x0F; break;
        default: cp = b & 0x07; break;
    }
    for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    i += len;
    return cp;
}

void append_utf8(std::string& out, char32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

void Utf8LossyStream::push(std::string_view bytes, std::string& out) {
    for (char c : bytes) {
        auto b = static_cast<unsigned char>(c);
        if (n_pending_ > 0) {
            if (valid_continuation(pending_[0], n_pending_, b)) {
                pending_[n_pending_++] = b;
                if (n_pending_ == sequence_length(pending_[0])) {
                    out.append(reinterpret_cast<const char*>(pending_), n_pending_);
                    n_pending_ = 0;
                }
                continue;
            }
            // The held sequence is a maximal invalid subpart: one U+FFFD, then look at b afresh.
            out.append(kReplacementChar);
            n_pending_ = 0;
        }
        size_t len = sequence_length(b);
        if (len == 1) {
            out.push_back(static_cast<char>(b));
        } else if (len == 0) {
            out.append(kReplacementChar);
        } else {
            pending_[0] = b;
            n_pending_ = 1;
        }
    }
}

void Utf8LossyStream::finish(std::string& out) {
    if (n_pending_ > 0) out.append(kReplacementChar);
    n_pending_ = 0;
}

std::string utf8_lossy(std::string_view bytes) {
    std::string out;
    out.reserve(bytes.size());
    Utf8LossyStream stream;
    stream.push(bytes, out);
    stream.finish(out);
    return out;
}

}  // namespace nibble::tokenizer
