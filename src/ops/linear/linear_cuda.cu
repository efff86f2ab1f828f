// Decode GEMV kernels: NVFP4 and BF16 weights, 1..16 activation rows, float32 accumulation on CUDA cores.
//
// One warp owns R consecutive output rows at a time and sweeps k with 16-byte streaming loads (evict-
// first, so the weights do not push the activations out of L1/L2); the loads of the next step are issued
// before the current step's math (double buffering), so each lane keeps 2 x R x 16 bytes in flight.
// Activations are re-read through L1 (__ldg) for each group of R rows: MT * 2 (BF16) or MT * 4 (F32) / R
// bytes per weight element. Measured (docs/perf.md): the NVFP4 kernel is bound by instruction issue
// (~5.3 SASS instructions a weight at m = 1), not by bytes, and m >= 4 belongs on the tensor cores.
//
// NVFP4 decode in registers: a 32-bit word holds 8 E2M1 codes. Code s.eem placed as fp16 bits
// s.00eem.000000000 is the fp16 number e2m1 * 2^-14 exactly (normals and the one subnormal code both
// scale by 2^14), so integer byte arithmetic and byte permutes decode with no table.
// Products are summed per block of 16 in float32, then multiplied by that block's E4M3 scale (decoded
// exactly as float32 bits * 2^120) and added to the row's accumulator; 2^14 and the global scale are
// applied once at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "ops/linear/linear_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 128;  // small blocks spread a 4096-row matrix over all SMs
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// 8 consecutive activations as float32.
__device__ __forceinline__ void load_x8(const float* p, float (&v)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load_x8(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t wd = word_of(u, j);
        v[2 * j] = __uint_as_float(wd << 16);
        v[2 * j + 1] = __uint_as_float(wd & 0xffff0000u);
    }
}

