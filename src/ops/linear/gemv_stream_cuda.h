// NVFP4 decode GEMV, "stream" family: y[m, n] = x[m, k] W^T (+ bias) for m = 1..8 (larger m runs in launches
// of 8 tokens, streaming the weights again), on the CUDA cores, organised for bytes in flight like
// gemv_fp8 (linear_cuda.cu): a warp owns 2 weight rows, each lane loads U 16-byte code chunks (and their
// E4M3 scale pairs) of both rows a step, the next step's loads issued while this step computes, so a warp
// keeps ~2 U KB of weights in flight at ~60-90 registers (gemv_stream_cuda.cu explains). Candidates beside
// gemv_nvfp4 / gemv_nvfp4_fused / gemv_nvfp4_gate_up_silu (linear_cuda.h), same contracts. The decoder
// forward dispatches one-token gate/up + SwiGLU here, where it measured faster (`nibble-kernel-bench
// stream`); one-token q/k/v measured 4-11% faster alone (`qkv`) but within +-2% in the whole models, and
// stays on the tensor-core kernel (docs/perf.md, session 8).
//
// Layouts and preconditions: those of linear_cuda.h (x, y [m, n] in F32 or BF16, 16-byte aligned; NVFP4
// packed [n, k / 2], scales [n, k / 16] E4M3, k % 32 == 0; bias [n] float32 or null). Checked:
// std::invalid_argument naming the launcher and the problem.
//
// Every launch uses programmatic dependent launch (cuda/pdl.cuh): its CTAs may start while the previous
// kernel in the stream still runs, load their first weights (constants) and then wait for it before
// reading x, the biases or writing y. Precondition: the previous kernel does not write these weights or
// scales. Without a programmatic predecessor it is an ordinary launch.
//
// chunks_per_lane: U, the 16-byte code chunks a lane loads per row and step: 2 or 4, 0 = by size (4 below
// 24 M weights a launch, 2 from there on).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/linear/linear_cuda.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

void gemv_nvfp4_stream(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                       cudaStream_t stream, int chunks_per_lane = 0);

// 1..3 projections of the same x (same k; each its own global scale, bias and output) in one launch, e.g.
// q, k and v. Projections with n = 0 are skipped. As gemv_nvfp4_fused.
void gemv_nvfp4_stream_fused(const void* x, DType dtype, int64_t m, const Nvfp4Projection* projections, int count,
                             cudaStream_t stream, int chunks_per_lane = 0);

// h[m, n] = silu(x gate^T + gate_bias) * (x up^T + up_bias), silu(g) = g / (1 + e^-g) in float32, h in the
// activations' dtype; gate and up [n, k] NVFP4 with their own global scales. As gemv_nvfp4_gate_up_silu.
void gemv_nvfp4_stream_gate_up_silu(const void* x, DType dtype, int64_t m, const Nvfp4DeviceWeight& gate,
                                    const float* gate_bias, const Nvfp4DeviceWeight& up, const float* up_bias,
                                    void* h, cudaStream_t stream, int chunks_per_lane = 0);

}  // namespace nibble::cuda
