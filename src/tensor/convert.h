// Decoding rows of stored floating-point tensors (F32, F16, BF16, F8_E4M3, F8_E5M2, F64) to float32.
// The CPU backend computes in float32 from whatever format the checkpoint stores.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace nibble {

// out[i] = float(src[i]) for i < n; `src` holds elements of `dtype`. Throws for non-float dtypes.
void decode_to_float(const void* src, DType dtype, int64_t n, float* out);

// The whole tensor as float32 (for small tensors: norms, biases, scales).
std::vector<float> tensor_to_floats(const Tensor& t);

// Encodes float32 values into `dtype` (F32, F16, BF16 with round-to-nearest-even).
void encode_from_float(const float* src, int64_t n, DType dtype, void* out);

}  // namespace nibble
