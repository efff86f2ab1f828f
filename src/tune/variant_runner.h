// The device side of tuning, as an interface: prepare a shape's inputs, launch one variant on them. The
// CUDA implementation is tune/variant_runner_cuda.h; the CPU tests use fakes. Plain C++ (no fmt).
#pragma once

#include "tune/launch_outcome.h"
#include "tune/registry.h"

namespace nibble::tune {

class VariantRunner {
public:
    virtual ~VariantRunner() = default;
    // Allocates and fills the inputs of `shape` (called once before its variants are launched).
    virtual void prepare(const OpShape& shape) = 0;
    // Enqueues one launch of `v` (with `splits` key-range splits for attention; 0: the op's own heuristic).
    // A launch failure comes back as a failed outcome, with the device's error cleared.
    virtual LaunchOutcome launch(const KernelVariant& v, const OpShape& shape, int splits) = 0;
};

}  // namespace nibble::tune
