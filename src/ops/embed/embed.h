// Embedding gather: rows of the token-embedding table (any float dtype) to float32.
#pragma once

#include <cstdint>

#include "tensor/tensor.h"

namespace nibble {

//   table [vocab, d] (F32, F16, BF16, ...); tokens [m]; out [m, d]
// Throws naming the token's index when a token id is outside [0, vocab).
void embed_cpu(const Tensor& table, const int32_t* tokens, int64_t m, float* out);

}  // namespace nibble
