// Host codecs for the scalar floating-point formats: BF16, FP16, FP8 E4M3 / E5M2, FP4 E2M1, E8M0.
// Encoding rounds to nearest, ties to even, exactly as CUDA's host conversions in cuda_bf16.h,
// cuda_fp16.h, cuda_fp8.h and cuda_fp4.h do (tests/tensor proves it bit for bit; docs/formats.md has
// the layouts). Decoding is exact (every code of these formats is representable in float32); a NaN code
// decodes to the same float32 NaN bits as CUDA's host decode (0x7fffffff, or 0x7fff0000 for E8M0).
// Decoders are inline (bit tricks, or a 256-entry constexpr table) because the CPU matmul calls them per
// element; encoders live in float_formats.cpp.
#pragma once

#include <array>
#include <bit>
#include <cstdint>

namespace nibble {

// What happens to finite values beyond a format's largest finite magnitude.
enum class Saturation {
    None,    // overflow becomes the format's Inf (E5M2, FP16) or NaN (E4M3, which has no Inf)
    Finite,  // clamp to +-max finite (+-Inf too); NaN stays NaN (CUDA's __NV_SATFINITE)
};

// BF16: the upper 16 bits of a float32. NaN becomes the canonical 0x7fff (sign and payload dropped, as
// CUDA's host __float2bfloat16_rn does).
uint16_t bf16_from_float(float x);
inline float bf16_to_float(uint16_t bits);

// FP16 (IEEE binary16), overflow to Inf, NaN becomes 0x7fff.
uint16_t fp16_from_float(float x);
inline float fp16_to_float(uint16_t bits);

// FP8 E4M3 (float8_e4m3fn: bias 7, no Inf, S.1111.111 is NaN, max 448, min subnormal 2^-9).
// Any NaN input encodes as 0x7f (CUDA's host path drops the sign of a NaN).
uint8_t e4m3_from_float(float x, Saturation sat = Saturation::Finite);
inline float e4m3_to_float(uint8_t bits);

// FP8 E5M2 (bias 15, Inf and NaN as in IEEE, max 57344, min subnormal 2^-16). Any NaN encodes as 0x7f.
uint8_t e5m2_from_float(float x, Saturation sat = Saturation::Finite);
inline float e5m2_to_float(uint8_t bits);

// FP4 E2M1 in the low 4 bits: bit 3 sign, magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Always saturates to
// +-6 (+-Inf too); NaN encodes as +6 (0x7), as CUDA's host conversion does. -0 encodes as 0x8.
uint8_t e2m1_from_float(float x);
inline float e2m1_to_float(uint8_t code);

// E8M0 (unsigned power of two 2^(bits-127); 0xff is NaN): the MXFP4 block scale. Encoding follows
// CUDA's __nv_cvt_float_to_e8m0(x, __NV_SATFINITE, rounding): the sign of x is ignored, zero and
// values below the rounding's reach give 0x00 (2^-127), NaN gives 0xff, +-Inf and overflow give 0xfe.
enum class E8m0Rounding {
    TowardZero,      // cudaRoundZero: floor of log2 for positive finite values
    TowardPositive,  // cudaRoundPosInf: ceiling of log2
};
uint8_t e8m0_from_float(float x, E8m0Rounding rounding);
inline float e8m0_to_float(uint8_t bits);

// ---- inline decoders on hot paths ----

namespace detail {

// float32 bits of the finite minifloat `code` (exp_bits exponent bits, man_bits mantissa bits, IEEE-like
// bias and subnormals); Inf/NaN codes are the caller's business.
constexpr uint32_t minifloat_to_bits(uint32_t code, int exp_bits, int man_bits, int bias) {
    const uint32_t sign = (code >> (exp_bits + man_bits)) & 1u;
    const uint32_t exp = (code >> man_bits) & ((1u << exp_bits) - 1u);
    uint32_t man = code & ((1u << man_bits) - 1u);
    uint32_t bits = sign << 31;
    if (exp != 0) {
        bits |= (exp - bias + 127) << 23 | man << (23 - man_bits);
    } else if (man != 0) {
        // subnormal man * 2^(1 - bias - man_bits): normalize so the leading 1 becomes implicit
        int lead = 0;
        while ((man >> (lead + 1)) != 0) ++lead;
        man &= ~(1u << lead);
        bits |= static_cast<uint32_t>(1 - bias - man_bits + lead + 127) << 23 | man << (23 - lead);
    }
    return bits;
}

constexpr uint32_t kCanonicalNanBits = 0x7fffffffu;  // CUDA's host decoders return this for NaN codes

constexpr std::array<float, 256> make_e4m3_table() {
    std::array<float, 256> table{};
    for (uint32_t c = 0; c < 256; ++c) {
        const uint32_t bits = (c & 0x7f) == 0x7f ? kCanonicalNanBits : minifloat_to_bits(c, 4, 3, 7);
        table[c] = std::bit_cast<float>(bits);
    }
    return table;
}

constexpr std::array<float, 256> make_e5m2_table() {
    std::array<float, 256> table{};
    for (uint32_t c = 0; c < 256; ++c) {
        uint32_t bits;
        if ((c & 0x7f) > 0x7c) {
            bits = kCanonicalNanBits;
        } else if ((c & 0x7f) == 0x7c) {
            bits = (c & 0x80) << 24 | 0x7f800000u;
        } else {
            bits = minifloat_to_bits(c, 5, 2, 15);
        }
        table[c] = std::bit_cast<float>(bits);
    }
    return table;
}

constexpr std::array<float, 16> make_e2m1_table() {
    std::array<float, 16> table{};
    for (uint32_t c = 0; c < 16; ++c) table[c] = std::bit_cast<float>(minifloat_to_bits(c, 2, 1, 1));
    return table;
}

inline constexpr std::array<float, 256> kE4m3ToFloat = make_e4m3_table();
inline constexpr std::array<float, 256> kE5m2ToFloat = make_e5m2_table();
inline constexpr std::array<float, 16> kE2m1ToFloat = make_e2m1_table();

}  // namespace detail

inline float bf16_to_float(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

inline float fp16_to_float(uint16_t bits) {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t em = bits & 0x7fffu;
    if (em >= 0x7c00u) {  // Inf or NaN
        return std::bit_cast<float>(em == 0x7c00u ? (sign | 0x7f800000u) : detail::kCanonicalNanBits);
    }
    if (em >= 0x0400u) {  // normal: rebias the exponent from 15 to 127 (112 << 10 == 0x1c000)
        return std::bit_cast<float>(sign | (em + 0x1c000u) << 13);
    }
    // zero or subnormal: em * 2^-24 is exact in float32
    const float magnitude = static_cast<float>(em) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
}

inline float e4m3_to_float(uint8_t bits) { return detail::kE4m3ToFloat[bits]; }
inline float e5m2_to_float(uint8_t bits) { return detail::kE5m2ToFloat[bits]; }
inline float e2m1_to_float(uint8_t code) { return detail::kE2m1ToFloat[code & 0x0f]; }

inline float e8m0_to_float(uint8_t bits) {
    // 0x00 is 2^-127, a float32 subnormal; 0xff is NaN, given CUDA's bf16 canonical NaN bits.
    if (bits == 0xff) return std::bit_cast<float>(0x7fff0000u);
    if (bits == 0x00) return std::bit_cast<float>(0x00400000u);
    return std::bit_cast<float>(static_cast<uint32_t>(bits) << 23);
}

}  // namespace nibble
