// The tune choices in the form a runner consumes them: built once from the tune cache (or none), the
// device's profile and the build's targets, then asked per (op, shape) while the runner is constructed,
// never per launch. A resolved choice is the ordered candidate list of candidate_order (cached choice,
// heuristic, the other eligible variants) plus the cached split count; the runner keeps it in small arrays
// indexed by its fixed shapes and m tiles, so a launch only walks a few pointers.
//
// Failure state and the record of which variants have launched are per variant, in flat arrays indexed by
// the variant's position in kernel_registry(), so the launch path reads them with one atomic load each. A
// variant that fails is also recorded in a FailedVariants (tune/fallback.h: one warning, and the reason).
//
// CUDA graphs: while a stream is being captured a failed launch invalidates the whole capture, so a runner
// picks for capture only a variant that has already launched outside capture or the heuristic one (the
// kernel the op would run untuned); see pick().
//
// Plain C++ (every build); the CUDA runner's launch loop lives in gpu/decoder_forward.cpp.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tune/device_profile.h"
#include "tune/eligibility.h"
#include "tune/fallback.h"
#include "tune/registry.h"
#include "tune/tune_cache.h"

namespace nibble::tune {

// One (op, shape)'s resolved choice.
struct ResolvedChoice {
    static constexpr int kMaxCandidates = 8;
    const KernelVariant* candidates[kMaxCandidates] = {};  // in the order to try them
    int n_candidates = 0;
    const KernelVariant* heuristic = nullptr;  // the untuned op's own pick (null: no eligible variant)
    int splits = 0;            // attention key-range splits from the cache; 0: the op's own heuristic
    bool from_cache = false;   // candidates[0] is the cache's choice
};

class KernelChoices {
public:
    // `cache` may be null (built-in heuristics for every shape); it is copied.
    KernelChoices(const TuneCache* cache, DeviceProfile device, BuildTargets build);

    bool has_cache() const { return cache_.has_value(); }
    const DeviceProfile& device() const { return device_; }

    // The candidates for `shape` (variants already failed left out). Formats the shape's bucket and
    // searches the cache: call it at construction time, not per launch.
    ResolvedChoice resolve(const OpShape& shape) const;

    // The variant to launch next from `c`: the first candidate not failed; while capturing a CUDA graph, the
    // first not failed that has launched outside capture before or is the heuristic one. Null when none.
    const KernelVariant* pick(const ResolvedChoice& c, bool capturing) const;

    // A launch of `v` was enqueued without error (outside capture: `v` is then safe to capture).
    void note_launched(const KernelVariant& v, bool capturing);
    // `v` failed to launch: never picked again in this process.
    void mark_failed(const KernelVariant& v, const std::string& why);
    bool failed(const KernelVariant& v) const;
    const FailedVariants& failed_variants() const { return failed_; }

    // Test hooks. Launches of `v` enqueued so far (eager and captured; a graph replay launches nothing).
    int64_t launches(const KernelVariant& v) const;
    // Makes every launch of `v` fail before it reaches the device (as a launch error would), to exercise
    // the fallback; null clears it.
    void inject_launch_failure(const KernelVariant* v) { injected_failure_.store(v, std::memory_order_relaxed); }
    bool injected_failure(const KernelVariant& v) const {
        return injected_failure_.load(std::memory_order_relaxed) == &v;
    }

private:
    size_t index_of(const KernelVariant& v) const;

    std::optional<TuneCache> cache_;
    DeviceProfile device_;
    BuildTargets build_;
    FailedVariants failed_;
    std::unique_ptr<std::atomic<bool>[]> failed_flag_;    // [registry size]
    std::unique_ptr<std::atomic<bool>[]> launched_eager_;  // [registry size]
    std::unique_ptr<std::atomic<int64_t>[]> launch_count_; // [registry size]
    std::atomic<const KernelVariant*> injected_failure_{nullptr};
};

// The GEMV launch tile index of m rows (0: m = 1, 1: 2, 2: 3..4, 3: 5..8, 4: 9 and more, the tiles of 16 a
// larger m runs in), and the tile's size.
inline constexpr int kGemvTiles = 5;
int gemv_tile_index(int64_t m);
int64_t gemv_tile_rows(int tile_index);

// ceil(log2(v)) for v >= 1 (0 for v <= 1): the index of a power-of-two bucket.
int log2_bucket(int64_t v);

}  // namespace nibble::tune
