// NcclCommunicator::all_reduce_residual_rmsnorm (parallel/lsa_reduce_norm_cuda.h) on 2 and 4 GPUs (ranks as
// threads; skipped with fewer GPUs), against a host reference of its contract: three calls in a row as a
// decode step makes them (rows in half 0, then half 1, then half 0 again, the residual carried), fresh random
// partial sums per rank and call, one residual and one norm weight shared by the ranks as in the forward,
// outputs poisoned first. Skipped, with the reason, where the runtime NCCL is not the one the binary was built
// against (the device API's structures are compiled in).
//   residual: bit for bit. The sum over ranks runs in rank order in float32 and is rounded to the dtype, then
//     the residual add is rounded: the host does the same operations in the same order.
//   out: rmsnorm of that residual. The device's sum of squares runs in another order and rsqrtf is within 2
//     ulp, so the float32 value differs by a few ulps: F32 within 1e-5 relative; BF16 within one BF16 ulp
//     (2^-8 relative) of the host's value rounded once.
//   every rank: the same bits (the same sums in the same order).
#include <gtest/gtest.h>

#include <nccl.h>

#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cuda/cuda_check.h"
#include "device_test_util.h"
#include "parallel/lsa_reduce_norm_cuda.h"
#include "parallel/nccl_communicator.h"
#include "tensor_parallel_util.h"
#include "../parallel/free_port.h"

