// The collectives tensor parallelism needs, behind one small interface: the sharded forward calls them and
// does not know who carries the bytes. Two implementations: InProcessGroup's ranks (threads of one process,
// host memory; a test double for the CPU) and NcclCommunicator (one process per GPU, device memory, CUDA
// builds only). Plain C++ with no fmt: .cu files include it.
//
// Every rank of a group must call the same collectives in the same order with the same counts and dtypes.
// Sums are over ranks in rank order, so every rank ends with bit-identical results.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "tensor/dtype.h"

namespace nibble {

class Communicator {
public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;
    virtual int world_size() const = 0;
    // In place: data[i] = sum over ranks of data[i]. dtype F32 or BF16 (BF16 summed in float32, rounded once).
    //   data [count]
    virtual void all_reduce_sum(void* data, int64_t count, DType dtype) = 0;
    // recv[r * count + i] = send[i] of rank r. dtype F32 or BF16.
    //   send [count], recv [world_size, count]
    virtual void all_gather(const void* send, int64_t count, DType dtype, void* recv) = 0;
    // Memory this group's collectives run fastest on, owned by the communicator (NCCL: a buffer registered
    // as a symmetric window, which its low-latency kernels need); collective: every rank calls it with the
    // same size at the same point, and passes the same offsets into it to later collectives. Null when the
    // implementation has no such memory (callers then use their own).
    virtual void* fast_buffer(size_t bytes) { return nullptr; }
    // Whether all_reduce_residual_rmsnorm takes m rows of d values of dtype (false: no such fused step here).
    virtual bool can_all_reduce_residual_rmsnorm(int64_t m, int64_t d, DType dtype) const { return false; }
    // In one step, the stores of all_reduce_sum(rows) followed by rmsnorm_residual(rows, residual, ...)
    // (ops/rmsnorm/rmsnorm_cuda.h), except that rows itself is left as it was: residual = round(round(sum over
    // ranks of rows) + residual), out = rmsnorm(residual) * weight. rows lies in this communicator's fast buffer,
    // at the same offset on every rank, and may be written again only after the next such call (the caller
    // alternates two buffers). Only where can_all_reduce_residual_rmsnorm says so.
    //   rows, residual, out [m, d]; weight [d] float32
    virtual void all_reduce_residual_rmsnorm(const void* rows, int64_t m, int64_t d, DType dtype, void* residual,
                                             const float* weight, float eps, void* out) {
        (void)rows, (void)m, (void)d, (void)dtype, (void)residual, (void)weight, (void)eps, (void)out;
        throw std::logic_error("all_reduce_residual_rmsnorm: this communicator has no fused reduce");
    }
};

}  // namespace nibble
