// What the CUDA chunked (SSD) Mamba2 scan may hold beyond its inputs, as plain C++ so that the memory plan
// counts it in builds without CUDA too.
#pragma once

#include <cstdint>

namespace nibble {

// The chunked scan's workspace (per-chunk states: about 2 MiB per 64-token chunk and per sequence at
// Nemotron-3-Nano's shape, 70 MiB for one 2048-token prompt) grows on demand up to this; a batch that would
// need more takes the sequential scan (gpu/hybrid_forward.h).
constexpr int64_t kSsdScanMaxWorkspaceBytes = int64_t{512} << 20;

}  // namespace nibble
