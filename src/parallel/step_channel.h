// The control channel of a tensor-parallel serving group: rank 0 (which runs the engine) tells every other
// rank which forward to run next, so that all ranks run the same steps in the same order and their NCCL
// collectives match. Plain TCP beside NCCL (which carries the activations); rank 0 listens on all
// interfaces at step_channel_port (--master-port + 1), each other rank connects and says who it is.
//
// Wire (host byte order; every node runs the same build):
//   hello    follower -> rank 0: "NBSC" + uint32 world_size + uint32 rank
//   message  either way:         "NBSC" + uint64 length + length bytes
// Rank 0 sends steps (and the serving setup); followers answer only during setup (step_channel.h does not
// read the bytes: engine/runner_step.h encodes steps).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "parallel/parallel_options.h"
#include "parallel/tcp_socket.h"

namespace nibble {

struct StepChannelOptions {
    std::string master_addr = "127.0.0.1";  // rank 0's host, as the other ranks reach it
    int port = 29502;                       // rank 0 listens here, on all interfaces (0: any free port)
    int world_size = 1;
    int rank = 0;
    int timeout_ms = 600000;  // joining: rank 0's wait for every hello (and each setup reply), a follower's
                              // attempts to reach rank 0
};

// The channel's port of a group: --master-port + 1 (NCCL's bootstrap has --master-port itself).
int step_channel_port(const ParallelOptions& options);

// Where every rank of `options` finds the channel, for global rank `rank`.
StepChannelOptions step_channel_options(const ParallelOptions& options, int64_t rank);

class StepChannelLeader {
public:
    // Listens at once, so that followers that start first wait in the backlog. Throws if the port is taken.
    explicit StepChannelLeader(const StepChannelOptions& options);

    // Takes every follower's hello (ranks 1 .. world_size-1, in any order). `tick` runs about every 200 ms of
    // waiting and may throw (a local child that has exited). Throws naming the ranks missing at the timeout,
    // or a peer that is not one of this group's ranks.
    void accept_followers(const std::function<void()>& tick = {});

    // Sends one message to every follower, in rank order. A follower whose connection has closed is an error
    // naming its rank; the channel then stays broken (every later call throws the same error).
    void broadcast(std::span<const uint8_t> message);
    // One message to one follower (e.g. its setup), and its answer (waiting up to the timeout, tick as above).
    void send(int rank, std::span<const uint8_t> message);
    std::vector<uint8_t> receive(int rank, const std::function<void()>& tick = {});

    int world_size() const { return options_.world_size; }
    int port() const { return options_.port; }  // the bound one when options.port was 0

private:
    net::Socket& follower(int rank);

    StepChannelOptions options_;
    net::Socket listener_;
    std::vector<net::Socket> followers_;  // [world_size]; [0] unused
    std::string broken_;                  // the first failure of broadcast, "" while healthy
};

class StepChannelFollower {
public:
    // Connects to rank 0 (retrying until the timeout: it may start later) and says hello.
    explicit StepChannelFollower(const StepChannelOptions& options);

    // Waits (for ever: a serving group may be idle for hours) for rank 0's next message. Returns false when
    // rank 0 has closed the connection between messages (it has gone); a message cut short is an error.
    bool receive(std::vector<uint8_t>& message);
    void send(std::span<const uint8_t> message);

    int rank() const { return options_.rank; }

private:
    StepChannelOptions options_;
    net::Socket socket_;
};

}  // namespace nibble
