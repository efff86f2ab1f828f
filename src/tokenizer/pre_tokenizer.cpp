// Pre-tokenizer stages (see pre_tokenizer.h); the split behaviours follow HF tokenizers'
// NormalizedString::split, and empty pieces are dropped as PreTokenizedString::split drops them.
#include "tokenizer/pre_tokenizer.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/unicode.h"
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {
namespace {

// GPT-2's pre-tokenization regex, used by ByteLevel when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Piece {
    uint32_t begin, end;
    bool is_match;
};

SplitBehavior parse_behavior(const nlohmann::json& j, std::string_view where) {
    const std::string b = j.get<std::string>();
    if (b == "Removed") return SplitBehavior::removed;
    if (b == "Isolated") return SplitBehavior::isolated;
    if (b == "MergedWithPrevious") return SplitBehavior::merged_with_previous;
    if (b == "MergedWithNext") return SplitBehavior::merged_with_next;
    if (b == "Contiguous") return SplitBehavior::contiguous;
    fail("tokenizer.json: {} behavior '{}' is not supported", where, b);
}

// Turns the match/non-match pieces covering one span into output spans per `behavior`.
void emit_split(std::vector<Piece>& pieces, SplitBehavior behavior, bool invert, bool at_start,
                uint32_t span_begin, std::vector<PreTokens::Span>& out) {
    if (invert) {
        for (auto& p : pieces) p.is_match = !p.is_match;
    }
    std::vector<Piece> merged;
    merged.reserve(pieces.size());
    switch (behavior) {
        case SplitBehavior::isolated:
        case SplitBehavior::removed:
            merged = pieces;
            break;
        case SplitBehavior::contiguous: {
            bool previous_match = false;
            for (const auto& p : pieces) {
                if (p.is_match == previous_match && !merged.empty()) {
                    merged.back().end = p.end;
                } else {
                    merged.push_back({p.begin, p.end, false});
                }
                previous_match = p.is_match;
            }
            break;
        }
        case SplitBehavior::merged_with_previous: {
            bool previous_match = false;
            for (const auto& p : pieces) {
                if (p.is_match && !previous_match && !merged.empty()) {
                    merged.back().end = p.end;
                } else {
                    merged.push_back({p.begin, p.end, false});
                }
                previous_match = p.is_match;
            }
            break;
        }
        case SplitBehavior::merged_with_next: {
            bool previous_match = false;
            for (size_t k = pieces.size(); k-- > 0;) {
                const auto& p = pieces[k];
                if (p.is_match && !previous_match && !merged.empty()) {
                    merged.back().begin = p.begin;
                } else {
                    merged.push_back({p.begin, p.end, false});
                }
                previous_match = p.is_match;
            }
            std::reverse(merged.begin(), merged.end());
            break;
        }
    }
    for (const auto& p : merged) {
        if (behavior == SplitBehavior::removed && p.is_match) continue;
        if (p.end == p.begin) continue;
        out.push_back({p.begin, p.end, at_start && p.begin == span_begin});
    }
}

// Match/non-match pieces of text[begin, end) for a regex.
void regex_pieces(const Regex& re, const std::string& buffer, uint32_t begin, uint32_t end, std::vector<Piece>& pieces) {
    pieces.clear();
    uint32_t prev = begin;
    re.find_all(std::string_view(buffer).substr(begin, end - begin), [&](size_t s, size_t e) {
        auto ms = static_cast<uint32_t>(begin + s), me = static_cast<uint32_t>(begin + e);
        if (prev != ms) pieces.push_back({prev, ms, false});
        pieces.push_back({ms, me, true});
        prev = me;
    });
    if (prev != end) pieces.push_back({prev, end, false});
}

// Match/non-match pieces for a per-character predicate: each matching character is its own match.
template <class Pred>
void char_pieces(Pred pred, const std::string& buffer, uint32_t begin, uint32_t end, std::vector<Piece>& pieces) {
    pieces.clear();
    std::string_view s(buffer);
    uint32_t last = begin;
    size_t i = begin;
    while (i < end) {
        size_t start = i;
        char32_t cp = next_code_point(s, i);
        if (pred(cp)) {
            if (last < start) pieces.push_back({last, static_cast<uint32_t>(start), false});
            pieces.push_back({static_cast<uint32_t>(start), static_cast<uint32_t>(i), true});
            last = static_cast<uint32_t>(i);
        }
    }
    if (last < end) pieces.push_back({last, end, false});
}

}  // namespace

