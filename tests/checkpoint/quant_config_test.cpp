// Quantization configs against the shapes real producers write and the rules vLLM applies when reading
// them:
//  - hf_quant_config.json as NVIDIA's ModelOpt exports write it (nvidia/*-FP4 checkpoints; the keys vLLM's
//    ModelOptNvFp4Config requires: group_size, kv_cache_quant_algo, exclude_modules);
//  - config.json quantization_config as ModelOpt's convert_hf_quant_config_format builds it (example from
//    the ModelOpt docs: quant_method "modelopt", ignore ["lm_head", "model.visual*"], kv_cache_scheme
//    {"type": "float", "num_bits": 8, "dynamic": false}, producer modelopt 0.39.0);
//  - compressed-tensors nvfp4-pack-quantized configs as llm-compressor writes them (RedHatAI/*-NVFP4), with
//    ignore lists taken from published checkpoints ("re:.*block_sparse_moe.gate$", "re:.*self_attn.*", ...).
// Exclusion semantics come from outside this project: fnmatch wildcards (Python fnmatch / POSIX fnmatch(3):
// '*' matches '.' too) for ModelOpt, and Python re.match (anchored at the start only) for compressed-tensors
// "re:" entries (compressed_tensors/utils/match.py _match_name).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "base/error.h"
#include "checkpoint/quant_config.h"

namespace nibble {
namespace {

using nlohmann::json;

template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

#define EXPECT_ERROR(expr, fragment)                                                                   \
    do {                                                                                               \
        std::string message_ = error_of([&] { (void)(expr); });                                        \
        EXPECT_NE(message_.find(fragment), std::string::npos)                                          \
            << "expected an error containing \"" << (fragment) << "\", got \"" << message_ << "\"";   \
    } while (0)

QuantConfig legacy(const std::string& text) { return parse_hf_quant_config(json::parse(text), "hf_quant_config.json"); }
QuantConfig embedded(const std::string& text) { return parse_quantization_config(json::parse(text), "config.json"); }

// Sets (or, with an empty value, erases) a key at a JSON pointer path in `text`.
std::string with(const std::string& text, const std::string& pointer, const std::string& value) {
    json j = json::parse(text);
    json::json_pointer p(pointer);
    if (value.empty())
        j[p.parent_pointer()].erase(p.back());
    else
        j[p] = json::parse(value);
    return j.dump();
}

// ---- ModelOpt hf_quant_config.json ---------------------------------------------------------------------

const char* kModelOptNvfp4 = R"({
    "producer": {
        "name": "modelopt",
        "version": "0.29.0"
    },
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": null,
        "group_size": 16,
        "exclude_modules": [
            "lm_head"
        ]
    }
})";

TEST(QuantConfig, ModelOptNvfp4Legacy) {
    QuantConfig q = legacy(kModelOptNvfp4);
    EXPECT_EQ(q.method, QuantMethod::ModelOptNvfp4);
    EXPECT_EQ(q.group_size, 16);
    EXPECT_FALSE(q.weight_only);
    EXPECT_EQ(q.kv_cache, KvCacheQuant::None);
    EXPECT_EQ(q.exclude_patterns, std::vector<std::string>{"lm_head"});
    EXPECT_EQ(q.source, "hf_quant_config.json");
    EXPECT_TRUE(q.is_excluded("lm_head"));
    EXPECT_FALSE(q.is_excluded("model.layers.0.self_attn.q_proj"));
    EXPECT_FALSE(q.is_excluded("model.layers.0.lm_head_extra"));  // exact pattern, no substring match

    EXPECT_EQ(legacy(with(kModelOptNvfp4, "/quantization/kv_cache_quant_algo", "\"FP8\"")).kv_cache, KvCacheQuant::Fp8);
    EXPECT_EQ(legacy(with(kModelOptNvfp4, "/quantization/kv_cache_quant_algo", "\"NVFP4\"")).kv_cache, KvCacheQuant::Nvfp4);
    // vLLM upper-cases quant_algo (ModelOpt may emit lowercase).
    EXPECT_EQ(legacy(with(kModelOptNvfp4, "/quantization/quant_algo", "\"nvfp4\"")).method, QuantMethod::ModelOptNvfp4);
}

