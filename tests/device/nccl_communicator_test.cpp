// NcclCommunicator on real GPUs: one rank on one GPU (all-reduce of fresh random data leaves it unchanged,
// all-gather copies it into a poisoned receive buffer, F32 and BF16, bit for bit: a sum over one rank is the
// value itself), and, when the machine has two or more GPUs, two ranks as two threads bootstrapped over the
// TCP rendezvous on 127.0.0.1, checked against the host sum (a + b: one rounding, the same in any order);
// with four or more GPUs, four ranks likewise (the sum within the rounding bound of any order).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#include "cuda/cuda_check.h"
#include "device_test_util.h"
#include "parallel/nccl_communicator.h"
#include "tensor_parallel_util.h"
#include "../parallel/free_port.h"

namespace nibble {
namespace {

// Random values as raw bytes of `dtype` (F32 or BF16).
std::vector<uint8_t> random_bytes(std::mt19937_64& rng, size_t n, DType dtype) {
    return test::bytes_of(test::random_normal(rng, n, 2.0f), dtype);
}

TEST(NcclCommunicator, OneRankAllReduceAndAllGatherReturnTheInput) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    cudaStream_t stream = nullptr;
    NIBBLE_CUDA_CHECK(cudaSetDevice(0));
    NIBBLE_CUDA_CHECK(cudaStreamCreate(&stream));
    {
        // From the flags' defaults (one node, one GPU), as serve would build it.
        const NcclBootstrap bootstrap = nccl_bootstrap(ParallelOptions{.master_port = test::free_port()}, 0);
        EXPECT_EQ(bootstrap.world_size, 1);
        EXPECT_EQ(bootstrap.rank, 0);
        NcclCommunicator comm(bootstrap, stream);
        EXPECT_EQ(comm.rank(), 0);
        EXPECT_EQ(comm.world_size(), 1);
        for (DType dtype : {DType::F32, DType::BF16}) {
            SCOPED_TRACE(std::string(dtype_name(dtype)));
            for (size_t n : {size_t{1}, size_t{1000}, size_t{1} << 20}) {
                const std::vector<uint8_t> host = random_bytes(rng, n, dtype);
                cuda::DeviceBuffer data(host.size());
                data.upload(host.data(), host.size());
                comm.all_reduce_sum(data.get(), static_cast<int64_t>(n), dtype);
                NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
                std::vector<uint8_t> back(host.size());
                data.download(back.data(), back.size());
                EXPECT_EQ(back, host) << "all_reduce_sum of " << n;

                cuda::DeviceBuffer recv(host.size());
                recv.fill_bytes(0xff);
                comm.all_gather(data.get(), static_cast<int64_t>(n), dtype, recv.get());
                NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
                std::vector<uint8_t> gathered(host.size());
                recv.download(gathered.data(), gathered.size());
                EXPECT_EQ(gathered, host) << "all_gather of " << n;
            }
        }
        EXPECT_THROW(comm.all_reduce_sum(nullptr, 4, DType::I32), std::runtime_error);
    }
    NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Each of tp ranks (threads on GPUs 0 .. tp-1, bootstrapped from the flags as serve does) all-reduces its
// host[r] and all-gathers it into a poisoned buffer. [tp] results: the reduced [n] and the gathered [tp * n].
struct RankSums {
    std::vector<std::vector<float>> reduced, gathered;
};
RankSums sum_and_gather_on_ranks(int tp, const std::vector<std::vector<float>>& host) {
    const size_t n = host[0].size(), ranks = static_cast<size_t>(tp);
    const int port = test::free_port();
    RankSums out{std::vector<std::vector<float>>(ranks, std::vector<float>(n)),
                 std::vector<std::vector<float>>(ranks, std::vector<float>(ranks * n))};
    std::vector<std::string> errors(ranks);
    std::vector<std::thread> threads;
    for (int r = 0; r < tp; ++r) {
        threads.emplace_back([&, r] {
            try {
                NIBBLE_CUDA_CHECK(cudaSetDevice(r));
                cudaStream_t stream = nullptr;
                NIBBLE_CUDA_CHECK(cudaStreamCreate(&stream));
                {
                    const ParallelOptions flags{.tensor_parallel_size = tp, .master_port = port};
                    NcclCommunicator comm(nccl_bootstrap(flags, r), stream);
                    cuda::DeviceBuffer data(n * 4), send(n * 4), recv(ranks * n * 4);
                    data.upload(host[static_cast<size_t>(r)].data(), n * 4);
                    send.upload(host[static_cast<size_t>(r)].data(), n * 4);
                    recv.fill_bytes(0xff);
                    comm.all_reduce_sum(data.get(), static_cast<int64_t>(n), DType::F32);
                    comm.all_gather(send.get(), static_cast<int64_t>(n), DType::F32, recv.get());
                    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
                    data.download(out.reduced[static_cast<size_t>(r)].data(), n * 4);
                    recv.download(out.gathered[static_cast<size_t>(r)].data(), ranks * n * 4);
                }
                NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            } catch (const std::exception& e) {
                errors[static_cast<size_t>(r)] = e.what();
            }
        });
    }
    for (auto& t : threads) t.join();
    for (int r = 0; r < tp; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r << " of " << tp;
    return out;
}

// The gathered buffer of every rank is every rank's input in rank order, bit for bit.
void expect_gathered_in_rank_order(const RankSums& got, const std::vector<std::vector<float>>& host) {
    const size_t n = host[0].size();
    for (size_t r = 0; r < got.gathered.size(); ++r)
        for (size_t from = 0; from < host.size(); ++from)
            for (size_t i = 0; i < n; ++i)
                ASSERT_EQ(got.gathered[r][from * n + i], host[from][i])
                    << "rank " << r << ": rank " << from << "'s element " << i;
}

TEST(NcclCommunicator, TwoRanksOnTwoGpusSumAndGather) {
    NIBBLE_REQUIRE_GPU();
    if (const std::string missing = test::missing_gpus(2); !missing.empty()) GTEST_SKIP() << missing;
    std::mt19937_64 rng(test::fresh_seed());
    std::vector<std::vector<float>> host(2);
    for (auto& h : host) h = test::random_normal(rng, 4096);
    const RankSums got = sum_and_gather_on_ranks(2, host);
    if (HasFailure()) return;
    for (size_t r = 0; r < 2; ++r)
        for (size_t i = 0; i < host[0].size(); ++i)
            ASSERT_EQ(got.reduced[r][i], host[0][i] + host[1][i]) << "rank " << r << " element " << i;
    expect_gathered_in_rank_order(got, host);
}

// Four ranks (the TP = 4 tests' group; skipped below 4 GPUs): a sum of 4 float32 terms is rounded 3 times, in an
// order the algorithm NCCL picks (ring, tree, symmetric kernels) decides, so each element is checked against
// the float64 sum within gamma_3 * sum|terms| (gamma_3 = 3u / (1 - 3u), u = 2^-24), the bound of any order; a
// missing or doubled rank's term is off by a whole term, far beyond it. The gather is a copy: bit for bit.
TEST(NcclCommunicator, FourRanksOnFourGpusSumAndGather) {
    NIBBLE_REQUIRE_GPU();
    if (const std::string missing = test::missing_gpus(4); !missing.empty()) GTEST_SKIP() << missing;
    std::mt19937_64 rng(test::fresh_seed());
    std::vector<std::vector<float>> host(4);
    for (auto& h : host) h = test::random_normal(rng, 4096);
    const RankSums got = sum_and_gather_on_ranks(4, host);
    if (HasFailure()) return;
    const double u = std::ldexp(1.0, -24), gamma3 = 3 * u / (1 - 3 * u);
    size_t differ_from_rank0 = 0;
    for (size_t r = 0; r < 4; ++r)
        for (size_t i = 0; i < host[0].size(); ++i) {
            double exact = 0, magnitude = 0;
            for (const auto& h : host) {
                exact += h[i];
                magnitude += std::fabs(static_cast<double>(h[i]));
            }
            ASSERT_LE(std::fabs(got.reduced[r][i] - exact), gamma3 * magnitude) << "rank " << r << " element " << i;
            differ_from_rank0 += got.reduced[r][i] != got.reduced[0][i];
        }
    expect_gathered_in_rank_order(got, host);
    std::printf("[  detail  ] 4 ranks: %zu reduced elements differ from rank 0's (a rounding order per rank)\n",
                differ_from_rank0);
}

}  // namespace
}  // namespace nibble
