// MXFP4 row codec (tensor/mxfp4.h): the OCP scale rule 2^(floor(log2(amax)) - 2) checked against
// std::ilogb and against CUDA's E8M0 round-toward-zero conversion, element codes against CUDA's E2M1
// conversion of x / scale, packing order, zero and tiny blocks, exact round trips, the error bound.
#include "tensor/mxfp4.h"

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

constexpr float kE2m1Values[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6};
constexpr int kB = kMxfp4BlockSize;

struct Quantized {
    std::vector<uint8_t> packed;
    std::vector<uint8_t> scales;
};

Quantized quantize(const std::vector<float>& x) {
    Quantized q{std::vector<uint8_t>(x.size() / 2), std::vector<uint8_t>(x.size() / kB)};
    mxfp4_quantize_row(x.data(), static_cast<int64_t>(x.size()), q.packed.data(), q.scales.data());
    return q;
}

uint8_t code_at(const Quantized& q, size_t i) { return (q.packed[i / 2] >> (4 * (i % 2))) & 0x0f; }

float block_amax(const std::vector<float>& x, size_t b) {
    float amax = 0.0f;
    for (int i = 0; i < kB; ++i) amax = std::max(amax, std::fabs(x[b * kB + i]));
    return amax;
}

// Blocks spanning the whole float range: magnitudes 2^-140 .. 2^120, with zero blocks among them.
std::vector<float> wide_row(std::mt19937& rng, size_t k) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> exponent(-140, 120);
    std::vector<float> x(k);
    for (size_t b = 0; b < k / kB; ++b) {
        const float magnitude = (b % 9 == 4) ? 0.0f : std::ldexp(1.0f, exponent(rng));
        for (int i = 0; i < kB; ++i) x[b * kB + i] = normal(rng) * magnitude;
    }
    return x;
}

TEST(Mxfp4, ScaleIsTheOcpSharedExponent) {
    std::mt19937 rng(11);
    const std::vector<float> x = wide_row(rng, 1 << 15);
    const Quantized q = quantize(x);
    for (size_t b = 0; b < x.size() / kB; ++b) {
        const float amax = block_amax(x, b);
        int want = 127;  // all-zero block: 1.0
        if (amax > 0.0f) want = std::max(std::ilogb(amax) - 2 + 127, 0);
        ASSERT_EQ(q.scales[b], want) << "block " << b << " amax " << amax;
    }
}

#if defined(NIBBLE_TEST_HAVE_CUDA_REFERENCE)

TEST(Mxfp4, ScalesAndCodesMatchCudaConversions) {
    std::mt19937 rng(12);
    for (int row = 0; row < 8; ++row) {
        const std::vector<float> x = wide_row(rng, 8192);
        const Quantized q = quantize(x);
        for (size_t b = 0; b < x.size() / kB; ++b) {
            const float amax = block_amax(x, b);
            uint8_t want_scale = cuda_ref::e8m0_from_float(1.0f, false);
            if (amax > 0.0f) want_scale = static_cast<uint8_t>(std::max(cuda_ref::e8m0_from_float(amax, false) - 2, 0));
            ASSERT_EQ(q.scales[b], want_scale) << "block " << b;
            const float scale = cuda_ref::e8m0_to_float(want_scale);
            for (int i = 0; i < kB; i += 2) {
                const size_t j = b * kB + i;
                const uint8_t lo = cuda_ref::e2m1_from_float(x[j] / scale);
                const uint8_t hi = cuda_ref::e2m1_from_float(x[j + 1] / scale);
                ASSERT_EQ(q.packed[j / 2], static_cast<uint8_t>(lo | hi << 4))
                    << "elements " << j << "," << j + 1 << " (even element in the low nibble)";
            }
        }
    }
}

TEST(Mxfp4, DequantizeIsCodeTimesScale) {
    std::mt19937 rng(13);
    const size_t k = 1 << 14;
    std::vector<uint8_t> packed(k / 2), scales(k / kB);
    for (auto& p : packed) p = static_cast<uint8_t>(rng());
    for (size_t b = 0; b < scales.size(); ++b) scales[b] = static_cast<uint8_t>(b % 256);  // every code
    std::vector<float> out(k);
    mxfp4_dequantize_row(packed.data(), scales.data(), static_cast<int64_t>(k), out.data());
    for (size_t i = 0; i < k; ++i) {
        const uint8_t code = (packed[i / 2] >> (4 * (i % 2))) & 0x0f;
        const float want = static_cast<float>(static_cast<double>(cuda_ref::e2m1_to_float(code)) *
                                              cuda_ref::e8m0_to_float(scales[i / kB]));
        if (std::isnan(want)) {
            ASSERT_TRUE(std::isnan(out[i])) << i;  // a NaN scale makes the whole block NaN
        } else {
            ASSERT_EQ(out[i], want) << "element " << i;
        }
    }
}

