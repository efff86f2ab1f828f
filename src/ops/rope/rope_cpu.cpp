#include <cmath>
#include <numbers>

#include "base/error.h"
#include "ops/rope/rope.h"

namespace nibble {

RopeTable make_rope_table(const RopeConfig& rope, int64_t head_dim) {
    RopeTable t;
    t.rotary_dim = static_cast<int64_t>(static_cast<float>(head_dim) * rope.partial_rotary_factor);
    NIBBLE_CHECK(t.rotary_dim > 0 && t.rotary_dim % 2 == 0 && t.rotary_dim <= head_dim,
                 "rotary dimension {} (head_dim {} x partial_rotary_factor {}) must be even and positive",
                 t.rotary_dim, head_dim, rope.partial_rotary_factor);
    const int64_t half = t.rotary_dim / 2;
    t.interleaved = rope.interleaved;
    t.inv_freq.resize(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
        // float32 throughout, as transformers computes it: 1 / base^(2i / dim)
        const float exponent = static_cast<float>(2 * i) / static_cast<float>(t.rotary_dim);
        t.inv_freq[static_cast<size_t>(i)] = 1.0f / std::pow(rope.theta, exponent);
    }
    switch (rope.type) {
        case RopeType::Default:
            break;
        case RopeType::Linear:
            for (auto& f : t.inv_freq) f /= rope.factor;
            break;
        case RopeType::Llama3: {
            // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band between
            // interpolates smoothly.
            const float old_len = static_cast<float>(rope.original_max_position);
            const float low_wavelen = old_len / rope.low_freq_factor;
            const float high_wavelen = old_len / rope.high_freq_factor;
            for (auto& f : t.inv_freq) {
                const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
                const float scaled = wavelen > low_wavelen ? f / rope.factor : f;
                const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                if (medium) {
                    const float smooth = (old_len / wavelen - rope.low_freq_factor) /
                                         (rope.high_freq_factor - rope.low_freq_factor);
                    f = (1.0f - smooth) * scaled / rope.factor + smooth * scaled;
                } else {
                    f = scaled;
                }
            }
            break;
        }
    }
    return t;
}

void rope_apply_cpu(float* x, int64_t m, int64_t n_heads, int64_t head_dim, const int64_t* positions,
                    const RopeTable& table) {
    const int64_t half = table.rotary_dim / 2;
    // Pair i: elements (i * a_step, i * a_step + b_offset).
    const int64_t a_step = table.interleaved ? 2 : 1, b_offset = table.interleaved ? 1 : half;
    std::vector<float> cos_v(static_cast<size_t>(half)), sin_v(static_cast<size_t>(half));
    for (int64_t t = 0; t < m; ++t) {
        const float pos = static_cast<float>(positions[t]);
        for (int64_t i = 0; i < half; ++i) {
            const float angle = pos * table.inv_freq[static_cast<size_t>(i)];
            cos_v[static_cast<size_t>(i)] = std::cos(angle);
            sin_v[static_cast<size_t>(i)] = std::sin(angle);
        }
        for (int64_t h = 0; h < n_heads; ++h) {
            float* v = x + (t * n_heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                float& a = v[i * a_step];
                float& b = v[i * a_step + b_offset];
                const float c = cos_v[static_cast<size_t>(i)], s = sin_v[static_cast<size_t>(i)];
                const float na = a * c - b * s, nb = b * c + a * s;
                a = na, b = nb;
            }
        }
    }
}

}  // namespace nibble