__device__ __forceinline__ void store_y(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_y(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// The 8 E2M1 codes of w (element e in bits 4e..4e+3) times 2^-14, as float32 (exact). Each code s.eem
// becomes the high byte 2 * eem + 128 * s of an fp16 whose low byte is 0; the byte arithmetic runs four
// codes at a time (no carries cross bytes: a byte stays <= 142), and one byte permute per pair builds
// the half2. About 9 integer-pipe and 4 IMAD operations per 8 codes.
__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t h) {
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
__device__ __forceinline__ void e2m1x8_to_float(uint32_t w, float (&v)[8]) {
    const uint32_t te = w & 0x0f0f0f0fu;           // codes of elements 0, 2, 4, 6 (one per byte)
    const uint32_t to = (w >> 4) & 0x0f0f0f0fu;    // codes of elements 1, 3, 5, 7
    // 2 * code + 112 * sign = 2 * eem + 128 * sign; (code & 8) = 8 * sign
    const uint32_t he = te * 2u + (te & 0x08080808u) * 14u;
    const uint32_t ho = to * 2u + (to & 0x08080808u) * 14u;
    float2 p;
    p = half2_bits_to_float2(__byte_perm(he, 0u, 0x1404)), v[0] = p.x, v[2] = p.y;
    p = half2_bits_to_float2(__byte_perm(he, 0u, 0x3424)), v[4] = p.x, v[6] = p.y;
    p = half2_bits_to_float2(__byte_perm(ho, 0u, 0x1404)), v[1] = p.x, v[3] = p.y;
    p = half2_bits_to_float2(__byte_perm(ho, 0u, 0x3424)), v[5] = p.x, v[7] = p.y;
}

// E4M3 code (low 8 bits of b) to float32, exactly: the bits moved into float32's exponent/mantissa give
// the value * 2^-120 for normals and subnormals alike (float32 denormals are kept: no fast-math).
__device__ __forceinline__ float e4m3_exact(uint32_t b) {
    const uint32_t bits = ((b & 0x80u) << 24) | ((b & 0x7fu) << 20);
    return __uint_as_float(bits) * 0x1p120f;
}

// Sums each of V values over the warp and leaves the total of value `index` in the lanes with
// (lane & (32 / V - 1)) == 0: V - 1 + log2(32 / V) shuffles instead of 5 V.
template <int V>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[V], int lane, int& index) {
    static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V must be a power of two up to 32");
    index = 0;
    int o = 16;
#pragma unroll
    for (int len = V; len > 1; len >>= 1, o >>= 1) {
        const int half = len >> 1;
        const bool upper = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
        if (upper) index += half;
    }
    float t = v[0];
#pragma unroll
    for (; o >= 1; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

template <int MT, int R, class XT>
__device__ __forceinline__ void reduce_and_store(float (&acc)[R][MT], int lane, int64_t row0, int m, int64_t n,
                                                 float out_scale, const float* __restrict__ bias,
                                                 XT* __restrict__ y) {
    constexpr int V = MT * R;
    float flat[V];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) flat[r * MT + mi] = acc[r][mi];
    int index = 0;
    const float total = warp_reduce_scatter<V>(flat, lane, index);
    if ((lane & (32 / V - 1)) != 0) return;
    const int r = index / MT, mi = index % MT;
    const int64_t row = row0 + r;
    if (row >= n || mi >= m) return;
    float out = total * out_scale;
    if (bias) out += bias[row];
    store_y(y + static_cast<int64_t>(mi) * n + row, out);
}

// y[m, n] = x[m, k] W^T, W NVFP4. Chunk c of a row: 16 bytes of codes (elements 32c..32c+31) and the
// 2 E4M3 scales of its two blocks.
template <int MT, int R, class XT>
__global__ void __launch_bounds__(kThreads)
    gemv_nvfp4_kernel(const XT* __restrict__ x, int m, int64_t k, const uint4* __restrict__ wq,
                      const unsigned short* __restrict__ ws, float out_scale, const float* __restrict__ bias,
                      XT* __restrict__ y, int64_t n) {
    const int lane = threadIdx.x & 31;
    const int64_t chunks = k >> 5;
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * R;
    for (int64_t row0 = warp * R; row0 < n; row0 += stride) {
        int64_t base[R];  // chunk index of each row's start; rows past n repeat the last (not stored)
#pragma unroll
        for (int r = 0; r < R; ++r) base[r] = min(row0 + r, n - 1) * chunks;
        float acc[R][MT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

        uint4 q_next[R];
        uint32_t s_next[R];
        if (lane < chunks) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                q_next[r] = __ldcs(wq + base[r] + lane);
                s_next[r] = __ldcs(ws + base[r] + lane);
            }
        }
        for (int64_t c = lane; c < chunks; c += 32) {
            uint4 q[R];
            uint32_t s[R];
#pragma unroll
            for (int r = 0; r < R; ++r) q[r] = q_next[r], s[r] = s_next[r];
            if (c + 32 < chunks) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    q_next[r] = __ldcs(wq + base[r] + c + 32);
                    s_next[r] = __ldcs(ws + base[r] + c + 32);
                }
            }
            const XT* xc = x + c * 32;
#pragma unroll
            for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 16
                float part[R][MT];
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) part[r][mi] = 0.0f;
#pragma unroll
                for (int j = 2 * b; j < 2 * b + 2; ++j) {  // words of 8 codes
                    float wf[R][8];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        e2m1x8_to_float(word_of(q[r], j), wf[r]);
                    }
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) {
                        if (mi >= m) break;  // warp-uniform
                        float xv[8];
                        load_x8(xc + static_cast<int64_t>(mi) * k + 8 * j, xv);
#pragma unroll
                        for (int r = 0; r < R; ++r)
#pragma unroll
                            for (int e = 0; e < 8; ++e) part[r][mi] = fmaf(wf[r][e], xv[e], part[r][mi]);
                    }
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float sc = e4m3_exact(s[r] >> (8 * b));
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = fmaf(part[r][mi], sc, acc[r][mi]);
                }
            }
        }
        reduce_and_store<MT, R>(acc, lane, row0, m, n, out_scale, bias, y);
    }
}

