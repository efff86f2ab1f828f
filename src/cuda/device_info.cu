#include "cuda/cuda_check.h"
#include "cuda/device_info.h"

namespace nibble::cuda {

int device_count() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
        (void)cudaGetLastError();  // clear, so a CPU-only run leaves no sticky error behind
        return 0;
    }
    NIBBLE_CUDA_CHECK(err);
    return n;
}

DeviceInfo query_device(int index) {
    cudaDeviceProp prop{};
    NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    DeviceInfo info;
    info.index = index;
    info.name = prop.name;
    info.cc_major = prop.major;
    info.cc_minor = prop.minor;
    info.sm_count = prop.multiProcessorCount;
    info.smem_per_block_optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
    info.smem_per_sm = static_cast<int64_t>(prop.sharedMemPerMultiprocessor);
    info.regs_per_block = prop.regsPerBlock;
    info.regs_per_sm = prop.regsPerMultiprocessor;
    info.l2_bytes = prop.l2CacheSize;
    info.total_memory = static_cast<int64_t>(prop.totalGlobalMem);
    info.memory_bus_bits = prop.memoryBusWidth;
    info.smem_per_block = static_cast<int64_t>(prop.sharedMemPerBlock);
    info.smem_reserved_per_block = static_cast<int64_t>(prop.reservedSharedMemPerBlock);
    info.max_threads_per_block = prop.maxThreadsPerBlock;
    info.max_threads_per_sm = prop.maxThreadsPerMultiProcessor;
    info.max_blocks_per_sm = prop.maxBlocksPerMultiProcessor;
    info.integrated = prop.integrated != 0;
    // CUDA 13's cudaDeviceProp has no memory clock; the attribute may be 0 on integrated devices.
    if (cudaDeviceGetAttribute(&info.memory_clock_khz, cudaDevAttrMemoryClockRate, index) != cudaSuccess) {
        (void)cudaGetLastError();
        info.memory_clock_khz = 0;
    }
    NIBBLE_CUDA_CHECK(cudaDriverGetVersion(&info.driver_version));
    NIBBLE_CUDA_CHECK(cudaRuntimeGetVersion(&info.runtime_version));
    return info;
}

}  // namespace nibble::cuda
