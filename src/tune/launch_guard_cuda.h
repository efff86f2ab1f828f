// The CUDA side of failure isolation (tune/fallback.h): runs a launcher and turns a launch-time failure
// into a LaunchOutcome, leaving the context usable. Plain C++ plus cuda_runtime.h types (CUDA builds only).
//
// A launch-time error (too much shared memory, too many resources, no kernel image, invalid configuration)
// is reported by the launch and is not sticky: cudaGetLastError clears it, and the guard calls it whether
// the launcher threw (the ops' launchers check cudaGetLastError themselves and throw) or not. The guard
// never synchronizes the device. To tell a cleared launch error from a lost context it asks the stream's
// state with cudaStreamQuery, which reports a sticky error (illegal address, ...) and does not wait; such
// an error is thrown as std::runtime_error, since no fallback can run on a lost context. While `stream`
// is being captured into a CUDA graph the query is not made (it would end the capture): a failure there
// is returned as failed, and the capture, which CUDA has invalidated, must be discarded by the caller.
// std::invalid_argument from a launcher (a caller's bad shape, not the variant's fault) passes through.
#pragma once

#include <cuda_runtime.h>

#include <functional>

#include "tune/launch_outcome.h"

namespace nibble::tune {

LaunchOutcome guarded_launch(const std::function<void()>& launch, cudaStream_t stream);

}  // namespace nibble::tune
