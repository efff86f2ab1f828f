// MXFP4 row codec (OCP Microscaling v1.0): blocks of 32 values, one E8M0 power-of-two scale per block,
// E2M1 elements packed two per byte (element 2i in the low nibble). Scale rule: see mxfp4.h.
#include "tensor/mxfp4.h"

#include <bit>
#include <cfloat>
#include <cmath>

#include "base/error.h"
#include "tensor/float_formats.h"

namespace nibble {

namespace {
constexpr uint8_t kE8m0One = 127;  // 2^0: the scale of an all-zero block
constexpr int kE2m1MaxPow2 = 2;    // E2M1's largest power of two is 4 = 2^2 (OCP's emax_elem)
}  // namespace

void mxfp4_quantize_row(const float* x, int64_t k, uint8_t* packed, uint8_t* scales) {
    NIBBLE_CHECK(k >= 0 && k % kMxfp4BlockSize == 0,
                 "mxfp4_quantize_row: row length {} is not a multiple of the block size {}", k, kMxfp4BlockSize);
    for (int64_t b = 0; b < k / kMxfp4BlockSize; ++b) {
        const float* xb = x + b * kMxfp4BlockSize;
        float amax = 0.0f;
        for (int i = 0; i < kMxfp4BlockSize; ++i) {
            const float a = std::fabs(xb[i]);
            NIBBLE_CHECK(a <= FLT_MAX, "mxfp4_quantize_row: element {} is {}, not a finite number",
                         b * kMxfp4BlockSize + i, xb[i]);
            amax = a > amax ? a : amax;
        }
        uint8_t scale = kE8m0One;
        if (amax > 0.0f) {
            // floor(log2(amax)) + 127 is the E8M0 round-toward-zero code of amax (0 below 2^-126);
            // subtracting emax_elem gives OCP's shared exponent, clamped at E8M0's smallest, 2^-127.
            const int code = e8m0_from_float(amax, E8m0Rounding::TowardZero) - kE2m1MaxPow2;
            scale = static_cast<uint8_t>(code > 0 ? code : 0);
        }
        scales[b] = scale;
        // 2^(127 - scale) is a normal float for every scale <= 252 (amax <= FLT_MAX guarantees it), and
        // multiplying by it is exactly dividing by the scale.
        const float inv_scale = std::bit_cast<float>(static_cast<uint32_t>(254 - scale) << 23);
        uint8_t* pb = packed + b * (kMxfp4BlockSize / 2);
        for (int i = 0; i < kMxfp4BlockSize; i += 2) {
            const uint8_t lo = e2m1_from_float(xb[i] * inv_scale);
            const uint8_t hi = e2m1_from_float(xb[i + 1] * inv_scale);
            pb[i / 2] = static_cast<uint8_t>(lo | hi << 4);
        }
    }
}

void mxfp4_dequantize_row(const uint8_t* packed, const uint8_t* scales, int64_t k, float* out) {
    NIBBLE_CHECK(k >= 0 && k % kMxfp4BlockSize == 0,
                 "mxfp4_dequantize_row: row length {} is not a multiple of the block size {}", k,
                 kMxfp4BlockSize);
    for (int64_t b = 0; b < k / kMxfp4BlockSize; ++b) {
        const float scale = e8m0_to_float(scales[b]);  // NaN for 0xff: the whole block is NaN (OCP)
        const uint8_t* pb = packed + b * (kMxfp4BlockSize / 2);
        float* ob = out + b * kMxfp4BlockSize;
        for (int i = 0; i < kMxfp4BlockSize / 2; ++i) {
            ob[2 * i] = e2m1_to_float(pb[i] & 0x0f) * scale;
            ob[2 * i + 1] = e2m1_to_float(pb[i] >> 4) * scale;
        }
    }
}

}  // namespace nibble
