// Host codecs for the scalar floating-point formats: BF16, FP16, FP8 E4M3 / E5M2, FP4 E2M1, E8M0.
// Encoding rounds to nearest, ties to even, exactly as CUDA's host conversions in cuda_bf16.h,
// cuda_fp16.h, cuda_fp8.h and cuda_fp4.h do (tests/tensor proves it bit for bit).
// Decoding is exact (every code of these formats is representable in float32).
#pragma once

#include <cstdint>

namespace nibble {

// What happens to finite values beyond a format's largest finite magnitude.
enum class Saturation {
    None,    // overflow becomes the format's Inf (E5M2, FP16) or NaN (E4M3, which has no Inf)
    Finite,  // clamp to +-max finite; NaN stays NaN (CUDA's __NV_SATFINITE)
};

// BF16: the upper 16 bits of a float32. NaN stays NaN (quiet).
uint16_t bf16_from_float(float x);
inline float bf16_to_float(uint16_t bits);

// FP16 (IEEE binary16), overflow to Inf.
uint16_t fp16_from_float(float x);
float fp16_to_float(uint16_t bits);

// FP8 E4M3 (float8_e4m3fn: bias 7, no Inf, S.1111.111 is NaN, max 448, min subnormal 2^-9).
uint8_t e4m3_from_float(float x, Saturation sat = Saturation::Finite);
float e4m3_to_float(uint8_t bits);

// FP8 E5M2 (bias 15, Inf and NaN as in IEEE, max 57344, min subnormal 2^-16).
uint8_t e5m2_from_float(float x, Saturation sat = Saturation::Finite);
float e5m2_to_float(uint8_t bits);

// FP4 E2M1 in the low 4 bits: bit 3 sign, magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Always saturates to
// +-6; NaN encodes as CUDA's host conversion does (see the .cpp).
uint8_t e2m1_from_float(float x);
float e2m1_to_float(uint8_t code);

// E8M0 (unsigned power of two 2^(bits-127); 0xff is NaN): the MXFP4 block scale.
enum class E8m0Rounding {
    TowardZero,      // cudaRoundZero: floor of log2 for positive finite values
    TowardPositive,  // cudaRoundPosInf: ceiling of log2
};
uint8_t e8m0_from_float(float x, E8m0Rounding rounding);
float e8m0_to_float(uint8_t bits);

// ---- inline decoders on hot paths ----
inline float bf16_to_float(uint16_t bits) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

}  // namespace nibble
