// The CUDA implementation of KernelTimer: each run between two CUDA events on `stream`, synchronized on
// the end event; warm-up runs untimed. Plain C++ plus cuda_runtime.h types (CUDA builds only).
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "tune/timer.h"

namespace nibble::tune {

std::unique_ptr<KernelTimer> make_cuda_event_timer(cudaStream_t stream);

}  // namespace nibble::tune
