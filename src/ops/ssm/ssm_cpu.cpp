#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/error.h"
#include "ops/ssm/ssm.h"

namespace nibble {

namespace {
float silu(float v) { return v / (1.0f + std::exp(-v)); }
// torch.nn.functional.softplus with its default threshold 20 (linear above it).
float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }
}  // namespace

void mamba_conv1d_cpu(const float* x, int64_t x_stride, int64_t n, int64_t channels, const float* weight,
                      const float* bias, int64_t kernel, float* state, float* out) {
    NIBBLE_CHECK(kernel >= 1, "mamba_conv1d: kernel {} must be positive", kernel);
    const int64_t hist = kernel - 1;
    // window [kernel, channels]: the state's K-1 rows then the current input.
    std::vector<float> window(static_cast<size_t>(kernel * channels));
    std::memcpy(window.data(), state, static_cast<size_t>(hist * channels) * sizeof(float));
    for (int64_t t = 0; t < n; ++t) {
        std::memcpy(window.data() + hist * channels, x + t * x_stride, static_cast<size_t>(channels) * sizeof(float));
        float* o = out + t * channels;
        for (int64_t c = 0; c < channels; ++c) {
            float acc = bias != nullptr ? bias[c] : 0.0f;
            for (int64_t j = 0; j < kernel; ++j) acc += weight[c * kernel + j] * window[static_cast<size_t>(j * channels + c)];
            o[c] = silu(acc);
        }
        std::memmove(window.data(), window.data() + channels, static_cast<size_t>(hist * channels) * sizeof(float));
    }
    std::memcpy(state, window.data(), static_cast<size_t>(hist * channels) * sizeof(float));
}

void ssm_scan_cpu(ThreadPool& pool, const SsmScanParams& p, int64_t n, const float* xbc, int64_t xbc_stride,
                  const float* dt, int64_t dt_stride, float* state, float* y) {
    NIBBLE_CHECK(p.n_groups > 0 && p.n_heads % p.n_groups == 0, "ssm_scan: {} heads in {} groups", p.n_heads,
                 p.n_groups);
    const int64_t P = p.head_dim, N = p.state_size, heads_per_group = p.n_heads / p.n_groups;
    const int64_t d_inner = p.n_heads * P, b_off = d_inner, c_off = d_inner + p.n_groups * N;
    pool.parallel_for(static_cast<size_t>(p.n_heads), 1, [&](size_t begin, size_t end) {
        for (size_t hi = begin; hi < end; ++hi) {
            const auto h = static_cast<int64_t>(hi);
            const int64_t g = h / heads_per_group;
            float* s = state + h * P * N;  // [P, N]
            for (int64_t t = 0; t < n; ++t) {
                const float* row = xbc + t * xbc_stride;
                const float* x = row + h * P;
                const float* B = row + b_off + g * N;
                const float* C = row + c_off + g * N;
                float d = softplus(dt[t * dt_stride + h] + p.dt_bias[h]);
                d = std::clamp(d, p.dt_min, p.dt_max);
                const float dA = std::exp(d * p.A[h]);
                float* yo = y + t * d_inner + h * P;
                for (int64_t i = 0; i < P; ++i) {
                    float* si = s + i * N;
                    const float dx = d * x[i];
                    float acc = 0.0f;
                    for (int64_t k = 0; k < N; ++k) {
                        si[k] = si[k] * dA + dx * B[k];
                        acc += si[k] * C[k];
                    }
                    yo[i] = acc + p.D[h] * x[i];
                }
            }
        }
    });
}

void gated_rmsnorm_cpu(const float* y, const float* z, int64_t z_stride, int64_t m, int64_t d, int64_t group_size,
                       const float* weight, float eps, float* out) {
    NIBBLE_CHECK(group_size > 0 && d % group_size == 0, "gated_rmsnorm: width {} is not a multiple of group {}", d,
                 group_size);
    std::vector<float> g(static_cast<size_t>(d));
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t i = 0; i < d; ++i) g[static_cast<size_t>(i)] = y[r * d + i] * silu(z[r * z_stride + i]);
        for (int64_t g0 = 0; g0 < d; g0 += group_size) {
            double ss = 0.0;
            for (int64_t i = g0; i < g0 + group_size; ++i) ss += double(g[static_cast<size_t>(i)]) * g[static_cast<size_t>(i)];
            const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(group_size)) + eps);
            for (int64_t i = g0; i < g0 + group_size; ++i) out[r * d + i] = weight[i] * (g[static_cast<size_t>(i)] * inv);
        }
    }
}

}  // namespace nibble
