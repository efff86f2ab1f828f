// The multi-GPU flags, with vLLM's names: --tensor-parallel-size (-tp), --nnodes, --node-rank,
// --master-addr, --master-port. One process per GPU; the GPUs of all nodes form one tensor-parallel group of
// tensor_parallel_size ranks, nnodes machines with tensor_parallel_size / nnodes GPUs each, rank =
// node_rank * gpus_per_node + local GPU index. Rank 0 (on node 0) hands the NCCL unique id to the others
// over TCP at master_addr:master_port (tcp_rendezvous.h).
#pragma once

#include <cstdint>
#include <string>

namespace nibble {

struct ParallelOptions {
    int64_t tensor_parallel_size = 1;       // --tensor-parallel-size / -tp: GPUs one model is split over
    int64_t nnodes = 1;                     // --nnodes: machines taking part
    int64_t node_rank = 0;                  // --node-rank: this machine's index, 0 .. nnodes-1
    std::string master_addr = "127.0.0.1";  // --master-addr: node 0's address, reachable from every node
    int64_t master_port = 29501;            // --master-port: node 0's TCP port for the rendezvous (vLLM's default)

    int64_t gpus_per_node() const { return tensor_parallel_size / nnodes; }
    // The global rank of GPU `local_rank` (0 .. gpus_per_node-1) of this node.
    int64_t global_rank(int64_t local_rank) const { return node_rank * gpus_per_node() + local_rank; }
};

// Throws nibble::Error naming the flag: sizes at least 1, --node-rank in [0, --nnodes), --tensor-parallel-size a
// multiple of --nnodes (every node runs as many GPUs), --master-port in [1, 65535], --master-addr not empty.
void check_parallel_options(const ParallelOptions& options);

}  // namespace nibble
