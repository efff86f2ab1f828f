// The Mamba2 mixer's ops and their CPU references: the causal depthwise conv1d over x/B/C with its rolling
// state, the selective scan (SSD) with its recurrent state, and the grouped gated RMSNorm. Semantics are
// transformers' NemotronHMamba2Mixer.torch_forward (models/nemotron_h/modeling_nemotron_h.py) and the
// mamba_ssm kernels it stands in for.
//
// Per sequence and Mamba layer the state is
//   conv  [conv_kernel - 1, conv_dim]   the last K-1 conv inputs (x, B, C before the conv), oldest first
//   ssm   [n_heads, head_dim, state]    h of the recurrence, float32 while computing
// and a sequence with no tokens computed starts from zeros (transformers' zero padding / zero state).
//
// The scan is the sequential recurrence, for prefill as for decode (one token at a time, per head):
//   dt = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max);  dA = exp(dt * A), A = -exp(A_log)
//   h  = h * dA + dt * (B_g outer x);   y = h . C_g + D * x      (g = the head's group)
// which is what transformers' chunked SSD computes in closed form (equal up to float rounding); a chunked
// scan is a CUDA-side optimisation. transformers' torch path clamps dt below at time_step_min only, the
// mamba_ssm kernels clamp to time_step_limit (default (0, inf)): we follow the kernels (what the real
// checkpoints run with); the golden fixtures keep dt above time_step_min so both agree there.
#pragma once

#include <cstdint>

#include "base/thread_pool.h"

namespace nibble {

// Causal depthwise conv1d with SiLU, continuing from `state`, which is advanced over the n inputs.
//   x [n, channels] rows `x_stride` apart; weight [channels, kernel] (tap kernel-1 multiplies the current
//   input); bias [channels] or nullptr; state [kernel - 1, channels]; out [n, channels] (must not alias x)
void mamba_conv1d_cpu(const float* x, int64_t x_stride, int64_t n, int64_t channels, const float* weight,
                      const float* bias, int64_t kernel, float* state, float* out);

struct SsmScanParams {
    int64_t n_heads = 0, head_dim = 0, state_size = 0, n_groups = 1;
    const float* A = nullptr;        // [n_heads] = -exp(A_log)
    const float* D = nullptr;        // [n_heads]
    const float* dt_bias = nullptr;  // [n_heads]
    float dt_min = 0.0f, dt_max = 0.0f;
};

// Selective scan over n tokens, continuing from and updating `state` [n_heads, head_dim, state_size].
//   xbc [n, ...] rows `xbc_stride` apart: x [n_heads * head_dim], then B [n_groups * state], then C (the conv
//   output); dt [n, n_heads] raw (before dt_bias and softplus) rows `dt_stride` apart;
//   y [n, n_heads * head_dim]
void ssm_scan_cpu(ThreadPool& pool, const SsmScanParams& p, int64_t n, const float* xbc, int64_t xbc_stride,
                  const float* dt, int64_t dt_stride, float* state, float* y);

// Grouped gated RMSNorm (Zamba2RMSNormGated, norm_before_gate=False): g = y * silu(z), each group of
// group_size values of g divided by its RMS (with eps), times weight.
//   y, out [m, d] (may alias); z [m, d] rows `z_stride` apart; weight [d]
void gated_rmsnorm_cpu(const float* y, const float* z, int64_t z_stride, int64_t m, int64_t d, int64_t group_size,
                       const float* weight, float eps, float* out);

}  // namespace nibble
