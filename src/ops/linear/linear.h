// A linear layer y = x W^T + b over any stored weight format, and its CPU reference.
// The weight is a typed view into the checkpoint (no copy): dense F32/F16/BF16, FP8 E4M3 with a per-tensor
// scale, or NVFP4 (E2M1 pairs + E4M3 block scales per 16 inputs + an FP32 global scale). Activations stay
// float32 on the CPU (weight-only quantization: activations are never quantized here).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "tensor/dtype.h"

namespace nibble {

enum class WeightFormat {
    Dense,  // dtype F32, F16 or BF16; data [n_out, n_in]
    Fp8,    // dtype F8_E4M3; data [n_out, n_in]; value = e4m3 * scale
    Nvfp4,  // data U8 [n_out, n_in / 2]; block_scales E4M3 [n_out, n_in / 16]; value = e2m1 * e4m3 * scale
};

std::string_view weight_format_name(WeightFormat format);

struct LinearWeight {
    std::string name;  // module name, for messages ("model.layers.0.self_attn.q_proj")
    WeightFormat format = WeightFormat::Dense;
    DType dtype = DType::BF16;
    int64_t n_out = 0, n_in = 0;
    const void* data = nullptr;
    const uint8_t* block_scales = nullptr;  // Nvfp4 only
    float scale = 1.0f;                     // Fp8: weight_scale; Nvfp4: global scale (a multiplier)
    float input_scale = 0.0f;               // the checkpoint's static activation scale (unused on the CPU)
    std::vector<float> bias;                // [n_out], or empty

    // out[n_in] = row r of W in float32.
    void dequantize_row(int64_t r, float* out) const;
    // Bytes the weight occupies as stored (data + scales).
    int64_t stored_bytes() const;
};

// y[m, n_out] = x[m, n_in] W^T (+ bias). Parallel over output rows; each row is dequantized once and
// reused for all m inputs.
void linear_cpu(ThreadPool& pool, const float* x, int64_t m, const LinearWeight& w, float* y);

}  // namespace nibble
