#include "parallel/tcp_socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>

#include "base/error.h"

namespace nibble::net {

Socket& Socket::operator=(Socket&& o) noexcept {
    std::swap(fd, o.fd);
    return *this;
}

Socket::~Socket() {
    if (fd >= 0) ::close(fd);
}

int remaining_ms(Clock::time_point deadline) {
    if (deadline == kNoDeadline) return -1;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return left > 0 ? static_cast<int>(std::min<int64_t>(left, INT_MAX)) : 0;
}

void wait_for(int fd, short events, Clock::time_point deadline, const std::string& what,
              const std::function<void()>& tick) {
    constexpr int kTickMs = 200;
    for (;;) {
        const int left = remaining_ms(deadline);
        const int slice = !tick ? left : left < 0 ? kTickMs : std::min(left, kTickMs);
        pollfd p{fd, events, 0};
        const int rc = ::poll(&p, 1, slice);
        if (rc > 0) return;
        if (rc < 0 && errno != EINTR) fail("{}: poll: {}", what, std::strerror(errno));
        if (rc == 0 && left == 0) fail("{}: timed out", what);
        if (rc == 0 && tick) tick();
    }
}

void send_all(int fd, const void* data, size_t n, Clock::time_point deadline, const std::string& what) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
        wait_for(fd, POLLOUT, deadline, what);
        const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k < 0 && (errno == EPIPE || errno == ECONNRESET)) fail("{}: the peer closed the connection", what);
        NIBBLE_CHECK(k > 0, "{}: send: {}", what, std::strerror(errno));
        p += k;
        n -= static_cast<size_t>(k);
    }
}

bool recv_all_or_eof(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what,
                     const std::function<void()>& tick) {
    auto* p = static_cast<uint8_t*>(data);
    size_t got = 0;
    while (got < n) {
        wait_for(fd, POLLIN, deadline, what, tick);
        const ssize_t k = ::recv(fd, p + got, n - got, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k == 0 || (k < 0 && errno == ECONNRESET)) {
            if (got == 0) return false;
            fail("{}: the peer closed the connection after {} of {} bytes", what, got, n);
        }
        NIBBLE_CHECK(k > 0, "{}: recv: {}", what, std::strerror(errno));
        got += static_cast<size_t>(k);
    }
    return true;
}

void recv_all(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& what,
              const std::function<void()>& tick) {
    NIBBLE_CHECK(recv_all_or_eof(fd, data, n, deadline, what, tick), "{}: the peer closed the connection", what);
}

bool peer_closed(int fd) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) return false;
    if ((p.revents & (POLLERR | POLLHUP)) != 0) return true;
    uint8_t byte = 0;
    const ssize_t k = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR);
}

void set_no_delay(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

Socket listen_on_port(int port, int backlog, const std::string& what) {
    Socket listener(::socket(AF_INET6, SOCK_STREAM, 0));
    const bool v6 = listener.valid();
    if (!v6) listener = Socket(::socket(AF_INET, SOCK_STREAM, 0));
    NIBBLE_CHECK(listener.valid(), "{}: socket: {}", what, std::strerror(errno));
    const int one = 1, zero = 0;
    ::setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc = 0;
    if (v6) {
        ::setsockopt(listener.fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);  // IPv4 peers too
        sockaddr_in6 a{};
        a.sin6_family = AF_INET6;
        a.sin6_addr = in6addr_any;
        a.sin6_port = htons(static_cast<uint16_t>(port));
        rc = ::bind(listener.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    } else {
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons(static_cast<uint16_t>(port));
        rc = ::bind(listener.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    }
    NIBBLE_CHECK(rc == 0, "{}: cannot listen on port {}: {}", what, port, std::strerror(errno));
    NIBBLE_CHECK(::listen(listener.fd, backlog) == 0, "{}: listen on port {}: {}", what, port, std::strerror(errno));
    return listener;
}

int local_port(int fd) {
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    NIBBLE_CHECK(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0, "getsockname: {}", std::strerror(errno));
    if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port);
    return ntohs(reinterpret_cast<const sockaddr_in*>(&a)->sin_port);
}

Socket connect_with_retry(const std::string& host, int port, Clock::time_point deadline, std::string& last_error) {
    const std::string service = std::to_string(port);
    last_error = "no attempt";
    while (remaining_ms(deadline) != 0) {
        addrinfo hints{};
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        addrinfo* found = nullptr;
        const int gai = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
        if (gai != 0) {
            last_error = ::gai_strerror(gai);
        } else {
            for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
                Socket s(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK, a->ai_protocol));
                if (!s.valid()) continue;
                int rc = ::connect(s.fd, a->ai_addr, a->ai_addrlen);
                if (rc != 0 && errno == EINPROGRESS) {
                    pollfd p{s.fd, POLLOUT, 0};
                    int err = ETIMEDOUT;
                    socklen_t len = sizeof err;
                    const int left = remaining_ms(deadline);
                    if (::poll(&p, 1, left < 0 ? 1000 : std::min(1000, left)) > 0)
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
        const int left = remaining_ms(deadline);
        std::this_thread::sleep_for(std::chrono::milliseconds(left < 0 ? 100 : std::min(100, left)));
    }
    return Socket();
}

}  // namespace nibble::net