TEST(QuantConfig, ModelOptW4A16IsWeightOnlyNvfp4) {
    QuantConfig q = legacy(with(kModelOptNvfp4, "/quantization/quant_algo", "\"W4A16_NVFP4\""));
    EXPECT_EQ(q.method, QuantMethod::ModelOptNvfp4);
    EXPECT_TRUE(q.weight_only);
    EXPECT_EQ(q.group_size, 16);
}

TEST(QuantConfig, ModelOptFp8) {
    // The FP8 example of TensorRT-LLM's docs (nvidia/Llama-3.1-*-Instruct-FP8): no group size, no excludes.
    QuantConfig q = legacy(R"({"producer": {"name": "modelopt", "version": "0.23.0rc1"},
                               "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": null}})");
    EXPECT_EQ(q.method, QuantMethod::ModelOptFp8);
    EXPECT_EQ(q.kv_cache, KvCacheQuant::None);
    EXPECT_TRUE(q.exclude_patterns.empty());
    EXPECT_FALSE(q.is_excluded("lm_head"));
}

TEST(QuantConfig, ModelOptWildcards) {
    QuantConfig q = legacy(with(kModelOptNvfp4, "/quantization/exclude_modules",
                                R"(["lm_head", "model.layers.4.mixer*", "*self_attn*", "model.layers.[0-2].mlp.*",
                                    "model.layers.1?.mlp.gate_proj", "*.down_proj.weight"])"));
    EXPECT_TRUE(q.is_excluded("model.layers.4.mixer.in_proj"));
    EXPECT_TRUE(q.is_excluded("model.layers.4.mixer"));
    EXPECT_FALSE(q.is_excluded("model.layers.40.mixer.in_proj"));
    EXPECT_TRUE(q.is_excluded("model.layers.31.self_attn.o_proj"));  // '*' crosses dots
    EXPECT_TRUE(q.is_excluded("model.layers.2.mlp.up_proj"));
    EXPECT_FALSE(q.is_excluded("model.layers.3.mlp.up_proj"));
    EXPECT_TRUE(q.is_excluded("model.layers.12.mlp.gate_proj"));
    EXPECT_FALSE(q.is_excluded("model.layers.112.mlp.gate_proj"));
    // A pattern naming the weight tensor excludes its module.
    EXPECT_TRUE(q.is_excluded("model.layers.9.mlp.down_proj"));
    EXPECT_FALSE(q.is_excluded("model.layers.9.mlp.gate_proj"));
}

TEST(QuantConfig, ModelOptRefusals) {
    for (const char* algo : {"MIXED_PRECISION", "FP8_PB_WO", "FP8_PER_CHANNEL_PER_TOKEN", "MXFP8", "W4A8_AWQ",
                             "NVFP4_AWQ", "W4A16_AWQ", "INT8_SQ"})
        EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization/quant_algo", std::string("\"") + algo + "\"")),
                     std::string("hf_quant_config.json: quantization.quant_algo '") + algo +
                         "' is not supported (supported: NVFP4, W4A16_NVFP4, FP8)");
    EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization/group_size", "32")),
                 "hf_quant_config.json: quantization.group_size 32 is not supported for NVFP4 (supported: 16)");
    for (const char* key : {"group_size", "kv_cache_quant_algo", "exclude_modules"})
        EXPECT_ERROR(legacy(with(kModelOptNvfp4, std::string("/quantization/") + key, "")),
                     std::string("field 'quantization.") + key + "' is missing");
    EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization/kv_cache_quant_algo", "\"INT8\"")),
                 "quantization.kv_cache_quant_algo 'INT8' is not supported (supported: FP8, NVFP4, null)");
    EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization/exclude_modules", "\"lm_head\"")),
                 "field 'quantization.exclude_modules' must be a list of strings");
    EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization/group_size", "\"16\"")),
                 "field 'quantization.group_size' must be an integer");
    EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization", "")), "field 'quantization' is missing");
    EXPECT_ERROR(legacy(with(kModelOptNvfp4, "/quantization/quant_algo", "")), "field 'quantization.quant_algo' is missing");
}

// ---- ModelOpt quantization_config in config.json -------------------------------------------------------

