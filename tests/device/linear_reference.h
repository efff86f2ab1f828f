// The CPU reference of a decode GEMV device test and each output's tolerance (the derivation in
// linear_cuda_test.cpp's header): linear_cpu's result, and 2 (k + 32) u32 S per output with S = sum |w_i x_i|
// + |b| over the dequantized row, plus a BF16 output's own rounding u_bf16 (|y_cpu| + that bound).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "ops/linear/linear.h"

namespace nibble::test {

//   x [m, w.n_in] (what the device reads); ref, tol [m, w.n_out]
inline void linear_reference(ThreadPool& pool, const LinearWeight& w, const std::vector<float>& x, int64_t m,
                             bool bf16_acts, std::vector<float>& ref, std::vector<double>& tol) {
    const int64_t n = w.n_out, k = w.n_in;
    const bool with_bias = !w.bias.empty();
    ref.assign(static_cast<size_t>(m * n), 0.0f);
    linear_cpu(pool, x.data(), m, w, ref.data());
    tol.assign(ref.size(), 0.0);
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
        w.dequantize_row(r, row.data());
        for (int64_t t = 0; t < m; ++t) {
            double s = with_bias ? std::fabs(w.bias[static_cast<size_t>(r)]) : 0.0;
            for (int64_t i = 0; i < k; ++i)
                s += std::fabs(static_cast<double>(row[static_cast<size_t>(i)]) * x[static_cast<size_t>(t * k + i)]);
            const double fp = 2.0 * static_cast<double>(k + 32) * kEpsF32 * s;
            const size_t o = static_cast<size_t>(t * n + r);
            tol[o] = bf16_acts ? fp * (1 + kEpsBf16) + kEpsBf16 * std::fabs(ref[o]) : fp;
        }
    }
}

}  // namespace nibble::test
