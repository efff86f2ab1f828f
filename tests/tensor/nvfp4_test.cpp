// NVFP4 row codec (tensor/nvfp4.h): block scales and element codes against the ModelOpt recipe built
// from CUDA's own E4M3 / E2M1 host conversions, packing order, zero blocks, the 2^-9 scale floor, exact
// round trips of on-grid values, the error bound on random data, and rejected inputs.
#include "tensor/nvfp4.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "base/error.h"
#include "cuda_reference.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

// ModelOpt's e2m1_values (nvfp4_tensor.py), the independent value table.
constexpr float kE2m1Values[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6};

struct Quantized {
    std::vector<uint8_t> packed;
    std::vector<uint8_t> scales;
};

Quantized quantize(const std::vector<float>& x, float global_scale) {
    Quantized q{std::vector<uint8_t>(x.size() / 2), std::vector<uint8_t>(x.size() / kNvfp4BlockSize)};
    nvfp4_quantize_row(x.data(), static_cast<int64_t>(x.size()), global_scale, q.packed.data(), q.scales.data());
    return q;
}

uint8_t code_at(const Quantized& q, size_t i) { return (q.packed[i / 2] >> (4 * (i % 2))) & 0x0f; }

float amax_of(const std::vector<float>& x) {
    float amax = 0.0f;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    return amax;
}

TEST(Nvfp4, GlobalScaleIsAmaxOver2688) {
    for (float amax : {1.0f, 3.7f, 448.0f * 6.0f, 1e-3f, 12345.678f}) {
        EXPECT_EQ(nvfp4_global_scale(amax), amax / 2688.0f);
    }
    EXPECT_EQ(nvfp4_global_scale(0.0f), 1.0f);
    EXPECT_THROW(nvfp4_global_scale(-1.0f), Error);
    EXPECT_THROW(nvfp4_global_scale(std::numeric_limits<float>::quiet_NaN()), Error);
    EXPECT_THROW(nvfp4_global_scale(std::numeric_limits<float>::infinity()), Error);
}

#if defined(NIBBLE_TEST_HAVE_CUDA_REFERENCE)

// Rows with what real tensors have: gaussian bulk, outliers, all-zero blocks, -0.0, blocks far below the
// tensor's amax (whose scales are E4M3 subnormals or floored).
std::vector<float> mixed_row(std::mt19937& rng, size_t k) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(k);
    for (size_t b = 0; b < k / kNvfp4BlockSize; ++b) {
        const int kind = static_cast<int>(b % 7);
        const float magnitude = kind == 3 ? 1e-4f : kind == 4 ? 1e-8f : kind == 5 ? 30.0f : 1.0f;
        for (int i = 0; i < kNvfp4BlockSize; ++i) {
            float v = normal(rng) * magnitude;
            if (kind == 6) v = (i % 3 == 0) ? -0.0f : 0.0f;
            x[b * kNvfp4BlockSize + i] = v;
        }
    }
    return x;
}

// The recipe of nvfp4.h, written with CUDA's conversions only.
TEST(Nvfp4, ScalesAndCodesMatchTheRecipeBuiltFromCudaConversions) {
    std::mt19937 rng(42);
    const size_t k = 4096;
    for (int row = 0; row < 24; ++row) {
        const std::vector<float> x = mixed_row(rng, k);
        // Row 0..7 use the recipe's global scale; the rest a smaller/larger one to exercise saturation
        // of the block scale and tiny scales.
        float global = nvfp4_global_scale(amax_of(x));
        if (row >= 8) global *= (row % 2) ? 0.25f : 64.0f;
        const Quantized q = quantize(x, global);
        for (size_t b = 0; b < k / kNvfp4BlockSize; ++b) {
            float block_amax = 0.0f;
            for (int i = 0; i < kNvfp4BlockSize; ++i) block_amax = std::max(block_amax, std::fabs(x[b * 16 + i]));
            uint8_t want_scale = cuda_ref::e4m3_from_float(1.0f, true);  // all-zero block
            if (block_amax > 0.0f) {
                want_scale = cuda_ref::e4m3_from_float(block_amax / (6.0f * global), true);
                if (want_scale == 0) want_scale = 0x01;  // the 2^-9 floor
            }
            ASSERT_EQ(q.scales[b], want_scale) << "row " << row << " block " << b;
            const float denom = cuda_ref::e4m3_to_float(want_scale) * global;
            for (int i = 0; i < kNvfp4BlockSize; i += 2) {
                const size_t j = b * kNvfp4BlockSize + i;
                const uint8_t lo = cuda_ref::e2m1_from_float(x[j] / denom);
                const uint8_t hi = cuda_ref::e2m1_from_float(x[j + 1] / denom);
                ASSERT_EQ(q.packed[j / 2], static_cast<uint8_t>(lo | hi << 4))
                    << "row " << row << " elements " << j << "," << j + 1 << " (even element in the low nibble)";
            }
        }
    }
}

