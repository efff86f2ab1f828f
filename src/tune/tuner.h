// Choosing a variant per shape: the built-in heuristic (what the ops' dispatch does untuned), the order in
// which the fitting variants are tried at run time (cached choice, heuristic, the rest), and tuning itself:
// every fitting variant (and split count) timed on the device through a VariantRunner and a KernelTimer,
// the fastest kept. Host logic; the CUDA runner is tune/variant_runner_cuda.h, the CPU tests use fakes.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tune/device_profile.h"
#include "tune/eligibility.h"
#include "tune/fallback.h"
#include "tune/registry.h"
#include "tune/timer.h"
#include "tune/tune_cache.h"
#include "tune/variant_runner.h"

namespace nibble::tune {

// The variant the ops pick without tuning, among `eligible` (null when it is empty). Mirrors the dispatch
// in ops/linear/linear_cuda.cu (NVFP4: CUDA cores at m = 1 below 65536 rows, tensor cores otherwise) and
// ops/attention/attention_cuda.cu (the pipelined decode kernel for FP8/NVFP4 caches, else the one kernel that
// applies); otherwise the first eligible one.
const KernelVariant* heuristic_variant(const OpShape& shape, std::span<const KernelVariant* const> eligible);

// The order in which to try variants for `shape` at run time: the cached choice (when the cache has one and
// it is eligible), then the heuristic's, then the other eligible variants; failed ones left out. `splits`
// is set to the cached choice's split count (0 when the choice is not from the cache: the op decides).
std::vector<const KernelVariant*> candidate_order(const OpShape& shape, const DeviceProfile& device,
                                                  const BuildTargets& build, const TuneCache* cache,
                                                  const FailedVariants& failed, int& splits);

struct CandidateTiming {
    const KernelVariant* variant = nullptr;
    int splits = 1;
    Timing timing;
};

struct ShapeTuning {
    OpShape shape;
    std::vector<CandidateTiming> timed;      // every candidate that ran, in the order tried
    std::vector<std::string> failures;       // "variant: error" for each that failed
    std::optional<TuneChoice> best;          // the fastest; nothing when none ran
};

// Times every eligible variant of `shape` not already failed (each split count of `splits` for variants that
// take splits, as long as a split keeps 256 keys for decode, 512 for prefill: the floors of the ops' own
// split heuristics).
ShapeTuning tune_shape(const OpShape& shape, std::span<const KernelVariant* const> eligible, VariantRunner& runner,
                       KernelTimer& timer, FailedVariants& failed, const TimingOptions& options);

}  // namespace nibble::tune
