// Which tensor-core attention kernels a registry variant (tune/registry.cpp) names, as the AttentionArgs
// selectors paged_attention reads: the forward launching a tuned choice and the tuner's variant runner timing
// one both go through here, so a variant always runs the kernel its name says. Plain C++ plus cuda_runtime.h
// types (CUDA builds only).
#pragma once

#include <string_view>

#include "ops/attention/attention_cuda.h"

namespace nibble::tune {

// decode_mma.* / decode_pipe.* / decode_pipe16.* and prefill_wide.* / prefill_mma.* pick their kernel; any
// other name (the CUDA-core variants) leaves the choice to paged_attention (Auto).
inline void select_attention_kernels(std::string_view variant, cuda::AttentionArgs& args) {
    args.decode_kernel = variant.starts_with("decode_pipe16.") ? cuda::DecodeKernel::Pipelined16
                         : variant.starts_with("decode_pipe.") ? cuda::DecodeKernel::Pipelined
                         : variant.starts_with("decode_mma.")  ? cuda::DecodeKernel::Mma
                                                               : cuda::DecodeKernel::Auto;
    args.prefill_kernel = variant.starts_with("prefill_wide.")  ? cuda::PrefillKernel::Wide
                          : variant.starts_with("prefill_mma.") ? cuda::PrefillKernel::Narrow
                                                                : cuda::PrefillKernel::Auto;
}

}  // namespace nibble::tune
