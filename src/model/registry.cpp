// Maps a config's architecture to its implementation. Unknown architectures were already refused by
// name when config.json was parsed; this switch is where a new family is added.
#include <fstream>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "base/log.h"
#include "checkpoint/safetensors.h"
#include "model/llama.h"
#include "model/model.h"
#include "model/nemotron_h.h"
#include "model/qwen_moe.h"

namespace nibble {

namespace {
nlohmann::json read_config_json(const std::string& dir) {
    const std::string path = dir + "/config.json";
    std::ifstream in(path);
    NIBBLE_CHECK(in.good(), "{}: cannot open (is {} a Hugging Face model folder?)", path, dir);
    try {
        return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", path, e.what());
    }
}
}  // namespace

std::vector<WeightSpec> expected_weights(const ModelConfig& config) {
    switch (config.arch) {
        case Arch::Llama:
        case Arch::Mistral:
        case Arch::Qwen2:
        case Arch::Qwen3: return llama_expected_weights(config);
        case Arch::Qwen2Moe:
        case Arch::Qwen3Moe: return qwen_moe_expected_weights(config);
        case Arch::NemotronH: return nemotron_h_expected_weights(config);
    }
    fail("architecture {} has no tensor list", config.arch_name);
}

std::unique_ptr<Model> load_model(const std::string& dir, ThreadPool& pool) {
    const nlohmann::json json = read_config_json(dir);
    ModelConfig config = parse_model_config(json, dir + "/config.json");
    QuantConfig quant = load_quant_config(dir, json);
    auto ckpt = std::make_unique<Checkpoint>(dir);
    log::info("loading {} ({} layers, hidden {}, {} weights) from {}", config.arch_name, config.n_layers,
              config.n_embd, quant.method == QuantMethod::None ? "unquantized" : quant_method_name(quant.method), dir);
    switch (config.arch) {
        case Arch::Llama:
        case Arch::Mistral:
        case Arch::Qwen2:
        case Arch::Qwen3:
            return std::make_unique<LlamaModel>(std::move(ckpt), std::move(config), std::move(quant), pool);
        case Arch::Qwen2Moe:
        case Arch::Qwen3Moe:
            return std::make_unique<QwenMoeModel>(std::move(ckpt), std::move(config), std::move(quant), pool);
        case Arch::NemotronH:
            return std::make_unique<NemotronHModel>(std::move(ckpt), std::move(config), std::move(quant), pool);
    }
    fail("{}: architecture {} has no implementation", dir, config.arch_name);
}

}  // namespace nibble
