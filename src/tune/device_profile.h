// A device profile: the limits that decide whether a kernel variant can launch on a GPU (shared memory,
// registers, threads, compute capability) and the rates the roofline in `nibble plan` divides by. Read
// from the running GPU (profile_from_device, over cuda::DeviceInfo, which cuda/device_info.cu fills from
// cudaGetDeviceProperties) or taken from the built-in profiles of GPUs we cannot run here (gb10, rtx5090,
// b200, h100, h200), whose figures cite their public sources in device_profile.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "cuda/device_info.h"

namespace nibble::tune {

struct DeviceProfile {
    std::string key;                    // "gb10", "h100", ...; "device" for a profile read from a GPU
    std::string name;                   // GPU name as the driver reports it (or the product name)
    int cc_major = 0, cc_minor = 0;     // compute capability
    int sm_count = 0;
    int64_t smem_per_block = 48 * 1024;     // without opting in (and the limit of static __shared__)
    int64_t smem_per_block_optin = 0;       // with cudaFuncAttributeMaxDynamicSharedMemorySize
    int64_t smem_per_sm = 0;
    int64_t smem_reserved_per_block = 1024; // the driver's per-block reservation (CUDA occupancy tables)
    int regs_per_block = 65536, regs_per_sm = 65536;
    int max_regs_per_thread = 255;
    int max_threads_per_block = 1024, max_threads_per_sm = 2048;
    int max_blocks_per_sm = 32;
    int64_t l2_bytes = 0;                   // 0: not published
    int64_t memory_bytes = 0;
    double memory_bandwidth = 0;            // bytes / s (peak, from the datasheet or the bus and clock)
    bool unified_memory = false;            // CPU and GPU share one memory (GB10, Grace Hopper's NVLink-C2C not)
    double fp4_flops = 0;                   // dense FP4 tensor-core FLOP/s; 0: no FP4 tensor cores
    double bf16_flops = 0;                  // dense BF16 tensor-core FLOP/s with FP32 accumulation
    int driver_version = 0, runtime_version = 0;  // 0 in built-in profiles
    std::string_view source;                // where the figures come from

    int cc() const { return cc_major * 10 + cc_minor; }
};

// The built-in profiles, in a fixed order.
std::span<const DeviceProfile> builtin_profiles();

// The built-in profile of `key` (case-insensitive; "spark" and "dgx-spark" name gb10, "h100-sxm" h100), or
// nothing.
std::optional<DeviceProfile> find_builtin_profile(std::string_view key);

// Like find_builtin_profile, but an unknown name is a nibble::Error listing the known ones.
DeviceProfile builtin_profile(std::string_view key);

// The profile of a GPU as its properties report it. Bandwidth comes from the bus width and memory clock
// when the properties carry them (0 when not); FP4 / BF16 rates from the built-in profile of the same
// compute capability and SM count when one matches, scaled by SM count otherwise (0 when none is near).
DeviceProfile profile_from_device(const cuda::DeviceInfo& info);

}  // namespace nibble::tune
