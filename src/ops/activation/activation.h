// Gated activations of MLPs.
#pragma once

#include <cstdint>

namespace nibble {

// SwiGLU: out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + e^-x). gate, up, out: [n] (out may alias gate).
void silu_mul_cpu(const float* gate, const float* up, int64_t n, float* out);

}  // namespace nibble
