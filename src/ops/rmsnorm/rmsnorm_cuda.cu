// RMSNorm kernels: one block of 256 threads per row; each thread handles 8-element vectors strided by the
// block. Pass 1 sums squares (and, fused, writes the rounded residual sum); pass 2 re-reads the row (from
// L1: the same thread wrote or read those bytes) and scales it. rsqrtf is within 2 ulp (CUDA guide).
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "cuda/block_sum.cuh"
#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/rmsnorm/rmsnorm_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;

template <class T, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_kernel(const T* x, T* residual, int64_t d, const float* __restrict__ weight, float eps,
                   T* out) {
    __shared__ float scratch[32];
    pdl_enter();  // every input comes from the kernels before
    const int64_t row = blockIdx.x;
    const T* xr = x + row * d;
    T* rr = kResidual ? residual + row * d : nullptr;
    const T* src = kResidual ? rr : xr;  // what pass 2 normalizes
    float ss = 0.0f;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * 8; i < d; i += kThreads * 8) {
        float v[8];
        load8(xr + i, v);
        if constexpr (kResidual) {
            float r[8];
            load8(rr + i, r);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = round_as(v[e] + r[e], rr);
            store8(rr + i, v);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
    }
    ss = block_sum<kThreads>(ss, scratch);
    const float inv = rsqrtf(ss / static_cast<float>(d) + eps);
    T* orow = out + row * d;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * 8; i < d; i += kThreads * 8) {
        float v[8];
        load8(src + i, v);
        const float4 w0 = reinterpret_cast<const float4*>(weight + i)[0];
        const float4 w1 = reinterpret_cast<const float4*>(weight + i)[1];
        const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = w[e] * (v[e] * inv);
        store8(orow + i, v);
    }
}

void check(DType dtype, int64_t m, int64_t d, const char* what) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument(std::string(what) + ": activations must be F32 or BF16");
    if (m < 0 || d <= 0 || d % 8 != 0)
        throw std::invalid_argument(std::string(what) + ": d = " + std::to_string(d) + " must be a positive multiple of 8");
}

template <class T, bool kResidual>
void launch(const void* x, void* residual, int64_t m, int64_t d, const float* weight, float eps, void* out,
            cudaStream_t stream) {
    if (m == 0) return;
    launch_pdl(rmsnorm_kernel<T, kResidual>, dim3(static_cast<unsigned>(m)), dim3(kThreads), 0, stream,
               static_cast<const T*>(x), static_cast<T*>(residual), d, weight, eps, static_cast<T*>(out));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rmsnorm(const void* x, DType dtype, int64_t m, int64_t d, const float* weight, float eps, void* out,
             cudaStream_t stream) {
    check(dtype, m, d, "rmsnorm");
    if (dtype == DType::F32) launch<float, false>(x, nullptr, m, d, weight, eps, out, stream);
    else launch<__nv_bfloat16, false>(x, nullptr, m, d, weight, eps, out, stream);
}

void rmsnorm_residual(const void* x, void* residual, DType dtype, int64_t m, int64_t d, const float* weight,
                      float eps, void* out, cudaStream_t stream) {
    check(dtype, m, d, "rmsnorm_residual");
    if (dtype == DType::F32) launch<float, true>(x, residual, m, d, weight, eps, out, stream);
    else launch<__nv_bfloat16, true>(x, residual, m, d, weight, eps, out, stream);
}

}  // namespace nibble::cuda
