// Thin wrappers around CUDA's own host conversions (cuda_bf16.h, cuda_fp16.h, cuda_fp8.h, cuda_fp4.h,
// compiled by g++ from the toolkit's include folder): the reference the format tests compare against.
// Only available when the build found the toolkit (NIBBLE_HAVE_CUDA_HEADERS); tests skip otherwise.
#pragma once

#include <cstdint>

#if defined(NIBBLE_HAVE_CUDA_HEADERS) && NIBBLE_HAVE_CUDA_HEADERS
#define NIBBLE_TEST_HAVE_CUDA_REFERENCE 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp4.h>
#include <cuda_fp8.h>

namespace nibble::cuda_ref {

inline uint16_t bf16_from_float(float x) { return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x; }
inline float bf16_to_float(uint16_t bits) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
}

inline uint16_t fp16_from_float(float x) { return static_cast<__half_raw>(__float2half_rn(x)).x; }
inline float fp16_to_float(uint16_t bits) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

inline uint8_t e4m3_from_float(float x, bool satfinite) {
    return __nv_cvt_float_to_fp8(x, satfinite ? __NV_SATFINITE : __NV_NOSAT, __NV_E4M3);
}
inline uint8_t e5m2_from_float(float x, bool satfinite) {
    return __nv_cvt_float_to_fp8(x, satfinite ? __NV_SATFINITE : __NV_NOSAT, __NV_E5M2);
}
inline float e4m3_to_float(uint8_t bits) { return fp16_to_float(__nv_cvt_fp8_to_halfraw(bits, __NV_E4M3).x); }
inline float e5m2_to_float(uint8_t bits) { return fp16_to_float(__nv_cvt_fp8_to_halfraw(bits, __NV_E5M2).x); }

inline uint8_t e2m1_from_float(float x) { return __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest); }
inline float e2m1_to_float(uint8_t code) { return fp16_to_float(__nv_cvt_fp4_to_halfraw(code, __NV_E2M1).x); }

inline uint8_t e8m0_from_float(float x, bool round_up) {
    return __nv_cvt_float_to_e8m0(x, __NV_SATFINITE, round_up ? cudaRoundPosInf : cudaRoundZero);
}
inline float e8m0_to_float(uint8_t bits) { return bf16_to_float(__nv_cvt_e8m0_to_bf16raw(bits).x); }

}  // namespace nibble::cuda_ref
#endif
