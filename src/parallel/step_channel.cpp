#include "parallel/step_channel.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include "base/error.h"

namespace nibble {

namespace {

using net::Clock;

constexpr char kMagic[4] = {'N', 'B', 'S', 'C'};
constexpr uint64_t kMaxMessageBytes = uint64_t{1} << 30;
// A step is small and a live peer reads it at once; a send that cannot finish within this is a hung peer.
constexpr auto kSendTimeout = std::chrono::seconds(300);

Clock::time_point deadline_in(int timeout_ms) { return Clock::now() + std::chrono::milliseconds(timeout_ms); }

void send_message(int fd, std::span<const uint8_t> message, const std::string& what) {
    const Clock::time_point deadline = Clock::now() + kSendTimeout;
    const uint64_t length = message.size();
    uint8_t header[sizeof kMagic + sizeof length];
    std::memcpy(header, kMagic, sizeof kMagic);
    std::memcpy(header + sizeof kMagic, &length, sizeof length);
    net::send_all(fd, header, sizeof header, deadline, what);
    net::send_all(fd, message.data(), message.size(), deadline, what);
}

// False when the peer closed the connection before a message began.
bool receive_message(int fd, std::vector<uint8_t>& message, Clock::time_point deadline, const std::string& what,
                     const std::function<void()>& tick = {}) {
    uint8_t header[sizeof kMagic + sizeof(uint64_t)];
    if (!net::recv_all_or_eof(fd, header, sizeof header, deadline, what, tick)) return false;
    NIBBLE_CHECK(std::memcmp(header, kMagic, sizeof kMagic) == 0, "{}: the bytes received are not a step-channel message",
                 what);
    uint64_t length = 0;
    std::memcpy(&length, header + sizeof kMagic, sizeof length);
    NIBBLE_CHECK(length <= kMaxMessageBytes, "{}: a message announces {} bytes (at most {})", what, length,
                 kMaxMessageBytes);
    message.resize(static_cast<size_t>(length));
    net::recv_all(fd, message.data(), message.size(), deadline, what, tick);
    return true;
}

std::string missing_ranks(const std::vector<net::Socket>& followers) {
    std::string out;
    for (size_t r = 1; r < followers.size(); ++r) {
        if (followers[r].valid()) continue;
        if (!out.empty()) out += ", ";
        out += std::to_string(r);
    }
    return out;
}

}  // namespace

int step_channel_port(const ParallelOptions& options) { return static_cast<int>(options.master_port) + 1; }

StepChannelOptions step_channel_options(const ParallelOptions& options, int64_t rank) {
    NIBBLE_CHECK(options.master_port + 1 <= 65535,
                 "--master-port {}: tensor-parallel serving also needs the port after it (the step channel)",
                 options.master_port);
    return {.master_addr = options.master_addr,
            .port = step_channel_port(options),
            .world_size = static_cast<int>(options.tensor_parallel_size),
            .rank = static_cast<int>(rank)};
}

StepChannelLeader::StepChannelLeader(const StepChannelOptions& options)
    : options_(options), followers_(static_cast<size_t>(std::max(options.world_size, 1))) {
    NIBBLE_CHECK(options.world_size >= 1 && options.rank == 0, "step channel: the leader is rank 0 of a group, not rank {} of {}",
                 options.rank, options.world_size);
    NIBBLE_CHECK(options.port >= 0 && options.port <= 65535, "step channel: port {} is not a TCP port", options.port);
    if (options.world_size > 1) {
        listener_ = net::listen_on_port(options.port, options.world_size,
                                        "step channel: rank 0 (--master-port + 1 = " + std::to_string(options.port) + ")");
        options_.port = net::local_port(listener_.fd);
    }
}

void StepChannelLeader::accept_followers(const std::function<void()>& tick) {
    const Clock::time_point deadline = deadline_in(options_.timeout_ms);
    for (std::string missing = missing_ranks(followers_); !missing.empty(); missing = missing_ranks(followers_)) {
        net::wait_for(listener_.fd, POLLIN, deadline,
                      "step channel: rank 0 waiting " + std::to_string(options_.timeout_ms / 1000) + " s for rank(s) " +
                          missing + " to join on port " + std::to_string(options_.port),
                      tick);
        net::Socket peer(::accept(listener_.fd, nullptr, nullptr));
        if (!peer.valid()) continue;
        char magic[4];
        uint32_t world = 0, rank = 0;
        const std::string what = "step channel: reading a peer's hello";
        net::recv_all(peer.fd, magic, sizeof magic, deadline, what);
        NIBBLE_CHECK(std::memcmp(magic, kMagic, sizeof magic) == 0,
                     "step channel: a connection to port {} is not a nibble rank (is the port shared? the step channel "
                     "uses --master-port + 1)",
                     options_.port);
        net::recv_all(peer.fd, &world, sizeof world, deadline, what);
        net::recv_all(peer.fd, &rank, sizeof rank, deadline, what);
        NIBBLE_CHECK(static_cast<int>(world) == options_.world_size,
                     "step channel: rank {} expects a group of {} ranks, rank 0 one of {} (check --tensor-parallel-size "
                     "and --nnodes on every node)",
                     rank, world, options_.world_size);
        NIBBLE_CHECK(rank >= 1 && static_cast<int>(rank) < options_.world_size,
                     "step channel: a peer says it is rank {} of {}", rank, options_.world_size);
        NIBBLE_CHECK(!followers_[rank].valid(), "step channel: two peers say they are rank {} (check --node-rank)", rank);
        net::set_no_delay(peer.fd);
        followers_[rank] = std::move(peer);
    }
}

net::Socket& StepChannelLeader::follower(int rank) {
    NIBBLE_CHECK(rank >= 1 && rank < options_.world_size, "step channel: no follower rank {} in a group of {}", rank,
                 options_.world_size);
    net::Socket& s = followers_[static_cast<size_t>(rank)];
    NIBBLE_CHECK(s.valid(), "step channel: rank {} has not joined (accept_followers first)", rank);
    return s;
}

void StepChannelLeader::broadcast(std::span<const uint8_t> message) {
    NIBBLE_CHECK(broken_.empty(), "{}", broken_);
    for (int r = 1; r < options_.world_size; ++r) {
        net::Socket& s = follower(r);
        try {
            // Followers never send while steps flow: anything readable means the connection has ended, which
            // a send alone may not reveal until the step after.
            NIBBLE_CHECK(!net::peer_closed(s.fd), "step channel: rank {} has closed its connection", r);
            send_message(s.fd, message, "step channel: sending a step to rank " + std::to_string(r));
        } catch (const Error& e) {
            broken_ = std::string(e.what()) + " (the rank has exited or failed: its log says why)";
            fail("{}", broken_);
        }
    }
}

void StepChannelLeader::send(int rank, std::span<const uint8_t> message) {
    send_message(follower(rank).fd, message, "step channel: sending to rank " + std::to_string(rank));
}

std::vector<uint8_t> StepChannelLeader::receive(int rank, const std::function<void()>& tick) {
    std::vector<uint8_t> message;
    const std::string what = "step channel: waiting " + std::to_string(options_.timeout_ms / 1000) +
                             " s for rank " + std::to_string(rank) + "'s answer";
    NIBBLE_CHECK(receive_message(follower(rank).fd, message, deadline_in(options_.timeout_ms), what, tick),
                 "step channel: rank {} closed its connection before answering (it has exited or failed: its log says "
                 "why)",
                 rank);
    return message;
}

StepChannelFollower::StepChannelFollower(const StepChannelOptions& options) : options_(options) {
    NIBBLE_CHECK(options.world_size > 1 && options.rank >= 1 && options.rank < options.world_size,
                 "step channel: a follower is rank 1 .. {} of its group, not rank {}", options.world_size - 1,
                 options.rank);
    const Clock::time_point deadline = deadline_in(options.timeout_ms);
    std::string last_error;
    socket_ = net::connect_with_retry(options.master_addr, options.port, deadline, last_error);
    if (!socket_.valid())
        fail("step channel: rank {} could not reach rank 0 at {}:{} (--master-addr, --master-port + 1) within {} s: {}",
             options.rank, options.master_addr, options.port, options.timeout_ms / 1000, last_error);
    net::set_no_delay(socket_.fd);
    const uint32_t world = static_cast<uint32_t>(options.world_size), rank = static_cast<uint32_t>(options.rank);
    uint8_t hello[sizeof kMagic + 2 * sizeof(uint32_t)];
    std::memcpy(hello, kMagic, sizeof kMagic);
    std::memcpy(hello + sizeof kMagic, &world, sizeof world);
    std::memcpy(hello + sizeof kMagic + sizeof world, &rank, sizeof rank);
    net::send_all(socket_.fd, hello, sizeof hello, deadline, "step channel: saying hello to rank 0");
}

bool StepChannelFollower::receive(std::vector<uint8_t>& message) {
    return receive_message(socket_.fd, message, net::kNoDeadline,
                           "step channel: rank " + std::to_string(options_.rank) + " receiving from rank 0");
}

void StepChannelFollower::send(std::span<const uint8_t> message) {
    send_message(socket_.fd, message, "step channel: rank " + std::to_string(options_.rank) + " answering rank 0");
}

}  // namespace nibble