// y[m, n] = x[m, k] W^T, W BF16. Chunk c of a row: 32 bytes (elements 16c..16c+15) as two 16-byte loads.
template <int MT, int R, class XT>
__global__ void __launch_bounds__(kThreads)
    gemv_bf16_kernel(const XT* __restrict__ x, int m, int64_t k, const uint4* __restrict__ w,
                     const float* __restrict__ bias, XT* __restrict__ y, int64_t n) {
    const int lane = threadIdx.x & 31;
    const int64_t chunks = k >> 4;
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * R;
    for (int64_t row0 = warp * R; row0 < n; row0 += stride) {
        int64_t base[R];  // uint4 index of each row's start
#pragma unroll
        for (int r = 0; r < R; ++r) base[r] = min(row0 + r, n - 1) * (k >> 3);
        float acc[R][MT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

        uint4 q_next[R][2];
        if (lane < chunks) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                q_next[r][0] = __ldcs(w + base[r] + 2 * lane);
                q_next[r][1] = __ldcs(w + base[r] + 2 * lane + 1);
            }
        }
        for (int64_t c = lane; c < chunks; c += 32) {
            uint4 q[R][2];
#pragma unroll
            for (int r = 0; r < R; ++r) q[r][0] = q_next[r][0], q[r][1] = q_next[r][1];
            if (c + 32 < chunks) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    q_next[r][0] = __ldcs(w + base[r] + 2 * (c + 32));
                    q_next[r][1] = __ldcs(w + base[r] + 2 * (c + 32) + 1);
                }
            }
            const XT* xc = x + c * 16;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float wf[R][8];
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint32_t wd = word_of(q[r][h], j);
                        wf[r][2 * j] = __uint_as_float(wd << 16);
                        wf[r][2 * j + 1] = __uint_as_float(wd & 0xffff0000u);
                    }
#pragma unroll
                for (int mi = 0; mi < MT; ++mi) {
                    if (mi >= m) break;
                    float xv[8];
                    load_x8(xc + static_cast<int64_t>(mi) * k + 8 * h, xv);
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r][mi] = fmaf(wf[r][e], xv[e], acc[r][mi]);
                }
            }
        }
        reduce_and_store<MT, R>(acc, lane, row0, m, n, 1.0f, bias, y);
    }
}

// Rows per warp for an M tile: activation re-reads cost MT * 2 (BF16) or MT * 4 (F32) / R bytes of L1
// and MT / R widening ops per weight element, but a larger R leaves fewer warps (n / R) to hide latency:
// R = 4 at m = 1 measured 34% of copy bandwidth at 4096x4096 against 87% at 128256x4096 (docs/perf.md).
template <int MT>
constexpr int rows_per_warp() {
    return MT <= 8 ? 2 : 1;
}

int grid_for(int64_t n, int rows, int device_sms) {
    const int64_t needed = (n + static_cast<int64_t>(rows) * kWarps - 1) / (static_cast<int64_t>(rows) * kWarps);
    return static_cast<int>(std::min<int64_t>(needed, static_cast<int64_t>(device_sms) * 16));
}

