// The hf_quant_config.json of a ModelOpt NVFP4 export (16-element groups, no KV-cache quantization) with the
// given exclude_modules, parsed: for the memory-plan tests that price a checkpoint's formats.
#pragma once

#include <nlohmann/json.hpp>

#include "checkpoint/quant_config.h"

namespace nibble::test {

inline QuantConfig modelopt_nvfp4_config(const nlohmann::json& exclude_modules) {
    return parse_hf_quant_config({{"producer", {{"name", "modelopt"}, {"version", "0.29.0"}}},
                                  {"quantization",
                                   {{"quant_algo", "NVFP4"},
                                    {"group_size", 16},
                                    {"kv_cache_quant_algo", nullptr},
                                    {"exclude_modules", exclude_modules}}}},
                                 "hf_quant_config.json");
}

}  // namespace nibble::test
