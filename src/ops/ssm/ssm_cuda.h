// CUDA launchers of the Mamba2 mixer's ops (ops/ssm/ssm.h holds the semantics and the CPU references):
// the causal conv1d over x/B/C with its rolling state, the selective scan with its recurrent state, and
// the grouped gated RMSNorm. Plain C++ plus cuda_runtime.h types: includable from host code.
//
// A batch holds n_seqs sequences of consecutive token rows: seq_starts [n_seqs + 1] int32 (device), the
// rows of sequence s are seq_starts[s] .. seq_starts[s + 1] - 1 (seq_starts[0] = 0, seq_starts[n_seqs] =
// n_tokens; a sequence may be empty). Prefill (one long sequence), decode (n_seqs sequences of one
// token) and mixed batches use the same launchers. Each sequence brings its own state for the layer, as
// device arrays of pointers [n_seqs] (ops/ssm/ssm_state.h's layout of one layer):
//   conv state [conv_kernel - 1, channels] float32, oldest row first
//   SSM state  [n_heads, head_dim, state_size] float32 or bfloat16 (SsmStateDtype)
// Activations (x, xbc, dt, y, z, out) share one dtype, F32 or BF16; all arithmetic is float32.
//
// Costs: the conv is parallel over (token, channel) plus a per-(sequence, channel) state shift. The scan
// is sequential over time within a sequence and parallel over (sequence, head, head_dim row), one warp
// per row with the state_size values of the row in registers (state_size / 32 per lane; the next
// token's inputs load during the current step): per token a warp does state_size FMA pairs and a
// 5-shuffle reduction, so a prefill of L tokens costs L dependent steps (a few hundred cycles each:
// expf, log1pf, the FMAs, 5 shuffles) however many heads run beside it, i.e. O(L) latency instead of
// the O(L / chunk) of a chunked scan. ssm_scan_chunked (below) is that scan, parallel over time, for
// long prompts; decode (L = 1) is already a single step.
// Preconditions (std::invalid_argument): conv kernel 1..8; state_size 1..256; n_heads a multiple of
// n_groups; d a multiple of group_size.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/ssm/ssm.h"
#include "ops/ssm/ssm_state.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

// out = silu(causal depthwise conv1d(x) + bias) continuing each sequence's conv state, which is then
// advanced to the sequence's last kernel - 1 inputs.
//   x [n_tokens, channels] rows x_stride elements apart; weight [channels, kernel] float32 (tap kernel - 1
//   multiplies the current input); bias [channels] float32 or null; out [n_tokens, channels] (not x)
void mamba_conv1d(const void* x, DType dtype, int64_t x_stride, int64_t n_tokens, int64_t channels,
                  const int32_t* seq_starts, int64_t n_seqs, const float* weight, const float* bias,
                  int64_t kernel, float* const* conv_states, void* out, cudaStream_t stream);

// Selective scan of each sequence from its SSM state, which is updated (a bfloat16 state is widened at
// the start and rounded once at the end). p's A, D, dt_bias are device pointers [n_heads] float32.
//   xbc [n_tokens, ...] rows xbc_stride apart: x [n_heads * head_dim], B [n_groups * state_size], C
//   (the conv output); dt [n_tokens, n_heads] raw rows dt_stride apart; y [n_tokens, n_heads * head_dim]
void ssm_scan(const SsmScanParams& p, int64_t n_tokens, const int32_t* seq_starts, int64_t n_seqs,
              const void* xbc, int64_t xbc_stride, const void* dt, int64_t dt_stride, DType dtype,
              void* const* ssm_states, SsmStateDtype state_dtype, void* y, cudaStream_t stream);

// The same scan, chunked (SSD) for prefill: each sequence's tokens in chunks of 64, within a chunk the
// quadratic form (C B^T masked by the cumulative decays, times dt x) plus the decayed entering state
// (C . h_in), a pass over the chunks carrying the state from the slot's, the final state written back
// (bfloat16: rounded once). Equal to ssm_scan in exact arithmetic; in float32 the sums run in another
// order and the decays come from segment sums of dt A (ssm_cuda.cu and tests/device/ssm_cuda_test.cpp
// give the bound). Four launches, parallel over (chunk, head); no host sync (graph-capturable).
// workspace: ssm_scan_chunked_workspace_bytes(p, n_tokens, n_seqs) bytes of device memory, any content;
// about (n_seqs + n_tokens / 64) * n_heads * head_dim * state_size * 4 bytes (the chunk states).
size_t ssm_scan_chunked_workspace_bytes(const SsmScanParams& p, int64_t n_tokens, int64_t n_seqs);
void ssm_scan_chunked(const SsmScanParams& p, int64_t n_tokens, const int32_t* seq_starts, int64_t n_seqs,
                      const void* xbc, int64_t xbc_stride, const void* dt, int64_t dt_stride, DType dtype,
                      void* const* ssm_states, SsmStateDtype state_dtype, void* y, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);

// out = weight * g / rms(g) per group of group_size, g = y * silu(z) (gated_rmsnorm_cpu).
//   y, out [m, d] (may alias); z [m, d] rows z_stride apart; weight [d] float32
void gated_rmsnorm(const void* y, const void* z, int64_t z_stride, DType dtype, int64_t m, int64_t d,
                   int64_t group_size, const float* weight, float eps, void* out, cudaStream_t stream);

}  // namespace nibble::cuda
