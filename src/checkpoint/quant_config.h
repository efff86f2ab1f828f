// How a checkpoint's linear weights are quantized, from hf_quant_config.json (ModelOpt, legacy) or the
// quantization_config object of config.json (ModelOpt or compressed-tensors). Unsupported methods,
// algorithms or formats are refused by name. Also builds the JSON that `nibble quantize` writes for each
// layout, with the keys vLLM reads (vllm/model_executor/layers/quantization/modelopt.py and
// compressed_tensors/).
//
// File shapes accepted (see quant_config.cpp for every rule):
//   hf_quant_config.json: {"producer": {"name", "version"}, "quantization": {"quant_algo": "NVFP4" |
//     "W4A16_NVFP4" | "FP8", "kv_cache_quant_algo": "FP8" | "NVFP4" | null, "group_size": 16,
//     "exclude_modules": [fnmatch wildcards]}}
//   config.json quantization_config, ModelOpt: {"quant_method": "modelopt", "quant_algo", "ignore" (or
//     "exclude_modules"), "kv_cache_scheme" {"type": "float", "num_bits": 8} (or "kv_cache_quant_algo"),
//     "group_size" or config_groups.*.weights.group_size, ...}
//   config.json quantization_config, compressed-tensors: {"quant_method": "compressed-tensors", "format":
//     "nvfp4-pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4,
//     "type": "float", "strategy": "tensor_group", "group_size": 16, ...}, "input_activations": {...} |
//     null}}, "ignore": [names, "re:" regexes], "kv_cache_scheme": {...} | null}
#pragma once

#include <string>
#include <string_view>
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
    // NVFP4 weights with unquantized (16-bit) activations: ModelOpt W4A16_NVFP4, or compressed-tensors
    // without input_activations. The weight tensors are the same as W4A4's; the activation scales
    // (input_scale / input_global_scale) may be missing and are not used.
    bool weight_only = false;
    std::vector<std::string> exclude_patterns;  // fnmatch wildcards (ModelOpt) or names / "re:" regexes (CT)
    KvCacheQuant kv_cache = KvCacheQuant::None;
    std::string source;                         // file it came from, for messages

    // True when the linear module `name` (e.g. "model.layers.0.self_attn.q_proj") is left unquantized
    // (always true for QuantMethod::None).
    //  - ModelOpt: a pattern matches when POSIX fnmatch(3) (no flags: '*' also matches '.') matches the
    //    module name, or the module name followed by ".weight". vLLM additionally treats each pattern as a
    //    substring (for pre-0.39 ModelOpt exports); we do not, so such a checkpoint fails at load with a
    //    missing-tensor error rather than being misread.
    //  - compressed-tensors: an entry matches when it equals the name, or, for "re:PATTERN", when the regex
    //    (ECMAScript) matches at the start of the name. That is Python's re.match, as compressed-tensors'
    //    _match_name and vLLM do: anchored at the start only, so "re:.*mlp" also matches ".mlp.down_proj".
    bool is_excluded(const std::string& module_name) const;
};

std::string_view quant_method_name(QuantMethod method);
std::string_view kv_cache_quant_name(KvCacheQuant kv);

// Parses hf_quant_config.json (ModelOpt legacy). `source` names the file in messages.
QuantConfig parse_hf_quant_config(const nlohmann::json& file, const std::string& source);
// Parses config.json's quantization_config object (ModelOpt or compressed-tensors). `source` names the
// file in messages; fields are named "quantization_config.<key>".
QuantConfig parse_quantization_config(const nlohmann::json& quantization_config, const std::string& source);

// Reads DIR/hf_quant_config.json if present, else config["quantization_config"], else method None. When
// both are present they must describe the same method, weight_only and kv cache, else an error.
QuantConfig load_quant_config(const std::string& dir, const nlohmann::json& config);

// What `nibble quantize` writes (NVFP4 W4A4, group size 16).
struct QuantExportOptions {
    std::vector<std::string> exclude_modules;  // exact module names left unquantized, e.g. "lm_head"
    KvCacheQuant kv_cache = KvCacheQuant::None;
    std::string producer_version;              // nibble's version; producer name is "nibble"
};
// ModelOpt layout: the content of hf_quant_config.json ...
nlohmann::json modelopt_hf_quant_config_json(const QuantExportOptions& options);
// ... and the quantization_config object for config.json, in the shape ModelOpt's
// convert_hf_quant_config_format produces (config_groups, ignore, quant_algo, kv_cache_scheme, producer,
// quant_method "modelopt").
nlohmann::json modelopt_quantization_config_json(const QuantExportOptions& options);
// compressed-tensors layout (format nvfp4-pack-quantized): the quantization_config object for config.json.
// compressed-tensors has no producer field, so the producer is not recorded here.
nlohmann::json compressed_tensors_quantization_config_json(const QuantExportOptions& options);

}  // namespace nibble
