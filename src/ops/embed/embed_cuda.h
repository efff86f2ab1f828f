// CUDA launcher for the embedding gather: rows of a BF16 table to F32 or BF16 activations (exact: BF16
// to F32 widens without rounding). Plain C++ plus cuda_runtime.h types.
//   table [vocab, d] BF16 (d % 8 == 0, 16-byte aligned); tokens [m] int32 (device); out [m, d]
// Token ids are validated by the caller on the host (embed_cpu's check); a device kernel cannot throw,
// so an id outside [0, vocab) yields a row of NaN rather than an out-of-bounds read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::cuda {

void embed(const uint16_t* table, int64_t vocab, int64_t d, const int32_t* tokens, int64_t m, DType out_dtype,
           void* out, cudaStream_t stream);

// One tensor-parallel rank's share of the embedding (vocabulary-parallel): table [rows, d] holds vocabulary
// rows [row_begin, row_begin + rows); a token outside them embeds as zeros, so that the sum over ranks (an
// all-reduce) leaves exactly its one row.
void embed_shard(const uint16_t* table, int64_t row_begin, int64_t rows, int64_t d, const int32_t* tokens, int64_t m,
                 DType out_dtype, void* out, cudaStream_t stream);

}  // namespace nibble::cuda
