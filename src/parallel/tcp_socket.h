// The TCP plumbing of the multi-process group, shared by the NCCL bootstrap (tcp_rendezvous.h) and the
// serving control channel (step_channel.h): an owning socket, deadline-bounded whole-buffer sends and
// receives, a listener on every interface, and a connect that retries until a deadline (the peer may start
// later). Every wait is bounded by a deadline; Clock::time_point::max() waits for ever. Errors are
// nibble::Error whose message starts with the caller's `what` (a phrase naming who waits for whom).
// Plain C++ with no fmt: the header stays includable from anywhere.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>

namespace nibble::net {

using Clock = std::chrono::steady_clock;
inline constexpr Clock::time_point kNoDeadline = Clock::time_point::max();

// Closes the descriptor when it goes out of scope.
struct Socket {
    int fd = -1;
    explicit Socket(int f = -1) : fd(f) {}
    Socket(Socket&& o) noexcept : fd(o.fd) { o.fd = -1; }
    Socket& operator=(Socket&& o) noexcept;
    Socket(const Socket&) = delete;
    Socket& operator=(const Socket&) = delete;
    ~Socket();
    bool valid() const { return fd >= 0; }
};

// Milliseconds left until the deadline, 0 when past, -1 for kNoDeadline (poll's "for ever").
int remaining_ms(Clock::time_point deadline);

// Waits until fd is readable (POLLIN) or writable (POLLOUT); throws "<what>: timed out" at the deadline. With
// `tick`, the wait is cut into slices of about 200 ms and tick() runs between them (it may throw: e.g. a
// child process that waits will never come).
void wait_for(int fd, short events, Clock::time_point deadline, const std::string& what,
              const std::function<void()>& tick = {});

// All n bytes, or an error naming `what` (a closed peer included).
void send_all(int fd, const void* data, size_t n, Clock::time_point deadline, const std::string& what);
void recv_all(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what,
              const std::function<void()>& tick = {});
// As recv_all, but a peer that closes before the first byte is a clean end: returns false.
bool recv_all_or_eof(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what,
                     const std::function<void()>& tick = {});

// Whether the peer has closed (or broken) a connection it should not be sending on: a non-blocking check.
bool peer_closed(int fd);

// Low latency for small messages (no Nagle).
void set_no_delay(int fd);

// A listener on every interface (IPv6 and IPv4 where the host has IPv6); port 0: any free port. Throws "<what>: cannot listen on
// port P: reason".
Socket listen_on_port(int port, int backlog, const std::string& what);

// The port a socket is bound to (a listener on port 0 gets one from the kernel).
int local_port(int fd);

// Connects to host:port, retrying every 100 ms (the peer may not listen yet) until the deadline. Non-blocking
// connects, so an unreachable host costs at most the time left, not the kernel's SYN timeout; the socket is
// blocking once connected. Returns an invalid Socket at the deadline, with the last failure in last_error.
Socket connect_with_retry(const std::string& host, int port, Clock::time_point deadline, std::string& last_error);

}  // namespace nibble::net
