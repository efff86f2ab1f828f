// Fused q/k RMSNorm + RoPE + KV cache write (ops/attention/qkv_prepare_cuda.h has the contract).
//
// CTA: kWarps warps, one token (blockIdx.x) and kWarps rows of it (blockIdx.y): the token's rows are its q
// heads (skipped when neither norm nor RoPE touches q and q stays in place), then its k heads, then its v
// heads. A warp owns one row; lane l holds elements 8l .. 8l + 7 (head_dim / 8 <= 32 lanes hold data, the
// rest zeros), which is exactly the split of rmsnorm_kernel's 256-thread block over a row of <= 256 values,
// so the sum of squares runs the same fma chains and the same xor-tree (the block's second stage only adds
// zeros): the same float.
// The CTA first computes the token's cos/sin table [rotary_dim / 2] in shared memory (the angle as
// rope_kernel computes it); RoPE then reads each element's partner from the warp's row in shared memory.
// NVFP4 groups of 16 are lane pairs (2g, 2g + 1).
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/attention/kv_quant.cuh"
#include "ops/attention/qkv_prepare_cuda.h"
#include "ops/rope/rope_rotate.cuh"

namespace nibble::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = static_cast<int>(kQkvPrepareMaxHeadDim);

struct Params {
    const void* q;
    void* q_out;  // q itself, or a separate contiguous [m, n_heads, head_dim]
    const void* k;
    const void* v;
    int64_t q_stride, k_stride, v_stride, q_out_stride;  // elements between tokens' rows
    int n_heads, n_kv_heads, head_dim;
    int first_row;  // 0, or n_heads when q is left as is
    const float* q_norm;
    const float* k_norm;
    float eps;
    const int64_t* positions;
    const float* inv_freq;
    int rotary_dim;
    const int64_t* slots;
    uint8_t* kc;
    uint8_t* vc;
    int64_t block_bytes;
    int block_size;
    float k_scale, v_scale;
};

