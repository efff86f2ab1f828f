// MXFP4 (OCP Microscaling v1.0): E2M1 elements in blocks of 32 along a row, one E8M0 scale per block,
// no per-tensor scale. Packing as NVFP4 (element 2i in the low nibble). The scale is chosen as
// OCP's recipe: 2^(floor(log2(block_amax)) - 2), i.e. the block's largest power of two divided by the
// largest power of two E2M1 holds (4); values beyond 6 * scale saturate. The exponent is clamped below at
// E8M0's smallest, 2^-127 (blocks whose amax is under 2^-125); an all-zero block gets scale 1.0 (0x7f).
// Elements are e2m1(x / scale), round to nearest even. A 0xff (NaN) scale decodes its block to NaN.
#pragma once

#include <cstdint>

namespace nibble {

constexpr int kMxfp4BlockSize = 32;

// Quantize throws nibble::Error for a non-finite element or a k that is not a multiple of 32.
//   x      [k]      input, k a multiple of 32
//   packed [k / 2]  E2M1 pairs, low nibble first
//   scales [k / 32] E8M0 block scales
void mxfp4_quantize_row(const float* x, int64_t k, uint8_t* packed, uint8_t* scales);
void mxfp4_dequantize_row(const uint8_t* packed, const uint8_t* scales, int64_t k, float* out);

}  // namespace nibble
