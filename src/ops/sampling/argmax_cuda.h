// CUDA launcher for greedy sampling on the device: the index of each row's largest logit, so a greedy step
// copies one int32 per sequence to the host instead of a vocabulary of floats. The first index wins ties
// (as std::max_element, the CPU sampler's rule); NaN entries are never chosen (a row of NaN gives 0).
// Plain C++ plus cuda_runtime.h types.
//   logits [n_rows, vocab] float32; tokens [n_rows] int32 (device)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nibble::cuda {

void argmax_rows(const float* logits, int64_t n_rows, int64_t vocab, int32_t* tokens, cudaStream_t stream);

}  // namespace nibble::cuda
