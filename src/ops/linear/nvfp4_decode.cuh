// Device helpers shared by the NVFP4 kernels (ops/linear/linear_cuda.cu, ops/moe/moe_cuda.cu): word
// access into a 16-byte load, and the exact E2M1 / E4M3 decodes to float32. For .cu files only.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace nibble::cuda {

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// The 8 E2M1 codes of w (element e in bits 4e..4e+3) times 2^-14, as float32 (exact). Each code s.eem
// becomes the high byte 2 * eem + 128 * s of an fp16 whose low byte is 0; the byte arithmetic runs four
// codes at a time (no carries cross bytes: a byte stays <= 142), and one byte permute per pair builds
// the half2. About 9 integer-pipe and 4 IMAD operations per 8 codes.
__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t h) {
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
// The same 8 codes as four fp16 pairs (bit patterns of __half2, value * 2^-14 each, exact; fp16 subnormals
// for +-0.5): h[0] = {v0, v2}, h[1] = {v4, v6}, h[2] = {v1, v3}, h[3] = {v5, v7} (low half first).
__device__ __forceinline__ void e2m1x8_to_half2(uint32_t w, uint32_t (&h)[4]) {
    const uint32_t te = w & 0x0f0f0f0fu;         // codes of elements 0, 2, 4, 6 (one per byte)
    const uint32_t to = (w >> 4) & 0x0f0f0f0fu;  // codes of elements 1, 3, 5, 7
    // 2 * code + 112 * sign = 2 * eem + 128 * sign; (code & 8) = 8 * sign
    const uint32_t he = te * 2u + (te & 0x08080808u) * 14u;
    const uint32_t ho = to * 2u + (to & 0x08080808u) * 14u;
    h[0] = __byte_perm(he, 0u, 0x1404), h[1] = __byte_perm(he, 0u, 0x3424);
    h[2] = __byte_perm(ho, 0u, 0x1404), h[3] = __byte_perm(ho, 0u, 0x3424);
}
__device__ __forceinline__ void e2m1x8_to_float(uint32_t w, float (&v)[8]) {
    uint32_t h[4];
    e2m1x8_to_half2(w, h);
    float2 p;
    p = half2_bits_to_float2(h[0]), v[0] = p.x, v[2] = p.y;
    p = half2_bits_to_float2(h[1]), v[4] = p.x, v[6] = p.y;
    p = half2_bits_to_float2(h[2]), v[1] = p.x, v[3] = p.y;
    p = half2_bits_to_float2(h[3]), v[5] = p.x, v[7] = p.y;
}

// E4M3 code (low 8 bits of b) to float32, exactly: the bits moved into float32's exponent/mantissa give
// the value * 2^-120 for normals and subnormals alike (float32 denormals are kept: no fast-math).
__device__ __forceinline__ float e4m3_exact(uint32_t b) {
    const uint32_t bits = ((b & 0x80u) << 24) | ((b & 0x7fu) << 20);
    return __uint_as_float(bits) * 0x1p120f;
}

}  // namespace nibble::cuda
