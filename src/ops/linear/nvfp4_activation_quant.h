// NVFP4 quantization of activation rows at run time, for the W4A4 FP4 tensor-core GEMV
// (ops/linear/gemv_fp4mma_cuda.h). Header-only and host + device callable, so the CUDA kernel, the CPU
// reference (ops/linear/gemv_fp4mma.h) and the host tests run the very same arithmetic.
//
// The recipe is tensor/nvfp4.h's nvfp4_quantize_row (ModelOpt), with the global scale chosen per row:
//   global_scale = amax(row) / (6 * 448)          (1 when that is not a normal float: an all-zero row)
//   block_scale  = e4m3(block_amax / (6 * global_scale)), at least 2^-9; 1.0 for an all-zero block
//   element      = e2m1(x / (e4m3(block_scale) * global_scale))
// every step in float32 with IEEE division, E4M3 and E2M1 rounded to nearest, ties to even, saturating
// (E4M3 to 448, E2M1 to 6). Byte for byte the output equals nvfp4_quantize_row(x, k,
// nvfp4_global_scale(amax(x)), ...) for finite x (tests/ops proves it).
//
// Why a per-row scale: decode activations differ from token to token by orders of magnitude, and the
// checkpoints' static input_scale is not loaded by nibble; the row's own amax costs one extra pass over
// 16 KiB or less and never clips.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NIBBLE_HD __host__ __device__ __forceinline__
#else
#define NIBBLE_HD inline
#endif

namespace nibble::fp4act {

inline constexpr int kBlock = 16;              // elements per E4M3 block scale
inline constexpr float kE2m1Max = 6.0f;
inline constexpr float kE4m3Max = 448.0f;
inline constexpr float kMinNormal = 1.17549435e-38f;  // FLT_MIN

NIBBLE_HD uint32_t float_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}

// The row's global scale from its amax, as tensor/nvfp4.h's nvfp4_global_scale.
NIBBLE_HD float global_scale_of(float amax) {
    const float s = amax / (kE2m1Max * kE4m3Max);
    return s >= kMinNormal ? s : 1.0f;
}

// E4M3 code of a positive finite v, round to nearest even, saturating to 448 (0x7e).
NIBBLE_HD uint8_t e4m3_encode_positive(float v) {
    if (!(v < kE4m3Max)) return 0x7e;
    const int exp = static_cast<int>((float_bits(v) >> 23) & 0xff) - 127;  // float32 subnormals: -127
    if (exp < -6) {
        // E4M3 subnormals: multiples of 2^-9, codes 0..7 (8 rounds up into the smallest normal, code 8)
        return static_cast<uint8_t>(rintf(ldexpf(v, 9)));
    }
    // normal: 1.mmm * 2^exp; q in [8, 16] counts eighths of 2^exp (16 carries into the next exponent)
    const int q = static_cast<int>(rintf(ldexpf(v, 3 - exp)));
    const int code = ((exp + 7) << 3) + (q - 8);
    return static_cast<uint8_t>(code > 0x7e ? 0x7e : code);
}

// E4M3 code (sign clear, not NaN) to float, exactly.
NIBBLE_HD float e4m3_decode_positive(uint8_t code) {
    const int exp = code >> 3, man = code & 7;
    return exp == 0 ? ldexpf(static_cast<float>(man), -9) : ldexpf(static_cast<float>(8 + man), exp - 10);
}

// E2M1 code of finite x: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, round to nearest even (ties go to the
// code with mantissa 0), saturating to 6; bit 3 is the sign (kept for zero results too).
NIBBLE_HD uint8_t e2m1_encode(float x) {
    const float a = fabsf(x);
    uint8_t code;
    if (a <= 0.25f) code = 0;
    else if (a < 0.75f) code = 1;
    else if (a <= 1.25f) code = 2;
    else if (a < 1.75f) code = 3;
    else if (a <= 2.5f) code = 4;
    else if (a < 3.5f) code = 5;
    else if (a <= 5.0f) code = 6;
    else code = 7;
    return static_cast<uint8_t>(code | ((float_bits(x) >> 28) & 0x8u));
}

// E2M1 code (4 bits) to float.
NIBBLE_HD float e2m1_decode(uint8_t code) {
    const uint8_t m = code & 7;
    const float mag = m < 4 ? 0.5f * m : (m == 4 ? 2.0f : m == 5 ? 3.0f : m == 6 ? 4.0f : 6.0f);
    return (code & 8) ? -mag : mag;
}

// One block of 16 values: its E4M3 scale code and 8 packed bytes (element 2i in the low nibble).
NIBBLE_HD uint8_t quantize_block(const float* x, float global_scale, uint8_t* packed) {
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = fmaxf(amax, fabsf(x[i]));
    uint8_t scale = 0x38;  // 1.0 for an all-zero block
    if (amax > 0.0f) {
        scale = e4m3_encode_positive(amax / (kE2m1Max * global_scale));
        if (scale == 0) scale = 0x01;  // never a zero scale for a nonzero block: at least 2^-9
    }
    const float denom = e4m3_decode_positive(scale) * global_scale;
    for (int i = 0; i < kBlock; i += 2)
        packed[i / 2] = static_cast<uint8_t>(e2m1_encode(x[i] / denom) | e2m1_encode(x[i + 1] / denom) << 4);
    return scale;
}

}  // namespace nibble::fp4act
