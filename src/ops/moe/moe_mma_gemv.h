// The NVFP4 expert GEMV of decode-sized MoE steps on the tensor cores (ops/moe/moe_mma_gemv_cuda.cu), called
// by the launchers of ops/moe/moe_cuda.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe_cuda.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

enum class MoeGemvOp {
    Down,    // out[p] = W_down x[p] (x: h in sorted-position order, float32)
    SwiGlu,  // out[p] = SiLU(W_gate x[t]) * (W_up x[t]), t = sorted_pairs[p] / top_k
    Relu2,   // out[p] = relu(W_up x[t])^2
};

// How the kernel splits an expert's rows and k over a CTA (moe_mma_gemv_layout): warps of 16 output rows,
// k in spans of 128 (4 lanes x 32 codes), k_splits warps sharing a row group, each over at most
// spans_per_warp spans; supported = false past what its registers hold (k > 4096 for SwiGLU, 8192 otherwise)
// or when k is not a multiple of 32.
struct MoeMmaGemvLayout {
    bool supported = false;
    int k_splits = 0, spans_per_warp = 0, row_groups = 0, warps = 0;
};
MoeMmaGemvLayout moe_mma_gemv_layout(int64_t k, MoeGemvOp op);

// Whether the launchers of moe_cuda.cu take this kernel: steps of 2 or more tokens (measured on H100 against
// the CUDA-core register GEMV, `nibble-kernel-bench moe`, docs/perf.md session 10; up / down us at m = 8, 32,
// 64: Qwen3-30B-A3B 56.1 / 31.9, 127.0 / 73.7, 176.5 / 100.5 against 61.2 / 32.6, 193.2 / 97.1, 353.4 /
// 165.5; Nemotron-3-Nano 91.0 / 80.6, 255.1 / 219.3, 367.4 / 314.8 against 90.7 / 77.7, 312.6 / 249.1, 558.1
// / 433.9). One-token steps stay on the register GEMV, as fast there (Qwen3 up 10.0 against 9.9 us; tg128 393
// against 398 tok/s): both wait on one wave of weight loads.
bool moe_mma_gemv_preferred(int64_t m, int64_t k, MoeGemvOp op);

// out[p, :] for every sorted position p of the active experts (perm), NVFP4 weights w1s[e] (up or down) and,
// for SwiGlu, w0s[e] (gate); x: float32 or BF16 (Down: float32). m: tokens of the step, grid_y: the active
// slots to cover (min(m * top_k, n_experts)). Returns false, launching nothing, when the layout is not
// supported (the caller runs another kernel).
bool moe_mma_gemv(const void* x, DType x_dtype, MoeGemvOp op, int64_t k, int64_t top_k,
                  const Nvfp4DeviceWeight* w0s, const Nvfp4DeviceWeight* w1s, int64_t n, int64_t grid_y,
                  int64_t m, const MoePermutation& perm, float* out, cudaStream_t stream);

}  // namespace nibble::cuda
