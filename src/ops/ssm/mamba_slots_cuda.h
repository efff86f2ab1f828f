// A device pool of per-sequence Mamba states (hybrid models on the CUDA backend) and the per-step tables
// that point the Mamba launchers of ssm_cuda.h at each batch sequence's slot. Plain C++ plus
// cuda_runtime.h types: includable from host code.
//
// Layout: slot i holds every Mamba layer's state contiguously (one copy saves or restores a slot):
//   conv [n_slots, n_layers, conv_elems] float32      ssm [n_slots, n_layers, ssm_elems] float32 or bfloat16
// The last slot (n_slots - 1) is scratch: a batch sequence whose slot is negative or out of range (the
// padding sequences of a replayed CUDA graph, slot -1) computes into it, touching no real slot.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/ssm/ssm_state.h"

namespace nibble::cuda {

struct MambaSlotPool {
    float* conv = nullptr;  // [n_slots, n_layers, conv_elems]
    void* ssm = nullptr;    // [n_slots, n_layers, ssm_elems] of ssm_dtype
    int64_t n_slots = 0, n_layers = 0, conv_elems = 0, ssm_elems = 0;
    SsmStateDtype ssm_dtype = SsmStateDtype::F32;

    int64_t scratch() const { return n_slots - 1; }
    int64_t ssm_elem_bytes() const { return ssm_dtype == SsmStateDtype::F32 ? 4 : 2; }
    int64_t conv_slot_bytes() const { return n_layers * conv_elems * 4; }
    int64_t ssm_slot_bytes() const { return n_layers * ssm_elems * ssm_elem_bytes(); }
    // The slot a batch sequence with state slot `slot` computes in.
    int64_t resolve(int32_t slot) const { return slot >= 0 && slot < scratch() ? slot : scratch(); }
};

// For the n_seqs sequences of a step (slots, start_pos [n_seqs] int32, device): first zeroes the whole
// state (every layer) of each sequence that starts at position 0 (a new or recomputed sequence, as the
// CPU model resets its MambaState), then fills, for each Mamba layer l and sequence s,
//   conv_ptrs[l * n_seqs + s] = pool.conv + (resolve(slots[s]) * n_layers + l) * conv_elems
//   ssm_ptrs [l * n_seqs + s] = pool.ssm  + (resolve(slots[s]) * n_layers + l) * ssm_elems (elements)
// conv_ptrs, ssm_ptrs: device arrays [n_layers * n_seqs]. Two real sequences must not share a slot.
void mamba_slot_tables(const MambaSlotPool& pool, const int32_t* slots, const int32_t* start_pos, int64_t n_seqs,
                       float** conv_ptrs, void** ssm_ptrs, cudaStream_t stream);

}  // namespace nibble::cuda
