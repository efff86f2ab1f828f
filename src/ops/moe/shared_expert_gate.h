// The gate of Qwen2-MoE's shared expert, CPU reference: each token's shared-expert output row is scaled by
// sigmoid(x . gate), x the token's (normed) input to the MoE block and gate the [1, n_embd] weight of
// `mlp.shared_expert_gate` (transformers' Qwen2MoeSparseMoeBlock: F.sigmoid(shared_expert_gate(x)) *
// shared_expert(x), added to the routed sum afterwards).
#pragma once

#include <cstdint>

namespace nibble {

// rows[t, i] *= 1 / (1 + exp(-sum_j x[t, j] gate[j])) for t < m, the dot product summed in float32 in index
// order.  x, rows [m, n_embd] (rows is updated in place, it must not alias x); gate [n_embd]
void shared_expert_gate_cpu(const float* x, int64_t m, int64_t n_embd, const float* gate, float* rows);

}  // namespace nibble