const char* kModelOptEmbedded = R"({
    "config_groups": {
        "group_0": {
            "input_activations": {"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16},
            "weights": {"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16},
            "targets": ["Linear"]
        }
    },
    "ignore": ["lm_head", "model.visual*"],
    "quant_algo": "NVFP4",
    "kv_cache_scheme": {"type": "float", "num_bits": 8, "dynamic": false},
    "producer": {"name": "modelopt", "version": "0.39.0"},
    "quant_method": "modelopt"
})";

TEST(QuantConfig, ModelOptEmbedded) {
    QuantConfig q = embedded(kModelOptEmbedded);
    EXPECT_EQ(q.method, QuantMethod::ModelOptNvfp4);
    EXPECT_EQ(q.group_size, 16);
    EXPECT_EQ(q.kv_cache, KvCacheQuant::Fp8);
    EXPECT_EQ(q.exclude_patterns, (std::vector<std::string>{"lm_head", "model.visual*"}));
    EXPECT_TRUE(q.is_excluded("model.visual.blocks.0.attn.qkv"));
    EXPECT_FALSE(q.is_excluded("model.layers.0.mlp.down_proj"));
    // Older spellings: exclude_modules and kv_cache_quant_algo; kv_cache_scheme as an algo string.
    std::string old = with(with(kModelOptEmbedded, "/ignore", ""), "/exclude_modules", R"(["lm_head"])");
    old = with(with(old, "/kv_cache_scheme", ""), "/kv_cache_quant_algo", "\"FP8\"");
    QuantConfig o = embedded(old);
    EXPECT_EQ(o.exclude_patterns, std::vector<std::string>{"lm_head"});
    EXPECT_EQ(o.kv_cache, KvCacheQuant::Fp8);
    EXPECT_EQ(embedded(with(kModelOptEmbedded, "/kv_cache_scheme", "\"NVFP4\"")).kv_cache, KvCacheQuant::Nvfp4);
    EXPECT_EQ(embedded(with(kModelOptEmbedded, "/kv_cache_scheme", "null")).kv_cache, KvCacheQuant::None);
    // quant_method variants vLLM also takes for ModelOpt.
    EXPECT_EQ(embedded(with(kModelOptEmbedded, "/quant_method", "\"modelopt_fp4\"")).method, QuantMethod::ModelOptNvfp4);
    // The legacy object nested under quantization_config.
    EXPECT_EQ(embedded(with(kModelOptNvfp4, "/quant_method", "\"modelopt\"")).method, QuantMethod::ModelOptNvfp4);
    EXPECT_ERROR(embedded(with(kModelOptEmbedded, "/config_groups/group_0/weights/group_size", "32")),
                 "config.json: quantization_config.config_groups.group_0.weights.group_size 32 is not supported for NVFP4");
    EXPECT_ERROR(embedded(with(kModelOptEmbedded, "/quant_algo", "\"W8A8_SQ_PER_CHANNEL\"")),
                 "config.json: quantization_config.quant_algo 'W8A8_SQ_PER_CHANNEL' is not supported");
    EXPECT_ERROR(embedded(with(kModelOptEmbedded, "/kv_cache_scheme", R"({"type": "int", "num_bits": 8})")),
                 "quantization_config.kv_cache_scheme with type 'int' and num_bits 8 is not supported");
}

// ---- compressed-tensors -------------------------------------------------------------------------------

const char* kCtNvfp4 = R"({
    "config_groups": {
      "group_0": {
        "format": "nvfp4-pack-quantized",
        "input_activations": {
          "actorder": null, "block_structure": null, "dynamic": "local", "group_size": 16, "num_bits": 4,
          "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor_group", "symmetric": true, "type": "float"
        },
        "output_activations": null,
        "targets": ["Linear"],
        "weights": {
          "actorder": null, "block_structure": null, "dynamic": false, "group_size": 16, "num_bits": 4,
          "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor_group", "symmetric": true, "type": "float"
        }
      }
    },
    "format": "nvfp4-pack-quantized",
    "global_compression_ratio": null,
    "ignore": ["lm_head"],
    "kv_cache_scheme": null,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
    "transform_config": {},
    "version": "0.11.1.a20250828"
})";

