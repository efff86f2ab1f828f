// Strict JSON parsing for files we validate: nlohmann::json silently keeps the last of two equal keys and
// nests as deep as the input asks, so this parse rejects duplicate keys (in any object) and nesting deeper
// than a limit, with a nibble::Error naming the source.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>

namespace nibble {

// `what` names the source in messages (e.g. "model.safetensors: header"). max_depth counts containers:
// {"a": [1]} has depth 2.
nlohmann::json parse_json_strict(const char* text, size_t size, const std::string& what, int max_depth);

}  // namespace nibble
