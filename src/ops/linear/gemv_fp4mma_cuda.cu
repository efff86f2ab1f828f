// W4A4 NVFP4 GEMV on the FP4 tensor cores of sm_120a / sm_121a (gemv_fp4mma_cuda.h has the contract).
//
// The instruction, per PTX ISA 9.0 section 9.7.14.5.14 "Warp-level matrix multiply-accumulate: mma"
// ("Alternate floating point type with block scaling" syntax; Target ISA notes: .kind / .block_scale /
// .scale_vec_size need sm_120a, or sm_120f from PTX ISA 8.8):
//   mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3
//       d, a, b, c, scale-a-data, {byte-id-a, thread-id-a}, scale-b-data, {byte-id-b, thread-id-b};
//   D[16 x 8] = (A[16 x 64] * scale_A[16 x 4]) (B[64 x 8] * scale_B[4 x 8]) + C, float32 accumulation.
// With .kind::mxf4nvf4 the E2M1 elements are packed 8 to a .b32 with no padding (same section: "no explicit
// padding is necessary"), so the fragments are those of the 4-bit m16n8k64 mma (section 9.7.14.5.x "Matrix
// Fragments for mma.m16n8k64", the .u4/.s4 layout), with g = lane / 4 and t = lane % 4:
//   A (row-major):  a0 row g, k 8t..8t+7;  a1 row g+8, same k;  a2 row g, k 32+8t..;  a3 row g+8, k 32+8t..
//   B (col-major):  b0 col g, k 8t..8t+7;  b1 col g, k 32+8t..32+8t+7
//   C, D:           d0, d1 row g, cols 2t, 2t+1;  d2, d3 row g+8, cols 2t, 2t+1
// element i of a register in bits 4i..4i+3, which is the checkpoints' byte order (element 2i in the low
// nibble) read as a little-endian 32-bit word: each register is one aligned 32-bit load.
//
// Scales (PTX ISA section 9.7.14.x "Block Scaling for mma.sync", warp-level-block-scaling): with
// scale_vec::4X each scale register holds the 4 UE4M3 scales of one row of A (or column of B) for the
// 4 blocks of 16 along k, byte j for k 16j..16j+15, so byte-id is 0. The selectors pick which lanes of each
// quad supply them: with thread-id-a = 0 lane 4g supplies row g and lane 4g+1 row g+8; with thread-id-b =
// 0 lane 4g supplies column g. The same thread-to-data maps are CUTLASS's (include/cute/atom/mma_traits_sm120.hpp,
// SM120_16x8x64_TN_VS: ALayout / BLayout as above; SFALayout takes row g + 8 * (lane & 1) with lane bit 1 a
// don't-care, SFBLayout column g from every lane of the quad). No hardware here could confirm them, so every
// lane holds a valid word regardless: lanes t = 0, 2 hold row g's scales, t = 1, 3 row g+8's (A), and all four
// lanes of a quad hold column g's (B).
//
// The GEMV maps the weights to A (16 output rows a tile) and the tokens to B (8 a launch column): one CTA
// of 4 warps per 16-row tile, the warps taking every 4th k step of 64 and adding their [16 x 8] partial
// sums in shared memory in a fixed order. Per-row scales: y = D * w_global * x_global[token] (+ bias).
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "ops/linear/gemv_fp4mma_cuda.h"
#include "ops/linear/nvfp4_activation_quant.h"

// The FP4 block-scaled mma exists in sm_120a / sm_121a code (and the sm_120f family target); every other
// target compiles the kernel as a trap (the launcher never launches it there).
#if defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL) || \
    (defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && __CUDA_ARCH_FAMILY_SPECIFIC__ == 1200)
#define NIBBLE_FP4_MMA 1
#else
#define NIBBLE_FP4_MMA 0
#endif