PreTokenizer PreTokenizer::from_json(const nlohmann::json& j) {
    PreTokenizer p;
    if (!j.is_null()) parse(j, p.stages_);
    p.gpt2_regex_ = std::make_shared<const Regex>(kGpt2Pattern, "ByteLevel pre-tokenizer");
    return p;
}

void PreTokenizer::parse(const nlohmann::json& j, std::vector<Stage>& stages) {
    NIBBLE_CHECK(j.is_object() && j.contains("type"), "tokenizer.json: pre_tokenizer without a 'type'");
    const std::string type = j.at("type").get<std::string>();
    if (type == "Sequence") {
        for (const auto& sub : j.at("pretokenizers")) parse(sub, stages);
    } else if (type == "Split") {
        const auto& pattern = j.at("pattern");
        std::string re;
        if (pattern.contains("String")) {
            re = regex_escape(pattern.at("String").get<std::string>());
        } else if (pattern.contains("Regex")) {
            re = pattern.at("Regex").get<std::string>();
        } else {
            fail("tokenizer.json: pre_tokenizer Split pattern is neither String nor Regex");
        }
        stages.emplace_back(Split{std::make_shared<const Regex>(re, "tokenizer.json: pre_tokenizer Split"),
                                  parse_behavior(j.at("behavior"), "pre_tokenizer Split"), j.value("invert", false)});
    } else if (type == "ByteLevel") {
        stages.emplace_back(ByteLevel{j.value("add_prefix_space", false), j.value("use_regex", true)});
    } else if (type == "Metaspace") {
        Metaspace m;
        m.replacement = j.value("replacement", std::string("\xE2\x96\x81"));
        size_t i = 0;
        NIBBLE_CHECK(!m.replacement.empty(), "tokenizer.json: pre_tokenizer Metaspace with an empty replacement");
        m.replacement_cp = next_code_point(m.replacement, i);
        NIBBLE_CHECK(i == m.replacement.size(), "tokenizer.json: Metaspace replacement must be one character");
        m.prepend = Metaspace::always;
        if (j.contains("prepend_scheme")) {
            const std::string scheme = j.at("prepend_scheme").get<std::string>();
            if (scheme == "always") m.prepend = Metaspace::always;
            else if (scheme == "first") m.prepend = Metaspace::first;
            else if (scheme == "never") m.prepend = Metaspace::never;
            else fail("tokenizer.json: Metaspace prepend_scheme '{}' is not supported", scheme);
        } else if (j.contains("add_prefix_space")) {
            m.prepend = j.at("add_prefix_space").get<bool>() ? Metaspace::always : Metaspace::never;
        }
        m.split = j.value("split", true);
        stages.emplace_back(std::move(m));
    } else if (type == "Digits") {
        stages.emplace_back(Digits{j.value("individual_digits", false)});
    } else if (type == "Punctuation") {
        stages.emplace_back(Punctuation{j.contains("behavior") ? parse_behavior(j.at("behavior"), "pre_tokenizer Punctuation")
                                                               : SplitBehavior::isolated});
    } else {
        fail("tokenizer.json: pre_tokenizer type '{}' is not supported", type);
    }
}