TEST(QuantConfig, CompressedTensorsNvfp4) {
    QuantConfig q = embedded(kCtNvfp4);
    EXPECT_EQ(q.method, QuantMethod::CompressedTensorsNvfp4);
    EXPECT_EQ(q.group_size, 16);
    EXPECT_FALSE(q.weight_only);
    EXPECT_EQ(q.kv_cache, KvCacheQuant::None);
    EXPECT_TRUE(q.is_excluded("lm_head"));
    EXPECT_FALSE(q.is_excluded("model.layers.0.self_attn.q_proj"));
    // Weight-only (NVFP4A16): no input_activations.
    QuantConfig w = embedded(with(kCtNvfp4, "/config_groups/group_0/input_activations", "null"));
    EXPECT_TRUE(w.weight_only);
    EXPECT_TRUE(embedded(with(kCtNvfp4, "/config_groups/group_0/input_activations", "")).weight_only);
    // An FP8 KV cache scheme as llm-compressor writes it.
    EXPECT_EQ(embedded(with(kCtNvfp4, "/kv_cache_scheme",
                            R"({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": false, "symmetric": true})"))
                  .kv_cache,
              KvCacheQuant::Fp8);
    // The group format alone is enough (seen in trimmed configs); "Linear" may come with other targets.
    EXPECT_EQ(embedded(with(kCtNvfp4, "/format", "")).method, QuantMethod::CompressedTensorsNvfp4);
    EXPECT_EQ(embedded(with(kCtNvfp4, "/config_groups/group_0/targets", R"(["Linear", "lm_head"])")).method,
              QuantMethod::CompressedTensorsNvfp4);
}

TEST(QuantConfig, CompressedTensorsIgnore) {
    QuantConfig q = embedded(with(kCtNvfp4, "/ignore",
                                  R"(["lm_head", "model.embed_tokens", "re:.*block_sparse_moe.gate$", "re:.*self_attn.*",
                                      "re:vision_encoder.*", "re:.*mlp\\.gate"])"));
    EXPECT_TRUE(q.is_excluded("model.layers.3.block_sparse_moe.gate"));
    EXPECT_FALSE(q.is_excluded("model.layers.3.block_sparse_moe.experts.0.w1"));
    EXPECT_TRUE(q.is_excluded("model.layers.0.self_attn.k_proj"));
    EXPECT_TRUE(q.is_excluded("vision_encoder.blocks.0.fc1"));
    EXPECT_FALSE(q.is_excluded("model.vision_encoder.blocks.0.fc1"));  // re.match anchors at the start
    EXPECT_TRUE(q.is_excluded("model.layers.0.mlp.gate_proj"));        // ... but not at the end
    EXPECT_FALSE(q.is_excluded("model.layers.0.mlp.up_proj"));
    EXPECT_FALSE(q.is_excluded("lm_head.extra"));                       // plain entries are exact names
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/ignore", R"(["re:(unclosed"])")),
                 "config.json: quantization_config.ignore entry 're:(unclosed' is not a regular expression");
}

TEST(QuantConfig, CompressedTensorsRefusals) {
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/format", "\"float-quantized\"")),
                 "config.json: quantization_config.format 'float-quantized' is not supported (supported: nvfp4-pack-quantized)");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/format", "\"pack-quantized\"")), "format 'pack-quantized' is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/format", "\"mixed-precision\"")), "format 'mixed-precision' is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/format", "\"mxfp4-pack-quantized\"")),
                 "quantization_config.config_groups.group_0.format 'mxfp4-pack-quantized' is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/weights/num_bits", "8")),
                 "quantization_config.config_groups.group_0.weights.num_bits 8 is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/weights/type", "\"int\"")), "weights.type 'int' is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/weights/strategy", "\"group\"")),
                 "weights.strategy 'group' is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/weights/group_size", "32")),
                 "weights.group_size 32 is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/weights/symmetric", "false")),
                 "weights.symmetric false is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/input_activations/dynamic", "true")),
                 "input_activations.dynamic boolean true is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/input_activations/num_bits", "8")),
                 "input_activations.num_bits 8 is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/targets", R"(["re:.*mlp.*"])")),
                 "quantization_config.config_groups.group_0.targets without \"Linear\" is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups/group_0/weights", "")),
                 "field 'quantization_config.config_groups.group_0.weights' is missing");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/quantization_status", "\"frozen\"")),
                 "quantization_config.quantization_status 'frozen' is not supported (supported: compressed)");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/sparsity_config", R"({"format": "sparse-24-bitmask", "sparsity_structure": "2:4"})")),
                 "quantization_config.sparsity_config is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/kv_cache_scheme", R"({"num_bits": 8, "type": "int"})")),
                 "kv_cache_scheme with type 'int' and num_bits 8 is not supported");
    EXPECT_ERROR(embedded(with(kCtNvfp4, "/config_groups", "{}")), "field 'quantization_config.config_groups' has no groups");
}

