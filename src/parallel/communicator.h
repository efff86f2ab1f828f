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
};

}  // namespace nibble
