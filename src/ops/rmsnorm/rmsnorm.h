// RMSNorm: out = x / sqrt(mean(x^2) + eps) * weight, per row of d values, computed in float32.
#pragma once

#include <cstdint>

namespace nibble {

//   x, out [m, d] (may alias); weight [d]
void rmsnorm_cpu(const float* x, int64_t m, int64_t d, const float* weight, float eps, float* out);

}  // namespace nibble