template <class T, KvDtype KV, bool INTERLEAVED>
__global__ void __launch_bounds__(kWarps * 32) qkv_prepare_kernel(const Params p) {
    __shared__ float cos_t[kMaxHeadDim / 2], sin_t[kMaxHeadDim / 2];
    __shared__ float row_buf[kWarps][kMaxHeadDim];
    pdl_enter();  // every input comes from the kernels before (cuda/pdl.cuh)
    const int64_t token = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int half = p.rotary_dim / 2;
    if (half > 0) {
        const float pos = static_cast<float>(p.positions[token]);
        for (int i = threadIdx.x; i < half; i += kWarps * 32) {
            const float angle = rope_angle(pos, p.inv_freq[i]);
            float s, c;
            sincosf(angle, &s, &c);
            cos_t[i] = c, sin_t[i] = s;
        }
    }
    __syncthreads();  // the last barrier: rows past the end may leave now

    const int row = p.first_row + static_cast<int>(blockIdx.y) * kWarps + warp;
    if (row >= p.n_heads + 2 * p.n_kv_heads) return;
    const bool is_q = row < p.n_heads, is_k = !is_q && row < p.n_heads + p.n_kv_heads;
    const int head = is_q ? row : is_k ? row - p.n_heads : row - p.n_heads - p.n_kv_heads;
    const int hd = p.head_dim;
    const T* const src = is_q   ? static_cast<const T*>(p.q) + token * p.q_stride + head * hd
                         : is_k ? static_cast<const T*>(p.k) + token * p.k_stride + head * hd
                                : static_cast<const T*>(p.v) + token * p.v_stride + head * hd;
    const bool has = lane * 8 < hd;  // this lane holds elements 8 lane .. 8 lane + 7
    float x[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (has) load8(src + lane * 8, x);

    // RMSNorm as rmsnorm_kernel: per-lane fma chain from 0, xor-tree over the warp, then the stored rounding.
    const float* const norm_w = is_q ? p.q_norm : is_k ? p.k_norm : nullptr;
    if (norm_w != nullptr) {
        float ss = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(x[e], x[e], ss);
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float inv = rsqrtf(ss / static_cast<float>(hd) + p.eps);
        if (has) {
            const float4 w0 = reinterpret_cast<const float4*>(norm_w + lane * 8)[0];
            const float4 w1 = reinterpret_cast<const float4*>(norm_w + lane * 8)[1];
            const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) x[e] = round_as(w[e] * (x[e] * inv), src);
        }
    }

    // RoPE as rope_kernel: pair i = (a, b) -> (a cos - b sin, b cos + a sin), then the stored rounding.
    if (half > 0 && row < p.n_heads + p.n_kv_heads) {
        float* const buf = row_buf[warp];
        if (has) {
#pragma unroll
            for (int e = 0; e < 8; ++e) buf[lane * 8 + e] = x[e];
        }
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int i = lane * 8 + e;
            if (i >= 2 * half) continue;
            // pair: its index; second: i is the pair's b; a, b: the pair's two elements
            const int pair = INTERLEAVED ? i >> 1 : (i < half ? i : i - half);
            const bool second = INTERLEAVED ? (i & 1) != 0 : i >= half;
            const float a = INTERLEAVED ? buf[i & ~1] : buf[pair];
            const float b = INTERLEAVED ? buf[i | 1] : buf[pair + half];
            const float c = cos_t[pair], s = sin_t[pair];
            float na, nb;
            rope_rotate(a, b, c, s, na, nb);  // rope_kernel's arithmetic (ops/rope/rope_rotate.cuh)
            x[e] = round_as(second ? nb : na, src);
        }
    }

    if (is_q) {
        if (has) store8(static_cast<T*>(p.q_out) + token * p.q_out_stride + head * hd + lane * 8, x);
        return;
    }

    // The cache row, as kv_write_kernel stores it.
    const int64_t slot = p.slots[token];
    if (slot < 0) return;  // the whole warp: one token
    const float ls = is_k ? p.k_scale : p.v_scale;
    uint8_t* const block = (is_k ? p.kc : p.vc) + (slot / p.block_size) * p.block_bytes;
    const int64_t crow = (slot % p.block_size) * p.n_kv_heads + head;
    if constexpr (KV == KvDtype::Bf16) {
        if (has) {
            uint32_t w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
                w[j] = *reinterpret_cast<const uint32_t*>(&h);
            }
            *reinterpret_cast<uint4*>(block + crow * hd * 2 + lane * 16) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    } else if constexpr (KV == KvDtype::Fp8) {
        if (has) {
            uint32_t lo = 0, hi = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                lo |= kv_fp8_code(x[i], ls) << (8 * i);
                hi |= kv_fp8_code(x[4 + i], ls) << (8 * i);
            }
            *reinterpret_cast<uint2*>(block + crow * hd + lane * 8) = make_uint2(lo, hi);
        }
    } else {
        float amax = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(x[e]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));  // the group: lanes 2g, 2g + 1
        if (has) {
            const uint32_t scale = nvfp4_scale_code(amax, ls);
            const float divisor = nvfp4_divisor(scale, ls);
            uint32_t codes = 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) codes |= nvfp4_code(x[e], divisor) << (4 * e);
            *reinterpret_cast<uint32_t*>(block + crow * (hd / 2) + lane * 4) = codes;
            if (lane % 2 == 0)
                block[static_cast<int64_t>(p.block_size) * p.n_kv_heads * (hd / 2) + crow * (hd / 16) + lane / 2] =
                    static_cast<uint8_t>(scale);
        }
    }
}

template <class T, KvDtype KV>
void launch(const Params& p, bool interleaved, dim3 grid, cudaStream_t stream) {
    if (interleaved)
        launch_pdl(qkv_prepare_kernel<T, KV, true>, grid, dim3(kWarps * 32), 0, stream, p);
    else
        launch_pdl(qkv_prepare_kernel<T, KV, false>, grid, dim3(kWarps * 32), 0, stream, p);
}

template <class T>
void launch_cache(const Params& p, KvDtype dtype, bool interleaved, dim3 grid, cudaStream_t stream) {
    switch (dtype) {
        case KvDtype::Bf16: launch<T, KvDtype::Bf16>(p, interleaved, grid, stream); break;
        case KvDtype::Fp8: launch<T, KvDtype::Fp8>(p, interleaved, grid, stream); break;
        default: launch<T, KvDtype::Nvfp4>(p, interleaved, grid, stream); break;
    }
}

}  // namespace

bool qkv_prepare_supported(int64_t head_dim, int64_t rotary_dim) {
    return head_dim > 0 && head_dim % 16 == 0 && head_dim <= kQkvPrepareMaxHeadDim && rotary_dim >= 0 &&
           rotary_dim % 8 == 0 && rotary_dim <= head_dim;
}

