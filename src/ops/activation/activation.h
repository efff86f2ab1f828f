// Activations of MLPs: gated (SwiGLU) and relu^2.
#pragma once

#include <cstdint>

namespace nibble {

// SwiGLU: out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + e^-x). gate, up, out: [n] (out may alias gate).
void silu_mul_cpu(const float* gate, const float* up, int64_t n, float* out);

// relu^2 (NemotronH's MLPs): out[i] = max(x[i], 0)^2. x, out: [n] (out may alias x).
void relu2_cpu(const float* x, int64_t n, float* out);

}  // namespace nibble
