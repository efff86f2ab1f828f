// Rotary position embedding, computed as Hugging Face transformers does: inverse frequencies from the
// config's rope type (default, linear, llama3), angle = position * inv_freq in float32, over the first
// rotary_dim dimensions, with pair i = (a, b) rotated to (a cos - b sin, b cos + a sin) by inv_freq[i]:
//   rotate half (NeoX, Llama; RopeConfig::interleaved false): a = v[i], b = v[i + rotary_dim / 2]
//   interleaved (GPT-J; true):                                 a = v[2i], b = v[2i + 1]
#pragma once

#include <cstdint>
#include <vector>

#include "checkpoint/model_config.h"

namespace nibble {

struct RopeTable {
    int64_t rotary_dim = 0;        // dimensions rotated (head_dim * partial_rotary_factor), even
    std::vector<float> inv_freq;   // [rotary_dim / 2]
    bool interleaved = false;      // RopeConfig::interleaved: pairs (2i, 2i + 1) instead of (i, i + half)
};

RopeTable make_rope_table(const RopeConfig& rope, int64_t head_dim);

// Rotates x in place.
//   x         [m, n_heads, head_dim]
//   positions [m]
void rope_apply_cpu(float* x, int64_t m, int64_t n_heads, int64_t head_dim, const int64_t* positions,
                    const RopeTable& table);

}  // namespace nibble
