// The two ceilings every benchmark figure is quoted against, measured on the card in the same run:
// device-to-device copy bandwidth (bytes read + bytes written per second) and the BF16 matrix rate
// (cuBLASLt, a large square product, FLOP/s).
#pragma once

#include <string>

namespace nibble::gpu {

struct DeviceLimits {
    std::string device_name;
    double copy_bytes_per_s = 0;   // read + write
    double bf16_flops_per_s = 0;
};

// Median of several timed repeats after a warm-up; takes about a second.
DeviceLimits measure_device_limits();

}  // namespace nibble::gpu
