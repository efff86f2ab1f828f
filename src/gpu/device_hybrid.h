// A hybrid Mamba2 / attention / MLP / MoE stack's weights in device memory (NemotronH, Nemotron-3-Nano), as
// gpu/hybrid_forward.h reads them: linear layers in their stored format (NVFP4 packed + E4M3 block scales,
// or BF16; ModelOpt's NVFP4 exports keep the attention layers, the Mamba layer feeding each and the lm_head
// BF16), the routed experts NVFP4 (up and down only: relu^2 experts; BF16 for a BF16 checkpoint, which only
// small test models are: the MoE's plain GEMV runs them), the router BF16, norms, the Mamba
// conv, A, D and dt_bias in float32, the embedding table BF16. Made by uploading a Model's HybridView or by
// filling random values of a real architecture's shape (synthetic_hybrid).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/model_config.h"
#include "cuda/device_buffer.h"
#include "gpu/device_decoder.h"
#include "model/hybrid_view.h"
#include "ops/ssm/ssm_state.h"

namespace nibble::gpu {

struct DeviceHybridLayer {
    LayerKind kind = LayerKind::Mamba;
    int64_t cache_index = -1;   // attention: KV cache layer; Mamba: state layer
    cuda::DeviceBuffer norm;    // [n_embd] float32
    // Mamba
    DeviceLinear in_proj, out_proj;
    cuda::DeviceBuffer conv_w;            // [conv_dim, conv_kernel] float32
    cuda::DeviceBuffer conv_b;            // [conv_dim] float32, empty without conv bias
    cuda::DeviceBuffer A, D, dt_bias;     // [n_heads] float32 (A = -exp(A_log))
    cuda::DeviceBuffer gated_norm;        // [d_inner] float32
    // Attention
    DeviceLinear q, k, v, o;
    // Mlp: the relu^2 MLP; Moe: the shared expert
    DeviceLinear up, down;
    // Moe
    DeviceLinear router;                  // [n_experts, n_embd] BF16
    cuda::DeviceBuffer correction_bias;   // [n_experts] float32
    DeviceMoeExperts experts;             // NVFP4 (or BF16) up / down (n_mats 2)
};

struct DeviceHybrid {
    ModelConfig config;
    cuda::DeviceBuffer embed;             // [vocab, n_embd] BF16
    std::vector<DeviceHybridLayer> layers;
    cuda::DeviceBuffer final_norm;        // [n_embd] float32
    DeviceLinear lm_head;                 // [vocab, n_embd]; data points at `embed` when tied
    int64_t n_attention = 0, n_mamba = 0;
    std::vector<float> k_scales, v_scales;  // [n_attention] FP8-convention KV scales, or empty (1.0)

    // The per-sequence recurrent state the forward keeps (one slot's shape, ssm_state.h).
    MambaStateShape state_shape(SsmStateDtype dtype) const;
    // Weights a decode step of `tokens` sequences streams (MoE layers: router, shared expert and the
    // DeviceMoeExperts::expected_active experts: top_k for one token).
    double streamed_bytes_per_step(int64_t tokens) const;
    // Multiply-accumulates per token in the linear layers (MoE: top_k experts), the lm_head aside.
    int64_t active_linear_params() const;
    int64_t device_bytes() const;
    // The largest n_out * n_in among the dense-path linears (the prefill GEMM's dequantization scratch).
    int64_t max_linear_elems() const;
};

// Checks that the CUDA hybrid forward supports this architecture and shape; throws naming what does not fit.
void check_hybrid_supported(const ModelConfig& config);
// The same plus the weights' formats: routed experts NVFP4 or dense (one format a layer), router unquantized,
// no FP8 linears.
void check_hybrid_supported(const ModelConfig& config, const HybridView& view);

// Uploads a Model's hybrid weights (model.h hybrid_view) with a progress bar on stderr.
DeviceHybrid upload_hybrid(const ModelConfig& config, const HybridView& view);

// Random weights of `config`'s shape on the device, with the BF16 exclusions of ModelOpt's NVFP4 recipe
// (attention layers and the Mamba layer before each BF16; the other linears and the experts NVFP4 when
// options.nvfp4; lm_head BF16 unless lm_head_nvfp4), a BF16 router, float32 Mamba parameters in the ranges
// real checkpoints hold (A in -16..-1, dt_bias so softplus gives ~0.01..0.1). For benchmarks.
DeviceHybrid synthetic_hybrid(const ModelConfig& config, const SyntheticOptions& options);

}  // namespace nibble::gpu