TEST(Nvfp4, DequantizeIsCodeTimesScaleTimesGlobal) {
    std::mt19937 rng(7);
    const size_t k = 1 << 14;
    std::vector<uint8_t> packed(k / 2), scales(k / kNvfp4BlockSize);
    for (auto& p : packed) p = static_cast<uint8_t>(rng());
    for (auto& s : scales) s = static_cast<uint8_t>(rng());  // every code, NaN and negative ones too
    for (float global : {1.0f, 0.00123f, 3.5e-30f}) {
        std::vector<float> out(k);
        nvfp4_dequantize_row(packed.data(), scales.data(), static_cast<int64_t>(k), global, out.data());
        for (size_t i = 0; i < k; ++i) {
            const uint8_t code = (packed[i / 2] >> (4 * (i % 2))) & 0x0f;
            const double exact = static_cast<double>(cuda_ref::e2m1_to_float(code)) *
                                 cuda_ref::e4m3_to_float(scales[i / kNvfp4BlockSize]) * global;
            const float want = static_cast<float>(exact);  // correctly rounded
            if (std::isnan(want)) {
                ASSERT_TRUE(std::isnan(out[i])) << i;
            } else {
                ASSERT_EQ(out[i], want) << "element " << i;
            }
        }
    }
}

#endif  // NIBBLE_TEST_HAVE_CUDA_REFERENCE

TEST(Nvfp4, AllZeroBlockGetsScaleOneAndZeroCodes) {
    std::vector<float> x(32, 0.0f);
    for (int i = 16; i < 32; i += 2) x[i] = -0.0f;
    const Quantized q = quantize(x, 0.5f);
    EXPECT_EQ(e4m3_to_float(q.scales[0]), 1.0f);
    EXPECT_EQ(e4m3_to_float(q.scales[1]), 1.0f);
    for (size_t i = 0; i < 32; ++i) EXPECT_EQ(e2m1_to_float(code_at(q, i)), 0.0f);
    std::vector<float> out(32, 1.0f);
    nvfp4_dequantize_row(q.packed.data(), q.scales.data(), 32, 0.5f, out.data());
    for (float v : out) EXPECT_EQ(v, 0.0f);
}

TEST(Nvfp4, TinyBlocksGetTheSmallestSubnormalScale) {
    // block_amax / (6 * global) = 1e-6 / 6: E4M3 rounds it to 0, the floor lifts it to 2^-9.
    std::vector<float> x(16, 0.0f);
    x[3] = 1e-6f;
    x[4] = -1e-6f;
    const Quantized q = quantize(x, 1.0f);
    EXPECT_EQ(q.scales[0], 0x01);
    EXPECT_EQ(e4m3_to_float(q.scales[0]), 0x1p-9f);
    // 1e-6 / 2^-9 = 0.000512: rounds to (signed) zero.
    EXPECT_EQ(code_at(q, 3), 0x0);
    EXPECT_EQ(code_at(q, 4), 0x8);
    // Just above the E4M3 rounding threshold 2^-10 the scale is the subnormal 2^-9 by rounding, not flooring.
    std::vector<float> y(16, 0.0f);
    y[0] = 6.0f * 0x1.01p-10f;
    EXPECT_EQ(quantize(y, 1.0f).scales[0], 0x01);
}

