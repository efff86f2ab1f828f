// A backend-neutral view of a pre-norm decoder's weights (the llama family, and Qwen3-MoE / Qwen2-MoE whose
// layers hold a routed MoE block, with Qwen2-MoE's gated shared expert, in place of the dense MLP), for backends that copy the weights elsewhere (the CUDA
// backend uploads them to the device). Pointers refer into the Model, which must outlive the view; nothing
// is copied.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/linear/linear.h"
#include "ops/rope/rope.h"
#include "tensor/tensor.h"

namespace nibble {

struct DecoderLayerView {
    const std::vector<float>* attn_norm = nullptr;  // [n_embd]
    const std::vector<float>* mlp_norm = nullptr;   // [n_embd]
    const std::vector<float>* q_norm = nullptr;     // [head_dim], empty vector when the model has none
    const std::vector<float>* k_norm = nullptr;     // [head_dim]
    const LinearWeight *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
    // Dense MLP (null in a MoE layer): gate/up [n_ff, n_embd], down [n_embd, n_ff].
    const LinearWeight *gate = nullptr, *up = nullptr, *down = nullptr;
    // MoE layer (router not null): softmax router [n_experts, n_embd] and each expert's SwiGLU MLP,
    // expert_gate/expert_up [n_experts] of [moe n_ff, n_embd], expert_down [n_experts] of [n_embd, moe n_ff].
    const LinearWeight* router = nullptr;
    std::vector<const LinearWeight*> expert_gate, expert_up, expert_down;
    // Qwen2-MoE's shared expert in a MoE layer (null without one): a SwiGLU MLP, shared_gate / shared_up
    // [n_ff_shared, n_embd], shared_down [n_embd, n_ff_shared], whose output is scaled per token by
    // sigmoid(shared_expert_gate x) (shared_expert_gate [1, n_embd]; null: unscaled) and added to the routed sum.
    const LinearWeight *shared_gate = nullptr, *shared_up = nullptr, *shared_down = nullptr;
    const LinearWeight* shared_expert_gate = nullptr;
    bool moe() const { return router != nullptr; }
    bool has_shared_expert() const { return shared_up != nullptr; }
};

struct DecoderView {
    Tensor embed;                                   // [vocab, n_embd] F32, F16 or BF16 (host memory)
    std::vector<DecoderLayerView> layers;
    const std::vector<float>* final_norm = nullptr;  // [n_embd]
    const LinearWeight* lm_head = nullptr;           // [vocab, n_embd]; the embedding itself when tied
    bool tied_lm_head = false;
    RopeTable rope;
    std::vector<float> k_scales, v_scales;           // [n_layers] the checkpoint's KV scales, or empty
};

}  // namespace nibble