void qk_norm_rope_kv_write(const QkvPrepareArgs& a, cudaStream_t stream) {
    const PagedKvLayer& kv = a.kv;
    if (a.dtype != DType::F32 && a.dtype != DType::BF16)
        throw std::invalid_argument("qk_norm_rope_kv_write: q/k/v must be F32 or BF16");
    if (kv.dtype == KvDtype::F32)
        throw std::invalid_argument("qk_norm_rope_kv_write: the F32 KV cache is host-only");
    if (kv.head_dim <= 0 || kv.head_dim % 16 != 0 || kv.head_dim > kQkvPrepareMaxHeadDim)
        throw std::invalid_argument("qk_norm_rope_kv_write: head_dim " + std::to_string(kv.head_dim) +
                                    " unsupported (a multiple of 16 up to " +
                                    std::to_string(kQkvPrepareMaxHeadDim) + ")");
    if (a.rotary_dim < 0 || a.rotary_dim % 8 != 0 || a.rotary_dim > kv.head_dim)
        throw std::invalid_argument("qk_norm_rope_kv_write: rotary_dim " + std::to_string(a.rotary_dim) +
                                    " unsupported (0, or a multiple of 8 up to head_dim " +
                                    std::to_string(kv.head_dim) + ")");
    if (a.n_heads <= 0 || kv.n_kv_heads <= 0 || a.m < 0)
        throw std::invalid_argument("qk_norm_rope_kv_write: n_heads " + std::to_string(a.n_heads) +
                                    ", n_kv_heads " + std::to_string(kv.n_kv_heads) + ", m " + std::to_string(a.m) +
                                    " (need positive heads, m >= 0)");
    if (kv.block_size <= 0) throw std::invalid_argument("qk_norm_rope_kv_write: bad block size");
    const int64_t q_width = a.n_heads * kv.head_dim, kv_width = kv.n_kv_heads * kv.head_dim;
    // A stride of 0 means contiguous rows; any other keeps every row's 8-element lane loads 16-byte aligned.
    auto stride_of = [](int64_t stride, int64_t width, const char* name) {
        if (stride == 0) return width;
        if (stride < width || stride % 8 != 0)
            throw std::invalid_argument(std::string("qk_norm_rope_kv_write: ") + name + " " + std::to_string(stride) +
                                        " (need 0, or a multiple of 8 elements at least the row's " +
                                        std::to_string(width) + ")");
        return stride;
    };
    const int64_t q_stride = stride_of(a.q_stride, q_width, "q_stride");
    const int64_t k_stride = stride_of(a.k_stride, kv_width, "k_stride");
    const int64_t v_stride = stride_of(a.v_stride, kv_width, "v_stride");
    for (const void* ptr : {static_cast<const void*>(a.q), a.k, a.v, static_cast<const void*>(a.q_out)})
        if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
            throw std::invalid_argument("qk_norm_rope_kv_write: q, k, v and q_out must be 16-byte aligned");
    if (a.m == 0) return;
    const bool separate_q_out = a.q_out != nullptr && a.q_out != a.q;
    // In place, q is untouched (and not even read) without a q norm and without RoPE; a separate q_out
    // receives it all the same.
    const bool touch_q = a.q_norm_weight != nullptr || a.rotary_dim > 0 || separate_q_out;
    const Params p{.q = a.q,
                   .q_out = separate_q_out ? a.q_out : a.q,
                   .k = a.k,
                   .v = a.v,
                   .q_stride = q_stride,
                   .k_stride = k_stride,
                   .v_stride = v_stride,
                   .q_out_stride = separate_q_out ? q_width : q_stride,
                   .n_heads = static_cast<int>(a.n_heads),
                   .n_kv_heads = static_cast<int>(kv.n_kv_heads),
                   .head_dim = static_cast<int>(kv.head_dim),
                   .first_row = touch_q ? 0 : static_cast<int>(a.n_heads),
                   .q_norm = a.q_norm_weight,
                   .k_norm = a.k_norm_weight,
                   .eps = a.norm_eps,
                   .positions = a.positions,
                   .inv_freq = a.inv_freq,
                   .rotary_dim = static_cast<int>(a.rotary_dim),
                   .slots = a.slot_mapping,
                   .kc = kv.k,
                   .vc = kv.v,
                   .block_bytes = kv.block_bytes,
                   .block_size = static_cast<int>(kv.block_size),
                   .k_scale = kv.k_scale,
                   .v_scale = kv.v_scale};
    const int64_t rows = a.n_heads + 2 * kv.n_kv_heads - p.first_row;
    const dim3 grid(static_cast<unsigned>(a.m), static_cast<unsigned>((rows + kWarps - 1) / kWarps));
    if (a.dtype == DType::F32)
        launch_cache<float>(p, kv.dtype, a.interleaved, grid, stream);
    else
        launch_cache<__nv_bfloat16>(p, kv.dtype, a.interleaved, grid, stream);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
