#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "cuda/pdl.cuh"
#include "cuda/vec8.cuh"
#include "ops/embed/gather_rows_cuda.h"

namespace nibble::cuda {
namespace {

// One block per output row; each thread moves 8 values per iteration.
template <class In, class Out>
__global__ void gather_rows_kernel(const In* __restrict__ src, int64_t d, const int32_t* __restrict__ rows,
                                   Out* __restrict__ out) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const In* s = src + static_cast<int64_t>(rows[blockIdx.x]) * d;
    Out* o = out + static_cast<int64_t>(blockIdx.x) * d;
    for (int64_t c = 8 * static_cast<int64_t>(threadIdx.x); c < d; c += 8 * blockDim.x) {
        float v[8];
        load8(s + c, v);
        store8(o + c, v);
    }
}

template <class In>
void launch_for_out(const In* src, int64_t d, const int32_t* rows, int64_t n, void* out, DType out_dtype,
                    cudaStream_t stream) {
    if (out_dtype == DType::F32)
        launch_pdl(gather_rows_kernel<In, float>, dim3(static_cast<unsigned>(n)), dim3(128), 0, stream, src,
                   d, rows, static_cast<float*>(out));
    else
        launch_pdl(gather_rows_kernel<In, __nv_bfloat16>, dim3(static_cast<unsigned>(n)), dim3(128), 0,
                   stream, src, d, rows, static_cast<__nv_bfloat16*>(out));
}

}  // namespace

void gather_rows(const void* src, DType src_dtype, int64_t d, const int32_t* rows, int64_t n_rows, void* out,
                 DType out_dtype, cudaStream_t stream) {
    auto ok = [](DType t) { return t == DType::F32 || t == DType::BF16; };
    if (!ok(src_dtype) || !ok(out_dtype)) throw std::invalid_argument("gather_rows: dtypes must be F32 or BF16");
    if (d <= 0 || d % 8 != 0) throw std::invalid_argument("gather_rows: d = " + std::to_string(d) + " is not a positive multiple of 8");
    if (n_rows <= 0) return;
    if (n_rows > 0x7fffffff) throw std::invalid_argument("gather_rows: too many rows");
    if (src_dtype == DType::F32)
        launch_for_out(static_cast<const float*>(src), d, rows, n_rows, out, out_dtype, stream);
    else
        launch_for_out(static_cast<const __nv_bfloat16*>(src), d, rows, n_rows, out, out_dtype, stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw std::runtime_error(std::string("gather_rows: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace nibble::cuda
