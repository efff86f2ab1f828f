// CUDA-event timing (tune/timer_cuda.h). No fmt/spdlog here: nvcc compiles this file.
#include "cuda/cuda_check.h"
#include "tune/timer_cuda.h"

#include <vector>

namespace nibble::tune {

namespace {

class CudaEventTimer final : public KernelTimer {
public:
    explicit CudaEventTimer(cudaStream_t stream) : stream_(stream) {
        NIBBLE_CUDA_CHECK(cudaEventCreate(&start_));
        const cudaError_t err = cudaEventCreate(&stop_);
        if (err != cudaSuccess) {
            cudaEventDestroy(start_);
            NIBBLE_CUDA_CHECK(err);
        }
    }
    ~CudaEventTimer() override {
        cudaEventDestroy(start_);
        cudaEventDestroy(stop_);
    }
    CudaEventTimer(const CudaEventTimer&) = delete;
    CudaEventTimer& operator=(const CudaEventTimer&) = delete;

    Timing time(const std::function<void()>& launch, const TimingOptions& opts) override {
        for (int i = 0; i < opts.warmup; ++i) launch();
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
        std::vector<double> us;
        us.reserve(opts.repeats > 0 ? opts.repeats : 0);
        for (int i = 0; i < opts.repeats; ++i) {
            NIBBLE_CUDA_CHECK(cudaEventRecord(start_, stream_));
            launch();
            NIBBLE_CUDA_CHECK(cudaEventRecord(stop_, stream_));
            NIBBLE_CUDA_CHECK(cudaEventSynchronize(stop_));
            float ms = 0.0f;
            NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
            us.push_back(1000.0 * ms);
        }
        return summarize_times(std::move(us));
    }

private:
    cudaStream_t stream_;
    cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace

std::unique_ptr<KernelTimer> make_cuda_event_timer(cudaStream_t stream) {
    return std::make_unique<CudaEventTimer>(stream);
}

}  // namespace nibble::tune
