// The BPE model of tokenizer.json ("model": {"type": "BPE", ...}): vocab, ranked merges (both the "a b"
// string and the ["a", "b"] pair spelling), unk_token with fuse_unk, byte_fallback to <0xXX> tokens,
// ignore_merges (a word found whole in the vocab is one token), continuing_subword_prefix and
// end_of_word_suffix. Merging follows HF tokenizers' Word::merge_all: always the lowest-ranked pair,
// leftmost first among equals.
//
// Encoded words are cached (word -> ids) in a bounded cache owned by the model, guarded by a mutex so
// one model serves many threads; the cache is cleared when it reaches its capacity.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace nibble::tokenizer {

// Hash for heterogeneous (std::string_view) lookup in string-keyed unordered maps.
struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>>;

class BpeModel {
public:
    // Parses the "model" object; `where` names the file for error messages.
    BpeModel(const nlohmann::json& model, std::string_view where);

    // Appends the ids of one pre-token to `out`.
    void encode_word(std::string_view word, std::vector<uint32_t>& out) const;

    std::optional<uint32_t> token_to_id(std::string_view token) const;
    const TokenMap& vocab() const { return vocab_; }

    static constexpr size_t kCacheCapacity = 1 << 17;  // words
    static constexpr size_t kMaxCachedWordBytes = 256; // longer words are rarely repeated

private:
    struct Merge {
        uint32_t rank;
        uint32_t new_id;
    };
    void merge_word(std::string_view word, std::vector<uint32_t>& out) const;
    static uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t{a} << 32) | b; }

    TokenMap vocab_;
    std::unordered_map<uint64_t, Merge> merges_;
    std::optional<uint32_t> unk_id_;
    bool fuse_unk_ = false;
    bool byte_fallback_ = false;
    bool ignore_merges_ = false;
    std::string continuing_subword_prefix_;
    std::string end_of_word_suffix_;
    std::vector<int64_t> byte_ids_;  // [256] id of "<0xXX>", -1 when absent

    mutable std::mutex cache_mutex_;
    mutable std::unordered_map<std::string, std::vector<uint32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace nibble::tokenizer