namespace nibble::cuda {

namespace {

constexpr int kQuantThreads = 256;
constexpr int kWarps = 4;                 // warps of a GEMV CTA, splitting k
constexpr int kTileRows = 16;             // weight rows of a CTA (the mma's m)
constexpr int kTileTokens = 8;            // tokens of a launch column (the mma's n)
constexpr int kStepK = 64;                // the mma's k

size_t align16(size_t v) { return (v + 15) & ~size_t{15}; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// One CTA per row: the row's amax, its global scale, then 16-element blocks, one per thread at a time.
template <class XT>
__global__ void __launch_bounds__(kQuantThreads) fp4mma_quantize_kernel(const XT* x, int64_t k, uint8_t* packed,
                                                                        uint8_t* scales, float* global_scale) {
    __shared__ float warp_max[kQuantThreads / 32];
    const XT* row = x + blockIdx.x * k;
    float amax = 0.0f;
    for (int64_t i = threadIdx.x; i < k; i += kQuantThreads) amax = fmaxf(amax, fabsf(to_float(row[i])));
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < kQuantThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
    const float global = fp4act::global_scale_of(amax);
    if (threadIdx.x == 0) global_scale[blockIdx.x] = global;
    uint8_t* packed_row = packed + blockIdx.x * (k / 2);
    uint8_t* scale_row = scales + blockIdx.x * (k / fp4act::kBlock);
    for (int64_t b = threadIdx.x; b < k / fp4act::kBlock; b += kQuantThreads) {
        float v[fp4act::kBlock];
#pragma unroll
        for (int i = 0; i < fp4act::kBlock; ++i) v[i] = to_float(row[b * fp4act::kBlock + i]);
        uint8_t bytes[fp4act::kBlock / 2];
        scale_row[b] = fp4act::quantize_block(v, global, bytes);
        uint2 word;
        word.x = bytes[0] | bytes[1] << 8 | bytes[2] << 16 | static_cast<uint32_t>(bytes[3]) << 24;
        word.y = bytes[4] | bytes[5] << 8 | bytes[6] << 16 | static_cast<uint32_t>(bytes[7]) << 24;
        *reinterpret_cast<uint2*>(packed_row + b * (fp4act::kBlock / 2)) = word;  // 8-byte aligned: k % 16 == 0
    }
}

#if NIBBLE_FP4_MMA
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ uint32_t load_word(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void mma_fp4_block_scaled(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                     uint32_t b0, uint32_t b1, uint32_t scale_a, uint32_t scale_b) {
    // Selectors {byte-id, thread-id} = {0, 0}: see the top of the file.
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3}, %10, {0, 0}, %11, {0, 0};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(scale_a), "r"(scale_b));
}
#endif

// grid (n / 16 tiles, m / 8 token columns), 128 threads. xq / xs / xg: the quantized activations.
template <class XT>
__global__ void __launch_bounds__(kWarps * 32) gemv_fp4mma_kernel(const uint8_t* w_packed, const uint8_t* w_scales,
                                                                  float w_global, int64_t n, int64_t k,
                                                                  const uint8_t* xq, const uint8_t* xs,
                                                                  const float* xg, int64_t m, const float* bias,
                                                                  XT* y) {
    __shared__ float partial[kWarps][kTileRows][kTileTokens];
#if NIBBLE_FP4_MMA
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
    const int64_t token0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
    // Rows past n (the last tile) read row n - 1 and are dropped at the store.
    const int64_t row_lo = min(row0 + g, n - 1), row_hi = min(row0 + g + 8, n - 1);
    const uint8_t* w_lo = w_packed + row_lo * (k / 2);
    const uint8_t* w_hi = w_packed + row_hi * (k / 2);
    const uint8_t* w_scale_row = w_scales + ((t & 1) ? row_hi : row_lo) * (k / 16);
    // Token columns past m contribute zeros (zero data and zero scales) and are dropped at the store.
    const int64_t token = token0 + g;
    const bool token_live = token < m;
    const uint8_t* x_row = xq + (token_live ? token : 0) * (k / 2);
    const uint8_t* x_scale_row = xs + (token_live ? token : 0) * (k / 16);

    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t step = warp; step < k / kStepK; step += kWarps) {  // the same trip count in every lane
        const int64_t byte = step * (kStepK / 2) + t * 4;           // k 64 step + 8t, in packed bytes
        const uint32_t a0 = load_word(w_lo + byte), a1 = load_word(w_hi + byte);
        const uint32_t a2 = load_word(w_lo + byte + 16), a3 = load_word(w_hi + byte + 16);
        const uint32_t b0 = token_live ? load_word(x_row + byte) : 0u;
        const uint32_t b1 = token_live ? load_word(x_row + byte + 16) : 0u;
        const uint32_t scale_a = load_word(w_scale_row + step * 4);
        const uint32_t scale_b = token_live ? load_word(x_scale_row + step * 4) : 0u;
        mma_fp4_block_scaled(d, a0, a1, a2, a3, b0, b1, scale_a, scale_b);
    }
    partial[warp][g][2 * t] = d[0];
    partial[warp][g][2 * t + 1] = d[1];
    partial[warp][g + 8][2 * t] = d[2];
    partial[warp][g + 8][2 * t + 1] = d[3];
    __syncthreads();
    // 128 threads = 16 rows x 8 tokens: one output each.
    const int r = threadIdx.x / kTileTokens, c = threadIdx.x % kTileTokens;
    const int64_t out_row = row0 + r, out_token = token0 + c;
    if (out_row < n && out_token < m) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += partial[w][r][c];
        store(y + out_token * n + out_row, sum * w_global * xg[out_token] + (bias ? bias[out_row] : 0.0f));
    }
#else
    // Not sm_120a / sm_121a code: the launcher refuses such devices before launching. The shared array is
    // kept (a volatile store) so every target reports the same static shared memory to the registry.
    reinterpret_cast<volatile float*>(&partial[0][0][0])[threadIdx.x] = 0.0f;
    __trap();
#endif
}

int current_cc_major(int* minor) {
    int device = 0, major = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device));
    return major;
}

bool misaligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; }

}  // namespace

