#include "parallel/tcp_rendezvous.h"

#include <poll.h>
#include <sys/socket.h>

#include <cstring>

#include "base/error.h"
#include "parallel/tcp_socket.h"

namespace nibble {

namespace {

using net::Clock;
using net::recv_all;
using net::send_all;
using net::Socket;

constexpr char kMagic[4] = {'N', 'B', 'T', 'P'};

std::vector<uint8_t> serve_rank0(const RendezvousOptions& o, const std::vector<uint8_t>& blob, Clock::time_point deadline) {
    Socket listener = net::listen_on_port(o.master_port, o.world_size, "rendezvous: rank 0 (--master-port)");
    std::vector<Socket> peers(static_cast<size_t>(o.world_size));
    for (int joined = 1; joined < o.world_size;) {
        const std::string what = std::to_string(joined - 1) + " of " + std::to_string(o.world_size - 1) +
                                 " ranks joined rank 0 on port " + std::to_string(o.master_port);
        net::wait_for(listener.fd, POLLIN, deadline, "rendezvous: waiting for the other ranks (" + what + ")");
        Socket peer(::accept(listener.fd, nullptr, nullptr));
        if (peer.fd < 0) continue;
        char magic[4];
        uint32_t world = 0, rank = 0;
        recv_all(peer.fd, magic, sizeof magic, deadline, "rendezvous: reading a peer's hello");
        NIBBLE_CHECK(std::memcmp(magic, kMagic, sizeof magic) == 0,
                     "rendezvous: a connection to port {} is not a nibble rank (is the port shared?)", o.master_port);
        recv_all(peer.fd, &world, sizeof world, deadline, "rendezvous: reading a peer's hello");
        recv_all(peer.fd, &rank, sizeof rank, deadline, "rendezvous: reading a peer's hello");
        NIBBLE_CHECK(static_cast<int>(world) == o.world_size,
                     "rendezvous: rank {} expects a group of {} ranks, rank 0 one of {} (check --tensor-parallel-size "
                     "and --nnodes on every node)",
                     rank, world, o.world_size);
        NIBBLE_CHECK(rank >= 1 && static_cast<int>(rank) < o.world_size, "rendezvous: a peer says it is rank {} of {}",
                     rank, o.world_size);
        NIBBLE_CHECK(peers[rank].fd < 0, "rendezvous: two peers say they are rank {} (check --node-rank)", rank);
        peers[rank] = std::move(peer);
        ++joined;
    }
    const uint64_t length = blob.size();
    for (int r = 1; r < o.world_size; ++r) {
        const std::string what = "rendezvous: sending the id to rank " + std::to_string(r);
        send_all(peers[static_cast<size_t>(r)].fd, kMagic, sizeof kMagic, deadline, what);
        send_all(peers[static_cast<size_t>(r)].fd, &length, sizeof length, deadline, what);
        send_all(peers[static_cast<size_t>(r)].fd, blob.data(), blob.size(), deadline, what);
    }
    return blob;
}

// Connects to rank 0, retrying (it may not listen yet) until the deadline.
Socket connect_to_rank0(const RendezvousOptions& o, Clock::time_point deadline) {
    std::string last_error;
    Socket s = net::connect_with_retry(o.master_addr, o.master_port, deadline, last_error);
    if (!s.valid())
        fail("rendezvous: rank {} could not reach rank 0 at {}:{} (--master-addr / --master-port) within {} ms: {}",
             o.rank, o.master_addr, o.master_port, o.timeout_ms, last_error);
    return s;
}

}  // namespace

std::vector<uint8_t> rendezvous_broadcast(const RendezvousOptions& o, const std::vector<uint8_t>& blob) {
    NIBBLE_CHECK(o.world_size >= 1 && o.rank >= 0 && o.rank < o.world_size,
                 "rendezvous: rank {} is outside a group of {}", o.rank, o.world_size);
    NIBBLE_CHECK(o.master_port >= 1 && o.master_port <= 65535, "rendezvous: --master-port {} is not a TCP port",
                 o.master_port);
    if (o.world_size == 1) return blob;
    const Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(o.timeout_ms);
    if (o.rank == 0) return serve_rank0(o, blob, deadline);
    Socket s = connect_to_rank0(o, deadline);
    const uint32_t world = static_cast<uint32_t>(o.world_size), rank = static_cast<uint32_t>(o.rank);
    send_all(s.fd, kMagic, sizeof kMagic, deadline, "rendezvous: saying hello to rank 0");
    send_all(s.fd, &world, sizeof world, deadline, "rendezvous: saying hello to rank 0");
    send_all(s.fd, &rank, sizeof rank, deadline, "rendezvous: saying hello to rank 0");
    char magic[4];
    uint64_t length = 0;
    const std::string what = "rendezvous: waiting for rank 0's id (all ranks must join first)";
    recv_all(s.fd, magic, sizeof magic, deadline, what);
    NIBBLE_CHECK(std::memcmp(magic, kMagic, sizeof magic) == 0, "rendezvous: {}:{} is not a nibble rank 0",
                 o.master_addr, o.master_port);
    recv_all(s.fd, &length, sizeof length, deadline, what);
    NIBBLE_CHECK(length <= (1u << 20), "rendezvous: rank 0 announced a {}-byte id", length);
    std::vector<uint8_t> out(static_cast<size_t>(length));
    recv_all(s.fd, out.data(), out.size(), deadline, what);
    return out;
}

}  // namespace nibble
