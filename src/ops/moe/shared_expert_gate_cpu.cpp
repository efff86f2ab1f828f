#include "ops/moe/shared_expert_gate.h"

#include <cmath>

namespace nibble {

void shared_expert_gate_cpu(const float* x, int64_t m, int64_t n_embd, const float* gate, float* rows) {
    for (int64_t t = 0; t < m; ++t) {
        const float* xt = x + t * n_embd;
        float dot = 0.0f;
        for (int64_t j = 0; j < n_embd; ++j) dot += xt[j] * gate[j];
        const float s = 1.0f / (1.0f + std::exp(-dot));
        float* r = rows + t * n_embd;
        for (int64_t i = 0; i < n_embd; ++i) r[i] *= s;
    }
}

}  // namespace nibble