TEST(QuantConfig, OtherMethodsAreRefusedByName) {
    EXPECT_ERROR(embedded(R"({"bits": 4, "group_size": 128, "desc_act": false, "quant_method": "gptq"})"),
                 "config.json: quantization_config.quant_method 'gptq' is not supported (supported: modelopt, compressed-tensors)");
    EXPECT_ERROR(embedded(R"({"bits": 4, "group_size": 128, "zero_point": true, "quant_method": "awq", "version": "gemm"})"),
                 "quant_method 'awq' is not supported");
    EXPECT_ERROR(embedded(R"({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})"),
                 "quant_method 'fp8' is not supported");
    EXPECT_ERROR(embedded(R"({"load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "quant_method": "bitsandbytes"})"),
                 "quant_method 'bitsandbytes' is not supported");
    EXPECT_ERROR(embedded(R"({"quant_method": "mxfp4"})"), "quant_method 'mxfp4' is not supported");
    EXPECT_ERROR(embedded(R"({"bits": 4})"), "field 'quantization_config.quant_method' is missing");
    EXPECT_ERROR(embedded("[]"), "field 'quantization_config' must be an object");
}

// ---- load_quant_config ---------------------------------------------------------------------------------

struct TempDir {
    std::filesystem::path path;
    TempDir() : path(std::filesystem::temp_directory_path() / ("nibble_quant_test_" + std::to_string(getpid()))) {
        std::filesystem::remove_all(path);
        std::filesystem::create_directories(path);
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    void write(const std::string& name, const std::string& text) const { std::ofstream(path / name) << text; }
};

TEST(QuantConfig, LoadPicksTheRightFile) {
    TempDir dir;
    json config = {{"architectures", {"LlamaForCausalLM"}}};
    QuantConfig none = load_quant_config(dir.path.string(), config);
    EXPECT_EQ(none.method, QuantMethod::None);
    EXPECT_TRUE(none.is_excluded("model.layers.0.mlp.up_proj"));

    config["quantization_config"] = json::parse(kCtNvfp4);
    QuantConfig ct = load_quant_config(dir.path.string(), config);
    EXPECT_EQ(ct.method, QuantMethod::CompressedTensorsNvfp4);
    EXPECT_EQ(ct.source, (dir.path / "config.json").string());

    // hf_quant_config.json and a config.json of another method disagree.
    dir.write("hf_quant_config.json", kModelOptNvfp4);
    EXPECT_ERROR(load_quant_config(dir.path.string(), config), "disagree");

    // ModelOpt's current exports carry both, in agreement; the legacy file is read.
    config["quantization_config"] = json::parse(with(kModelOptEmbedded, "/kv_cache_scheme", ""));
    QuantConfig both = load_quant_config(dir.path.string(), config);
    EXPECT_EQ(both.method, QuantMethod::ModelOptNvfp4);
    EXPECT_EQ(both.source, (dir.path / "hf_quant_config.json").string());
    EXPECT_EQ(both.exclude_patterns, std::vector<std::string>{"lm_head"});

    config.erase("quantization_config");
    EXPECT_EQ(load_quant_config(dir.path.string(), config).method, QuantMethod::ModelOptNvfp4);

    dir.write("hf_quant_config.json", "{\"quantization\": ");
    EXPECT_ERROR(load_quant_config(dir.path.string(), config), "hf_quant_config.json: invalid JSON");
}

// ---- what nibble quantize writes ----------------------------------------------------------------------

TEST(QuantConfig, ModelOptExport) {
    QuantExportOptions options{{"lm_head", "model.layers.0.mlp.down_proj"}, KvCacheQuant::Fp8, "0.1.0"};
    json hf = modelopt_hf_quant_config_json(options);
    EXPECT_EQ(hf, json::parse(R"({
        "producer": {"name": "nibble", "version": "0.1.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                         "exclude_modules": ["lm_head", "model.layers.0.mlp.down_proj"]}})"));
    // The config.json object is what ModelOpt's convert_hf_quant_config_format returns for that file
    // (NVFP4 branch: config_groups.group_0 with input_activations / weights {dynamic false, num_bits 4,
    // type float, group_size}; FP8 KV as a dict; producer copied; quant_method "modelopt").
    EXPECT_EQ(modelopt_quantization_config_json(options), json::parse(R"({
        "config_groups": {"group_0": {
            "input_activations": {"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16},
            "weights": {"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16},
            "targets": ["Linear"]}},
        "ignore": ["lm_head", "model.layers.0.mlp.down_proj"],
        "quant_algo": "NVFP4",
        "kv_cache_scheme": {"dynamic": false, "num_bits": 8, "type": "float"},
        "producer": {"name": "nibble", "version": "0.1.0"},
        "quant_method": "modelopt"})"));
    // Without a KV cache algorithm the converter leaves kv_cache_scheme out.
    options.kv_cache = KvCacheQuant::None;
    EXPECT_FALSE(modelopt_quantization_config_json(options).contains("kv_cache_scheme"));
    EXPECT_TRUE(modelopt_hf_quant_config_json(options)["quantization"]["kv_cache_quant_algo"].is_null());

    // And both read back as what was written.
    QuantConfig a = parse_hf_quant_config(modelopt_hf_quant_config_json(options), "hf_quant_config.json");
    QuantConfig b = parse_quantization_config(modelopt_quantization_config_json(options), "config.json");
    for (const QuantConfig* q : {&a, &b}) {
        EXPECT_EQ(q->method, QuantMethod::ModelOptNvfp4);
        EXPECT_EQ(q->group_size, 16);
        EXPECT_FALSE(q->weight_only);
        EXPECT_EQ(q->kv_cache, KvCacheQuant::None);
        EXPECT_TRUE(q->is_excluded("model.layers.0.mlp.down_proj"));
        EXPECT_FALSE(q->is_excluded("model.layers.1.mlp.down_proj"));
    }
}

TEST(QuantConfig, CompressedTensorsExport) {
    QuantExportOptions options{{"lm_head"}, KvCacheQuant::None, "0.1.0"};
    json ct = compressed_tensors_quantization_config_json(options);
    // The fields vLLM's compressed-tensors NVFP4 W4A4 scheme checks, and compressed-tensors' own keys.
    EXPECT_EQ(ct["quant_method"], "compressed-tensors");
    EXPECT_EQ(ct["format"], "nvfp4-pack-quantized");
    EXPECT_EQ(ct["quantization_status"], "compressed");
    const json& g = ct["config_groups"]["group_0"];
    EXPECT_EQ(g["targets"], json::parse(R"(["Linear"])"));
    for (const char* part : {"weights", "input_activations"}) {
        EXPECT_EQ(g[part]["num_bits"], 4);
        EXPECT_EQ(g[part]["type"], "float");
        EXPECT_EQ(g[part]["strategy"], "tensor_group");
        EXPECT_EQ(g[part]["group_size"], 16);
        EXPECT_EQ(g[part]["symmetric"], true);
    }
    EXPECT_EQ(g["weights"]["dynamic"], false);
    EXPECT_EQ(g["input_activations"]["dynamic"], "local");
    EXPECT_EQ(ct["ignore"], json::parse(R"(["lm_head"])"));
    EXPECT_TRUE(ct["kv_cache_scheme"].is_null());

    QuantConfig q = parse_quantization_config(ct, "config.json");
    EXPECT_EQ(q.method, QuantMethod::CompressedTensorsNvfp4);
    EXPECT_FALSE(q.weight_only);
    EXPECT_TRUE(q.is_excluded("lm_head"));

    options.kv_cache = KvCacheQuant::Fp8;
    EXPECT_EQ(parse_quantization_config(compressed_tensors_quantization_config_json(options), "config.json").kv_cache,
              KvCacheQuant::Fp8);
    options.kv_cache = KvCacheQuant::Nvfp4;
    EXPECT_ERROR(compressed_tensors_quantization_config_json(options), "NVFP4 KV cache scheme is not supported");
}

TEST(QuantConfig, Names) {
    EXPECT_EQ(quant_method_name(QuantMethod::CompressedTensorsNvfp4), "compressed-tensors-nvfp4");
    EXPECT_EQ(kv_cache_quant_name(KvCacheQuant::Fp8), "fp8");
}

}  // namespace
}  // namespace nibble
