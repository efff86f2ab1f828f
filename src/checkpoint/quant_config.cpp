// Quantization configs -> QuantConfig, and the configs `nibble quantize` writes. Facts used, with sources:
//  - ModelOpt: vLLM's ModelOptQuantConfigBase.from_config reads either {"quantization": {quant_algo,
//    kv_cache_quant_algo, group_size, exclude_modules}} (hf_quant_config.json) or the config.json form
//    {quant_algo, kv_cache_scheme {"type": "float", "num_bits": 8} => FP8, ignore, group_size}; quant_algo is
//    upper-cased; NVFP4 group_size defaults to 16; for NVFP4 in hf_quant_config.json, group_size,
//    kv_cache_quant_algo and exclude_modules are required (ModelOptNvFp4Config._from_config). vLLM enables
//    ModelOpt for any quant_method starting with "modelopt".
//  - ModelOpt's convert_hf_quant_config_format (modelopt/torch/export/convert_hf_config.py) builds the
//    config.json form: config_groups.group_0 {input_activations, weights: {dynamic false, num_bits 4,
//    type float, group_size}, targets ["Linear"]}, ignore, quant_algo, kv_cache_scheme (a dict for FP8,
//    the algo string otherwise), producer, quant_method "modelopt". It has no top-level group_size, so we
//    read it from config_groups when absent.
//  - W4A16_NVFP4 is weight-only NVFP4 with the same weight tensors as NVFP4 (vLLM's
//    ModelOptNvFp4W4A16LinearMethod loads weight / weight_scale / weight_scale_2 and discards any
//    input_scale), so it is accepted as ModelOptNvfp4 with weight_only.
//  - compressed-tensors: format nvfp4-pack-quantized, weights {num_bits 4, type float, strategy
//    tensor_group, group_size 16, symmetric}, input_activations the same with dynamic "local" (or absent:
//    weight-only); ignore entries are names or "re:" regexes matched with re.match (compressed_tensors
//    utils/match.py _match_name).
#include "checkpoint/quant_config.h"

#include <fnmatch.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <optional>
#include <regex>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "checkpoint/json_fields.h"

