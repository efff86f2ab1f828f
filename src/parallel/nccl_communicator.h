// The Communicator of a multi-GPU group: one process (or thread) per GPU, collectives by NCCL on device
// memory. CUDA builds only (nccl_communicator.cu); include this header only from code built with NIBBLE_CUDA.
// NCCL's own header stays inside the .cu file.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/parallel_options.h"

struct ncclComm;     // nccl.h's communicator (ncclComm_t is a pointer to it)
struct ncclDevComm;  // nccl_device/core.h's device communicator

namespace nibble {

struct NcclBootstrap {
    int world_size = 1;
    int rank = 0;                           // global rank, 0 .. world_size-1 (ParallelOptions::global_rank)
    int device = 0;                         // this rank's CUDA device
    std::string master_addr = "127.0.0.1";  // where rank 0 hands out the NCCL unique id (tcp_rendezvous.h)
    int master_port = 29501;
    int timeout_ms = 300000;
};

// The bootstrap of GPU `local_rank` (0 .. gpus_per_node-1, also its CUDA device) of this node, from the
// command-line flags: world = --tensor-parallel-size, rank = --node-rank * gpus_per_node + local_rank.
inline NcclBootstrap nccl_bootstrap(const ParallelOptions& o, int local_rank) {
    return NcclBootstrap{.world_size = static_cast<int>(o.tensor_parallel_size),
                         .rank = static_cast<int>(o.global_rank(local_rank)),
                         .device = local_rank,
                         .master_addr = o.master_addr,
                         .master_port = static_cast<int>(o.master_port)};
}

class NcclCommunicator final : public Communicator {
public:
    // Collective over all ranks: rank 0 makes the NCCL unique id and sends it to the others over TCP, then
    // every rank joins with ncclCommInitRank on its device. Collectives are enqueued on `stream` (of that
    // device): buffers are device memory, and results are there once the stream reaches them.
    NcclCommunicator(const NcclBootstrap& bootstrap, cudaStream_t stream);
    ~NcclCommunicator() override;
    NcclCommunicator(const NcclCommunicator&) = delete;
    NcclCommunicator& operator=(const NcclCommunicator&) = delete;

    int rank() const override { return rank_; }
    int world_size() const override { return world_size_; }
    int device() const { return device_; }
    cudaStream_t stream() const { return stream_; }
    // data: device memory [count]; F32 or BF16 (NCCL sums BF16 in its own order and precision).
    void all_reduce_sum(void* data, int64_t count, DType dtype) override;
    // send: device memory [count]; recv: device memory [world_size, count].
    void all_gather(const void* send, int64_t count, DType dtype, void* recv) override;
    // ncclMemAlloc'd device memory registered as a symmetric window (NCCL_WIN_COLL_SYMMETRIC: NCCL's
    // symmetric kernels, lower latency for the small all-reduces of decode); null, with a warning on stderr,
    // when this NCCL or system cannot (no CUMEM, an old NCCL). Freed with the communicator.
    void* fast_buffer(size_t bytes) override;
    // The fused reduce of parallel/lsa_reduce_norm_cuda.h on rows in a fast buffer: available when NCCL's device
    // API runs here (the runtime NCCL is the one built against, every rank load/store-accessible, i.e. one
    // NVLink or P2P domain) and NIBBLE_LSA_NORM is not 0.
    bool can_all_reduce_residual_rmsnorm(int64_t m, int64_t d, DType dtype) const override;
    void all_reduce_residual_rmsnorm(const void* rows, int64_t m, int64_t d, DType dtype, void* residual,
                                     const float* weight, float eps, void* out) override;

private:
    void make_device_comm();
    ncclComm* comm_ = nullptr;
    struct Window {
        void* ptr;
        size_t bytes;
        void* handle;  // ncclWindow_t
    };
    std::vector<Window> windows_;
    ncclDevComm* dev_comm_ = nullptr;  // null: no fused reduce
    void* reduce_scratch_ = nullptr;   // the fused reduce's (lsa_reduce_norm_cuda.h)
    cudaStream_t stream_ = nullptr;
    int rank_ = 0, world_size_ = 1, device_ = 0;
};

}  // namespace nibble
