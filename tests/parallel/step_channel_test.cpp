// The step channel over localhost, ranks as threads: followers that start before rank 0 retry until it
// listens; every follower receives every broadcast in order (empty and 1 MiB messages included) and learns
// that rank 0 has gone when it closes; setup-style send/receive both ways. Failures are named: a follower that
// never joins (the timeout names its rank), a tick that gives up early, a follower gone before a broadcast
// (its rank; later broadcasts repeat the error), a peer that is not a rank, a group-size mismatch, and a
// message cut short.
#include <gtest/gtest.h>

#include <sys/socket.h>

#include <chrono>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "parallel/step_channel.h"
#include "parallel/tcp_socket.h"
#include "parallel_test_util.h"

namespace nibble {
namespace {

using test::error_of;

StepChannelOptions leader_options(int world, int timeout_ms = 20000) {
    return {.master_addr = "127.0.0.1", .port = 0, .world_size = world, .rank = 0, .timeout_ms = timeout_ms};
}

StepChannelOptions follower_options(int port, int world, int rank, int timeout_ms = 20000) {
    return {.master_addr = "127.0.0.1", .port = port, .world_size = world, .rank = rank, .timeout_ms = timeout_ms};
}

TEST(StepChannel, EveryFollowerReceivesEveryMessageInOrder) {
    const int world = 4;
    std::mt19937 rng(5);
    std::vector<std::vector<uint8_t>> messages = {{1, 2, 3}, {}, std::vector<uint8_t>(1 << 20), {42}};
    for (uint8_t& b : messages[2]) b = static_cast<uint8_t>(rng());
    auto leader = std::make_unique<StepChannelLeader>(leader_options(world));
    const int port = leader->port();
    ASSERT_GT(port, 0);
    std::vector<std::vector<std::vector<uint8_t>>> got(world);
    std::vector<std::string> errors(world);
    std::vector<std::vector<uint8_t>> setups(world);
    std::vector<std::thread> followers;
    for (int r = 1; r < world; ++r) {
        followers.emplace_back([&, r] {
            try {
                StepChannelFollower f(follower_options(port, world, r));
                EXPECT_EQ(f.rank(), r);
                std::vector<uint8_t> m;
                ASSERT_TRUE(f.receive(m));  // the setup
                setups[static_cast<size_t>(r)] = m;
                f.send(std::vector<uint8_t>{static_cast<uint8_t>(10 + r)});
                while (f.receive(m)) got[static_cast<size_t>(r)].push_back(m);
            } catch (const std::exception& e) {
                errors[static_cast<size_t>(r)] = e.what();
            }
        });
    }
    leader->accept_followers();
    for (int r = 1; r < world; ++r) leader->send(r, std::vector<uint8_t>{static_cast<uint8_t>(r)});
    for (int r = 1; r < world; ++r) EXPECT_EQ(leader->receive(r), std::vector<uint8_t>{static_cast<uint8_t>(10 + r)});
    for (const auto& m : messages) leader->broadcast(m);
    leader.reset();  // closes every connection: the followers' receive returns false
    for (auto& t : followers) t.join();
    for (int r = 1; r < world; ++r) {
        EXPECT_EQ(errors[static_cast<size_t>(r)], "") << r;
        EXPECT_EQ(setups[static_cast<size_t>(r)], std::vector<uint8_t>{static_cast<uint8_t>(r)}) << r;
        EXPECT_EQ(got[static_cast<size_t>(r)], messages) << r;
    }
}

TEST(StepChannel, FollowersThatStartFirstWaitForRankZero) {
    // Rank 0's port is known in advance here (bound and released), as --master-port is in serving.
    int port = 0;
    {
        net::Socket probe = net::listen_on_port(0, 1, "probe");
        port = net::local_port(probe.fd);
    }
    std::string error;
    std::thread follower([&] {
        try {
            StepChannelFollower f(follower_options(port, 2, 1));
            std::vector<uint8_t> m;
            EXPECT_TRUE(f.receive(m));
            EXPECT_EQ(m, std::vector<uint8_t>{9});
        } catch (const std::exception& e) {
            error = e.what();
        }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    StepChannelOptions o = leader_options(2);
    o.port = port;
    StepChannelLeader leader(o);
    leader.accept_followers();
    leader.broadcast(std::vector<uint8_t>{9});
    follower.join();
    EXPECT_EQ(error, "");
}

TEST(StepChannel, AFollowerThatNeverJoinsIsNamedAtTheTimeout) {
    StepChannelLeader leader(leader_options(3, 400));
    std::thread one([&] { StepChannelFollower f(follower_options(leader.port(), 3, 1)); });
    const auto start = std::chrono::steady_clock::now();
    const std::string e = error_of([&] { leader.accept_followers(); });
    one.join();
    EXPECT_NE(e.find("for rank(s) 2 to join"), std::string::npos) << e;
    EXPECT_NE(e.find("timed out"), std::string::npos) << e;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));

    // A tick (serve: "has a child rank exited?") ends the wait before the timeout.
    StepChannelLeader patient(leader_options(2, 60000));
    int ticks = 0;
    const std::string t = error_of([&] {
        patient.accept_followers([&] {
            if (++ticks == 3) fail("rank 1 (pid 123) exited with status 1");
        });
    });
    EXPECT_EQ(t, "rank 1 (pid 123) exited with status 1");

    // A follower with nobody listening gives up at its timeout, naming where it looked.
    int port = 0;
    {
        net::Socket probe = net::listen_on_port(0, 1, "probe");
        port = net::local_port(probe.fd);
    }
    const std::string f = error_of([&] { StepChannelFollower x(follower_options(port, 2, 1, 300)); });
    EXPECT_NE(f.find("rank 1 could not reach rank 0 at 127.0.0.1:" + std::to_string(port)), std::string::npos) << f;
}

TEST(StepChannel, AFollowerGoneIsNamedAtTheNextBroadcast) {
    auto leader_owner = std::make_unique<StepChannelLeader>(leader_options(3));
    StepChannelLeader& leader = *leader_owner;
    std::promise<void> rank2_gone;
    std::thread one([&] {
        StepChannelFollower f(follower_options(leader.port(), 3, 1));
        std::vector<uint8_t> m;
        while (f.receive(m)) {
        }
    });
    std::thread two([&] {
        {
            StepChannelFollower f(follower_options(leader.port(), 3, 2));
            std::vector<uint8_t> m;
            EXPECT_TRUE(f.receive(m));
        }  // closes after the first message
        rank2_gone.set_value();
    });
    leader.accept_followers();
    leader.broadcast(std::vector<uint8_t>{1});
    rank2_gone.get_future().wait();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the FIN crosses loopback
    const std::string e = error_of([&] { leader.broadcast(std::vector<uint8_t>{2}); });
    EXPECT_NE(e.find("rank 2 has closed its connection"), std::string::npos) << e;
    // The group is out of step for good: the same error again, without sending.
    EXPECT_EQ(error_of([&] { leader.broadcast(std::vector<uint8_t>{3}); }), e);
    // A follower that is gone before answering is named too.
    EXPECT_NE(error_of([&] { leader.receive(2); }).find("rank 2 closed its connection before answering"),
              std::string::npos);
    two.join();
    // Rank 1 got message 1, and maybe 2 (it is sent in rank order before rank 2 is checked); its loop ends
    // when the leader goes.
    leader_owner.reset();
    one.join();
}

TEST(StepChannel, StrangersAndMismatchedGroupsAreRefused) {
    {
        StepChannelLeader leader(leader_options(2, 5000));
        std::thread stranger([&] {
            std::string last;
            net::Socket s = net::connect_with_retry("127.0.0.1", leader.port(), net::Clock::now() + std::chrono::seconds(5), last);
            const char junk[12] = {'G', 'E', 'T', ' ', '/', ' ', 'H', 'T', 'T', 'P', '/', '1'};
            net::send_all(s.fd, junk, sizeof junk, net::Clock::now() + std::chrono::seconds(5), "stranger");
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
        });
        const std::string e = error_of([&] { leader.accept_followers(); });
        stranger.join();
        EXPECT_NE(e.find("is not a nibble rank"), std::string::npos) << e;
    }
    {
        auto leader = std::make_unique<StepChannelLeader>(leader_options(2, 5000));
        const int port = leader->port();
        std::thread other([&] {
            try {
                StepChannelFollower f(follower_options(port, 4, 1));
                std::vector<uint8_t> m;
                f.receive(m);
            } catch (const Error&) {
                // rank 0 hangs up on it
            }
        });
        const std::string e = error_of([&] { leader->accept_followers(); });
        EXPECT_NE(e.find("rank 1 expects a group of 4 ranks, rank 0 one of 2"), std::string::npos) << e;
        leader.reset();  // closes the listener (the refused peer's socket closed when the error was thrown)
        other.join();
    }
}

TEST(StepChannel, AMessageCutShortIsAnError) {
    net::Socket listener = net::listen_on_port(0, 1, "test rank 0");
    const int port = net::local_port(listener.fd);
    std::thread rank0([&] {
        net::Socket peer(::accept(listener.fd, nullptr, nullptr));
        char hello[12];
        net::recv_all(peer.fd, hello, sizeof hello, net::Clock::now() + std::chrono::seconds(5), "hello");
        // A header announcing 100 bytes, then 10 of them, then the connection closes.
        uint8_t header[12] = {'N', 'B', 'S', 'C'};
        const uint64_t length = 100;
        std::memcpy(header + 4, &length, sizeof length);
        const uint8_t body[10] = {};
        net::send_all(peer.fd, header, sizeof header, net::Clock::now() + std::chrono::seconds(5), "header");
        net::send_all(peer.fd, body, sizeof body, net::Clock::now() + std::chrono::seconds(5), "body");
    });
    StepChannelFollower f(follower_options(port, 2, 1));
    std::vector<uint8_t> m;
    const std::string e = error_of([&] { f.receive(m); });
    rank0.join();
    EXPECT_NE(e.find("closed the connection after 10 of 100 bytes"), std::string::npos) << e;
}

}  // namespace
}  // namespace nibble
