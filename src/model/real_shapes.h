// Published architectures' shapes, for planning and benchmarking without a download (`nibble plan --synthetic
// NAME`, `nibble bench --synthetic NAME`): each name is the config.json its checkpoint publishes (the fields
// that shape the weights, as written there) and the quantization a ModelOpt NVFP4 export of it carries.
//   llama3-8b, llama3-70b         Llama-3.1-8B / -70B (LlamaForCausalLM)
//   qwen3-8b                      Qwen3-8B (Qwen3ForCausalLM)
//   mistral-7b                    Mistral-7B-v0.3 (MistralForCausalLM)
//   qwen3-30b-a3b                 Qwen3-30B-A3B (Qwen3MoeForCausalLM, 128 experts, 8 per token)
//   nemotron-3-nano-30b-a3b       NVIDIA-Nemotron-3-Nano-30B-A3B (NemotronHForCausalLM: 23 Mamba2, 23 MoE of 128
//                                 experts with 6 per token, 6 attention layers)
// The config goes through parse_model_config, so a shape is exactly what loading the real config.json gives.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"

namespace nibble {

struct RealShapeOptions {
    bool nvfp4 = true;           // false: the BF16 checkpoint (no quantization config)
    bool lm_head_nvfp4 = false;  // quantize lm_head too (ModelOpt's exports keep it BF16)
};

struct RealShape {
    std::string name;
    ModelConfig config;
    QuantConfig quant;  // method None for BF16
};

// The known names, in the order above.
std::vector<std::string> real_shape_names();

// The config.json object of `name` (the published fields that shape the model). Throws nibble::Error listing
// the known names for any other.
nlohmann::json real_shape_config_json(const std::string& name);

// parse_model_config of the above.
ModelConfig real_shape_config(const std::string& name);

// The config and the quantization a ModelOpt NVFP4 export of it has (hf_quant_config.json: quant_algo NVFP4,
// group size 16, exclude_modules; see real_shapes.cpp for each name's list), or none with nvfp4 false.
RealShape real_shape(const std::string& name, const RealShapeOptions& options = {});

// ModelOpt's BF16 exclusions of a NemotronH NVFP4 export, as fnmatch patterns over published module names:
// every attention layer's mixer and the mixer of the Mamba layer right before each attention layer
// ("backbone.layers.{i}.mixer*"). The rule NemotronHModel::default_quant_exclusions applies to a loaded model
// (conv1d, embeddings and norms are not linears, so they stay BF16 without a pattern; lm_head is separate).
std::vector<std::string> nemotron_h_modelopt_exclusions(const ModelConfig& config);

}  // namespace nibble