namespace nibble {
namespace {

float round_to(float v, DType dtype) { return dtype == DType::BF16 ? bf16_to_float(bf16_from_float(v)) : v; }

struct Case {
    int tp;
    int64_t m, d;
    DType dtype;
};

class LsaReduceNorm : public ::testing::TestWithParam<Case> {};

TEST_P(LsaReduceNorm, MatchesTheHostReferenceOnEveryRank) {
    NIBBLE_REQUIRE_GPU();
    const Case c = GetParam();
    if (const std::string missing = test::missing_gpus(c.tp); !missing.empty()) GTEST_SKIP() << missing;
    int version = 0;
    if (ncclGetVersion(&version) != ncclSuccess || version != NCCL_VERSION_CODE)
        GTEST_SKIP() << "the runtime NCCL is " << version << ", this binary was built against " << NCCL_VERSION_CODE
                     << ": the fused reduce is off (NcclCommunicator::make_device_comm); on the lent machines run with "
                        "the matching NCCL (scripts/device-run.sh)";
    constexpr int kCalls = 3;
    const size_t n = static_cast<size_t>(c.m * c.d), ranks = static_cast<size_t>(c.tp);
    const float eps = 1e-5f;
    std::mt19937_64 rng(test::fresh_seed());
    // partial[call][rank] [m, d] (already rounded to the dtype), residual0 [m, d], weight [d]
    std::vector<std::vector<std::vector<float>>> partial(kCalls, std::vector<std::vector<float>>(ranks));
    for (auto& call : partial)
        for (auto& p : call) {
            p = test::random_normal(rng, n, 1.5f);
            for (float& v : p) v = round_to(v, c.dtype);
        }
    std::vector<float> residual = test::random_normal(rng, n, 3.0f);
    for (float& v : residual) v = round_to(v, c.dtype);
    const std::vector<float> weight = test::random_normal(rng, static_cast<size_t>(c.d), 1.0f);

    // Host reference of the three calls.
    std::vector<std::vector<float>> want_res(kCalls), want_out(kCalls);
    std::vector<float> res = residual;
    for (int k = 0; k < kCalls; ++k) {
        std::vector<float> out(n);
        for (int64_t row = 0; row < c.m; ++row) {
            double ss = 0;
            for (int64_t j = 0; j < c.d; ++j) {
                const size_t i = static_cast<size_t>(row * c.d + j);
                float s = partial[k][0][i];
                for (size_t r = 1; r < ranks; ++r) s += partial[k][r][i];
                res[i] = round_to(round_to(s, c.dtype) + res[i], c.dtype);
                ss += static_cast<double>(res[i]) * res[i];
            }
            const double inv = 1.0 / std::sqrt(ss / static_cast<double>(c.d) + eps);
            for (int64_t j = 0; j < c.d; ++j) {
                const size_t i = static_cast<size_t>(row * c.d + j);
                out[i] = static_cast<float>(weight[static_cast<size_t>(j)] * (res[i] * inv));
            }
        }
        want_res[static_cast<size_t>(k)] = res;
        want_out[static_cast<size_t>(k)] = out;
    }

    // got[rank][call]: residual and out after each call.
    std::vector<std::vector<std::vector<float>>> got_res(ranks), got_out(ranks);
    std::vector<std::string> errors(ranks);
    const int port = test::free_port();
    std::vector<std::thread> threads;
    for (int r = 0; r < c.tp; ++r)
        threads.emplace_back([&, r] {
            try {
                NIBBLE_CUDA_CHECK(cudaSetDevice(r));
                cudaStream_t stream = nullptr;
                NIBBLE_CUDA_CHECK(cudaStreamCreate(&stream));
                {
                    const ParallelOptions flags{.tensor_parallel_size = c.tp, .master_port = port};
                    NcclCommunicator comm(nccl_bootstrap(flags, r), stream);
                    const size_t bytes = n * dtype_size(c.dtype);
                    auto* window = static_cast<uint8_t*>(comm.fast_buffer(2 * bytes));
                    if (window == nullptr) throw std::runtime_error("no fast buffer");
                    if (!comm.can_all_reduce_residual_rmsnorm(c.m, c.d, c.dtype))
                        throw std::runtime_error("the fused reduce is not available on this machine");
                    cuda::DeviceBuffer dres(bytes), dout(bytes), dw(static_cast<size_t>(c.d) * 4);
                    const std::vector<uint8_t> r0 = test::bytes_of(residual, c.dtype);
                    dres.upload(r0.data(), bytes);
                    dw.upload(weight.data(), dw.bytes());
                    for (int k = 0; k < kCalls; ++k) {
                        uint8_t* rows = window + static_cast<size_t>((k + 1) % 2) * bytes;  // 1, 0, 1 as the forward
                        const std::vector<uint8_t> p =
                            test::bytes_of(partial[static_cast<size_t>(k)][static_cast<size_t>(r)], c.dtype);
                        // After the previous call on this stream: the reuse rule's order.
                        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(rows, p.data(), bytes, cudaMemcpyHostToDevice, stream));
                        NIBBLE_CUDA_CHECK(cudaMemsetAsync(dout.get(), 0xff, bytes, stream));
                        comm.all_reduce_residual_rmsnorm(rows, c.m, c.d, c.dtype, dres.get(), dw.as<float>(), eps,
                                                         dout.get());
                        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
                        std::vector<uint8_t> b(bytes);
                        dres.download(b.data(), bytes);
                        got_res[static_cast<size_t>(r)].push_back(test::values_of(b, c.dtype));
                        dout.download(b.data(), bytes);
                        got_out[static_cast<size_t>(r)].push_back(test::values_of(b, c.dtype));
                    }
                }
                NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
            } catch (const std::exception& e) {
                errors[static_cast<size_t>(r)] = e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (size_t r = 0; r < ranks; ++r) ASSERT_EQ(errors[r], "") << "rank " << r << " of " << c.tp;
    const double rel = c.dtype == DType::BF16 ? std::ldexp(1.0, -8) : 1e-5;
    for (size_t r = 0; r < ranks; ++r)
        for (int k = 0; k < kCalls; ++k) {
            const auto& gr = got_res[r][static_cast<size_t>(k)];
            const auto& go = got_out[r][static_cast<size_t>(k)];
            for (size_t i = 0; i < n; ++i) {
                ASSERT_EQ(gr[i], want_res[static_cast<size_t>(k)][i])
                    << "rank " << r << " call " << k << " residual element " << i;
                const double ref = want_out[static_cast<size_t>(k)][i];
                ASSERT_LE(std::fabs(go[i] - ref), rel * std::fabs(ref) + 1e-30)
                    << "rank " << r << " call " << k << " out element " << i << ": " << go[i] << " vs " << ref;
                ASSERT_EQ(go[i], got_out[0][static_cast<size_t>(k)][i]) << "rank " << r << " differs from rank 0";
            }
        }
}

INSTANTIATE_TEST_SUITE_P(Ranks, LsaReduceNorm,
                         ::testing::Values(Case{2, 1, 8192, DType::BF16}, Case{2, 5, 1032, DType::F32},
                                           Case{4, 1, 8192, DType::BF16}, Case{4, 64, 4096, DType::BF16},
                                           Case{4, 3, 1032, DType::F32}),
                         [](const auto& info) {
                             const Case& c = info.param;
                             return "tp" + std::to_string(c.tp) + "_m" + std::to_string(c.m) + "_d" +
                                    std::to_string(c.d) + (c.dtype == DType::BF16 ? "_bf16" : "_f32");
                         });

// The contract's bounds, without a GPU group: rows past the barrier count and odd widths are refused.
TEST(LsaReduceNorm, SupportedShapes) {
    EXPECT_TRUE(cuda::lsa_reduce_norm_supported(1, 8192, DType::BF16));
    EXPECT_TRUE(cuda::lsa_reduce_norm_supported(cuda::kLsaReduceNormMaxRows, 8, DType::F32));
    EXPECT_FALSE(cuda::lsa_reduce_norm_supported(cuda::kLsaReduceNormMaxRows + 1, 8192, DType::BF16));
    EXPECT_FALSE(cuda::lsa_reduce_norm_supported(1, 8196, DType::BF16));
    EXPECT_FALSE(cuda::lsa_reduce_norm_supported(0, 8192, DType::BF16));
    EXPECT_FALSE(cuda::lsa_reduce_norm_supported(1, 8192, DType::F16));
}

}  // namespace
}  // namespace nibble
