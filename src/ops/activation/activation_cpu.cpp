#include <cmath>

#include "ops/activation/activation.h"

namespace nibble {

void silu_mul_cpu(const float* gate, const float* up, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

void relu2_cpu(const float* x, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] > 0.0f ? x[i] * x[i] : 0.0f;
}

}  // namespace nibble
