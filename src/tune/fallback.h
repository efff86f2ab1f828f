// Failure isolation: a variant whose launch fails is recorded as failed for the rest of the process and
// the op runs the next fitting variant instead. Host logic only; the launch itself is a callback, so the
// CPU tests drive it with a fake launcher, and the CUDA side (tune/launch_guard_cuda.h) turns a CUDA launch
// into a LaunchOutcome, clearing the error so the context is left usable.
//
// What counts as a launch failure: an error the launch itself reports (configuration, resources, no
// kernel image), which CUDA clears with cudaGetLastError. An error from an earlier kernel's execution
// (illegal address, ...) is sticky: the context is lost, no fallback can help, and the launcher must throw
// instead of returning a failed outcome (launch_guard_cuda does).
#pragma once

#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>

#include "tune/launch_outcome.h"
#include "tune/registry.h"

namespace nibble::tune {

// The variants that failed in this process (owned by whoever owns the ops' dispatch: the runner, the
// tuner; not a global). Thread-safe.
class FailedVariants {
public:
    // Records `v` as failed; logs a warning the first time.
    void mark_failed(const KernelVariant& v, const std::string& why);
    bool failed(const KernelVariant& v) const;
    // Why `v` failed, or "" when it has not.
    std::string reason(const KernelVariant& v) const;
    size_t size() const;

private:
    mutable std::mutex mutex_;
    std::unordered_map<const KernelVariant*, std::string> failed_;
};

using VariantLauncher = std::function<LaunchOutcome(const KernelVariant&)>;

// Launches the first variant of `candidates` (in order: the tuned choice first, then the fallbacks) that
// has not failed before; a launch that fails marks its variant failed and moves on to the next. Returns the
// variant that ran. Throws nibble::Error naming every failure when none ran (or none was left to try).
const KernelVariant& launch_with_fallback(std::span<const KernelVariant* const> candidates, FailedVariants& failed,
                                          const VariantLauncher& launch, std::string_view what);

}  // namespace nibble::tune
