// CUDA launcher for non-greedy sampling on the device: per row of logits, the token that engine/sampler.h's
// sample_token(logits, params, u) draws (temperature, then top-k, top-p, min-p, each on the distribution
// the previous left; the kept tokens walked by ascending id until their cumulative weight exceeds u x the
// kept weight), so a sampled step copies one int32 per sequence to the host instead of a vocabulary of
// floats. No sort: one block per row finds the top-k and top-p cuts by bisection over the logits'
// order-preserving 32-bit keys (ties broken by lowest id, as the host's order does), min-p compares weights,
// and one tiled prefix-sum scan in id order draws. Rows at temperature 0 take the first maximum.
// The weights are sampling_weight.h's, bit for bit the host's; only the order of the double sums differs, so
// the token equals the host's unless u or a top-p cut lies within about vocab x 2^-53 (relative) of a
// boundary. Rows whose largest logit is not finite (NaN, +-inf) are unspecified. Plain C++ plus
// cuda_runtime.h types.
//   logits [n_rows, vocab] float32; rows [n_rows] RowSamplingParams; tokens [n_rows] int32 (all device)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nibble::cuda {

struct RowSamplingParams {
    float temperature = 1.0f;  // 0: greedy (u unused)
    int32_t top_k = 0;         // <= 0 or >= vocab: every token
    float top_p = 1.0f;        // (0, 1]
    float min_p = 0.0f;        // [0, 1]
    double u = 0.0;            // the row's uniform draw, [0, 1)
};

void sample_rows(const float* logits, int64_t n_rows, int64_t vocab, const RowSamplingParams* rows, int32_t* tokens,
                 cudaStream_t stream);

}  // namespace nibble::cuda
