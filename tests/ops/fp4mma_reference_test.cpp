// The W4A4 FP4 GEMV's host pieces (ops/linear/nvfp4_activation_quant.h, ops/linear/gemv_fp4mma.h): the
// activation quantizer, which the CUDA kernel runs too, against tensor/nvfp4.h's codec byte for byte; its
// E4M3 / E2M1 encoders against tensor/float_formats.h over every code boundary; and the reference GEMV
// against a double-precision dot product of the dequantized operands.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "base/error.h"
#include "ops/linear/gemv_fp4mma.h"
#include "ops/linear/nvfp4_activation_quant.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

TEST(Fp4MmaQuant, EncodersMatchTheHostCodecs) {
    // Every E4M3 value, the midpoints between neighbours (ties) and points just beside them.
    for (int c = 1; c < 0x7e; ++c) {
        const float lo = e4m3_to_float(static_cast<uint8_t>(c)), hi = e4m3_to_float(static_cast<uint8_t>(c + 1));
        for (float v : {lo, hi, 0.5f * (lo + hi), std::nextafter(0.5f * (lo + hi), 0.0f),
                        std::nextafter(0.5f * (lo + hi), 1000.0f)})
            EXPECT_EQ(fp4act::e4m3_encode_positive(v), e4m3_from_float(v)) << v;
        EXPECT_EQ(fp4act::e4m3_decode_positive(static_cast<uint8_t>(c)), lo) << c;
    }
    for (float v : {1e-30f, 1e-3f, 0x1p-10f, 0x1p-9f, 447.0f, 448.0f, 460.0f, 464.0f, 1e6f})
        EXPECT_EQ(fp4act::e4m3_encode_positive(v), e4m3_from_float(v)) << v;
    // E2M1 over a fine grid of both signs, the ties included.
    for (int i = -800; i <= 800; ++i) {
        const float v = static_cast<float>(i) / 100.0f;
        for (float w : {v, std::nextafter(v, -10.0f), std::nextafter(v, 10.0f)})
            EXPECT_EQ(fp4act::e2m1_encode(w), e2m1_from_float(w)) << w;
    }
    for (int c = 0; c < 16; ++c)
        EXPECT_EQ(fp4act::e2m1_decode(static_cast<uint8_t>(c)), e2m1_to_float(static_cast<uint8_t>(c))) << c;
}

TEST(Fp4MmaQuant, RowMatchesNvfp4QuantizeRowWithTheRowsAmax) {
    std::mt19937 rng(20261125);
    for (int trial = 0; trial < 50; ++trial) {
        const int64_t k = 16 * (1 + static_cast<int64_t>(rng() % 64));
        // rows over many magnitudes, some blocks tiny or zero, to reach the subnormal and zero scale paths
        std::lognormal_distribution<float> sigma(0.0f, 4.0f);
        std::normal_distribution<float> normal(0.0f, sigma(rng));
        std::vector<float> x(static_cast<size_t>(k));
        for (float& v : x) v = normal(rng);
        if (trial % 5 == 1) std::fill(x.begin(), x.begin() + 16, 0.0f);
        if (trial % 5 == 2) for (int i = 16; i < 32 && i < k; ++i) x[static_cast<size_t>(i)] *= 1e-6f;
        float amax = 0.0f;
        for (float v : x) amax = std::max(amax, std::fabs(v));
        std::vector<uint8_t> packed(static_cast<size_t>(k / 2)), scales(static_cast<size_t>(k / 16));
        std::vector<uint8_t> packed_ref(packed.size()), scales_ref(scales.size());
        const float global = fp4mma_quantize_activation_row(x.data(), k, packed.data(), scales.data());
        const float global_ref = nvfp4_global_scale(amax);
        nvfp4_quantize_row(x.data(), k, global_ref, packed_ref.data(), scales_ref.data());
        ASSERT_EQ(global, global_ref) << "trial " << trial;
        ASSERT_EQ(scales, scales_ref) << "trial " << trial;
        ASSERT_EQ(packed, packed_ref) << "trial " << trial;
    }
}

