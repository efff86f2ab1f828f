// Timing a launch: warm-up runs, then `repeats` timed runs, reporting the median. The interface is plain
// C++ (no fmt, no CUDA types) so that the CUDA implementation (tune/timer_cuda.cu, CUDA events on one
// stream) and the CPU tests' fake share it.
#pragma once

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <vector>

namespace nibble::tune {

struct TimingOptions {
    int warmup = 3;     // untimed runs first (caches, clocks, lazy module loading)
    int repeats = 15;   // timed runs; the median is kept
};

struct Timing {
    double median_us = 0;
    double min_us = 0;
    int repeats = 0;
};

class KernelTimer {
public:
    virtual ~KernelTimer() = default;
    // Runs `launch` opts.warmup + opts.repeats times; `launch` enqueues work and returns (it may throw,
    // and the exception passes through).
    virtual Timing time(const std::function<void()>& launch, const TimingOptions& opts) = 0;
};

// The median and minimum of per-run times (microseconds); an empty list is std::invalid_argument.
inline Timing summarize_times(std::vector<double> us) {
    if (us.empty()) throw std::invalid_argument("summarize_times: no samples");
    std::sort(us.begin(), us.end());
    const size_t n = us.size();
    const double median = n % 2 == 1 ? us[n / 2] : 0.5 * (us[n / 2 - 1] + us[n / 2]);
    return {median, us.front(), static_cast<int>(n)};
}

}  // namespace nibble::tune
