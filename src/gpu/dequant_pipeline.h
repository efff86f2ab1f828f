// Prefill GEMMs over quantized weights (NVFP4, FP8) read each weight as a BF16 copy made just before. That
// dequantization is memory-bound and the GEMM compute-bound, so they overlap: while the GEMM of weight i
// runs on the forward's stream, weight i + 1 is dequantized on a side stream into the other of two scratch
// buffers. Events order both ways (a GEMM waits for its copy; a copy waits until the GEMM two weights back
// has finished reading its buffer). One GEMM may read several weights of one n_in at once (a layer's q, k
// and v): a group, dequantized one after another into one copy, their rows stacked.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <vector>

#include "cuda/device_buffer.h"
#include "gpu/device_decoder.h"

namespace nibble::gpu {

// The weights one GEMM reads: 1 to 3 quantized linears of one n_in, copied as [sum of their n_out, n_in] BF16
// in this order (no global scale applied: the GEMM's alpha, so a group's linears must share it).
struct DequantGroup {
    std::array<const DeviceLinear*, 3> parts{};
    int count = 0;
    static DequantGroup one(const DeviceLinear& w) { return {{&w, nullptr, nullptr}, 1}; }
    int64_t elems() const;
    bool operator==(const DequantGroup&) const = default;
};

class DequantPipeline {
public:
    // Scratch for groups of up to max_elems values each.
    explicit DequantPipeline(int64_t max_elems);
    ~DequantPipeline();
    DequantPipeline(const DequantPipeline&) = delete;
    DequantPipeline& operator=(const DequantPipeline&) = delete;

    // Starts a forward whose GEMMs read these groups in this order; the first two are dequantized at once.
    // Work enqueued on `stream` before this call is not waited for (weights never change).
    void begin(std::vector<DequantGroup> order);
    bool active() const { return next_ < order_.size(); }
    // The BF16 copy of g (the next group of the order; checked), usable by work enqueued on `stream` next.
    const uint16_t* acquire(const DequantGroup& g, cudaStream_t stream);
    const uint16_t* acquire(const DeviceLinear& w, cudaStream_t stream) { return acquire(DequantGroup::one(w), stream); }
    // After enqueuing the GEMM that reads the acquired copy: frees its buffer for the group after next.
    void release(cudaStream_t stream);

private:
    void issue(size_t i);
    cuda::DeviceBuffer buf_[2];  // [max_elems] BF16 each
    int64_t max_elems_ = 0;
    cudaStream_t side_ = nullptr;
    cudaEvent_t ready_[2] = {}, free_[2] = {};
    std::vector<DequantGroup> order_;
    size_t next_ = 0;
};

}  // namespace nibble::gpu
