// NVFP4 row codec: the ModelOpt scale recipe described in nvfp4.h over blocks of 16 values, packing two
// E2M1 codes per byte (element 2i in the low nibble).
#include "tensor/nvfp4.h"

#include <cfloat>
#include <cmath>

#include "base/error.h"
#include "tensor/float_formats.h"

namespace nibble {

namespace {
constexpr uint8_t kE4m3One = 0x38;       // 1.0: the scale of an all-zero block
constexpr uint8_t kE4m3MinSubnormal = 0x01;  // 2^-9: the floor of any other block's scale
}  // namespace

float nvfp4_global_scale(float amax) {
    NIBBLE_CHECK(std::isfinite(amax) && amax >= 0.0f,
                 "nvfp4_global_scale: tensor amax {} is not a finite non-negative number", amax);
    const float scale = amax / (kE2m1Max * kE4m3Max);
    return scale >= FLT_MIN ? scale : 1.0f;
}

void nvfp4_quantize_row(const float* x, int64_t k, float global_scale, uint8_t* packed, uint8_t* scales) {
    NIBBLE_CHECK(k >= 0 && k % kNvfp4BlockSize == 0,
                 "nvfp4_quantize_row: row length {} is not a multiple of the block size {}", k, kNvfp4BlockSize);
    // A normal global scale keeps scale * global_scale >= 2^-135 > 0, so no element is divided by zero.
    NIBBLE_CHECK(std::isfinite(global_scale) && global_scale >= FLT_MIN,
                 "nvfp4_quantize_row: global scale {} is not a finite normal positive number", global_scale);
    const float six_global = kE2m1Max * global_scale;
    for (int64_t b = 0; b < k / kNvfp4BlockSize; ++b) {
        const float* xb = x + b * kNvfp4BlockSize;
        float amax = 0.0f;
        for (int i = 0; i < kNvfp4BlockSize; ++i) {
            const float a = std::fabs(xb[i]);
            NIBBLE_CHECK(a <= FLT_MAX, "nvfp4_quantize_row: element {} is {}, not a finite number",
                         b * kNvfp4BlockSize + i, xb[i]);
            amax = a > amax ? a : amax;
        }
        uint8_t scale = kE4m3One;
        if (amax > 0.0f) {
            scale = e4m3_from_float(amax / six_global, Saturation::Finite);
            if (scale == 0) scale = kE4m3MinSubnormal;
        }
        scales[b] = scale;
        const float denom = e4m3_to_float(scale) * global_scale;
        uint8_t* pb = packed + b * (kNvfp4BlockSize / 2);
        for (int i = 0; i < kNvfp4BlockSize; i += 2) {
            const uint8_t lo = e2m1_from_float(xb[i] / denom);
            const uint8_t hi = e2m1_from_float(xb[i + 1] / denom);
            pb[i / 2] = static_cast<uint8_t>(lo | hi << 4);
        }
    }
}

void nvfp4_dequantize_row(const uint8_t* packed, const uint8_t* scales, int64_t k, float global_scale,
                          float* out) {
    NIBBLE_CHECK(k >= 0 && k % kNvfp4BlockSize == 0,
                 "nvfp4_dequantize_row: row length {} is not a multiple of the block size {}", k,
                 kNvfp4BlockSize);
    for (int64_t b = 0; b < k / kNvfp4BlockSize; ++b) {
        const float scale = e4m3_to_float(scales[b]);
        const uint8_t* pb = packed + b * (kNvfp4BlockSize / 2);
        float* ob = out + b * kNvfp4BlockSize;
        for (int i = 0; i < kNvfp4BlockSize / 2; ++i) {
            // e2m1 * scale is exact in float32 (at most 5 significant bits), so one rounding in all.
            ob[2 * i] = e2m1_to_float(pb[i] & 0x0f) * scale * global_scale;
            ob[2 * i + 1] = e2m1_to_float(pb[i] >> 4) * scale * global_scale;
        }
    }
}

}  // namespace nibble