namespace nibble {

namespace {

constexpr int kNvfp4GroupSize = 16;
constexpr std::string_view kCtNvfp4Format = "nvfp4-pack-quantized";

std::string upper(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
    return s;
}
std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
}

// quant_algo -> method. Algorithms vLLM knows but nibble does not run are refused by name.
void set_modelopt_algo(QuantConfig& q, const JsonObject& o, std::string_view key) {
    std::string algo = upper(o.get_string(key));
    if (algo == "NVFP4") {
        q.method = QuantMethod::ModelOptNvfp4;
    } else if (algo == "W4A16_NVFP4") {
        q.method = QuantMethod::ModelOptNvfp4;  // same tensors as NVFP4; activations stay 16-bit
        q.weight_only = true;
    } else if (algo == "FP8") {
        q.method = QuantMethod::ModelOptFp8;
    } else {
        fail("{}: {} '{}' is not supported (supported: NVFP4, W4A16_NVFP4, FP8)", o.source(), o.field(key),
             o.get_string(key));
    }
}

KvCacheQuant kv_from_algo(const JsonObject& o, std::string_view key) {
    auto algo = o.opt_string(key, NullIs::Absent);
    if (!algo || upper(*algo) == "NONE") return KvCacheQuant::None;
    if (upper(*algo) == "FP8") return KvCacheQuant::Fp8;
    if (upper(*algo) == "NVFP4") return KvCacheQuant::Nvfp4;
    fail("{}: {} '{}' is not supported (supported: FP8, NVFP4, null)", o.source(), o.field(key), *algo);
}

// {"type": "float", "num_bits": 8, ...}: the compressed-tensors spelling of a KV cache scheme.
KvCacheQuant kv_from_scheme(const JsonObject& scheme) {
    std::string type = scheme.get_string("type");
    int64_t bits = scheme.get_int("num_bits");
    if (type == "float" && bits == 8) return KvCacheQuant::Fp8;
    if (type == "float" && bits == 4) return KvCacheQuant::Nvfp4;
    fail("{}: {} with type '{}' and num_bits {} is not supported (supported: float 8-bit, float 4-bit)",
         scheme.source(), scheme.path(), type, bits);
}

void check_group_size(QuantConfig& q, const JsonObject& o, std::string_view key, int64_t group_size) {
    if (q.method == QuantMethod::ModelOptNvfp4 && group_size != kNvfp4GroupSize)
        fail("{}: {} {} is not supported for NVFP4 (supported: 16)", o.source(), o.field(key), group_size);
    q.group_size = static_cast<int>(group_size);
}

// {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"}: the "quantization" object of
// hf_quant_config.json.
QuantConfig parse_modelopt_legacy(const JsonObject& o) {
    QuantConfig q;
    q.source = o.source();
    set_modelopt_algo(q, o, "quant_algo");
    if (q.method == QuantMethod::ModelOptNvfp4)
        for (const char* key : {"group_size", "kv_cache_quant_algo", "exclude_modules"})
            if (!o.has(key)) o.fail_field(key, "is missing (required for NVFP4, as vLLM requires it)");
    if (auto gs = o.opt_int("group_size", NullIs::Absent))
        check_group_size(q, o, "group_size", *gs);
    else if (q.method == QuantMethod::ModelOptNvfp4)
        q.group_size = kNvfp4GroupSize;
    q.kv_cache = kv_from_algo(o, "kv_cache_quant_algo");
    q.exclude_patterns = o.opt_string_list("exclude_modules", NullIs::Absent).value_or(std::vector<std::string>{});
    return q;
}

// The config.json form of a ModelOpt config.
QuantConfig parse_modelopt_embedded(const JsonObject& o) {
    if (o.has("quantization")) return parse_modelopt_legacy(o.get_object("quantization"));
    QuantConfig q;
    q.source = o.source();
    set_modelopt_algo(q, o, "quant_algo");

    if (auto gs = o.opt_int("group_size", NullIs::Absent)) {
        check_group_size(q, o, "group_size", *gs);
    } else if (auto groups = o.opt_object("config_groups", NullIs::Absent)) {
        // convert_hf_quant_config_format puts the group size only here.
        for (const auto& [name, g] : groups->json().items()) {
            JsonObject group(g, o.source(), groups->field(name));
            if (auto w = group.opt_object("weights", NullIs::Absent))
                if (auto gs = w->opt_int("group_size", NullIs::Absent)) check_group_size(q, *w, "group_size", *gs);
        }
    }
    if (q.group_size == 0 && q.method == QuantMethod::ModelOptNvfp4) q.group_size = kNvfp4GroupSize;

    if (const auto* scheme = o.find("kv_cache_scheme"); scheme != nullptr && !scheme->is_null()) {
        if (scheme->is_string())
            q.kv_cache = kv_from_algo(o, "kv_cache_scheme");  // the converter writes non-FP8 algos as strings
        else
            q.kv_cache = kv_from_scheme(o.get_object("kv_cache_scheme"));
    } else {
        q.kv_cache = kv_from_algo(o, "kv_cache_quant_algo");
    }

    if (auto ignore = o.opt_string_list("ignore", NullIs::Absent))
        q.exclude_patterns = *ignore;
    else
        q.exclude_patterns =
            o.opt_string_list("exclude_modules", NullIs::Absent).value_or(std::vector<std::string>{});
    return q;
}

// weights / input_activations of a compressed-tensors group: NVFP4 arguments or a refusal by name.
void check_ct_nvfp4_args(const JsonObject& a, bool is_weights) {
    auto refuse = [&](std::string_view key, const std::string& got) {
        fail("{}: {} {} is not supported (supported: NVFP4: num_bits 4, type float, strategy tensor_group, "
             "group_size 16, symmetric)",
             a.source(), a.field(key), got);
    };
    if (int64_t bits = a.get_int("num_bits"); bits != 4) refuse("num_bits", std::to_string(bits));
    if (std::string type = a.get_string("type"); type != "float") refuse("type", "'" + type + "'");
    auto strategy = a.opt_string("strategy", NullIs::Absent);
    if (is_weights && !strategy) a.fail_field("strategy", "is missing");
    if (strategy && *strategy != "tensor_group") refuse("strategy", "'" + *strategy + "'");
    auto group_size = a.opt_int("group_size", NullIs::Absent);
    if (is_weights && !group_size) a.fail_field("group_size", "is missing");
    if (group_size && *group_size != kNvfp4GroupSize) refuse("group_size", std::to_string(*group_size));
    if (auto symmetric = a.opt_bool("symmetric", NullIs::Absent); symmetric && !*symmetric)
        refuse("symmetric", "false");
    // Weights are static; activations have per-block scales computed at run time ("local") around a
    // calibrated global scale. Fully dynamic activations (true) would have no global scale in the file.
    if (const auto* dynamic = a.find("dynamic"); dynamic != nullptr && !dynamic->is_null()) {
        bool ok = (dynamic->is_boolean() && !dynamic->get<bool>()) ||
                  (!is_weights && dynamic->is_string() && dynamic->get<std::string>() == "local");
        if (!ok) refuse("dynamic", describe_json_value(*dynamic));
    }
}

QuantConfig parse_compressed_tensors(const JsonObject& o) {
    QuantConfig q;
    q.source = o.source();
    q.method = QuantMethod::CompressedTensorsNvfp4;
    q.group_size = kNvfp4GroupSize;

    auto format = o.opt_string("format", NullIs::Absent);
    if (format && *format != kCtNvfp4Format)
        fail("{}: {} '{}' is not supported (supported: nvfp4-pack-quantized)", o.source(), o.field("format"),
             *format);
    if (auto status = o.opt_string("quantization_status", NullIs::Absent); status && *status != "compressed")
        fail("{}: {} '{}' is not supported (supported: compressed)", o.source(), o.field("quantization_status"),
             *status);
    if (auto sparsity = o.opt_object("sparsity_config", NullIs::Absent); sparsity && !sparsity->json().empty())
        if (sparsity->opt_string("format", NullIs::Absent).value_or("") != "dense")
            fail("{}: {} is not supported (sparse checkpoints)", o.source(), o.field("sparsity_config"));
    if (auto transform = o.opt_object("transform_config", NullIs::Absent); transform && !transform->json().empty())
        fail("{}: {} is not supported (transformed weights)", o.source(), o.field("transform_config"));

    JsonObject groups = o.get_object("config_groups");
    if (groups.json().empty()) o.fail_field("config_groups", "has no groups");
    std::optional<bool> weight_only;
    for (const auto& [name, g] : groups.json().items()) {
        JsonObject group(g, o.source(), groups.field(name));
        auto group_format = group.opt_string("format", NullIs::Absent);
        if (group_format && *group_format != kCtNvfp4Format)
            fail("{}: {} '{}' is not supported (supported: nvfp4-pack-quantized)", o.source(),
                 group.field("format"), *group_format);
        if (!format && !group_format)
            fail("{}: neither {} nor {} is given", o.source(), o.field("format"), group.field("format"));
        auto targets = group.get_string_list("targets");
        // "Linear" targets every linear module; a group limited to some modules would leave the others
        // unquantized without listing them in ignore, which is_excluded could not tell.
        if (std::find(targets.begin(), targets.end(), "Linear") == targets.end())
            fail("{}: {} without \"Linear\" is not supported (only groups that target every Linear module)",
                 o.source(), group.field("targets"));
        check_ct_nvfp4_args(group.get_object("weights"), true);
        auto inputs = group.opt_object("input_activations", NullIs::Absent);
        if (inputs) check_ct_nvfp4_args(*inputs, false);
        if (const auto* out = group.find("output_activations"); out != nullptr && !out->is_null())
            fail("{}: {} is not supported", o.source(), group.field("output_activations"));
        if (weight_only && *weight_only != !inputs)
            fail("{}: config groups disagree on whether activations are quantized", o.source());
        weight_only = !inputs;
    }
    q.weight_only = *weight_only;

    q.exclude_patterns = o.opt_string_list("ignore", NullIs::Absent).value_or(std::vector<std::string>{});
    for (const auto& p : q.exclude_patterns) {
        if (p.rfind("re:", 0) != 0) continue;
        try {
            std::regex re(p.substr(3), std::regex::ECMAScript);
        } catch (const std::regex_error& e) {
            fail("{}: {} entry '{}' is not a regular expression we can use: {}", o.source(), o.field("ignore"), p,
                 e.what());
        }
    }
    if (auto scheme = o.opt_object("kv_cache_scheme", NullIs::Absent)) q.kv_cache = kv_from_scheme(*scheme);
    return q;
}

}  // namespace

