// The shared-expert gate: one warp per token row; lanes stride over the row in vectors of 8 (16-byte loads),
// a warp sum of the float32 dot product, then the same lanes scale the row by its sigmoid.
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/moe/shared_expert_gate_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kWarps = 4;  // token rows per CTA

template <class T>
__global__ void __launch_bounds__(kWarps * 32)
    shared_expert_gate_kernel(const T* x, const __nv_bfloat16* gate, int64_t m, int64_t n_embd, T* rows) {
    pdl_enter();  // x and rows come from the kernels before (cuda/pdl.cuh)
    const int lane = threadIdx.x & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    if (t >= m) return;  // the whole warp
    const int64_t vecs = n_embd / 8;
    const T* xt = x + t * n_embd;
    float dot = 0.0f;
    for (int64_t v = lane; v < vecs; v += 32) {
        float xv[8], gv[8];
        load8(xt + v * 8, xv);
        load8(gate + v * 8, gv);
#pragma unroll
        for (int j = 0; j < 8; ++j) dot = fmaf(xv[j], gv[j], dot);
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float s = 1.0f / (1.0f + expf(-dot));
    T* r = rows + t * n_embd;
    for (int64_t v = lane; v < vecs; v += 32) {
        float rv[8];
        load8(r + v * 8, rv);
#pragma unroll
        for (int j = 0; j < 8; ++j) rv[j] *= s;
        store8(r + v * 8, rv);
    }
}

void bad(const std::string& what) { throw std::invalid_argument("shared_expert_gate: " + what); }

}  // namespace

void shared_expert_gate(const void* x, DType dtype, int64_t m, int64_t n_embd, const uint16_t* gate, void* rows,
                        cudaStream_t stream) {
    if (dtype != DType::F32 && dtype != DType::BF16) bad("activations must be F32 or BF16");
    if (n_embd <= 0 || n_embd % 8 != 0) bad("n_embd " + std::to_string(n_embd) + " must be a positive multiple of 8");
    if (m < 0 || m > 0x7fffffff) bad("m " + std::to_string(m) + " out of range");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(rows) | reinterpret_cast<uintptr_t>(gate)) %
            16 != 0)
        bad("x, rows and gate must be 16-byte aligned");
    if (x == rows) bad("rows must not alias x");
    if (m == 0) return;
    const dim3 grid(static_cast<unsigned>((m + kWarps - 1) / kWarps));
    const auto* g = reinterpret_cast<const __nv_bfloat16*>(gate);
    if (dtype == DType::F32)
        launch_pdl(shared_expert_gate_kernel<float>, grid, dim3(kWarps * 32), 0, stream, static_cast<const float*>(x),
                   g, m, n_embd, static_cast<float*>(rows));
    else
        launch_pdl(shared_expert_gate_kernel<__nv_bfloat16>, grid, dim3(kWarps * 32), 0, stream,
                   static_cast<const __nv_bfloat16*>(x), g, m, n_embd, static_cast<__nv_bfloat16*>(rows));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
