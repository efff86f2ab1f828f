// BPE model (see bpe.h).
#include "tokenizer/bpe.h"

#include <queue>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {

BpeModel::BpeModel(const nlohmann::json& model, std::string_view where) {
    if (model.contains("dropout") && !model.at("dropout").is_null()) {
        NIBBLE_CHECK(model.at("dropout").get<double>() == 0.0, "{}: BPE dropout is not supported", where);
    }
    for (const auto& [token, id] : model.at("vocab").items()) vocab_.emplace(token, id.get<uint32_t>());
    auto str_or_empty = [&](const char* key) {
        return model.contains(key) && model.at(key).is_string() ? model.at(key).get<std::string>() : std::string();
    };
    std::string unk = str_or_empty("unk_token");
    if (!unk.empty()) {
        auto it = vocab_.find(unk);
        NIBBLE_CHECK(it != vocab_.end(), "{}: BPE unk_token '{}' is not in the vocab", where, unk);
        unk_id_ = it->second;
    }
    fuse_unk_ = model.value("fuse_unk", false);
    byte_fallback_ = model.value("byte_fallback", false);
    ignore_merges_ = model.value("ignore_merges", false);
    continuing_subword_prefix_ = str_or_empty("continuing_subword_prefix");
    end_of_word_suffix_ = str_or_empty("end_of_word_suffix");

    byte_ids_.assign(256, -1);
    for (int b = 0; b < 256; ++b) {
        auto it = vocab_.find(fmt::format("<0x{:02X}>", b));
        if (it != vocab_.end()) byte_ids_[b] = it->second;
    }

    const auto& merges = model.at("merges");
    merges_.reserve(merges.size());
    uint32_t rank = 0;
    std::string joined;
    for (const auto& m : merges) {
        std::string a, b;
        if (m.is_array()) {
            NIBBLE_CHECK(m.size() == 2, "{}: BPE merge #{} is not a pair", where, rank);
            a = m[0].get<std::string>();
            b = m[1].get<std::string>();
        } else {
            const std::string s = m.get<std::string>();
            size_t space = s.find(' ');
            NIBBLE_CHECK(space != std::string::npos, "{}: BPE merge #{} '{}' has no space", where, rank, s);
            a = s.substr(0, space);
            b = s.substr(space + 1);
        }
        auto ia = vocab_.find(a), ib = vocab_.find(b);
        joined = a + b;
        auto ij = vocab_.find(joined);
        NIBBLE_CHECK(ia != vocab_.end() && ib != vocab_.end() && ij != vocab_.end(),
                     "{}: BPE merge #{} ('{}', '{}') uses a token that is not in the vocab", where, rank, a, b);
        merges_[pair_key(ia->second, ib->second)] = Merge{rank, ij->second};
        ++rank;
    }
}

std::optional<uint32_t> BpeModel::token_to_id(std::string_view token) const {
    auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
}

void BpeModel::encode_word(std::string_view word, std::vector<uint32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
        auto it = vocab_.find(word);
        if (it != vocab_.end()) {
            out.push_back(it->second);
            return;
        }
    }
    const bool cacheable = word.size() <= kMaxCachedWordBytes;
    if (cacheable) {
        std::lock_guard lock(cache_mutex_);
        auto it = cache_.find(word);
        if (it != cache_.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    size_t first = out.size();
    merge_word(word, out);
    if (cacheable) {
        std::vector<uint32_t> ids(out.begin() + static_cast<std::ptrdiff_t>(first), out.end());
        std::lock_guard lock(cache_mutex_);
        if (cache_.size() >= kCacheCapacity) cache_.clear();
        cache_.emplace(std::string(word), std::move(ids));
    }
}

void BpeModel::merge_word(std::string_view word, std::vector<uint32_t>& out) const {
    struct Symbol {
        uint32_t id;
        int32_t prev, next;
        bool alive;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    auto add = [&](uint32_t id) {
        auto n = static_cast<int32_t>(symbols.size());
        symbols.push_back({id, n - 1, n + 1, true});
    };
    // Initial symbols: one per character (or its byte tokens, or unk).
    int64_t pending_unk = -1;  // an unk token not yet added (fuse_unk grows it)
    std::string with_affixes;
    size_t i = 0;
    while (i < word.size()) {
        size_t start = i;
        i += utf8_len(static_cast<unsigned char>(word[i]));
        if (i > word.size()) i = word.size();
        std::string_view ch = word.substr(start, i - start);
        std::string_view key = ch;
        if ((start > 0 && !continuing_subword_prefix_.empty()) || (i == word.size() && !end_of_word_suffix_.empty())) {
            with_affixes.clear();
            if (start > 0) with_affixes += continuing_subword_prefix_;
            with_affixes += ch;
            if (i == word.size()) with_affixes += end_of_word_suffix_;
            key = with_affixes;
        }
        auto it = vocab_.find(key);
        if (it != vocab_.end()) {
            if (pending_unk >= 0) {
                add(static_cast<uint32_t>(pending_unk));
                pending_unk = -1;
            }
            add(it->second);
            continue;
        }
        if (byte_fallback_) {
            bool all = true;
            for (char c : key) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
            if (all) {
                if (pending_unk >= 0) {
                    add(static_cast<uint32_t>(pending_unk));
                    pending_unk = -1;
                }
                for (char c : key) add(static_cast<uint32_t>(byte_ids_[static_cast<unsigned char>(c)]));
                continue;
            }
        }
        if (unk_id_) {
            if (pending_unk >= 0 && !fuse_unk_) add(static_cast<uint32_t>(pending_unk));
            pending_unk = *unk_id_;
        }
        // Without an unk token, HF tokenizers drops the character.
    }
    if (pending_unk >= 0) add(static_cast<uint32_t>(pending_unk));
    if (symbols.empty()) return;
    symbols.back().next = -1;

    struct Candidate {
        uint32_t rank;
        int32_t pos;
        uint32_t new_id;
        bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto consider = [&](int32_t pos) {
        int32_t next = symbols[pos].next;
        if (next < 0) return;
        auto it = merges_.find(pair_key(symbols[pos].id, symbols[next].id));
        if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.new_id});
    };
    for (int32_t p = 0; p + 1 < static_cast<int32_t>(symbols.size()); ++p) consider(p);
    while (!queue.empty()) {
        Candidate top = queue.top();
        queue.pop();
        Symbol& left = symbols[top.pos];
        if (!left.alive || left.next < 0) continue;
        Symbol& right = symbols[left.next];
        // Skip stale entries: the pair at this position changed since it was queued.
        auto it = merges_.find(pair_key(left.id, right.id));
        if (it == merges_.end() || it->second.new_id != top.new_id) continue;
        left.id = top.new_id;
        right.alive = false;
        left.next = right.next;
        if (left.next >= 0) symbols[left.next].prev = top.pos;
        if (left.prev >= 0) consider(left.prev);
        consider(top.pos);
    }
    for (const auto& s : symbols) {
        if (s.alive) out.push_back(s.id);
    }
}

}  // namespace nibble::tokenizer
