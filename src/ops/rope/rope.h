// Rotary position embedding, computed as Hugging Face transformers does: inverse frequencies from the
// config's rope type (default, linear, llama3), angle = position * inv_freq in float32, and the
// "rotate half" (NeoX) pairing of dimension i with i + rotary_dim/2 over the first rotary_dim dimensions.
#pragma once

#include <cstdint>
#include <vector>

#include "checkpoint/model_config.h"

namespace nibble {

struct RopeTable {
    int64_t rotary_dim = 0;        // dimensions rotated (head_dim * partial_rotary_factor), even
    std::vector<float> inv_freq;   // [rotary_dim / 2]
};

RopeTable make_rope_table(const RopeConfig& rope, int64_t head_dim);

// Rotates x in place.
//   x         [m, n_heads, head_dim]
//   positions [m]
void rope_apply_cpu(float* x, int64_t m, int64_t n_heads, int64_t head_dim, const int64_t* positions,
                    const RopeTable& table);

}  // namespace nibble
