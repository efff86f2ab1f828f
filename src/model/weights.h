// Binding checkpoint tensors to typed weights, by the layout the quantization config names:
//   none / excluded module:  X.weight F32|F16|BF16 [n_out, n_in]
//   ModelOpt NVFP4:          X.weight U8 [n_out, n_in/2], X.weight_scale F8_E4M3 [n_out, n_in/16],
//                            X.weight_scale_2 F32 scalar (global, a multiplier), X.input_scale F32 scalar
//   compressed-tensors NVFP4: X.weight_packed, X.weight_scale, X.weight_global_scale (= 1/global),
//                            X.input_global_scale
//   ModelOpt FP8:            X.weight F8_E4M3 [n_out, n_in], X.weight_scale F32 scalar, X.input_scale
// Every mismatch is an error naming the tensor, the file and the expected dtype/shape.
#pragma once

#include <string>
#include <vector>

#include "checkpoint/quant_config.h"
#include "checkpoint/safetensors.h"
#include "ops/linear/linear.h"

namespace nibble {

struct LinearSpec {
    std::string module;  // "model.layers.0.self_attn.q_proj"
    int64_t n_out = 0, n_in = 0;
    bool bias = false;   // X.bias [n_out] must exist
};

LinearWeight load_linear(const Checkpoint& ckpt, const QuantConfig& quant, const LinearSpec& spec);

// A 1-D float tensor (norm weight, bias) of length n, as float32.
std::vector<float> load_vector(const Checkpoint& ckpt, const std::string& name, int64_t n);

// A scalar float tensor (shape [] or [1]) as float32.
float load_scalar(const Checkpoint& ckpt, const std::string& name);

}  // namespace nibble
