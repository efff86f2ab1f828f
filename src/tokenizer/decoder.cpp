// Streaming decoder stages (see decoder.h).
#include "tokenizer/decoder.h"

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/normalizer.h"

namespace nibble::tokenizer {
namespace {

// HF ByteFallback: a token of the form <0xHH> stands for one byte.
bool parse_byte_token(std::string_view t, uint8_t& byte) {
    if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return false;
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    int hi = hex(t[3]), lo = hex(t[4]);
    if (hi < 0 || lo < 0) return false;
    byte = static_cast<uint8_t>(hi * 16 + lo);
    return true;
}

// Length of the longest suffix of `s` that is a proper prefix of `pattern`.
size_t partial_suffix(std::string_view s, std::string_view pattern) {
    size_t max = std::min(s.size(), pattern.size() - 1);
    for (size_t n = max; n > 0; --n) {
        if (s.substr(s.size() - n) == pattern.substr(0, n)) return n;
    }
    return 0;
}

Decoder::Stage make_stage(Decoder::Kind kind) {
    Decoder::Stage s;
    s.kind = kind;
    return s;
}

}  // namespace

std::shared_ptr<const Decoder> Decoder::from_json(const nlohmann::json& j) {
    auto d = std::make_shared<Decoder>();
    if (j.is_null()) {
        d->stages_.push_back(make_stage(Kind::join_with_space));
    } else {
        parse(j, d->stages_);
    }
    bool fused = false;
    for (auto& s : d->stages_) {
        s.fused_input = fused;
        if (fused && (s.kind == Kind::byte_level || s.kind == Kind::byte_fallback)) {
            fail("tokenizer.json: decoder {} after Fuse or ByteLevel is not supported",
                 s.kind == Kind::byte_level ? "ByteLevel" : "ByteFallback");
        }
        if (s.kind == Kind::fuse || s.kind == Kind::byte_level) fused = true;
    }
    return d;
}

void Decoder::parse(const nlohmann::json& j, std::vector<Stage>& stages) {
    NIBBLE_CHECK(j.is_object() && j.contains("type"), "tokenizer.json: decoder without a 'type'");
    const std::string type = j.at("type").get<std::string>();
    if (type == "Sequence") {
        for (const auto& sub : j.at("decoders")) parse(sub, stages);
    } else if (type == "ByteLevel") {
        stages.push_back(make_stage(Kind::byte_level));
    } else if (type == "ByteFallback") {
        stages.push_back(make_stage(Kind::byte_fallback));
    } else if (type == "Fuse") {
        stages.push_back(make_stage(Kind::fuse));
    } else if (type == "Replace") {
        const auto& pattern = j.at("pattern");
        NIBBLE_CHECK(pattern.contains("String"), "tokenizer.json: decoder Replace with a Regex pattern is not supported");
        Stage s = make_stage(Kind::replace);
        s.from = pattern.at("String").get<std::string>();
        s.to = j.at("content").get<std::string>();
        NIBBLE_CHECK(!s.from.empty(), "tokenizer.json: decoder Replace with an empty pattern");
        stages.push_back(std::move(s));
    } else if (type == "Strip") {
        Stage s = make_stage(Kind::strip);
        s.from = j.at("content").get<std::string>();
        NIBBLE_CHECK(!s.from.empty() && utf8_len(static_cast<unsigned char>(s.from[0])) == s.from.size(),
                     "tokenizer.json: decoder Strip content must be one character");
        s.start = j.value("start", size_t{0});
        s.stop = j.value("stop", size_t{0});
        stages.push_back(std::move(s));
    } else if (type == "Metaspace") {
        Stage s = make_stage(Kind::metaspace);
        s.replacement = j.value("replacement", std::string("\xE2\x96\x81"));
        if (j.contains("prepend_scheme")) {
            s.metaspace_strip_first = j.at("prepend_scheme").get<std::string>() != "never";
        } else {
            s.metaspace_strip_first = j.value("add_prefix_space", true);
        }
        stages.push_back(std::move(s));
    } else {
        fail("tokenizer.json: decoder type '{}' is not supported", type);
    }
}

DecodeStream::DecodeStream(std::shared_ptr<const Decoder> decoder) : decoder_(std::move(decoder)) {
    states_.resize(decoder_->stages().size());
    for (size_t k = 0; k < states_.size(); ++k) {
        const auto& s = decoder_->stages()[k];
        if (s.kind == Decoder::Kind::strip) states_[k].leading_left = s.start;
    }
}

void DecodeStream::push(std::string_view token, std::string& out) { feed(0, token, out); }

void DecodeStream::finish(std::string& out) {
    for (size_t k = 0; k < states_.size(); ++k) flush(k, out);
}

void DecodeStream::feed(size_t k, std::string_view item, std::string& out) {
    const auto& stages = decoder_->stages();
    if (k == stages.size()) {
        out.append(item);
        return;
    }
    const auto& s = stages[k];
    State& st = states_[k];
    using Kind = Decoder::Kind;
    switch (s.kind) {
        case Kind::join_with_space: {
            if (!st.first) feed(k + 1, " ", out);
            st.first = false;
            feed(k + 1, item, out);
            break;
        }
        case Kind::fuse:
            feed(k + 1, item, out);
            break;
        case Kind::byte_level: {
            // A token whose characters are all in the byte alphabet stands for those bytes; any other
            // token (an added token like "<｜User｜>") stands for its own UTF-8 bytes.
            std::string bytes;
            bool mapped = true;
            size_t i = 0;
            while (i < item.size()) {
                uint8_t b;
                if (!unicode_to_byte(next_code_point(item, i), b)) {
                    mapped = false;
                    break;
                }
                bytes.push_back(static_cast<char>(b));
            }
            std::string text;
            st.lossy.push(mapped ? std::string_view(bytes) : item, text);
            if (!text.empty()) feed(k + 1, text, out);
            break;
        }
        case Kind::byte_fallback: {
            uint8_t b;
            if (parse_byte_token(item, b)) {
                st.held.push_back(static_cast<char>(b));
                break;
            }
            flush(k, out);
            feed(k + 1, item, out);
            break;
        }
        case Kind::replace: {
            if (!s.fused_input) {
                feed(k + 1, replace_all(item, s.from, s.to), out);
                break;
            }
            st.held.append(item);
            size_t keep = partial_suffix(st.held, s.from);
            std::string_view ready = std::string_view(st.held).substr(0, st.held.size() - keep);
            std::string text = replace_all(ready, s.from, s.to);
            st.held.erase(0, ready.size());
            if (!text.empty()) feed(k + 1, text, out);
            break;
        }
        case Kind::strip: {
            std::string_view rest = item;
            if (!s.fused_input) st.leading_left = s.start;
            while (st.leading_left > 0 && rest.substr(0, s.from.size()) == s.from) {
                rest.remove_prefix(s.from.size());
                --st.leading_left;
            }
            if (!rest.empty()) st.leading_left = 0;
            if (!s.fused_input) {
                size_t n = 0;
                while (n < s.stop && rest.size() >= s.from.size() && rest.substr(rest.size() - s.from.size()) == s.from) {
                    rest.remove_suffix(s.from.size());
                    ++n;
                }
                feed(k + 1, rest, out);
                break;
            }
            // Fused: hold back the trailing run of `content` characters, at most `stop` of them.
            if (s.stop == 0) {
                if (!rest.empty()) feed(k + 1, rest, out);
                break;
            }
            st.held.append(rest);
            size_t run = 0;
            std::string_view h = st.held;
            while (h.size() >= s.from.size() && h.substr(h.size() - s.from.size()) == s.from && run < s.stop) {
                h.remove_suffix(s.from.size());
                ++run;
            }
            std::string ready(h);
            st.held.erase(0, ready.size());
            if (!ready.empty()) feed(k + 1, ready, out);
            break;
        }
        case Kind::metaspace: {
            std::string text;
            size_t prev = 0;
            while (true) {
                size_t pos = item.find(s.replacement, prev);
                text.append(item.substr(prev, pos == std::string_view::npos ? std::string_view::npos : pos - prev));
                if (pos == std::string_view::npos) break;
                if (!(st.first && s.metaspace_strip_first)) text.push_back(' ');
                prev = pos + s.replacement.size();
            }
            if (!s.fused_input) st.first = false;
            feed(k + 1, text, out);
            break;
        }
    }
}

void DecodeStream::flush(size_t k, std::string& out) {
    const auto& s = decoder_->stages()[k];
    State& st = states_[k];
    using Kind = Decoder::Kind;
    switch (s.kind) {
        case Kind::byte_level: {
            std::string text;
            st.lossy.finish(text);
            if (!text.empty()) feed(k + 1, text, out);
            break;
        }
        case Kind::byte_fallback: {
            if (st.held.empty()) break;
            // HF: a run of byte tokens that is not valid UTF-8 becomes one U+FFFD per byte.
            std::string text;
            if (find_invalid_utf8(st.held) == std::string::npos) {
                text = std::move(st.held);
            } else {
                for (size_t i = 0; i < st.held.size(); ++i) text.append(kReplacementChar);
            }
            st.held.clear();
            feed(k + 1, text, out);
            break;
        }
        case Kind::replace: {
            if (!st.held.empty()) {
                std::string text = replace_all(st.held, s.from, s.to);
                st.held.clear();
                feed(k + 1, text, out);
            }
            break;
        }
        case Kind::strip: {
            // What is held is a run of at most `stop` trailing content characters: all stripped.
            st.held.clear();
            break;
        }
        default:
            break;
    }
}

}  // namespace nibble::tokenizer