bool QuantConfig::is_excluded(const std::string& module_name) const {
    switch (method) {
    case QuantMethod::None: return true;
    case QuantMethod::ModelOptNvfp4:
    case QuantMethod::ModelOptFp8: {
        const std::string with_weight = module_name + ".weight";
        for (const auto& p : exclude_patterns)
            if (fnmatch(p.c_str(), module_name.c_str(), 0) == 0 || fnmatch(p.c_str(), with_weight.c_str(), 0) == 0)
                return true;
        return false;
    }
    case QuantMethod::CompressedTensorsNvfp4:
        for (const auto& p : exclude_patterns) {
            if (p.rfind("re:", 0) != 0) {
                if (p == module_name) return true;
                continue;
            }
            std::regex re;
            try {
                re = std::regex(p.substr(3), std::regex::ECMAScript);
            } catch (const std::regex_error& e) {
                fail("{}: ignore entry '{}' is not a regular expression we can use: {}", source, p, e.what());
            }
            // match_continuous anchors the match at the start of the name, like Python's re.match.
            if (std::regex_search(module_name, re, std::regex_constants::match_continuous)) return true;
        }
        return false;
    }
    return false;
}

std::string_view quant_method_name(QuantMethod method) {
    switch (method) {
    case QuantMethod::None: return "none";
    case QuantMethod::ModelOptNvfp4: return "modelopt-nvfp4";
    case QuantMethod::ModelOptFp8: return "modelopt-fp8";
    case QuantMethod::CompressedTensorsNvfp4: return "compressed-tensors-nvfp4";
    }
    return "unknown";
}

