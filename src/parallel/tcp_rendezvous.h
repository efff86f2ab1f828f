// The bootstrap of a multi-process group: rank 0 hands a small blob (the NCCL unique id) to every other rank
// over plain TCP, so that NCCL can then find its own transport (NVLink, InfiniBand/RoCE, TCP). Plain C++ with
// no fmt: .cu files include it.
//
// Protocol (all integers little-endian on the wire as the host stores them; every node runs the same build):
//   rank k > 0 connects to master_addr:master_port (retrying until the timeout: rank 0 may start later) and
//   sends "NBTP" + uint32 world_size + uint32 k; rank 0 checks both (a stray or mismatched peer is an error
//   naming it) and answers "NBTP" + uint64 length + the blob, once every rank has checked in.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nibble {

struct RendezvousOptions {
    std::string master_addr = "127.0.0.1";  // rank 0's host (name or address)
    int master_port = 29501;                // rank 0 listens here, on all interfaces
    int world_size = 1;
    int rank = 0;
    int timeout_ms = 300000;                // how long to wait for the other ranks, in total
};

// Collective over the group: rank 0 passes `blob`, the others pass anything (ignored); every rank returns
// rank 0's blob. Throws nibble::Error naming the address, port and ranks on a timeout or a bad peer.
std::vector<uint8_t> rendezvous_broadcast(const RendezvousOptions& options, const std::vector<uint8_t>& blob);

}  // namespace nibble