size_t fp4mma_workspace_bytes(int64_t m, int64_t k) {
    if (m < 0 || k < 0) throw std::invalid_argument("fp4mma_workspace_bytes: negative dimension");
    const size_t mm = static_cast<size_t>(m), kk = static_cast<size_t>(k);
    return align16(align16(mm * kk / 2) + mm * kk / 16) + 4 * mm;
}

Fp4Activations fp4mma_workspace_view(void* workspace, int64_t m, int64_t k) {
    const size_t mm = static_cast<size_t>(m), kk = static_cast<size_t>(k);
    auto* base = static_cast<uint8_t*>(workspace);
    Fp4Activations a;
    a.packed = base;
    a.scales = base + align16(mm * kk / 2);
    a.global_scale = reinterpret_cast<float*>(base + align16(align16(mm * kk / 2) + mm * kk / 16));
    return a;
}

bool fp4mma_device_supported() {
    int minor = 0;
    return current_cc_major(&minor) == 12;
}

void fp4mma_quantize_activations(const void* x, DType dtype, int64_t m, int64_t k, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
    const std::string what = "fp4mma_quantize_activations";
    if (dtype != DType::F32 && dtype != DType::BF16) throw std::invalid_argument(what + ": x must be F32 or BF16");
    if (m < 0 || k < 0 || k % fp4act::kBlock != 0)
        throw std::invalid_argument(what + ": m = " + std::to_string(m) + ", k = " + std::to_string(k) +
                                    " (k must be a multiple of 16)");
    if (m > 0x7fffffff) throw std::invalid_argument(what + ": m = " + std::to_string(m) + " is too large");
    if (workspace_bytes < fp4mma_workspace_bytes(m, k))
        throw std::invalid_argument(what + ": workspace of " + std::to_string(workspace_bytes) + " bytes, needs " +
                                    std::to_string(fp4mma_workspace_bytes(m, k)));
    if (misaligned(x, 16) || misaligned(workspace, 16))
        throw std::invalid_argument(what + ": x and the workspace must be 16-byte aligned");
    if (m == 0 || k == 0) return;
    const Fp4Activations a = fp4mma_workspace_view(workspace, m, k);
    const dim3 grid(static_cast<unsigned>(m));
    if (dtype == DType::F32)
        fp4mma_quantize_kernel<float><<<grid, kQuantThreads, 0, stream>>>(static_cast<const float*>(x), k, a.packed,
                                                                          a.scales, a.global_scale);
    else
        fp4mma_quantize_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, stream>>>(
            static_cast<const __nv_bfloat16*>(x), k, a.packed, a.scales, a.global_scale);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void gemv_nvfp4_fp4mma(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const std::string what = "gemv_nvfp4_fp4mma";
    if (dtype != DType::F32 && dtype != DType::BF16) throw std::invalid_argument(what + ": x must be F32 or BF16");
    if (m < 0 || w.n < 0 || w.k <= 0 || w.k % kStepK != 0)
        throw std::invalid_argument(what + ": m = " + std::to_string(m) + ", n = " + std::to_string(w.n) +
                                    ", k = " + std::to_string(w.k) + " (k must be a positive multiple of 64)");
    if ((m + kTileTokens - 1) / kTileTokens > 65535 || (w.n + kTileRows - 1) / kTileRows > 0x7fffffff)
        throw std::invalid_argument(what + ": m = " + std::to_string(m) + " or n = " + std::to_string(w.n) +
                                    " is too large for one launch");
    if (misaligned(x, 16) || misaligned(y, 16))
        throw std::invalid_argument(what + ": x and y must be 16-byte aligned");
    if (misaligned(w.packed, 4) || misaligned(w.scales, 4))
        throw std::invalid_argument(what + ": packed weights and scales must be 4-byte aligned");
    int minor = 0;
    const int major = current_cc_major(&minor);
    if (major != 12)
        throw std::runtime_error(what + ": needs a compute capability 12.x GPU (the sm_120a / sm_121a FP4 "
                                 "block-scaled mma.sync); this device is " + std::to_string(major) + "." +
                                 std::to_string(minor));
    fp4mma_quantize_activations(x, dtype, m, w.k, workspace, workspace_bytes, stream);
    if (m == 0 || w.n == 0) return;
    const Fp4Activations a = fp4mma_workspace_view(workspace, m, w.k);
    const dim3 grid(static_cast<unsigned>((w.n + kTileRows - 1) / kTileRows),
                    static_cast<unsigned>((m + kTileTokens - 1) / kTileTokens));
    if (dtype == DType::F32)
        gemv_fp4mma_kernel<float><<<grid, kWarps * 32, 0, stream>>>(w.packed, w.scales, w.global_scale, w.n, w.k,
                                                                    a.packed, a.scales, a.global_scale, m, bias,
                                                                    static_cast<float*>(y));
    else
        gemv_fp4mma_kernel<__nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(
            w.packed, w.scales, w.global_scale, w.n, w.k, a.packed, a.scales, a.global_scale, m, bias,
            static_cast<__nv_bfloat16*>(y));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
