// Per-sequence recurrent state of a hybrid model's Mamba layers (ssm.h gives the layout of one layer):
// conv state float32 [n_layers, conv_kernel - 1, conv_dim] and SSM state [n_layers, n_heads, head_dim,
// state_size] stored as float32 or bfloat16 (--mamba-ssm-cache-dtype, vLLM's flag). The engine owns one
// per running sequence (a slot next to its KV blocks); a forward whose sequence starts at position 0
// resets it first. The scan always computes in float32; a bfloat16 store rounds the state (to nearest
// even) once per forward, as vLLM's bf16 cache does at the end of each step.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace nibble {

enum class SsmStateDtype { F32, Bf16 };

// "float32" / "bfloat16" (also "auto" -> float32, transformers' mamba_ssm_cache_dtype default); throws
// naming the flag for anything else.
SsmStateDtype parse_ssm_state_dtype(std::string_view name);
std::string_view ssm_state_dtype_name(SsmStateDtype dtype);

struct MambaStateShape {
    int64_t n_layers = 0;  // Mamba layers (0: the model keeps no recurrent state)
    int64_t conv_rows = 0, conv_dim = 0;  // conv_kernel - 1, d_inner + 2 * n_groups * state_size
    int64_t n_heads = 0, head_dim = 0, state_size = 0;
    SsmStateDtype ssm_dtype = SsmStateDtype::F32;

    bool empty() const { return n_layers == 0; }
    int64_t conv_elems() const { return conv_rows * conv_dim; }               // per layer
    int64_t ssm_elems() const { return n_heads * head_dim * state_size; }     // per layer
    // Bytes of one sequence's state (what `nibble plan` counts per sequence slot).
    int64_t bytes() const {
        return n_layers * (conv_elems() * 4 + ssm_elems() * (ssm_dtype == SsmStateDtype::F32 ? 4 : 2));
    }
};

class MambaState {
public:
    MambaState() = default;
    explicit MambaState(const MambaStateShape& shape);
    const MambaStateShape& shape() const { return shape_; }
    // Zeros everything (a sequence starting over: new, preempted and recomputed, or reusing a slot).
    void reset();
    float* conv(int64_t layer);  // [conv_rows, conv_dim]
    // The layer's SSM state widened to float32 into out [n_heads, head_dim, state_size], and back.
    void load_ssm(int64_t layer, float* out) const;
    void store_ssm(int64_t layer, const float* in);

private:
    MambaStateShape shape_;
    std::vector<float> conv_;
    std::vector<float> ssm_f32_;
    std::vector<uint16_t> ssm_bf16_;
};

}  // namespace nibble
