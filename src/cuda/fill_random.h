// Fills device memory with pseudo-random 32-bit words (a counter hash: fast, deterministic per seed),
// shaped by masks: word = (hash & and_mask) | or_mask. For benchmarks, which need large non-zero,
// non-trivial device data without a host round trip. Plain C++ plus cuda_runtime.h types.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace nibble::cuda {

//   words [n_words] (device)
void fill_random_u32(uint32_t* words, size_t n_words, uint64_t seed, uint32_t and_mask, uint32_t or_mask,
                     cudaStream_t stream);

}  // namespace nibble::cuda
