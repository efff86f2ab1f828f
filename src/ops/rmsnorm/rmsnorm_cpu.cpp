#include <cmath>

#include "ops/rmsnorm/rmsnorm.h"

namespace nibble {

void rmsnorm_cpu(const float* x, int64_t m, int64_t d, const float* weight, float eps, float* out) {
    for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * d;
        float* o = out + r * d;
        double ss = 0.0;  // sum of squares in double: the reference should not lose bits here
        for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(d)) + eps);
        for (int64_t i = 0; i < d; ++i) o[i] = weight[i] * (xr[i] * inv);
    }
}

}  // namespace nibble
