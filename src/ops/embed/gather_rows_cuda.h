// CUDA launcher that gathers rows of an activation matrix into a compact one, converting the dtype on the
// way (the rows that need logits, widened to float32 for the lm_head). Plain C++ plus cuda_runtime.h types.
//   src [*, d] F32 or BF16; rows [n_rows] int32 (device) row indices into src; out [n_rows, d]
// d % 8 == 0 with 16-byte aligned rows (std::invalid_argument otherwise).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

void gather_rows(const void* src, DType src_dtype, int64_t d, const int32_t* rows, int64_t n_rows, void* out,
                 DType out_dtype, cudaStream_t stream);

}  // namespace nibble::cuda
