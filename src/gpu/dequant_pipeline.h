// Prefill GEMMs over quantized weights (NVFP4, FP8) read each weight as a BF16 copy made just before. That
// dequantization is memory-bound and the GEMM compute-bound, so they overlap: while the GEMM of weight i
// runs on the forward's stream, weight i + 1 is dequantized on a side stream into the other of two scratch
// buffers. Events order both ways (a GEMM waits for its copy; a copy waits until the GEMM two weights back
// has finished reading its buffer).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.h"
#include "gpu/device_decoder.h"

namespace nibble::gpu {

class DequantPipeline {
public:
    // Scratch for weights of up to max_elems values each.
    explicit DequantPipeline(int64_t max_elems);
    ~DequantPipeline();
    DequantPipeline(const DequantPipeline&) = delete;
    DequantPipeline& operator=(const DequantPipeline&) = delete;

    // Starts a forward whose GEMMs use these quantized weights in this order; the first two are dequantized
    // at once. Work enqueued on `stream` before this call is not waited for (weights never change).
    void begin(std::vector<const DeviceLinear*> order);
    bool active() const { return next_ < order_.size(); }
    // The BF16 copy of w (the next weight of the order; checked), usable by work enqueued on `stream` next.
    const uint16_t* acquire(const DeviceLinear& w, cudaStream_t stream);
    // After enqueuing the GEMM that reads the acquired copy: frees its buffer for the weight after next.
    void release(cudaStream_t stream);

private:
    void issue(size_t i);
    cuda::DeviceBuffer buf_[2];  // [max_elems] BF16 each
    int64_t max_elems_ = 0;
    cudaStream_t side_ = nullptr;
    cudaEvent_t ready_[2] = {}, free_[2] = {};
    std::vector<const DeviceLinear*> order_;
    size_t next_ = 0;
};

}  // namespace nibble::gpu
