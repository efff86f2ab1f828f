// fill_random_u32: a grid-stride loop hashing (seed, index) with the splitmix64 finalizer.
#include "cuda/cuda_check.h"
#include "cuda/fill_random.h"

namespace nibble::cuda {
namespace {

__global__ void fill_kernel(uint32_t* words, size_t n, uint64_t seed, uint32_t and_mask, uint32_t or_mask) {
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        words[i] = (static_cast<uint32_t>(z) & and_mask) | or_mask;
    }
}

}  // namespace

void fill_random_u32(uint32_t* words, size_t n_words, uint64_t seed, uint32_t and_mask, uint32_t or_mask,
                     cudaStream_t stream) {
    if (n_words == 0) return;
    fill_kernel<<<132 * 8, 256, 0, stream>>>(words, n_words, seed, and_mask, or_mask);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