std::string_view kv_cache_quant_name(KvCacheQuant kv) {
    switch (kv) {
    case KvCacheQuant::None: return "none";
    case KvCacheQuant::Fp8: return "fp8";
    case KvCacheQuant::Nvfp4: return "nvfp4";
    }
    return "unknown";
}

QuantConfig parse_hf_quant_config(const nlohmann::json& file, const std::string& source) {
    JsonObject top(file, source);
    return parse_modelopt_legacy(top.get_object("quantization"));
}

QuantConfig parse_quantization_config(const nlohmann::json& quantization_config, const std::string& source) {
    JsonObject o(quantization_config, source, "quantization_config");
    std::string method = o.get_string("quant_method");
    // vLLM takes every quant_method starting with "modelopt" as ModelOpt.
    if (lower(method).rfind("modelopt", 0) == 0) return parse_modelopt_embedded(o);
    if (method == "compressed-tensors") return parse_compressed_tensors(o);
    fail("{}: {} '{}' is not supported (supported: modelopt, compressed-tensors)", source, o.field("quant_method"),
         method);
}

QuantConfig load_quant_config(const std::string& dir, const nlohmann::json& config) {
    const std::string config_path = dir + "/config.json";
    const std::string legacy_path = dir + "/hf_quant_config.json";
    JsonObject c(config, config_path);

    std::optional<QuantConfig> legacy, embedded;
    if (std::filesystem::exists(legacy_path)) legacy = parse_hf_quant_config(read_json_file(legacy_path), legacy_path);
    if (const auto* qc = c.find("quantization_config"); qc != nullptr && !qc->is_null())
        embedded = parse_quantization_config(*qc, config_path);

    if (legacy && embedded &&
        (legacy->method != embedded->method || legacy->weight_only != embedded->weight_only ||
         legacy->kv_cache != embedded->kv_cache))
        fail("{} ({}{}, kv cache {}) and {} quantization_config ({}{}, kv cache {}) disagree", legacy_path,
             quant_method_name(legacy->method), legacy->weight_only ? " weight-only" : "",
             kv_cache_quant_name(legacy->kv_cache), config_path, quant_method_name(embedded->method),
             embedded->weight_only ? " weight-only" : "", kv_cache_quant_name(embedded->kv_cache));
    if (legacy) return *legacy;
    if (embedded) return *embedded;
    QuantConfig none;
    none.source = config_path;
    return none;
}

