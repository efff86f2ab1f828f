#include "parallel/tcp_rendezvous.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "base/error.h"

namespace nibble {

namespace {

constexpr char kMagic[4] = {'N', 'B', 'T', 'P'};
using Clock = std::chrono::steady_clock;

// Closes the descriptor when it goes out of scope.
struct Socket {
    int fd = -1;
    explicit Socket(int f = -1) : fd(f) {}
    Socket(Socket&& o) noexcept : fd(o.fd) { o.fd = -1; }
    Socket& operator=(Socket&& o) noexcept {
        std::swap(fd, o.fd);
        return *this;
    }
    Socket(const Socket&) = delete;
    ~Socket() {
        if (fd >= 0) ::close(fd);
    }
};

int remaining_ms(Clock::time_point deadline) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return left > 0 ? static_cast<int>(left) : 0;
}

// Waits until fd is readable (POLLIN) or writable (POLLOUT), or throws at the deadline.
void wait_for(int fd, short events, Clock::time_point deadline, const std::string& what) {
    for (;;) {
        pollfd p{fd, events, 0};
        const int rc = ::poll(&p, 1, remaining_ms(deadline));
        if (rc > 0) return;
        if (rc == 0) fail("rendezvous: timed out {}", what);
        if (errno != EINTR) fail("rendezvous: poll while {}: {}", what, std::strerror(errno));
    }
}

void send_all(int fd, const void* data, size_t n, Clock::time_point deadline, const std::string& what) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
        wait_for(fd, POLLOUT, deadline, what);
        const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        NIBBLE_CHECK(k > 0, "rendezvous: send while {}: {}", what, std::strerror(errno));
        p += k;
        n -= static_cast<size_t>(k);
    }
}

void recv_all(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what) {
    auto* p = static_cast<uint8_t*>(data);
    while (n > 0) {
        wait_for(fd, POLLIN, deadline, what);
        const ssize_t k = ::recv(fd, p, n, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        NIBBLE_CHECK(k != 0, "rendezvous: the peer closed the connection while {}", what);
        NIBBLE_CHECK(k > 0, "rendezvous: recv while {}: {}", what, std::strerror(errno));
        p += k;
        n -= static_cast<size_t>(k);
    }
}

std::vector<uint8_t> serve_rank0(const RendezvousOptions& o, const std::vector<uint8_t>& blob, Clock::time_point deadline) {
    Socket listener(::socket(AF_INET6, SOCK_STREAM, 0));
    bool v6 = listener.fd >= 0;
    if (!v6) listener = Socket(::socket(AF_INET, SOCK_STREAM, 0));
    NIBBLE_CHECK(listener.fd >= 0, "rendezvous: socket: {}", std::strerror(errno));
    const int one = 1, zero = 0;
    ::setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc = 0;
    if (v6) {
        ::setsockopt(listener.fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);  // IPv4 peers too
        sockaddr_in6 a{};
        a.sin6_family = AF_INET6;
        a.sin6_addr = in6addr_any;
        a.sin6_port = htons(static_cast<uint16_t>(o.master_port));
        rc = ::bind(listener.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    } else {
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons(static_cast<uint16_t>(o.master_port));
        rc = ::bind(listener.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    }
    NIBBLE_CHECK(rc == 0, "rendezvous: rank 0 cannot listen on port {} (--master-port): {}", o.master_port,
                 std::strerror(errno));
    NIBBLE_CHECK(::listen(listener.fd, o.world_size) == 0, "rendezvous: listen on port {}: {}", o.master_port,
                 std::strerror(errno));
    std::vector<Socket> peers(static_cast<size_t>(o.world_size));
    for (int joined = 1; joined < o.world_size;) {
        const std::string what = std::to_string(joined - 1) + " of " + std::to_string(o.world_size - 1) +
                                 " ranks joined rank 0 on port " + std::to_string(o.master_port);
        wait_for(listener.fd, POLLIN, deadline, "waiting for the other ranks: " + what);
        Socket peer(::accept(listener.fd, nullptr, nullptr));
        if (peer.fd < 0) continue;
        char magic[4];
        uint32_t world = 0, rank = 0;
        recv_all(peer.fd, magic, sizeof magic, deadline, "reading a peer's hello");
        NIBBLE_CHECK(std::memcmp(magic, kMagic, sizeof magic) == 0,
                     "rendezvous: a connection to port {} is not a nibble rank (is the port shared?)", o.master_port);
        recv_all(peer.fd, &world, sizeof world, deadline, "reading a peer's hello");
        recv_all(peer.fd, &rank, sizeof rank, deadline, "reading a peer's hello");
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
        const std::string what = "sending the id to rank " + std::to_string(r);
        send_all(peers[static_cast<size_t>(r)].fd, kMagic, sizeof kMagic, deadline, what);
        send_all(peers[static_cast<size_t>(r)].fd, &length, sizeof length, deadline, what);
        send_all(peers[static_cast<size_t>(r)].fd, blob.data(), blob.size(), deadline, what);
    }
    return blob;
}

// Connects to rank 0, retrying (it may not listen yet) until the deadline.
Socket connect_to_rank0(const RendezvousOptions& o, Clock::time_point deadline) {
    const std::string port = std::to_string(o.master_port);
    std::string last_error = "no attempt";
    while (remaining_ms(deadline) > 0) {
        addrinfo hints{};
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        addrinfo* found = nullptr;
        const int gai = ::getaddrinfo(o.master_addr.c_str(), port.c_str(), &hints, &found);
        if (gai != 0) {
            last_error = ::gai_strerror(gai);
        } else {
            for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
                Socket s(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK, a->ai_protocol));
                if (s.fd < 0) continue;
                // Non-blocking, so that an unreachable host costs at most the time left, not the kernel's
                // SYN timeout; the socket goes back to blocking mode once connected (poll guards every read).
                int rc = ::connect(s.fd, a->ai_addr, a->ai_addrlen);
                if (rc != 0 && errno == EINPROGRESS) {
                    pollfd p{s.fd, POLLOUT, 0};
                    int err = ETIMEDOUT;
                    socklen_t len = sizeof err;
                    if (::poll(&p, 1, std::min(1000, remaining_ms(deadline))) > 0)
                        ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
                    rc = err == 0 ? 0 : -1;
                    errno = err;
                }
                if (rc == 0) {
                    ::fcntl(s.fd, F_SETFL, ::fcntl(s.fd, F_GETFL) & ~O_NONBLOCK);
                    ::freeaddrinfo(found);
                    return s;
                }
                last_error = std::strerror(errno);
            }
            ::freeaddrinfo(found);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(std::min(100, remaining_ms(deadline))));
    }
    fail("rendezvous: rank {} could not reach rank 0 at {}:{} (--master-addr / --master-port) within {} ms: {}", o.rank,
         o.master_addr, o.master_port, o.timeout_ms, last_error);
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
    send_all(s.fd, kMagic, sizeof kMagic, deadline, "saying hello to rank 0");
    send_all(s.fd, &world, sizeof world, deadline, "saying hello to rank 0");
    send_all(s.fd, &rank, sizeof rank, deadline, "saying hello to rank 0");
    char magic[4];
    uint64_t length = 0;
    const std::string what = "waiting for rank 0's id (all ranks must join first)";
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
