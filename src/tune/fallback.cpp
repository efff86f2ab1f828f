#include "tune/fallback.h"

#include <fmt/format.h>

#include "base/error.h"
#include "base/log.h"

namespace nibble::tune {

void FailedVariants::mark_failed(const KernelVariant& v, const std::string& why) {
    std::lock_guard lock(mutex_);
    const auto [it, inserted] = failed_.emplace(&v, why);
    if (inserted)
        log::warn("tune: {} {} failed to launch and is not used again in this process: {}", op_name(v.op), v.name,
                  why);
}

bool FailedVariants::failed(const KernelVariant& v) const {
    std::lock_guard lock(mutex_);
    return failed_.count(&v) > 0;
}

std::string FailedVariants::reason(const KernelVariant& v) const {
    std::lock_guard lock(mutex_);
    const auto it = failed_.find(&v);
    return it == failed_.end() ? std::string() : it->second;
}

size_t FailedVariants::size() const {
    std::lock_guard lock(mutex_);
    return failed_.size();
}

const KernelVariant& launch_with_fallback(std::span<const KernelVariant* const> candidates, FailedVariants& failed,
                                          const VariantLauncher& launch, std::string_view what) {
    std::string problems;
    for (const KernelVariant* v : candidates) {
        if (failed.failed(*v)) {
            problems += fmt::format("{}{}: failed earlier ({})", problems.empty() ? "" : "; ", v->name, failed.reason(*v));
            continue;
        }
        const LaunchOutcome outcome = launch(*v);
        if (outcome.ok) return *v;
        failed.mark_failed(*v, outcome.error);
        problems += fmt::format("{}{}: {}", problems.empty() ? "" : "; ", v->name, outcome.error);
    }
    if (candidates.empty()) fail("{}: no kernel variant fits this device for this shape", what);
    fail("{}: every fitting kernel variant failed to launch ({})", what, problems);
}

}  // namespace nibble::tune
