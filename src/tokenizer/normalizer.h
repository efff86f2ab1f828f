// tokenizer.json "normalizer": a flat list of steps (Sequence is flattened) applied in order to each
// piece of text between added tokens. Supported: NFC, NFD, NFKC, NFKD, Prepend, Replace (String or
// Regex pattern), Strip, Lowercase, Sequence; anything else is refused by name when loading.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace nibble::tokenizer {

class Normalizer {
public:
    // Parses the "normalizer" object of tokenizer.json (null gives an empty normalizer).
    static Normalizer from_json(const nlohmann::json& j);

    bool empty() const { return steps_.empty(); }
    // Applies every step to `text`; as in HF tokenizers, an empty text stays empty (no Prepend).
    std::string apply(std::string_view text) const;

private:
    struct Unicode { NormalForm form; };
    struct Prepend { std::string prefix; };
    struct ReplaceString { std::string from, to; };
    struct ReplaceRegex { std::shared_ptr<const Regex> regex; std::string to; };
    struct Strip { bool left, right; };
    struct Lowercase {};
    using Step = std::variant<Unicode, Prepend, ReplaceString, ReplaceRegex, Strip, Lowercase>;

    static void parse(const nlohmann::json& j, std::vector<Step>& steps);
    std::vector<Step> steps_;
};

// Replaces every occurrence of `from` (non-empty) in `text` by `to`.
std::string replace_all(std::string_view text, std::string_view from, std::string_view to);

}  // namespace nibble::tokenizer
