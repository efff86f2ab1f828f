#include "gpu/device_limits.h"

#include <algorithm>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/device_info.h"
#include "cuda/fill_random.h"
#include "ops/linear/gemm_cuda.h"

namespace nibble::gpu {
namespace {

template <class F>
double median_ms(F&& f, int warmup, int repeats) {
    cudaEvent_t a, b;
    NIBBLE_CUDA_CHECK(cudaEventCreate(&a));
    NIBBLE_CUDA_CHECK(cudaEventCreate(&b));
    for (int i = 0; i < warmup; ++i) f();
    std::vector<float> ms;
    for (int i = 0; i < repeats; ++i) {
        NIBBLE_CUDA_CHECK(cudaEventRecord(a));
        f();
        NIBBLE_CUDA_CHECK(cudaEventRecord(b));
        NIBBLE_CUDA_CHECK(cudaEventSynchronize(b));
        float t = 0;
        NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
    }
    (void)cudaEventDestroy(a);
    (void)cudaEventDestroy(b);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

}  // namespace

DeviceLimits measure_device_limits() {
    DeviceLimits lim;
    lim.device_name = cuda::query_device(0).name;
    {
        const size_t bytes = size_t{1} << 30;  // far beyond L2
        cuda::DeviceBuffer src(bytes), dst(bytes);
        cuda::fill_random_u32(src.as<uint32_t>(), bytes / 4, 7, 0xffffffffu, 0u, nullptr);
        const double ms = median_ms([&] { NIBBLE_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice)); }, 2, 9);
        lim.copy_bytes_per_s = 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
    }
    {
        const int64_t n = 8192;
        cuda::DeviceBuffer a(static_cast<size_t>(n * n) * 2), b(static_cast<size_t>(n * n) * 2), c(static_cast<size_t>(n * n) * 2);
        // BF16 values in [2^-7, 2^-4) with random signs: real data, never zeros.
        cuda::fill_random_u32(a.as<uint32_t>(), a.bytes() / 4, 11, 0x81ff81ffu, 0x3c003c00u, nullptr);
        cuda::fill_random_u32(b.as<uint32_t>(), b.bytes() / 4, 13, 0x81ff81ffu, 0x3c003c00u, nullptr);
        cuda::GemmContext ctx(0);
        const double ms = median_ms([&] { cuda::gemm_bf16(ctx, a.get(), n, b.as<uint16_t>(), n, n, 1.0f, nullptr, c.get(), nullptr); }, 3, 9);
        lim.bf16_flops_per_s = 2.0 * static_cast<double>(n) * n * n / (ms * 1e-3);
    }
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    return lim;
}

}  // namespace nibble::gpu
