// The slot tables of mamba_slots_cuda.h: one kernel zeroes the states of sequences starting at position 0
// (grid-stride over the slot's words, one CTA row per sequence), one fills the pointer tables.
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "ops/ssm/mamba_slots_cuda.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t resolve_slot(int32_t slot, int64_t n_slots) {
    return slot >= 0 && slot < n_slots - 1 ? slot : n_slots - 1;
}

// grid (chunks, n_seqs): zeroes conv_words float32 and ssm_words 32-bit words of each fresh sequence's slot.
__global__ void __launch_bounds__(kThreads)
    zero_fresh_kernel(float* conv, uint32_t* ssm, int64_t n_slots, int64_t conv_words, int64_t ssm_words,
                      const int32_t* __restrict__ slots, const int32_t* __restrict__ start_pos) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int s = blockIdx.y;
    if (start_pos[s] != 0) return;
    const int64_t slot = resolve_slot(slots[s], n_slots);
    float* c = conv + slot * conv_words;
    uint32_t* h = ssm + slot * ssm_words;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < conv_words; i += stride) c[i] = 0.0f;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < ssm_words; i += stride) h[i] = 0u;
}

__global__ void __launch_bounds__(kThreads)
    tables_kernel(float* conv, char* ssm, int64_t n_slots, int64_t n_layers, int64_t conv_elems,
                  int64_t ssm_layer_bytes, const int32_t* __restrict__ slots, int64_t n_seqs, float** conv_ptrs,
                  void** ssm_ptrs) {
    pdl_enter();  // inputs come from the kernels before (cuda/pdl.cuh)
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (idx >= n_layers * n_seqs) return;
    const int64_t l = idx / n_seqs, s = idx - l * n_seqs;
    const int64_t at = resolve_slot(slots[s], n_slots) * n_layers + l;
    conv_ptrs[idx] = conv + at * conv_elems;
    ssm_ptrs[idx] = ssm + at * ssm_layer_bytes;
}

}  // namespace

void mamba_slot_tables(const MambaSlotPool& pool, const int32_t* slots, const int32_t* start_pos, int64_t n_seqs,
                       float** conv_ptrs, void** ssm_ptrs, cudaStream_t stream) {
    if (pool.n_slots < 1 || pool.n_layers < 1 || pool.conv_elems < 0 || pool.ssm_elems < 1 || n_seqs < 1 ||
        n_seqs > 65535 || pool.conv == nullptr || pool.ssm == nullptr)
        throw std::invalid_argument("mamba_slot_tables: " + std::to_string(pool.n_slots) + " slots of " +
                                    std::to_string(pool.n_layers) + " layers, " + std::to_string(n_seqs) +
                                    " sequences (need a pool and 1..65535 sequences)");
    if (pool.ssm_slot_bytes() % 4 != 0)
        throw std::invalid_argument("mamba_slot_tables: a slot's SSM state must be whole 32-bit words");
    const int64_t conv_words = pool.n_layers * pool.conv_elems, ssm_words = pool.ssm_slot_bytes() / 4;
    const int64_t most = conv_words > ssm_words ? conv_words : ssm_words;
    int64_t chunks = (most + kThreads - 1) / kThreads;
    if (chunks > 128) chunks = 128;  // grid-stride beyond; a fresh sequence is rare next to decode steps
    launch_pdl(zero_fresh_kernel, dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(n_seqs)),
               dim3(kThreads), 0, stream, pool.conv, static_cast<uint32_t*>(pool.ssm), pool.n_slots,
               conv_words, ssm_words, slots, start_pos);
    const int64_t n = pool.n_layers * n_seqs;
    launch_pdl(tables_kernel, dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)), dim3(kThreads), 0,
               stream, pool.conv, static_cast<char*>(pool.ssm), pool.n_slots, pool.n_layers, pool.conv_elems,
               pool.ssm_elems * pool.ssm_elem_bytes(), slots, n_seqs, conv_ptrs, ssm_ptrs);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
