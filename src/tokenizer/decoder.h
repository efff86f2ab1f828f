// tokenizer.json "decoder" as a streaming pipeline. Each stage of HF tokenizers' decode_chain
// (Sequence is flattened) is a transducer: before a fusing stage (Fuse, ByteLevel) items are whole
// tokens, after it they are consecutive chunks of the one fused string. A full decode is the same
// stream fed every token and then finished, so the pieces of an incremental decode always concatenate
// to the full decode, and no piece ever ends inside a UTF-8 sequence (ByteLevel holds back incomplete
// bytes, ByteFallback holds a run of byte tokens until it ends).
//
// Supported: ByteLevel, Metaspace, ByteFallback, Fuse, Replace (String pattern), Strip, Sequence, and no
// decoder at all (tokens joined by spaces); anything else is refused by name when loading.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "tokenizer/utf8.h"

namespace nibble::tokenizer {

class Decoder {
public:
    // Parses the "decoder" object of tokenizer.json (null: join tokens with spaces).
    static std::shared_ptr<const Decoder> from_json(const nlohmann::json& j);

    enum class Kind { byte_level, metaspace, byte_fallback, fuse, replace, strip, join_with_space };
    struct Stage {
        Kind kind = Kind::fuse;
        bool fused_input = false;  // items are chunks of one fused string rather than tokens
        std::string from, to;      // replace: pattern and content; strip: `from` is the character
        size_t start = 0, stop = 0;  // strip counts
        std::string replacement;   // metaspace replacement character
        bool metaspace_strip_first = true;  // prepend_scheme != never
    };
    const std::vector<Stage>& stages() const { return stages_; }

private:
    static void parse(const nlohmann::json& j, std::vector<Stage>& stages);
    std::vector<Stage> stages_;
};

// One decode in progress: push token strings, get text appended as soon as it is final.
class DecodeStream {
public:
    explicit DecodeStream(std::shared_ptr<const Decoder> decoder);

    // Feeds one token's string; appends newly final text to `out`.
    void push(std::string_view token, std::string& out);
    // Flushes everything held back; the stream is then spent.
    void finish(std::string& out);

private:
    struct State {
        std::string held;          // replace/strip: text held back; byte_fallback: pending bytes
        Utf8LossyStream lossy;     // byte_level
        size_t leading_left = 0;   // strip: leading characters still to strip
        bool first = true;         // metaspace / join: next token is the first
    };
    void feed(size_t k, std::string_view item, std::string& out);
    void flush(size_t k, std::string& out);

    std::shared_ptr<const Decoder> decoder_;
    std::vector<State> states_;
};

}  // namespace nibble::tokenizer
