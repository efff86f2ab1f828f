// `nibble quantize`: a BF16/FP16/FP32 checkpoint becomes an NVFP4 checkpoint with the tensor names,
// dtypes, shapes and config entries that NVIDIA ModelOpt or llm-compressor (compressed-tensors) export,
// so that other engines (vLLM) load it too. Scales follow ModelOpt's recipe (tensor/nvfp4.h).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "base/thread_pool.h"

namespace nibble {

enum class QuantLayout {
    ModelOpt,           // X.weight U8, X.weight_scale F8_E4M3, X.weight_scale_2 F32, X.input_scale F32
    CompressedTensors,  // X.weight_packed, X.weight_scale, X.weight_global_scale, X.input_global_scale
};

// Without calibration, every linear's activation scale is 1.0, i.e. an assumed activation amax of
// 6 * 448 = 2688: a W4A4 engine's E4M3 block scales then cover block maxima from 6 * 2^-9 (~0.012) to 2688,
// the range hidden states of these models take. Weight-only engines (nibble on Hopper) ignore it.
constexpr float kDefaultInputScale = 1.0f;

struct QuantizeOptions {
    std::string src_dir, dst_dir;
    QuantLayout layout = QuantLayout::ModelOpt;
    // fnmatch patterns of linear modules kept unquantized; embeddings, norms and MoE routers (mlp.gate,
    // mlp.shared_expert_gate: quantize.cpp's kAlwaysExcluded) are never quantized.
    std::vector<std::string> exclude = {"lm_head"};
    // Also keep unquantized what the architecture's published recipe does (Model::default_quant_exclusions():
    // NemotronH's attention layers and the Mamba layers feeding them, as ModelOpt exports Nemotron-H).
    bool architecture_exclusions = true;
    // One NVFP4 global scale per fusion group (global_scale_group), from the group's joint amax and written
    // to every member, as ModelOpt's export gives the projections engines run as one GEMM (vLLM's qkv_proj
    // and gate_up_proj) one weight_scale_2; the members' input scales take the group's largest amax too.
    // false: every tensor its own amax.
    bool fusion_group_global_scales = true;
    // Activation amax per linear module from calibration; modules absent use kDefaultInputScale.
    std::map<std::string, float> input_amax;
    uint64_t max_shard_bytes = 5ull << 30;
    bool progress = true;
};

struct TensorReport {
    std::string name;       // source tensor
    std::string action;     // "nvfp4", or "copied"
    double rel_rms_error = 0.0;  // ||w - dequant(quant(w))|| / ||w||, for quantized tensors
    int64_t bytes_in = 0, bytes_out = 0;
};

// The group whose members share one NVFP4 global scale: a layer's "P.q_proj", "P.k_proj" and "P.v_proj" are
// "P.{q,k,v}_proj", an MLP's or expert's "P.gate_proj" and "P.up_proj" are "P.{gate,up}_proj" (an MLP
// without a gate, NemotronH's relu2, is a group of one); any other module is its own group.
std::string global_scale_group(const std::string& module);

// Writes the quantized checkpoint into dst_dir (created; must not already hold a checkpoint) and returns
// one report per source tensor. Refuses a source that is already quantized, a module to quantize whose
// input dimension is not a multiple of 16, and an exclude pattern that matches no linear module.
std::vector<TensorReport> quantize_checkpoint(const QuantizeOptions& options, ThreadPool& pool);

}  // namespace nibble
