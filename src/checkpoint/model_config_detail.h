// Pieces of config.json parsing shared by the per-architecture parsers (model_config.cpp and
// model_config_nemotron_h.cpp); not an interface for other modules.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "checkpoint/json_fields.h"
#include "tensor/dtype.h"

namespace nibble::config_detail {

// torch_dtype / dtype (agreeing when both are given); F32 when neither is.
DType dtype(const JsonObject& c);
// int, list of ints, or null (no such token); `fallback` when absent.
std::vector<int64_t> token_ids(const JsonObject& c, std::string_view key, std::optional<int64_t> fallback);

}  // namespace nibble::config_detail
