// The W4A4 NVFP4 GEMV that the FP4 tensor-core kernel (ops/linear/gemv_fp4mma_cuda.h) computes, on the
// CPU: the reference its device test compares against. Plain C++, in every build.
//
//   xq, xs, xg = quantize_activation_row(x[t])        per token t (ops/linear/nvfp4_activation_quant.h)
//   y[t, r]    = (sum over k of e2m1(xq) * e4m3(xs) * e2m1(wq) * e4m3(ws)) * w_global * xg[t] (+ bias[r])
// The sum of products of exactly representable values is accumulated in float32 per block of 16 (the
// order is the reference's; the tensor core's order is unspecified, hence the test's tolerance).
#pragma once

#include <cstdint>

namespace nibble {

// One activation row x[k] (k % 16 == 0, finite values) quantized to NVFP4 with its own global scale:
// packed[k / 2] (element 2i in the low nibble), scales[k / 16] E4M3; returns the global scale.
// Throws nibble::Error on a bad k or a non-finite value.
float fp4mma_quantize_activation_row(const float* x, int64_t k, uint8_t* packed, uint8_t* scales);

// y[m, n] = the W4A4 product above, float32. W: packed [n, k / 2], scales [n, k / 16], w_global; bias [n]
// or null. k % 64 == 0 (the tensor core's k step) and weight scales unsigned (sign bit clear, not NaN):
// checked, nibble::Error.
void gemv_fp4mma_reference(const float* x, int64_t m, int64_t k, const uint8_t* w_packed, const uint8_t* w_scales,
                           float w_global, int64_t n, const float* bias, float* y);

}  // namespace nibble
