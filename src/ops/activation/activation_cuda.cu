// SwiGLU kernel: a grid-stride loop over vectors of 8 elements (16-byte accesses), scalar tail.
#include <cuda_bf16.h>

#include <algorithm>
#include <stdexcept>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/activation/activation_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

template <class T>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const T* gate, const T* up, int64_t n, T* out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    const int64_t vecs = n / 8;
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < vecs; v += stride) {
        float g[8], u[8];
        load8(gate + v * 8, g);
        load8(up + v * 8, u);
#pragma unroll
        for (int e = 0; e < 8; ++e) g[e] = silu_mul1(g[e], u[e]);
        store8(out + v * 8, g);
    }
    for (int64_t i = vecs * 8 + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
        store1(out + i, silu_mul1(load1(gate + i), load1(up + i)));
}

__device__ __forceinline__ float relu2_1(float v) { return v > 0.0f ? v * v : 0.0f; }

template <class T>
__global__ void __launch_bounds__(kThreads) relu2_kernel(const T* x, int64_t n, T* out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    const int64_t vecs = n / 8;
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < vecs; v += stride) {
        float a[8];
        load8(x + v * 8, a);
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] = relu2_1(a[e]);
        store8(out + v * 8, a);
    }
    for (int64_t i = vecs * 8 + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
        store1(out + i, relu2_1(load1(x + i)));
}

}  // namespace

void relu2(const void* x, DType dtype, int64_t n, void* out, cudaStream_t stream) {
    if (dtype != DType::F32 && dtype != DType::BF16) throw std::invalid_argument("relu2: activations must be F32 or BF16");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out)) % 16 != 0)
        throw std::invalid_argument("relu2: x and out must be 16-byte aligned");
    if (n <= 0) return;
    const int64_t blocks = std::min<int64_t>((n / 8 + kThreads) / kThreads, 132 * 16);
    if (dtype == DType::F32)
        launch_pdl(relu2_kernel<float>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                   static_cast<const float*>(x), n, static_cast<float*>(out));
    else
        launch_pdl(relu2_kernel<__nv_bfloat16>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                   stream, static_cast<const __nv_bfloat16*>(x), n, static_cast<__nv_bfloat16*>(out));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void silu_mul(const void* gate, const void* up, DType dtype, int64_t n, void* out, cudaStream_t stream) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        throw std::invalid_argument("silu_mul: activations must be F32 or BF16");
    if ((reinterpret_cast<uintptr_t>(gate) | reinterpret_cast<uintptr_t>(up) | reinterpret_cast<uintptr_t>(out)) %
            16 != 0)
        throw std::invalid_argument("silu_mul: gate, up and out must be 16-byte aligned");
    if (n <= 0) return;
    const int64_t blocks = std::min<int64_t>((n / 8 + kThreads) / kThreads, 132 * 16);
    if (dtype == DType::F32)
        launch_pdl(silu_mul_kernel<float>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                   static_cast<const float*>(gate), static_cast<const float*>(up), n,
                   static_cast<float*>(out));
    else
        launch_pdl(silu_mul_kernel<__nv_bfloat16>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                   stream, static_cast<const __nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up), n,
                   static_cast<__nv_bfloat16*>(out));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
