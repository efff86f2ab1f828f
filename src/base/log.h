// Logging through spdlog; the level is set once by main() from --log-level.
#pragma once

#include <spdlog/spdlog.h>

namespace nibble::log {
using spdlog::debug;
using spdlog::error;
using spdlog::info;
using spdlog::warn;
}  // namespace nibble::log
