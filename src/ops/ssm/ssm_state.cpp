#include "ops/ssm/ssm_state.h"

#include <algorithm>

#include "base/error.h"
#include "tensor/float_formats.h"

namespace nibble {

SsmStateDtype parse_ssm_state_dtype(std::string_view name) {
    if (name == "float32" || name == "auto") return SsmStateDtype::F32;
    if (name == "bfloat16") return SsmStateDtype::Bf16;
    fail("--mamba-ssm-cache-dtype '{}' is not supported (supported: auto, float32, bfloat16)", name);
}

std::string_view ssm_state_dtype_name(SsmStateDtype dtype) {
    return dtype == SsmStateDtype::F32 ? "float32" : "bfloat16";
}

MambaState::MambaState(const MambaStateShape& shape) : shape_(shape) {
    conv_.assign(static_cast<size_t>(shape.n_layers * shape.conv_elems()), 0.0f);
    if (shape.ssm_dtype == SsmStateDtype::F32)
        ssm_f32_.assign(static_cast<size_t>(shape.n_layers * shape.ssm_elems()), 0.0f);
    else
        ssm_bf16_.assign(static_cast<size_t>(shape.n_layers * shape.ssm_elems()), 0);
}

void MambaState::reset() {
    std::fill(conv_.begin(), conv_.end(), 0.0f);
    std::fill(ssm_f32_.begin(), ssm_f32_.end(), 0.0f);
    std::fill(ssm_bf16_.begin(), ssm_bf16_.end(), uint16_t{0});
}

float* MambaState::conv(int64_t layer) {
    NIBBLE_CHECK(layer >= 0 && layer < shape_.n_layers, "mamba state: layer {} of {}", layer, shape_.n_layers);
    return conv_.data() + layer * shape_.conv_elems();
}

void MambaState::load_ssm(int64_t layer, float* out) const {
    NIBBLE_CHECK(layer >= 0 && layer < shape_.n_layers, "mamba state: layer {} of {}", layer, shape_.n_layers);
    const int64_t n = shape_.ssm_elems();
    if (shape_.ssm_dtype == SsmStateDtype::F32) {
        std::copy_n(ssm_f32_.data() + layer * n, n, out);
    } else {
        const uint16_t* s = ssm_bf16_.data() + layer * n;
        for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(s[i]);
    }
}

void MambaState::store_ssm(int64_t layer, const float* in) {
    NIBBLE_CHECK(layer >= 0 && layer < shape_.n_layers, "mamba state: layer {} of {}", layer, shape_.n_layers);
    const int64_t n = shape_.ssm_elems();
    if (shape_.ssm_dtype == SsmStateDtype::F32) {
        std::copy_n(in, n, ssm_f32_.data() + layer * n);
    } else {
        uint16_t* s = ssm_bf16_.data() + layer * n;
        for (int64_t i = 0; i < n; ++i) s[i] = bf16_from_float(in[i]);
    }
}

}  // namespace nibble