TEST(Nvfp4, OnGridValuesRoundTripExactly) {
    std::mt19937 rng(99);
    const size_t k = 2048;
    // Powers of two keep x = e2m1 * scale * global exact; 0.37 checks the recipe survives float rounding.
    for (float global : {1.0f, 0x1p-12f, 0x1p10f, 0.37f}) {
        std::vector<float> x(k);
        std::vector<uint8_t> want_codes(k), want_scales(k / kNvfp4BlockSize);
        for (size_t b = 0; b < k / kNvfp4BlockSize; ++b) {
            // a normal E4M3 scale 2^e * (1 + m/8), e in [-6, 8], below 448
            const int e = static_cast<int>(rng() % 15) - 6;
            int m = static_cast<int>(rng() % 8);
            if (e == 8 && m == 7) m = 6;  // 480 would be the NaN code; 448 is the largest
            const double scale = std::ldexp(1.0 + m / 8.0, e);
            want_scales[b] = static_cast<uint8_t>((e + 7) << 3 | m);
            for (int i = 0; i < kNvfp4BlockSize; ++i) {
                uint8_t code = static_cast<uint8_t>(rng() % 16);
                if (i == static_cast<int>(b % kNvfp4BlockSize)) code = (rng() & 1) ? 0x7 : 0xf;  // one +-6 per block
                want_codes[b * kNvfp4BlockSize + i] = code;
                x[b * kNvfp4BlockSize + i] = static_cast<float>(kE2m1Values[code] * scale * global);
            }
        }
        const Quantized q = quantize(x, global);
        std::vector<float> out(k);
        nvfp4_dequantize_row(q.packed.data(), q.scales.data(), static_cast<int64_t>(k), global, out.data());
        for (size_t b = 0; b < k / kNvfp4BlockSize; ++b) ASSERT_EQ(q.scales[b], want_scales[b]) << "block " << b;
        for (size_t i = 0; i < k; ++i) {
            // -0.0 may come back as code 0x8 or 0x0 depending on how it was built; compare values
            ASSERT_EQ(kE2m1Values[code_at(q, i)], kE2m1Values[want_codes[i]]) << "global " << global << " element " << i;
            if (global != 0.37f) {
                ASSERT_EQ(out[i], x[i]) << "element " << i;
            }
        }
    }
}

TEST(Nvfp4, ErrorStaysWithinHalfAGridStepOrTheSaturationGap) {
    std::mt19937 rng(5);
    std::student_t_distribution<float> heavy(3.0f);
    const size_t k = 1 << 16;
    std::vector<float> x(k);
    for (float& v : x) v = heavy(rng) * 0.02f;
    const float global = nvfp4_global_scale(amax_of(x));
    const Quantized q = quantize(x, global);
    std::vector<float> out(k);
    nvfp4_dequantize_row(q.packed.data(), q.scales.data(), static_cast<int64_t>(k), global, out.data());
    const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    double err2 = 0, sig2 = 0;
    for (size_t i = 0; i < k; ++i) {
        const double unit = static_cast<double>(e4m3_to_float(q.scales[i / kNvfp4BlockSize])) * global;
        const double y = std::fabs(x[i]) / unit;  // magnitude on the E2M1 grid
        double bound = y - 6.0;                    // saturated
        for (int g = 0; g < 7; ++g) {
            if (y <= grid[g + 1]) {
                bound = (grid[g + 1] - grid[g]) / 2;
                break;
            }
        }
        const double err = std::fabs(static_cast<double>(out[i]) - x[i]);
        // Slack: float32 rounding of x / (scale * global) and of the output, a few ulps of |x|.
        ASSERT_LE(err, (bound + 1e-6 * y) * unit) << "element " << i << " x " << x[i];
        // A normal scale's rounding can push amax a sixteenth past 6 at most (E4M3 has 3 mantissa bits).
        if ((q.scales[i / kNvfp4BlockSize] & 0x78) != 0) {
            ASSERT_LE(y, 6.0 * (1 + 1.0 / 16) + 1e-6) << i;
        }
        err2 += err * err;
        sig2 += static_cast<double>(x[i]) * x[i];
    }
    // Normalised MSE of 4-bit blockwise quantisation of heavy-tailed data: well under 2%.
    EXPECT_LT(err2 / sig2, 0.02);
}

TEST(Nvfp4, RejectsBadInput) {
    std::vector<float> x(32, 1.0f);
    std::vector<uint8_t> packed(16), scales(2);
    EXPECT_THROW(nvfp4_quantize_row(x.data(), 24, 1.0f, packed.data(), scales.data()), Error);
    EXPECT_THROW(nvfp4_quantize_row(x.data(), 32, 0.0f, packed.data(), scales.data()), Error);
    EXPECT_THROW(nvfp4_quantize_row(x.data(), 32, std::numeric_limits<float>::infinity(), packed.data(),
                                    scales.data()),
                 Error);
    x[17] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(nvfp4_quantize_row(x.data(), 32, 1.0f, packed.data(), scales.data()), Error);
    x[17] = -std::numeric_limits<float>::infinity();
    EXPECT_THROW(nvfp4_quantize_row(x.data(), 32, 1.0f, packed.data(), scales.data()), Error);
    std::vector<float> out(32);
    EXPECT_THROW(nvfp4_dequantize_row(packed.data(), scales.data(), 20, 1.0f, out.data()), Error);
}

}  // namespace
}  // namespace nibble
