// The unnormalized token probability that the host sampler (engine/sampler.cpp) and the device sampler
// (ops/sampling/sample_cuda.cu) both use: exp((logit - top) / T), evaluated with IEEE-754 operations that are
// correctly rounded on both sides (a float division, subtraction and product, then fmaf, rintf and ldexpf
// only; no library exp, whose last bit differs between glibc and CUDA), so that the two compute bit-identical
// weights and the filters' decisions can agree exactly. Plain C++, also compiled by nvcc.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define NIBBLE_SAMPLING_FN __host__ __device__ __forceinline__
#else
#define NIBBLE_SAMPLING_FN inline
#endif

namespace nibble {

// e^x for x <= 0 (x > 0 is not a weight and is not needed); 0 below -86 (and for NaN), where e^x < 2^-124,
// so no result is subnormal. Cody-Waite reduction x = n ln2 + r with |r| <= ln2 / 2 in two fmaf steps, then
// the degree-7 Taylor polynomial (truncation below 6e-9 relative) in Horner form: within a few float ulp of
// e^x, and exactly 1 at x = 0.
NIBBLE_SAMPLING_FN float sampling_exp(float x) {
    if (!(x >= -86.0f)) return 0.0f;
    const float n = rintf(x * 1.44269504f);                   // x / ln2, to the nearest integer
    float r = fmaf(-n, 0.693145751953125f, x);                // ln2's high 16 bits: n x hi is exact
    r = fmaf(-n, 1.42860682e-6f, r);                          // ln2 - hi
    float p = 1.98412698e-4f;                                 // 1/7!
    p = fmaf(p, r, 1.38888889e-3f);                           // 1/6!
    p = fmaf(p, r, 8.33333333e-3f);                           // 1/5!
    p = fmaf(p, r, 4.16666667e-2f);                           // 1/4!
    p = fmaf(p, r, 1.66666667e-1f);                           // 1/3!
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    return ldexpf(p, static_cast<int>(n));
}

// 1 / T, correctly rounded (the device's __fdiv_rn; the host's IEEE division).
NIBBLE_SAMPLING_FN float sampling_inv_temperature(float temperature) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(1.0f, temperature);
#else
    return 1.0f / temperature;
#endif
}

// The weight of logit l in a row whose largest logit is top, with inv_t = sampling_inv_temperature(T):
// sampling_exp((l - top) x inv_t) with the subtraction and the product rounded to float separately (the
// device intrinsics forbid fusing them into an FMA; the host compiles ISO C++, which does not contract).
// 1 for the top token.
NIBBLE_SAMPLING_FN float sampling_weight(float l, float top, float inv_t) {
#if defined(__CUDA_ARCH__)
    return sampling_exp(__fmul_rn(__fsub_rn(l, top), inv_t));
#else
    return sampling_exp((l - top) * inv_t);
#endif
}

}  // namespace nibble
