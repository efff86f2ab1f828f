// What one launch attempt of a kernel variant came to. Plain C++, shared by tune/fallback.h and the CUDA
// launch guard (tune/launch_guard_cuda.h).
#pragma once

#include <string>
#include <utility>

namespace nibble::tune {

struct LaunchOutcome {
    bool ok = true;
    std::string error;  // when !ok: what the launch reported
    static LaunchOutcome success() { return {}; }
    static LaunchOutcome failure(std::string why) { return {false, std::move(why)}; }
};

}  // namespace nibble::tune
