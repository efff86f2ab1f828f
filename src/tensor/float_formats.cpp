// Encoders of the scalar formats declared in float_formats.h. Every narrow format goes through one
// integer routine, round_magnitude(), that rounds |x| to nearest-even on the format's grid with an
// unbounded exponent above; each encoder then applies its own overflow, NaN and sign rules, which are
// those of CUDA's host conversions (cuda_fp16.hpp, cuda_fp8.hpp, cuda_fp4.hpp, cuda_bf16.hpp).
#include "tensor/float_formats.h"

#include <bit>

namespace nibble {

namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;

// m / 2^shift rounded to nearest, ties to even. m < 2^24, shift >= 1.
uint32_t shift_right_rne(uint32_t m, int shift) {
    if (shift > 25) return 0;  // m / 2^shift < 1/2
    const uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    return (rem > half || (rem == half && (q & 1u))) ? q + 1 : q;
}

// Rounds the finite magnitude with float32 bits `abs_bits` to a format with `man_bits` mantissa bits and
// exponent bias `bias` (smallest normal exponent 1 - bias >= -125), returning the magnitude code
// (exponent field << man_bits | mantissa). The exponent is not bounded above: a result beyond the
// format's largest finite code means overflow, which the caller resolves. A carry out of the mantissa
// lands in the exponent field, which is exactly the next binade's code.
uint32_t round_magnitude(uint32_t abs_bits, int man_bits, int bias) {
    int exp = static_cast<int>(abs_bits >> 23);
    uint32_t man = abs_bits & 0x7fffffu;
    if (exp == 0) {
        exp = 1;  // float32 subnormal: no implicit bit
    } else {
        man |= 0x800000u;
    }
    const int e = exp - 127;  // |x| = man * 2^(e - 23)
    const int emin = 1 - bias;
    if (e >= emin) {  // normal in the target: keep man_bits + 1 significant bits
        return (static_cast<uint32_t>(e - emin) << man_bits) + shift_right_rne(man, 23 - man_bits);
    }
    // subnormal in the target: count units of 2^(emin - man_bits)
    return shift_right_rne(man, 23 - man_bits + (emin - e));
}

}  // namespace

uint16_t bf16_from_float(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    if ((u & kAbsMask) > kInfBits) return 0x7fff;
    // Adding 0x7fff plus the kept lsb rounds the low half to nearest-even; a carry may reach Inf, as it must.
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

uint16_t fp16_from_float(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t a = u & kAbsMask;
    if (a > kInfBits) return 0x7fff;
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t code = round_magnitude(a, 10, 15);
    return static_cast<uint16_t>(sign | (code > 0x7bffu ? 0x7c00u : code));
}

uint8_t e4m3_from_float(float x, Saturation sat) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t a = u & kAbsMask;
    if (a > kInfBits) return 0x7f;
    const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    const uint32_t code = round_magnitude(a, 3, 7);
    if (code > 0x7eu) return static_cast<uint8_t>(sign | (sat == Saturation::Finite ? 0x7eu : 0x7fu));
    return static_cast<uint8_t>(sign | code);
}

uint8_t e5m2_from_float(float x, Saturation sat) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t a = u & kAbsMask;
    if (a > kInfBits) return 0x7f;
    const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    const uint32_t code = round_magnitude(a, 2, 15);
    if (code > 0x7bu) return static_cast<uint8_t>(sign | (sat == Saturation::Finite ? 0x7bu : 0x7cu));
    return static_cast<uint8_t>(sign | code);
}

uint8_t e2m1_from_float(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t a = u & kAbsMask;
    if (a > kInfBits) return 0x7;
    const uint8_t sign = static_cast<uint8_t>((u >> 28) & 0x8u);
    const uint32_t code = round_magnitude(a, 1, 1);
    return static_cast<uint8_t>(sign | (code > 0x7u ? 0x7u : code));
}

uint8_t e8m0_from_float(float x, E8m0Rounding rounding) {
    const uint32_t a = std::bit_cast<uint32_t>(x) & kAbsMask;
    if (a > kInfBits) return 0xff;
    if (a == kInfBits) return 0xfe;  // saturate to the largest finite power, 2^127
    uint32_t exp = a >> 23;          // float32 subnormals have 0: 2^-127 is the floor either way
    if (rounding == E8m0Rounding::TowardPositive && (a & 0x7fffffu) != 0 && a > 0x00400000u) {
        ++exp;  // not a power of two (and above 2^-127): round up to the next power
    }
    return static_cast<uint8_t>(exp > 0xfe ? 0xfe : exp);
}

}  // namespace nibble