TEST(Fp4MmaQuant, AllZeroRowAndBadInputs) {
    std::vector<float> x(32, 0.0f);
    std::vector<uint8_t> packed(16, 0xaa), scales(2, 0xaa);
    EXPECT_EQ(fp4mma_quantize_activation_row(x.data(), 32, packed.data(), scales.data()), 1.0f);
    for (uint8_t s : scales) EXPECT_EQ(s, 0x38);
    for (uint8_t p : packed) EXPECT_EQ(p, 0x00);
    EXPECT_THROW(fp4mma_quantize_activation_row(x.data(), 24, packed.data(), scales.data()), Error);
    x[3] = NAN;
    EXPECT_THROW(fp4mma_quantize_activation_row(x.data(), 32, packed.data(), scales.data()), Error);
}

TEST(Fp4MmaReference, MatchesDoubleDotOfDequantizedOperands) {
    std::mt19937 rng(7);
    const int64_t m = 3, n = 5, k = 192;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(m * k)), w(static_cast<size_t>(n * k)), bias(static_cast<size_t>(n));
    for (float& v : x) v = normal(rng);
    for (float& v : w) v = 0.05f * normal(rng);
    for (float& v : bias) v = normal(rng);
    float w_amax = 0.0f;
    for (float v : w) w_amax = std::max(w_amax, std::fabs(v));
    const float w_global = nvfp4_global_scale(w_amax);
    std::vector<uint8_t> wq(static_cast<size_t>(n * k / 2)), ws(static_cast<size_t>(n * k / 16));
    for (int64_t r = 0; r < n; ++r) nvfp4_quantize_row(&w[r * k], k, w_global, &wq[r * k / 2], &ws[r * k / 16]);
    std::vector<float> y(static_cast<size_t>(m * n), NAN);
    gemv_fp4mma_reference(x.data(), m, k, wq.data(), ws.data(), w_global, n, bias.data(), y.data());

    std::vector<uint8_t> xq(static_cast<size_t>(k / 2)), xs(static_cast<size_t>(k / 16));
    std::vector<float> xd(static_cast<size_t>(k)), wd(static_cast<size_t>(k));
    for (int64_t t = 0; t < m; ++t) {
        const float xg = fp4mma_quantize_activation_row(&x[t * k], k, xq.data(), xs.data());
        nvfp4_dequantize_row(xq.data(), xs.data(), k, xg, xd.data());
        for (int64_t r = 0; r < n; ++r) {
            // Exact: dequantize without the global scales (products of E2M1 and E4M3 are exact in float).
            nvfp4_dequantize_row(&wq[r * k / 2], &ws[r * k / 16], k, 1.0f, wd.data());
            std::vector<float> xu(static_cast<size_t>(k));
            nvfp4_dequantize_row(xq.data(), xs.data(), k, 1.0f, xu.data());
            double dot = 0.0, abs_sum = 0.0;
            for (int64_t i = 0; i < k; ++i) {
                dot += static_cast<double>(xu[i]) * wd[i];
                abs_sum += std::fabs(static_cast<double>(xu[i]) * wd[i]);
            }
            const double expect = dot * w_global * xg + bias[r];
            // per-block sums exact, k / 16 float roundings of the running sum, then two products and the bias
            const double tol = (k / 16 + 4) * 0x1p-24 * (abs_sum * w_global * xg + std::fabs(bias[r])) + 1e-30;
            EXPECT_NEAR(y[t * n + r], expect, tol) << "t " << t << " r " << r;
        }
    }
    EXPECT_THROW(gemv_fp4mma_reference(x.data(), m, 96, wq.data(), ws.data(), w_global, n, nullptr, y.data()), Error);
    ws[1] |= 0x80;  // a signed scale the tensor core's .ue4m3 cannot read
    EXPECT_THROW(gemv_fp4mma_reference(x.data(), m, k, wq.data(), ws.data(), w_global, n, nullptr, y.data()), Error);
}

}  // namespace
}  // namespace nibble
