// How a checkpoint's linear weights are quantized, from hf_quant_config.json (ModelOpt, legacy) or the
// quantization_config object of config.json (ModelOpt or compressed-tensors). Unsupported methods,
// algorithms or formats are refused by name.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace nibble {

enum class QuantMethod {
    None,                    // weights stored in F32/F16/BF16
    ModelOptNvfp4,           // weight U8 [N,K/2], weight_scale F8_E4M3 [N,K/16], weight_scale_2, input_scale
    ModelOptFp8,             // weight F8_E4M3 [N,K], weight_scale F32 scalar, input_scale
    CompressedTensorsNvfp4,  // weight_packed, weight_scale, weight_global_scale (=1/global), input_global_scale
};

enum class KvCacheQuant { None, Fp8, Nvfp4 };

struct QuantConfig {
    QuantMethod method = QuantMethod::None;
    int group_size = 0;                         // 16 for NVFP4
    std::vector<std::string> exclude_patterns;  // fnmatch wildcards (ModelOpt) or names / "re:" regexes (CT)
    KvCacheQuant kv_cache = KvCacheQuant::None;
    std::string source;                         // file it came from, for messages

    // True when the linear module `name` (e.g. "model.layers.0.self_attn.q_proj") is left unquantized.
    bool is_excluded(const std::string& module_name) const;
};

std::string_view quant_method_name(QuantMethod method);

// Reads DIR/hf_quant_config.json if present, else config["quantization_config"], else method None.
QuantConfig load_quant_config(const std::string& dir, const nlohmann::json& config);

}  // namespace nibble
