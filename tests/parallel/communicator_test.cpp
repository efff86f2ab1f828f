// The in-process communicator (the test double of NCCL) and the TCP rendezvous that bootstraps NCCL:
// all-reduce and all-gather of random data against a plain serial computation, a failing rank that must not
// hang the others, and the unique-id hand-out between threads over 127.0.0.1.
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <thread>

#include "base/error.h"
#include "parallel/in_process_group.h"
#include "parallel/parallel_options.h"
#include "parallel/tcp_rendezvous.h"
#include "tensor/float_formats.h"
#include "free_port.h"

namespace nibble {
namespace {

std::vector<float> random_floats(size_t n, std::mt19937& rng) {
    std::normal_distribution<float> dist(0.0f, 3.0f);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

TEST(InProcessGroup, AllReduceSumsInRankOrderOnEveryRank) {
    for (int n : {1, 2, 3, 4}) {
        std::mt19937 rng(static_cast<unsigned>(n));
        const size_t count = 1000;
        std::vector<std::vector<float>> data(static_cast<size_t>(n));
        for (auto& d : data) d = random_floats(count, rng);
        std::vector<float> expected(count, 0.0f);
        for (const auto& d : data)
            for (size_t i = 0; i < count; ++i) expected[i] += d[i];
        InProcessGroup group(n);
        group.run([&](int r) {
            Communicator& c = group.communicator(r);
            EXPECT_EQ(c.rank(), r);
            EXPECT_EQ(c.world_size(), n);
            c.all_reduce_sum(data[static_cast<size_t>(r)].data(), static_cast<int64_t>(count), DType::F32);
        });
        for (const auto& d : data) EXPECT_EQ(d, expected);  // bit-identical: the same order everywhere
    }
}

TEST(InProcessGroup, Bf16AllReduceRoundsTheFloatSumOnce) {
    std::mt19937 rng(5);
    const int n = 3;
    const size_t count = 257;
    std::vector<std::vector<uint16_t>> data(n, std::vector<uint16_t>(count));
    std::vector<float> sum(count, 0.0f);
    for (auto& d : data) {
        const std::vector<float> f = random_floats(count, rng);
        for (size_t i = 0; i < count; ++i) {
            d[i] = bf16_from_float(f[i]);
            sum[i] += bf16_to_float(d[i]);
        }
    }
    InProcessGroup group(n);
    group.run([&](int r) { group.communicator(r).all_reduce_sum(data[static_cast<size_t>(r)].data(), count, DType::BF16); });
    for (const auto& d : data)
        for (size_t i = 0; i < count; ++i) EXPECT_EQ(d[i], bf16_from_float(sum[i])) << i;
}

TEST(InProcessGroup, AllGatherPutsEachRankInItsSlot) {
    std::mt19937 rng(9);
    const int n = 4;
    const int64_t count = 33;
    std::vector<std::vector<float>> send(n), recv(n, std::vector<float>(static_cast<size_t>(n * count), NAN));
    for (auto& s : send) s = random_floats(static_cast<size_t>(count), rng);
    InProcessGroup group(n);
    group.run([&](int r) {
        group.communicator(r).all_gather(send[static_cast<size_t>(r)].data(), count, DType::F32,
                                         recv[static_cast<size_t>(r)].data());
    });
    for (int r = 0; r < n; ++r)
        for (int q = 0; q < n; ++q)
            for (int64_t i = 0; i < count; ++i)
                EXPECT_EQ(recv[static_cast<size_t>(r)][static_cast<size_t>(q * count + i)], send[static_cast<size_t>(q)][static_cast<size_t>(i)]);
}

TEST(InProcessGroup, AFailingRankDoesNotHangTheOthers) {
    InProcessGroup group(3);
    std::vector<float> x(8, 1.0f);
    try {
        group.run([&](int r) {
            if (r == 1) throw Error("rank 1 broke");
            std::vector<float> mine = x;
            group.communicator(r).all_reduce_sum(mine.data(), 8, DType::F32);
            group.communicator(r).all_reduce_sum(mine.data(), 8, DType::F32);
        });
        ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
        EXPECT_STREQ(e.what(), "rank 1 broke");
    }
    EXPECT_THROW(group.communicator(0).all_reduce_sum(x.data(), 8, DType::I32), Error);
}

TEST(TcpRendezvous, RankZeroHandsItsBlobToEveryRank) {
    const int n = 4, port = test::free_port();
    std::mt19937 rng(11);
    std::vector<uint8_t> blob(128);
    for (uint8_t& b : blob) b = static_cast<uint8_t>(rng());
    std::vector<std::vector<uint8_t>> got(n);
    std::vector<std::string> errors(n);
    std::vector<std::thread> threads;
    // Rank 0 starts last: the others must retry until it listens.
    for (int r = n - 1; r >= 0; --r) {
        threads.emplace_back([&, r] {
            try {
                const RendezvousOptions o{.master_addr = "127.0.0.1", .master_port = port, .world_size = n, .rank = r,
                                          .timeout_ms = 20000};
                got[static_cast<size_t>(r)] = rendezvous_broadcast(o, r == 0 ? blob : std::vector<uint8_t>{});
            } catch (const std::exception& e) {
                errors[static_cast<size_t>(r)] = e.what();
            }
        });
        if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    for (auto& t : threads) t.join();
    for (int r = 0; r < n; ++r) {
        EXPECT_EQ(errors[static_cast<size_t>(r)], "") << r;
        EXPECT_EQ(got[static_cast<size_t>(r)], blob) << r;
    }
}

TEST(TcpRendezvous, TimeoutsAndMismatchesAreNamed) {
    const int port = test::free_port();
    try {
        rendezvous_broadcast({.master_addr = "127.0.0.1", .master_port = port, .world_size = 2, .rank = 1, .timeout_ms = 300},
                             {});
        ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("could not reach rank 0 at 127.0.0.1:" + std::to_string(port)),
                  std::string::npos)
            << e.what();
    }
    // An address that never answers (TEST-NET-1): the wait ends at the deadline, not the kernel's SYN timeout.
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW(rendezvous_broadcast({.master_addr = "192.0.2.1", .master_port = port, .world_size = 2, .rank = 1,
                                       .timeout_ms = 500},
                                      {}),
                 Error);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
    // A rank that believes in a different group size.
    std::string rank0_error;
    std::thread rank0([&] {
        try {
            rendezvous_broadcast({.master_addr = "127.0.0.1", .master_port = port, .world_size = 2, .rank = 0,
                                  .timeout_ms = 5000},
                                 {1, 2, 3});
        } catch (const Error& e) {
            rank0_error = e.what();
        }
    });
    try {
        rendezvous_broadcast({.master_addr = "127.0.0.1", .master_port = port, .world_size = 4, .rank = 1,
                              .timeout_ms = 5000},
                             {});
    } catch (const Error&) {
        // rank 0 hangs up on it
    }
    rank0.join();
    EXPECT_NE(rank0_error.find("expects a group of 4 ranks, rank 0 one of 2"), std::string::npos) << rank0_error;
    // One rank needs no network.
    EXPECT_EQ(rendezvous_broadcast({.world_size = 1, .rank = 0}, {7}), std::vector<uint8_t>{7});
}

TEST(ParallelOptions, ChecksEachFlag) {
    auto error_of = [](const ParallelOptions& o) {
        try {
            check_parallel_options(o);
        } catch (const Error& e) {
            return std::string(e.what());
        }
        return std::string();
    };
    EXPECT_EQ(error_of({}), "");
    EXPECT_EQ(error_of({.tensor_parallel_size = 8, .nnodes = 2, .node_rank = 1}), "");
    EXPECT_NE(error_of({.tensor_parallel_size = 0}).find("--tensor-parallel-size must be at least 1"), std::string::npos);
    EXPECT_NE(error_of({.tensor_parallel_size = 3, .nnodes = 2}).find("multiple of --nnodes 2"), std::string::npos);
    EXPECT_NE(error_of({.tensor_parallel_size = 2, .nnodes = 2, .node_rank = 2}).find("--node-rank must be in [0, 2)"),
              std::string::npos);
    EXPECT_NE(error_of({.master_port = 70000}).find("--master-port"), std::string::npos);
    EXPECT_NE(error_of({.master_addr = ""}).find("--master-addr"), std::string::npos);
    const ParallelOptions two{.tensor_parallel_size = 8, .nnodes = 2, .node_rank = 1};
    EXPECT_EQ(two.gpus_per_node(), 4);
    EXPECT_EQ(two.global_rank(3), 7);
}

}  // namespace
}  // namespace nibble
