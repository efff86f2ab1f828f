#include <algorithm>
#include <array>

#include "base/error.h"
#include "ops/linear/linear.h"
#include "tensor/convert.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {

std::string_view weight_format_name(WeightFormat format) {
    switch (format) {
        case WeightFormat::Dense: return "dense";
        case WeightFormat::Fp8: return "fp8";
        case WeightFormat::Nvfp4: return "nvfp4";
    }
    return "?";
}

void LinearWeight::dequantize_row(int64_t r, float* out) const {
    switch (format) {
        case WeightFormat::Dense:
            decode_to_float(static_cast<const uint8_t*>(data) + r * n_in * static_cast<int64_t>(dtype_size(dtype)),
                            dtype, n_in, out);
            return;
        case WeightFormat::Fp8: {
            const auto* row = static_cast<const uint8_t*>(data) + r * n_in;
            for (int64_t i = 0; i < n_in; ++i) out[i] = e4m3_to_float(row[i]) * scale;
            return;
        }
        case WeightFormat::Nvfp4:
            nvfp4_dequantize_row(static_cast<const uint8_t*>(data) + r * (n_in / 2),
                                 block_scales + r * (n_in / kNvfp4BlockSize), n_in, scale, out);
            return;
    }
}

int64_t LinearWeight::stored_bytes() const {
    switch (format) {
        case WeightFormat::Dense: return n_out * n_in * static_cast<int64_t>(dtype_size(dtype));
        case WeightFormat::Fp8: return n_out * n_in;
        case WeightFormat::Nvfp4: return n_out * (n_in / 2) + n_out * (n_in / kNvfp4BlockSize);
    }
    return 0;
}

namespace {
// Dot product with 8 independent partial sums so the compiler can vectorize without -ffast-math.
float dot(const float* a, const float* b, int64_t n) {
    std::array<float, 8> acc{};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[static_cast<size_t>(j)] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (; i < n; ++i) s += a[i] * b[i];
    for (float v : acc) s += v;
    return s;
}
}  // namespace

void linear_cpu(ThreadPool& pool, const float* x, int64_t m, const LinearWeight& w, float* y) {
    NIBBLE_CHECK(w.data != nullptr, "linear {}: weight not loaded", w.name);
    const int64_t n_out = w.n_out, n_in = w.n_in;
    pool.parallel_for(static_cast<size_t>(n_out), 16, [&](size_t begin, size_t end) {
        std::vector<float> row(static_cast<size_t>(n_in));
        for (size_t r = begin; r < end; ++r) {
            w.dequantize_row(static_cast<int64_t>(r), row.data());
            const float b = w.bias.empty() ? 0.0f : w.bias[r];
            for (int64_t t = 0; t < m; ++t)
                y[t * n_out + static_cast<int64_t>(r)] = dot(x + t * n_in, row.data(), n_in) + b;
        }
    });
}

}  // namespace nibble
