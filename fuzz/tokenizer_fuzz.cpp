// libFuzzer target for the tokenizer: arbitrary bytes are encoded by two small tokenizers built in
// memory, one byte-level BPE (Split regex with Unicode classes, ByteLevel, NFC, added tokens with
// lstrip/rstrip/single_word) and one metaspace BPE with byte fallback (Prepend/Replace normalizers,
// Replace/ByteFallback/Fuse/Strip decoders); valid UTF-8 must encode, and its ids must decode both
// whole and streamed to the same text. The same bytes, read as ids, are decoded too. Anything but a
// clean return or a nibble::Error is a bug.
// Build: cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DNIBBLE_FUZZ=ON -DNIBBLE_CUDA=OFF
// Run:   build-fuzz/tokenizer_fuzz -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer.h"

namespace {

using nibble::tokenizer::Tokenizer;
using json = nlohmann::json;

json added(uint32_t id, const char* content, bool special, bool lstrip, bool rstrip, bool single_word) {
    return {{"id", id}, {"content", content}, {"special", special}, {"lstrip", lstrip}, {"rstrip", rstrip},
            {"single_word", single_word}, {"normalized", false}};
}

Tokenizer byte_level_tokenizer() {
    json vocab = json::object();
    const auto& b2u = nibble::tokenizer::byte_to_unicode();
    uint32_t next = 0;
    for (const auto& s : b2u) vocab[s] = next++;
    json merges = json::array();
    for (const char* pair : {"Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "1 2", "12 3"}) {
        std::string p = pair;
        size_t space = p.find(' ');
        std::string joined = p.substr(0, space) + p.substr(space + 1);
        if (!vocab.contains(joined)) vocab[joined] = next++;
        merges.push_back(json::array({p.substr(0, space), p.substr(space + 1)}));
    }
    json tj = {
        {"added_tokens", json::array({added(next, "<|end|>", true, false, false, false),
                                      added(next + 1, "<tool>", false, true, true, false),
                                      added(next + 2, "word", false, false, false, true)})},
        {"normalizer", {{"type", "NFC"}}},
        {"pre_tokenizer",
         {{"type", "Sequence"},
          {"pretokenizers",
           json::array({{{"type", "Split"},
                         {"pattern", {{"Regex", R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
                         {"behavior", "Isolated"}, {"invert", false}},
                        {{"type", "Digits"}, {"individual_digits", false}},
                        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
        {"post_processor", {{"type", "ByteLevel"}}},
        {"decoder", {{"type", "ByteLevel"}}},
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"ignore_merges", true}}},
    };
    return Tokenizer::from_json(tj, nullptr, "fuzz byte-level tokenizer.json");
}

Tokenizer metaspace_tokenizer() {
    json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
    uint32_t next = 3;
    char name[8];
    for (int b = 0; b < 256; ++b) {
        std::snprintf(name, sizeof(name), "<0x%02X>", b);
        vocab[name] = next++;
    }
    for (const char* t : {"\xE2\x96\x81", "a", "b", "c", "\xE2\x96\x81" "a", "ab", "\xE2\x96\x81" "ab", "\xC3\xA9"}) {
        if (!vocab.contains(t)) vocab[t] = next++;
    }
    json merges = json::array({"\xE2\x96\x81 a", "a b", "\xE2\x96\x81" "a b"});
    json tj = {
        {"added_tokens", json::array({added(0, "<unk>", true, false, false, false), added(1, "<s>", true, false, false, false),
                                      added(2, "</s>", true, false, false, false)})},
        {"normalizer", {{"type", "Sequence"},
                        {"normalizers", json::array({{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
                                                     {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}})}}},
        {"pre_tokenizer", nullptr},
        {"post_processor", {{"type", "TemplateProcessing"},
                            {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                                    {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                            {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
        {"decoder", {{"type", "Sequence"},
                     {"decoders", json::array({{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
                                               {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
                                               {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 1}}})}}},
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"unk_token", "<unk>"}, {"fuse_unk", true},
                   {"byte_fallback", true}}},
    };
    return Tokenizer::from_json(tj, nullptr, "fuzz metaspace tokenizer.json");
}

void exercise(const Tokenizer& tok, std::string_view text, const uint8_t* data, size_t size) {
    try {
        auto ids = tok.encode(text, size % 2 == 0);
        std::string whole = tok.decode(ids);
        nibble::tokenizer::Detokenizer detok(tok);
        std::string streamed;
        for (uint32_t id : ids) streamed += detok.push(id);
        streamed += detok.finish();
        if (streamed != whole) std::abort();
    } catch (const nibble::Error&) {
    }
    // The input as a sequence of 16-bit ids, some beyond the vocab.
    std::vector<uint32_t> ids;
    for (size_t i = 0; i + 1 < size; i += 2) ids.push_back(static_cast<uint32_t>(data[i]) | (static_cast<uint32_t>(data[i + 1] & 0x3) << 8));
    std::string whole = tok.decode(ids, size % 3 == 0);
    nibble::tokenizer::Detokenizer detok(tok, size % 3 == 0);
    std::string streamed;
    for (uint32_t id : ids) streamed += detok.push(id);
    streamed += detok.finish();
    if (streamed != whole) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const Tokenizer byte_level = byte_level_tokenizer();
    static const Tokenizer metaspace = metaspace_tokenizer();
    std::string_view text(reinterpret_cast<const char*>(data), size);
    exercise(byte_level, text, data, size);
    exercise(metaspace, text, data, size);
    return 0;
}
