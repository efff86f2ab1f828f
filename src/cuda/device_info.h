// What a CUDA device offers, read once at start from cudaGetDeviceProperties. Plain C++ (no CUDA types)
// so host code can include it without the CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace nibble::cuda {

struct DeviceInfo {
    int index = 0;
    std::string name;
    int cc_major = 0, cc_minor = 0;         // compute capability
    int sm_count = 0;
    int64_t smem_per_block_optin = 0;       // bytes a block may use after opting in
    int64_t smem_per_sm = 0;
    int regs_per_block = 0, regs_per_sm = 0;
    int64_t l2_bytes = 0;
    int64_t total_memory = 0;
    int memory_bus_bits = 0;
    int memory_clock_khz = 0;               // peak memory clock (0 when the device does not report it)
    int driver_version = 0, runtime_version = 0;
    int64_t smem_per_block = 0;             // without opting in
    int64_t smem_reserved_per_block = 0;    // the driver's per-block reservation
    int max_threads_per_block = 0, max_threads_per_sm = 0, max_blocks_per_sm = 0;
    bool integrated = false;                // shares memory with the CPU (GB10, Jetson)
};

int device_count();
DeviceInfo query_device(int index);

}  // namespace nibble::cuda