void PreTokenizer::apply(PreTokens& pieces, PreTokens& scratch) const {
    std::vector<Piece> found;
    for (const auto& stage : stages_) {
        scratch.spans.clear();
        if (const auto* s = std::get_if<Split>(&stage)) {
            for (const auto& span : pieces.spans) {
                regex_pieces(*s->regex, pieces.buffer, span.begin, span.end, found);
                emit_split(found, s->behavior, s->invert, span.at_text_start, span.begin, scratch.spans);
            }
            std::swap(pieces.spans, scratch.spans);
        } else if (const auto* d = std::get_if<Digits>(&stage)) {
            for (const auto& span : pieces.spans) {
                char_pieces(is_numeric, pieces.buffer, span.begin, span.end, found);
                emit_split(found, d->individual ? SplitBehavior::isolated : SplitBehavior::contiguous, false,
                           span.at_text_start, span.begin, scratch.spans);
            }
            std::swap(pieces.spans, scratch.spans);
        } else if (const auto* p = std::get_if<Punctuation>(&stage)) {
            for (const auto& span : pieces.spans) {
                char_pieces(is_punctuation, pieces.buffer, span.begin, span.end, found);
                emit_split(found, p->behavior, false, span.at_text_start, span.begin, scratch.spans);
            }
            std::swap(pieces.spans, scratch.spans);
        } else if (const auto* b = std::get_if<ByteLevel>(&stage)) {
            scratch.buffer.clear();
            std::string prefixed;
            for (const auto& span : pieces.spans) {
                std::string_view text = std::string_view(pieces.buffer).substr(span.begin, span.end - span.begin);
                if (b->add_prefix_space && (text.empty() || text[0] != ' ')) {
                    prefixed.resize(text.size() + 1);
                    prefixed[0] = ' ';
                    text.copy(prefixed.data() + 1, text.size());
                    text = prefixed;
                }
                auto emit = [&](std::string_view piece, bool at_start) {
                    if (piece.empty()) return;
                    auto begin = static_cast<uint32_t>(scratch.buffer.size());
                    byte_level_encode(piece, scratch.buffer);
                    scratch.spans.push_back({begin, static_cast<uint32_t>(scratch.buffer.size()), at_start});
                };
                if (b->use_regex) {
                    size_t prev = 0;
                    gpt2_regex_->find_all(text, [&](size_t ms, size_t me) {
                        if (prev != ms) emit(text.substr(prev, ms - prev), span.at_text_start && prev == 0);
                        emit(text.substr(ms, me - ms), span.at_text_start && ms == 0);
                        prev = me;
                    });
                    if (prev != text.size()) emit(text.substr(prev), span.at_text_start && prev == 0);
                } else {
                    emit(text, span.at_text_start);
                }
            }
            std::swap(pieces, scratch);
        } else if (const auto* m = std::get_if<Metaspace>(&stage)) {
            scratch.buffer.clear();
            std::string text;
            for (const auto& span : pieces.spans) {
                std::string_view original = std::string_view(pieces.buffer).substr(span.begin, span.end - span.begin);
                text.clear();
                for (char c : original) {
                    if (c == ' ') text.append(m->replacement);
                    else text.push_back(c);
                }
                bool starts = text.compare(0, m->replacement.size(), m->replacement) == 0;
                if (!starts && (m->prepend == Metaspace::always || (m->prepend == Metaspace::first && span.at_text_start))) {
                    std::string prefixed_text;
                    prefixed_text.reserve(m->replacement.size() + text.size());
                    prefixed_text.append(m->replacement).append(text);
                    text.swap(prefixed_text);
                }
                auto base = static_cast<uint32_t>(scratch.buffer.size());
                scratch.buffer.append(text);
                if (!m->split) {
                    if (!text.empty()) scratch.spans.push_back({base, static_cast<uint32_t>(scratch.buffer.size()), span.at_text_start});
                    continue;
                }
                char32_t rep = m->replacement_cp;
                char_pieces([rep](char32_t cp) { return cp == rep; }, scratch.buffer, base,
                            static_cast<uint32_t>(scratch.buffer.size()), found);
                emit_split(found, SplitBehavior::merged_with_next, false, span.at_text_start, base, scratch.spans);
            }
            std::swap(pieces, scratch);
        }
    }
}

}  // namespace nibble::tokenizer