#endif  // NIBBLE_TEST_HAVE_CUDA_REFERENCE

TEST(Mxfp4, ZeroAndTinyBlocks) {
    std::vector<float> x(3 * kB, 0.0f);
    // block 1: amax 2^-125 -> exponent -127, the smallest scale; 2^-125 / 2^-127 = 4 exactly
    x[kB + 5] = 0x1p-125f;
    x[kB + 6] = -0x1p-127f;  // one unit of that scale: -1.0
    // block 2: amax 2^-140 (a float32 subnormal) also clamps to 2^-127 and rounds to zero
    x[2 * kB] = 0x1p-140f;
    const Quantized q = quantize(x);
    EXPECT_EQ(q.scales[0], 127);
    EXPECT_EQ(q.scales[1], 0);
    EXPECT_EQ(q.scales[2], 0);
    EXPECT_EQ(kE2m1Values[code_at(q, kB + 5)], 4.0f);
    EXPECT_EQ(kE2m1Values[code_at(q, kB + 6)], -1.0f);
    EXPECT_EQ(kE2m1Values[code_at(q, 2 * kB)], 0.0f);
    for (int i = 0; i < kB; ++i) EXPECT_EQ(code_at(q, i), 0);
}

TEST(Mxfp4, OnGridValuesRoundTripExactly) {
    std::mt19937 rng(14);
    const size_t k = 4096;
    std::vector<float> x(k);
    std::vector<uint8_t> want_codes(k), want_scales(k / kB);
    for (size_t b = 0; b < k / kB; ++b) {
        const int e = static_cast<int>(rng() % 200) - 100;
        want_scales[b] = static_cast<uint8_t>(e + 127);
        for (int i = 0; i < kB; ++i) {
            uint8_t code = static_cast<uint8_t>(rng() % 16);
            // the block's largest magnitude must be 4 or 6 units, so that floor(log2(amax)) - 2 == e
            if (code == 0x7 || code == 0xf || i == static_cast<int>(b % kB)) code = (rng() & 1) ? 0x6 : 0xe;
            if (i == 7 && (rng() & 1)) code = 0x7;
            want_codes[b * kB + i] = code;
            x[b * kB + i] = std::ldexp(kE2m1Values[code], e);
        }
    }
    const Quantized q = quantize(x);
    std::vector<float> out(k);
    mxfp4_dequantize_row(q.packed.data(), q.scales.data(), static_cast<int64_t>(k), out.data());
    for (size_t b = 0; b < k / kB; ++b) ASSERT_EQ(q.scales[b], want_scales[b]) << "block " << b;
    for (size_t i = 0; i < k; ++i) {
        ASSERT_EQ(kE2m1Values[code_at(q, i)], kE2m1Values[want_codes[i]]) << "element " << i;
        ASSERT_EQ(out[i], x[i]) << "element " << i;
    }
}

TEST(Mxfp4, ErrorStaysWithinHalfAGridStepOrTheSaturationGap) {
    std::mt19937 rng(15);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    const size_t k = 1 << 16;
    std::vector<float> x(k);
    for (float& v : x) v = normal(rng);
    const Quantized q = quantize(x);
    std::vector<float> out(k);
    mxfp4_dequantize_row(q.packed.data(), q.scales.data(), static_cast<int64_t>(k), out.data());
    const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    double err2 = 0, sig2 = 0;
    for (size_t i = 0; i < k; ++i) {
        const double unit = e8m0_to_float(q.scales[i / kB]);
        const double y = std::fabs(x[i]) / unit;
        ASSERT_LT(y, 8.0) << "amax / scale is in [4, 8) by construction";
        double bound = y - 6.0;
        for (int g = 0; g < 7; ++g) {
            if (y <= grid[g + 1]) {
                bound = (grid[g + 1] - grid[g]) / 2;
                break;
            }
        }
        const double err = std::fabs(static_cast<double>(out[i]) - x[i]);
        ASSERT_LE(err, bound * unit) << "element " << i;
        err2 += err * err;
        sig2 += static_cast<double>(x[i]) * x[i];
    }
    EXPECT_LT(err2 / sig2, 0.03);
}

TEST(Mxfp4, RejectsBadInput) {
    std::vector<float> x(64, 1.0f);
    std::vector<uint8_t> packed(32), scales(2);
    EXPECT_THROW(mxfp4_quantize_row(x.data(), 48, packed.data(), scales.data()), Error);
    x[40] = std::numeric_limits<float>::infinity();
    EXPECT_THROW(mxfp4_quantize_row(x.data(), 64, packed.data(), scales.data()), Error);
    std::vector<float> out(64);
    EXPECT_THROW(mxfp4_dequantize_row(packed.data(), scales.data(), 16, out.data()), Error);
}

}  // namespace
}  // namespace nibble