namespace {

nlohmann::json producer_json(const QuantExportOptions& options) {
    return {{"name", "nibble"}, {"version", options.producer_version}};
}

nlohmann::json kv_algo_json(KvCacheQuant kv) {
    switch (kv) {
    case KvCacheQuant::None: return nullptr;
    case KvCacheQuant::Fp8: return "FP8";
    case KvCacheQuant::Nvfp4: return "NVFP4";
    }
    return nullptr;
}

}  // namespace

nlohmann::json modelopt_hf_quant_config_json(const QuantExportOptions& options) {
    return {
        {"producer", producer_json(options)},
        {"quantization",
         {{"quant_algo", "NVFP4"},
          {"kv_cache_quant_algo", kv_algo_json(options.kv_cache)},
          {"group_size", kNvfp4GroupSize},
          {"exclude_modules", options.exclude_modules}}},
    };
}

nlohmann::json modelopt_quantization_config_json(const QuantExportOptions& options) {
    nlohmann::json args = {{"dynamic", false}, {"num_bits", 4}, {"type", "float"}, {"group_size", kNvfp4GroupSize}};
    nlohmann::json q = {
        {"config_groups", {{"group_0", {{"input_activations", args}, {"weights", args}, {"targets", {"Linear"}}}}}},
        {"ignore", options.exclude_modules},
        {"quant_algo", "NVFP4"},
        {"producer", producer_json(options)},
        {"quant_method", "modelopt"},
    };
    // Same rule as convert_hf_quant_config_format: a dict for FP8, the algo name otherwise, absent for none.
    if (options.kv_cache == KvCacheQuant::Fp8)
        q["kv_cache_scheme"] = {{"dynamic", false}, {"num_bits", 8}, {"type", "float"}};
    else if (options.kv_cache == KvCacheQuant::Nvfp4)
        q["kv_cache_scheme"] = "NVFP4";
    return q;
}

nlohmann::json compressed_tensors_quantization_config_json(const QuantExportOptions& options) {
    nlohmann::json weights = {{"num_bits", 4},          {"type", "float"},    {"symmetric", true},
                              {"group_size", kNvfp4GroupSize}, {"strategy", "tensor_group"}, {"dynamic", false}};
    nlohmann::json inputs = weights;
    inputs["dynamic"] = "local";
    nlohmann::json kv_scheme = nullptr;
    if (options.kv_cache == KvCacheQuant::Fp8)
        kv_scheme = {{"num_bits", 8}, {"type", "float"}, {"strategy", "tensor"}, {"dynamic", false},
                     {"symmetric", true}};
    else if (options.kv_cache == KvCacheQuant::Nvfp4)
        fail("compressed-tensors export: an NVFP4 KV cache scheme is not supported (supported: fp8, none)");
    return {
        {"quant_method", "compressed-tensors"},
        {"format", kCtNvfp4Format},
        {"quantization_status", "compressed"},
        {"config_groups",
         {{"group_0",
           {{"targets", {"Linear"}},
            {"format", kCtNvfp4Format},
            {"weights", weights},
            {"input_activations", inputs},
            {"output_activations", nullptr}}}}},
        {"ignore", options.exclude_modules},
        {"kv_cache_scheme", kv_scheme},
        {"global_compression_ratio", nullptr},
        {"sparsity_config", nlohmann::json::object()},
    };
}

}  // namespace nibble
