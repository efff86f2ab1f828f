// Strict JSON parsing for files we validate: nlohmann::json silently keeps the last of two equal keys and
// nests as deep as the input asks, so this parse rejects duplicate keys (in any object) and nesting deeper
// than a limit, and can bound array lengths, with a nibble::Error naming the source. The limits also bound
// the memory the parsed document takes relative to the text (nlohmann spends 16+ bytes per value).
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace nibble {

// `what` names the source in messages (e.g. "model.safetensors: header"). max_depth counts containers:
// {"a": [1]} has depth 2. max_array_size bounds the elements of every array (objects are not bounded).
nlohmann::json parse_json_strict(const char* text, size_t size, const std::string& what, int max_depth,
                                 size_t max_array_size = SIZE_MAX);

}  // namespace nibble
