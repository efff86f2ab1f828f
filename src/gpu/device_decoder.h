// A dense pre-norm decoder's weights in device memory (the llama family: Llama, Mistral, Qwen2, Qwen3), as
// the CUDA forward reads them: linear layers in their stored format (NVFP4 packed + E4M3 block scales,
// FP8, or BF16), norms in float32, the embedding table in BF16. Made by uploading a Model's DecoderView
// (weight_upload.h) or by filling random values of a real architecture's shape (synthetic_decoder).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/model_config.h"
#include "cuda/device_buffer.h"
#include "ops/linear/linear.h"
#include "ops/linear/linear_cuda.h"

namespace nibble::gpu {

struct DeviceLinear {
    std::string name;                          // module name, for messages
    WeightFormat format = WeightFormat::Dense;  // Dense means BF16 here
    int64_t n_out = 0, n_in = 0;
    cuda::DeviceBuffer storage;                 // Dense [n_out, n_in] BF16; Fp8 [n_out, n_in]; Nvfp4 packed [n_out, n_in / 2]
    cuda::DeviceBuffer scale_storage;           // Nvfp4: [n_out, n_in / 16] E4M3
    const void* data = nullptr;                 // storage, or another weight's (a tied lm_head reads the embedding)
    float scale = 1.0f;                         // Fp8: per-tensor scale; Nvfp4: global scale
    cuda::DeviceBuffer bias;                    // [n_out] float32, or empty

    const float* bias_ptr() const { return bias.bytes() ? bias.as<float>() : nullptr; }
    cuda::Nvfp4DeviceWeight nvfp4() const {
        return {static_cast<const uint8_t*>(data), scale_storage.as<uint8_t>(), scale, n_out, n_in};
    }
    // Bytes one pass over the weight reads (data and scales; what a decode step streams).
    int64_t stored_bytes() const;
};

struct DeviceDecoderLayer {
    cuda::DeviceBuffer attn_norm, mlp_norm;  // [n_embd] float32
    cuda::DeviceBuffer q_norm, k_norm;       // [head_dim] float32, empty without QK-norm
    DeviceLinear q, k, v, o, gate, up, down;
};

struct DeviceDecoder {
    ModelConfig config;
    cuda::DeviceBuffer embed;           // [vocab, n_embd] BF16
    std::vector<DeviceDecoderLayer> layers;
    cuda::DeviceBuffer final_norm;      // [n_embd] float32
    DeviceLinear lm_head;               // [vocab, n_embd]; data points at `embed` when tied
    cuda::DeviceBuffer inv_freq;        // [rotary_dim / 2] float32
    int64_t rotary_dim = 0;
    std::vector<float> k_scales, v_scales;  // [n_layers] FP8-convention KV scales, or empty (1.0)

    // Weights streamed per decode step (every linear layer once, the embedding rows aside).
    int64_t streamed_bytes_per_token() const;
    int64_t device_bytes() const;
    // The largest n_out * n_in among the layers (the prefill GEMM's dequantization scratch).
    int64_t max_linear_elems() const;
};

// Checks that the CUDA forward supports this architecture and shape; throws naming what does not fit.
void check_decoder_supported(const ModelConfig& config);

// Random weights of `config`'s shape on the device: NVFP4 linear layers (valid E4M3 block scales around
// 2^-6..2^-3 so activations stay O(1)) or BF16 ones; lm_head NVFP4 only when lm_head_nvfp4 (ModelOpt's
// exports keep it BF16). For benchmarks: no checkpoint, no host copy.
struct SyntheticOptions {
    bool nvfp4 = true;
    bool lm_head_nvfp4 = false;
    uint64_t seed = 1;
};
DeviceDecoder synthetic_decoder(const ModelConfig& config, const SyntheticOptions& options);

// Real architectures' shapes for --synthetic: "llama3-8b", "llama3-70b", "qwen3-8b", "mistral-7b".
// Throws listing the known names for any other.
ModelConfig synthetic_config(const std::string& name);
std::vector<std::string> synthetic_config_names();

}  // namespace nibble::gpu
