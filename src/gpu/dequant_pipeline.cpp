#include "gpu/dequant_pipeline.h"

#include "base/error.h"
#include "cuda/cuda_check.h"
#include "ops/linear/gemm_cuda.h"

namespace nibble::gpu {

DequantPipeline::DequantPipeline(int64_t max_elems) : max_elems_(max_elems) {
    for (auto& b : buf_) b = cuda::DeviceBuffer(static_cast<size_t>(max_elems) * 2);
    NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
        NIBBLE_CUDA_CHECK(cudaEventCreateWithFlags(&ready_[i], cudaEventDisableTiming));
        NIBBLE_CUDA_CHECK(cudaEventCreateWithFlags(&free_[i], cudaEventDisableTiming));
    }
}

DequantPipeline::~DequantPipeline() {
    if (side_) (void)cudaStreamSynchronize(side_);
    for (int i = 0; i < 2; ++i) {
        (void)cudaEventDestroy(ready_[i]);
        (void)cudaEventDestroy(free_[i]);
    }
    if (side_) (void)cudaStreamDestroy(side_);
}

void DequantPipeline::issue(size_t i) {
    const DeviceLinear& w = *order_[i];
    NIBBLE_CHECK(w.n_out * w.n_in <= max_elems_, "{}: {} x {} exceeds the dequantization scratch", w.name, w.n_out,
                 w.n_in);
    const int slot = static_cast<int>(i % 2);
    NIBBLE_CUDA_CHECK(cudaStreamWaitEvent(side_, free_[slot], 0));  // the GEMM two weights back is done with it
    uint16_t* out = buf_[slot].as<uint16_t>();
    if (w.format == WeightFormat::Nvfp4)
        cuda::dequantize_nvfp4_to_bf16(w.nvfp4(), out, side_);
    else
        cuda::dequantize_fp8_to_bf16(static_cast<const uint8_t*>(w.data), w.n_out, w.n_in, out, side_);
    NIBBLE_CUDA_CHECK(cudaEventRecord(ready_[slot], side_));
}

void DequantPipeline::begin(std::vector<const DeviceLinear*> order) {
    order_ = std::move(order);
    next_ = 0;
    for (size_t i = 0; i < std::min<size_t>(2, order_.size()); ++i) issue(i);
}

const uint16_t* DequantPipeline::acquire(const DeviceLinear& w, cudaStream_t stream) {
    NIBBLE_CHECK(next_ < order_.size() && order_[next_] == &w, "dequantization pipeline: {} used out of order", w.name);
    const int slot = static_cast<int>(next_ % 2);
    NIBBLE_CUDA_CHECK(cudaStreamWaitEvent(stream, ready_[slot], 0));
    return buf_[slot].as<uint16_t>();
}

void DequantPipeline::release(cudaStream_t stream) {
    const int slot = static_cast<int>(next_ % 2);
    NIBBLE_CUDA_CHECK(cudaEventRecord(free_[slot], stream));
    ++next_;
    if (next_ + 1 < order_.size()) issue(next_ + 1);
}

}  // namespace nibble::gpu
