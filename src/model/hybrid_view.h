// A backend-neutral view of a hybrid Mamba2 / attention / MLP / MoE stack's weights (NemotronH: each layer
// one mixer after a pre-RMSNorm, added to the residual), for backends that copy the weights elsewhere (the
// CUDA backend uploads them, gpu/device_hybrid.h). Pointers refer into the Model, which must outlive the
// view; nothing is copied. Layer kinds and shapes are the config's (model_config.h LayerKind, MambaConfig).
#pragma once

#include <cstdint>
#include <vector>

#include "checkpoint/model_config.h"
#include "ops/linear/linear.h"
#include "tensor/tensor.h"

namespace nibble {

struct HybridLayerView {
    LayerKind kind = LayerKind::Mamba;
    int64_t cache_index = -1;                    // attention: KV cache layer; Mamba: state layer; else -1
    const std::vector<float>* norm = nullptr;    // [n_embd] the pre-mixer RMSNorm
    // Mamba: in_proj [z, x, B, C, dt = in_proj_dim, n_embd], out_proj [n_embd, d_inner], conv weight
    // [conv_dim, conv_kernel] and bias [conv_dim] (empty without conv bias), A (= -exp(A_log)), D, dt_bias
    // [n_heads], the gated norm's weight [d_inner]; all float32 except the linears.
    const LinearWeight *in_proj = nullptr, *out_proj = nullptr;
    const std::vector<float> *conv_w = nullptr, *conv_b = nullptr;
    const std::vector<float> *A = nullptr, *D = nullptr, *dt_bias = nullptr, *gated_norm = nullptr;
    // Attention (no RoPE, no bias): q [n_heads * head_dim, n_embd], k / v [n_kv_heads * head_dim, n_embd], o.
    const LinearWeight *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
    // relu^2 MLP (Mlp layers) or the MoE layer's shared expert: up [ff, n_embd], down [n_embd, ff].
    const LinearWeight *up = nullptr, *down = nullptr;
    // MoE: the sigmoid router [n_experts, n_embd] (float in the checkpoint), its correction bias
    // [n_experts], each routed expert's relu^2 MLP up [moe n_ff, n_embd] and down [n_embd, moe n_ff].
    const LinearWeight* router = nullptr;
    const std::vector<float>* correction_bias = nullptr;
    std::vector<const LinearWeight*> expert_up, expert_down;
};

struct HybridView {
    Tensor embed;                                    // [vocab, n_embd] F32, F16 or BF16 (host memory)
    std::vector<HybridLayerView> layers;
    const std::vector<float>* final_norm = nullptr;  // [n_embd]
    const LinearWeight* lm_head = nullptr;           // [vocab, n_embd]; the embedding itself when tied
    bool tied_lm_head = false;
    int64_t n_attention = 0, n_mamba = 0;            // KV cache layers, Mamba state layers
    std::vector<float> k_scales, v_scales;           // [n_attention] the checkpoint's KV scales, or empty
};

}  // namespace nibble
