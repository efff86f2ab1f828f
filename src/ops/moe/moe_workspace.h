// The layout of the CUDA MoE forward's workspace (moe_cuda.h, moe_experts_nvfp4) as plain C++: moe_cuda.cu
// carves the workspace by it, and the memory plan (engine/memory_plan.h) counts the same bytes in builds
// without CUDA.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nibble {

// Byte offsets of each part in one allocation, each part starting 16-byte aligned, for m tokens routed to
// top_k experts each (pairs = m * top_k):
//   counts [n_experts] int32, offsets [n_experts + 1] int32, sorted and position [pairs] int32 each,
//   active [n_experts] int32, n_active [1] int32 (the permutation);
//   h [pairs, n_ff] float32 (each pair's expert hidden row), o [pairs, n_embd] float32 (its expert output).
struct MoeWorkspaceLayout {
    size_t counts = 0, offsets = 0, sorted = 0, position = 0, active = 0, n_active = 0, h = 0, o = 0;
    size_t total = 0;  // bytes of the whole workspace
};

// Arguments are not checked here (cuda::moe_workspace_bytes checks them); all must be >= 0.
inline MoeWorkspaceLayout moe_workspace_layout(int64_t m, int64_t top_k, int64_t n_experts, int64_t n_embd,
                                               int64_t n_ff) {
    const auto pairs = static_cast<size_t>(m * top_k), ne = static_cast<size_t>(n_experts);
    MoeWorkspaceLayout l;
    size_t at = 0;
    auto take = [&at](size_t bytes) {
        const size_t here = at;
        at += (bytes + 15) & ~size_t{15};
        return here;
    };
    l.counts = take(ne * 4);
    l.offsets = take((ne + 1) * 4);
    l.sorted = take(pairs * 4);
    l.position = take(pairs * 4);
    l.active = take(ne * 4);
    l.n_active = take(4);
    l.h = take(pairs * static_cast<size_t>(n_ff) * 4);
    l.o = take(pairs * static_cast<size_t>(n_embd) * 4);
    l.total = at;
    return l;
}

}  // namespace nibble
