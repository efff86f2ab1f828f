// NVFP4: E2M1 elements in blocks of 16 consecutive values along a row (the reduction dimension K), one
// FP8 E4M3 scale per block, one FP32 per-tensor scale. Two elements per byte, element 2i in the low
// nibble and 2i+1 in the high nibble. Value = e2m1 * e4m3(block_scale) * global_scale.
//
// Scale recipe (NVIDIA ModelOpt, nvfp4_tensor.py):
//   global_scale = amax(tensor) / (6 * 448)                 (ModelOpt's weight_scale_2; a multiplier)
//   block_scale  = e4m3(block_amax / (6 * global_scale)), at least the smallest E4M3 subnormal 2^-9;
//                  an all-zero block gets scale 1.0
//   element      = e2m1(x / (float(block_scale) * global_scale))
// computed in float32 in that order (6 * global_scale first, as ModelOpt does), with e4m3/e2m1 the
// round-to-nearest-even conversions of float_formats.h. Where ModelOpt would emit a bad byte we differ on
// purpose: a block scale beyond 448 (global_scale smaller than the recipe's) saturates to 448 instead of
// becoming NaN, and one that underflows becomes 2^-9 rather than 0 or 1.0. -0.0 encodes as E2M1 0x8.
// compressed-tensors stores the reciprocal of global_scale ("weight_global_scale" = 2688 / amax).
#pragma once

#include <cstddef>
#include <cstdint>

namespace nibble {

constexpr int kNvfp4BlockSize = 16;
constexpr float kE2m1Max = 6.0f;
constexpr float kE4m3Max = 448.0f;

// amax / 2688, or 1.0 when that is 0 or below FLT_MIN (nothing worth scaling). Throws nibble::Error for a
// negative or non-finite amax.
float nvfp4_global_scale(float amax);

// Quantizes one row of k values (k a multiple of 16). Throws nibble::Error for a non-finite element, a k
// that is not a multiple of 16, or a global_scale that is not a finite normal positive float.
//   x      [k]      input
//   packed [k / 2]  E2M1 pairs, low nibble first
//   scales [k / 16] E4M3 block scales
void nvfp4_quantize_row(const float* x, int64_t k, float global_scale, uint8_t* packed, uint8_t* scales);

// Inverse of the above: out[k] = e2m1 * e4m3(scale) * global_scale, evaluated left to right (the first
// product is exact, so each output is the correctly rounded float32 of the exact value).
void nvfp4_dequantize_row(const uint8_t* packed, const uint8_t* scales, int64_t k, float global_scale,
                          float* out);

}  // namespace nibble
