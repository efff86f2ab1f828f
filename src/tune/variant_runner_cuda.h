// The CUDA VariantRunner: real device buffers with random contents for each shape, each launch through the
// ops' public launchers (ops/linear/linear_cuda.h, ops/attention/attention_cuda.h) inside guarded_launch
// (tune/launch_guard_cuda.h). Plain C++ plus cuda_runtime.h types (CUDA builds only).
//
// GEMV: x [m, k] and y [m, n] in the shape's activation dtype; the weights in as many copies as make
// twice the device's L2 (at most 4096), one copy per launch in turn, so a timed launch streams its weights
// from memory as a decode step does (one layer's weights are cold when it runs) instead of from L2.
// "mma.*" variants run gemv_nvfp4_mma, "cuda_core.*" gemv_nvfp4_cuda_core or gemv_bf16; the m tile picks
// the instantiation the variant names. Attention: n_seqs sequences of kv_len cached tokens (random K/V,
// block size 16, contiguous block tables), q_len new tokens each; paged_attention dispatches the kernel the
// variant names (the registry's applicability mirrors its dispatch), with `splits` key-range splits.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "tune/variant_runner.h"

namespace nibble::tune {

std::unique_ptr<VariantRunner> make_cuda_variant_runner(cudaStream_t stream);

}  // namespace nibble::tune
