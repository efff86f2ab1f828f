// Device side of the paged KV cache's quantization (the recipe of kv_encode_head, ops/attention/kv_cache.h),
// shared by kv_write_kernel (attention_cuda.cu) and the fused q/k norm + RoPE + KV write
// (qkv_prepare_cuda.cu) so both store the same bytes. For .cu files only.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace nibble::cuda {

__device__ __forceinline__ float e4m3_to_float_dev(uint8_t code) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
    return __half2float(__half(h));
}

// E2M1 of x rounded to nearest, ties to even, saturating to +-6 (what cuda_fp4.h's host conversion and
// float_formats.h's e2m1_from_float do; sm_90 has no cvt for it). The grid is {0, .5, 1, 1.5, 2, 3, 4, 6};
// the midpoints .25, 1.25, 2.5 and 5 go down to the even code, .75, 1.75 and 3.5 up.
__device__ __forceinline__ uint32_t e2m1_rne(float x) {
    const float a = fabsf(x);
    const uint32_t code = a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
                        : a <= 2.5f  ? 4u : a < 3.5f  ? 5u : a <= 5.0f  ? 6u : 7u;
    return code | ((__float_as_uint(x) >> 28) & 0x8u);
}

// FP8 cache: the E4M3 code of x / layer_scale (IEEE division, saturating to +-448).
__device__ __forceinline__ uint32_t kv_fp8_code(float x, float layer_scale) {
    return static_cast<uint32_t>(__nv_cvt_float_to_fp8(x / layer_scale, __NV_SATFINITE, __NV_E4M3));
}

// NVFP4 cache, nvfp4_quantize_row's recipe operation for operation (IEEE division, no contraction): the E4M3
// scale code of a group of 16 whose largest magnitude is amax ...
__device__ __forceinline__ uint32_t nvfp4_scale_code(float amax, float layer_scale) {
    const float six_global = __fmul_rn(6.0f, layer_scale);
    uint32_t scale = 0x38;  // E4M3 1.0 for an all-zero group
    if (amax > 0.0f) {
        scale = __nv_cvt_float_to_fp8(__fdiv_rn(amax, six_global), __NV_SATFINITE, __NV_E4M3);
        if (scale == 0) scale = 0x01;  // at least the smallest subnormal
    }
    return scale;
}
// ... the divisor of its elements ...
__device__ __forceinline__ float nvfp4_divisor(uint32_t scale_code, float layer_scale) {
    return __fmul_rn(e4m3_to_float_dev(static_cast<uint8_t>(scale_code)), layer_scale);
}
// ... and an element's E2M1 code.
__device__ __forceinline__ uint32_t nvfp4_code(float x, float divisor) { return e2m1_rne(__fdiv_rn(x, divisor)); }

}  // namespace nibble::cuda