int current_sm_count() {
    int device = 0, sms = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

template <int MT, class XT>
void launch_nvfp4(const XT* x, int m, const Nvfp4DeviceWeight& w, const float* bias, XT* y, int sms,
                  cudaStream_t stream) {
    constexpr int R = rows_per_warp<MT>();
    // 2^14 undoes the fp16 placement of the E2M1 codes (exact: a power of two).
    const float out_scale = w.global_scale * 16384.0f;
    gemv_nvfp4_kernel<MT, R, XT><<<grid_for(w.n, R, sms), kThreads, 0, stream>>>(
        x, m, w.k, reinterpret_cast<const uint4*>(w.packed), reinterpret_cast<const unsigned short*>(w.scales),
        out_scale, bias, y, w.n);
}

template <int MT, class XT>
void launch_bf16(const XT* x, int m, const uint16_t* w, int64_t n, int64_t k, const float* bias, XT* y, int sms,
                 cudaStream_t stream) {
    constexpr int R = rows_per_warp<MT>();
    gemv_bf16_kernel<MT, R, XT><<<grid_for(n, R, sms), kThreads, 0, stream>>>(
        x, m, k, reinterpret_cast<const uint4*>(w), bias, y, n);
}

// Calls f.template operator()<MT>() for the smallest M tile that holds m (m in 1..16).
template <class F>
void dispatch_m_tile(int m, F&& f) {
    if (m <= 1) f.template operator()<1>();
    else if (m <= 2) f.template operator()<2>();
    else if (m <= 4) f.template operator()<4>();
    else if (m <= 8) f.template operator()<8>();
    else f.template operator()<16>();
}

void check_common(const void* x, DType dtype, int64_t m, const void* y, int64_t n, int64_t k, const char* what) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument(std::string(what) + ": activations must be F32 or BF16");
    if (m < 0 || n < 0 || k < 0) throw std::invalid_argument(std::string(what) + ": negative dimension");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 != 0)
        throw std::invalid_argument(std::string(what) + ": x and y must be 16-byte aligned");
}

template <class XT, class Launch>
void run_tiles(const void* x, int64_t m, int64_t n, int64_t k, void* y, Launch&& launch) {
    const auto* xt = static_cast<const XT*>(x);
    auto* yt = static_cast<XT*>(y);
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
        const int mt = static_cast<int>(std::min<int64_t>(16, m - m0));
        launch(xt + m0 * k, mt, yt + m0 * n);
    }
}

}  // namespace

void gemv_nvfp4(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                cudaStream_t stream) {
    check_common(x, dtype, m, y, w.n, w.k, "gemv_nvfp4");
    if (w.k % 32 != 0) throw std::invalid_argument("gemv_nvfp4: k = " + std::to_string(w.k) + " is not a multiple of 32");
    if ((reinterpret_cast<uintptr_t>(w.packed) % 16) != 0 || (reinterpret_cast<uintptr_t>(w.scales) % 2) != 0)
        throw std::invalid_argument("gemv_nvfp4: packed weights must be 16-byte aligned, scales 2-byte aligned");
    if (m == 0 || w.n == 0) return;
    const int sms = current_sm_count();
    auto body = [&]<class XT>() {
        run_tiles<XT>(x, m, w.n, w.k, y, [&](const XT* xt, int mt, XT* yt) {
            dispatch_m_tile(mt, [&]<int MT>() { launch_nvfp4<MT, XT>(xt, mt, w, bias, yt, sms, stream); });
        });
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gemv_bf16(const void* x, DType dtype, int64_t m, const uint16_t* w, int64_t n, int64_t k, const float* bias,
               void* y, cudaStream_t stream) {
    check_common(x, dtype, m, y, n, k, "gemv_bf16");
    if (k % 16 != 0) throw std::invalid_argument("gemv_bf16: k = " + std::to_string(k) + " is not a multiple of 16");
    if (reinterpret_cast<uintptr_t>(w) % 16 != 0) throw std::invalid_argument("gemv_bf16: w must be 16-byte aligned");
    if (m == 0 || n == 0) return;
    const int sms = current_sm_count();
    auto body = [&]<class XT>() {
        run_tiles<XT>(x, m, n, k, y, [&](const XT* xt, int mt, XT* yt) {
            dispatch_m_tile(mt, [&]<int MT>() { launch_bf16<MT, XT>(xt, mt, w, n, k, bias, yt, sms, stream); });
        });
    };
    if (dtype == DType::F32) body.template operator()<float>();
    else body.template operator()<__nv_bfloat16>();
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
