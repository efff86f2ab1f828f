// Mixture-of-experts MLP, CPU reference: router logits -> top-k experts per token -> each expert's MLP over
// the tokens routed to it -> the outputs weighted by the router and summed per token.
//
// Layout: activations are row-major float32, x and y [m, n_embd]; router logits [m, n_experts];
// a routing holds, per token, its top_k expert ids and weights ([m, top_k] each, best first).
// Experts are LinearWeight views in any stored format (dense, FP8, NVFP4), as bound from the checkpoint's
// per-expert tensors (X.experts.{e}.gate_proj / up_proj / down_proj).
//
// Routers:
//   softmax (Mixtral, Qwen2-MoE, Qwen3-MoE): p = softmax(logits) in float32, the top_k largest p, divided by
//   their sum when norm_topk_prob (transformers' Qwen3MoeSparseMoeBlock / Qwen2MoeTopKRouter).
//   sigmoid + correction bias + grouped top-k (DeepSeek V3, Nemotron-H): moe_route_sigmoid_cpu below.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "ops/linear/linear.h"

namespace nibble {

// One expert's MLP. Gated (SwiGLU): down(silu(gate x) * up x). Non-gated: down(act(up x)), gate unused.
struct MoeExpertWeights {
    LinearWeight gate;  // [n_ff, n_embd]; empty (n_out 0) for non-gated experts
    LinearWeight up;    // [n_ff, n_embd]
    LinearWeight down;  // [n_embd, n_ff]
};

enum class MoeActivation {
    SwiGlu,  // silu(gate) * up
    Relu2,   // relu(up)^2, non-gated
};

// The router's choice for m tokens.
struct MoeRouting {
    int64_t m = 0, top_k = 0;
    std::vector<int32_t> ids;    // [m, top_k] expert ids, best first
    std::vector<float> weights;  // [m, top_k] their weights
};

// Softmax router. Ties between equal probabilities go to the lower expert id (torch.topk's order on the
// CPU is unspecified there; random-weight fixtures never tie). logits [m, n_experts].
MoeRouting moe_route_softmax_cpu(const float* logits, int64_t m, int64_t n_experts, int64_t top_k,
                                 bool norm_topk_prob);

// Sigmoid router with a score-correction bias and grouped top-k (DeepSeek V3, Nemotron-H; transformers'
// NemotronHMoE.route_tokens_to_experts): s = sigmoid(logits); choice = s + correction_bias (nullptr: 0);
// the experts split into n_group equal groups, each scored by the sum of its two best choice values, and
// only the topk_group best groups stay eligible; the top_k eligible experts by choice are picked (best
// first, ties to the lower id) and weighted by s (not choice), divided by (their sum + 1e-20) when
// norm_topk_prob, then multiplied by routed_scaling_factor.
//   logits [m, n_experts]; correction_bias [n_experts]
MoeRouting moe_route_sigmoid_cpu(const float* logits, int64_t m, int64_t n_experts, int64_t top_k,
                                 const float* correction_bias, int64_t n_group, int64_t topk_group,
                                 bool norm_topk_prob, float routed_scaling_factor);

// Expert parallelism: a rank holding experts [begin, end) runs the routed pairs whose id is inside the range
// under its local id (id - begin) and drops the others (local id -1; the rank's output is the routed sum over
// its own experts only). ids, returned [n] int32.
std::vector<int32_t> moe_localize_ids_cpu(std::span<const int32_t> ids, int64_t begin, int64_t end);

// y = x W^T as the model computes it (through its backend, shown to its calibration observer).
//   x [rows, w.n_in], y [rows, w.n_out]
using MoeLinearFn = std::function<void(const LinearWeight& w, const float* x, int64_t rows, float* y)>;

// y[t] = sum_j routing.weights[t, j] * expert_{routing.ids[t, j]}(x[t]). Each expert runs once over the
// tokens routed to it (gathered in token order); contributions are added to y in ascending expert order,
// starting from zero, which is the order transformers' expert loop accumulates in (index_add_ per expert).
//   x, y [m, n_embd]; y is overwritten (it must not alias x)
void moe_experts_cpu(const float* x, int64_t n_embd, std::span<const MoeExpertWeights> experts,
                     const MoeRouting& routing, MoeActivation act, const MoeLinearFn& linear, float* y);

}  // namespace nibble
