// nibble's version, written into the checkpoints it produces and the caches it keys.
#pragma once

namespace nibble {
inline constexpr const char* kNibbleVersion = "0.1.0";
}
