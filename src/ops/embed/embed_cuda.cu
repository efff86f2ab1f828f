// Embedding gather kernel: one block per token, 16-byte vectors of 8 BF16 values per thread.
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/embed/embed_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 128;

// Rows [row_begin, row_begin + rows) of the vocabulary are in `table`. A token outside them gives NaN
// (unsharded: an invalid id) or zeros (a vocabulary shard: another rank holds its row).
template <class T>
__global__ void __launch_bounds__(kThreads)
    embed_kernel(const __nv_bfloat16* __restrict__ table, int64_t row_begin, int64_t rows, int64_t d,
                 const int32_t* __restrict__ tokens, bool outside_is_zero, T* __restrict__ out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t i = blockIdx.x;
    const int64_t row = static_cast<int64_t>(tokens[i]) - row_begin;
    const bool valid = row >= 0 && row < rows;
    const __nv_bfloat16* src = table + (valid ? row : 0) * d;
    const float fill = outside_is_zero ? 0.0f : __uint_as_float(0x7fffffffu);
    T* dst = out + i * d;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * 8; c < d; c += kThreads * 8) {
        float v[8];
        if (valid) {
            load8(src + c, v);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = fill;
        }
        store8(dst + c, v);
    }
}

void launch_embed(const uint16_t* table, int64_t row_begin, int64_t rows, int64_t d, const int32_t* tokens,
                  int64_t m, bool outside_is_zero, DType out_dtype, void* out, cudaStream_t stream) {
    if (out_dtype != DType::F32 && out_dtype != DType::BF16)
        throw std::invalid_argument("embed: output must be F32 or BF16");
    if (d <= 0 || d % 8 != 0) throw std::invalid_argument("embed: d = " + std::to_string(d) + " must be a multiple of 8");
    if (m <= 0) return;
    const auto* t = reinterpret_cast<const __nv_bfloat16*>(table);
    if (out_dtype == DType::F32)
        launch_pdl(embed_kernel<float>, dim3(static_cast<unsigned>(m)), dim3(kThreads), 0, stream, t,
                   row_begin, rows, d, tokens, outside_is_zero, static_cast<float*>(out));
    else
        launch_pdl(embed_kernel<__nv_bfloat16>, dim3(static_cast<unsigned>(m)), dim3(kThreads), 0, stream, t,
                   row_begin, rows, d, tokens, outside_is_zero, static_cast<__nv_bfloat16*>(out));
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void embed(const uint16_t* table, int64_t vocab, int64_t d, const int32_t* tokens, int64_t m, DType out_dtype,
           void* out, cudaStream_t stream) {
    launch_embed(table, 0, vocab, d, tokens, m, false, out_dtype, out, stream);
}

void embed_shard(const uint16_t* table, int64_t row_begin, int64_t rows, int64_t d, const int32_t* tokens, int64_t m,
                 DType out_dtype, void* out, cudaStream_t stream) {
    if (row_begin < 0 || rows < 0) throw std::invalid_argument("embed_shard: negative row range");
    launch_embed(table, row_begin, rows, d, tokens, m, true, out_dtype, out, stream);
}

}  // namespace nibble::cuda
