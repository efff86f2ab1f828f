// cuda::rope_apply with the interleaved (GPT-J) pairing against rope_apply_cpu, on fresh random heads and
// positions up to 128K. Tolerance as for the rotate-half test (small_ops_cuda_test.cpp): both sides form the
// same float32 angle; cos and sin differ by at most 3 ulp; each output is two products and a sum, so
// |device - cpu| <= 8 u32 (|a| + |b|) for the pair (a, b), plus a BF16 output's own rounding. Dimensions past
// rotary_dim must come back unchanged (tolerance 0).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "device_test_util.h"
#include "ops/rope/rope.h"
#include "ops/rope/rope_cuda.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;

void interleaved_case(std::mt19937_64& rng, RopeConfig cfg, int64_t m, int64_t n_heads, int64_t head_dim, bool bf16) {
    const std::string what = "rope interleaved m=" + std::to_string(m) + " heads=" + std::to_string(n_heads) +
                             " head_dim=" + std::to_string(head_dim) + " partial=" +
                             std::to_string(cfg.partial_rotary_factor) + (bf16 ? " bf16" : " f32");
    SCOPED_TRACE(what);
    cfg.interleaved = true;
    const RopeTable table = make_rope_table(cfg, head_dim);
    auto x = test::random_normal(rng, static_cast<size_t>(m * n_heads * head_dim), 3.0f);
    std::vector<int64_t> pos(static_cast<size_t>(m));
    std::uniform_int_distribution<int64_t> pd(1, 131071);
    for (auto& p : pos) p = pd(rng);
    DeviceActs dx;
    dx.upload(x, bf16);  // x now holds exactly what the device reads
    const cuda::DeviceBuffer dpos = test::upload_vec(pos);
    const cuda::DeviceBuffer dinv = test::upload_vec(table.inv_freq);

    std::vector<float> ref = x;
    rope_apply_cpu(ref.data(), m, n_heads, head_dim, pos.data(), table);
    std::vector<double> tol(ref.size(), 0.0);
    for (int64_t th = 0; th < m * n_heads; ++th)
        for (int64_t i = 0; i < table.rotary_dim / 2; ++i) {
            const size_t ia = static_cast<size_t>(th * head_dim + 2 * i), ib = ia + 1;
            const double fp = 8 * test::kEpsF32 * (std::fabs(x[ia]) + std::fabs(x[ib]));
            tol[ia] = bf16 ? fp + test::kEpsBf16 * (std::fabs(ref[ia]) + fp) : fp;
            tol[ib] = bf16 ? fp + test::kEpsBf16 * (std::fabs(ref[ib]) + fp) : fp;
        }
    // In place, so no poison: an element the kernel skipped keeps its input value, which fails the check
    // unless its rotation angle is ~0 (positions are >= 1, so not for the first pairs of each head); a
    // rotate-half pairing would move values between other elements and fail too.
    cuda::rope_apply(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, m, n_heads, head_dim, dpos.as<int64_t>(),
                     dinv.as<float>(), table.rotary_dim, nullptr, /*interleaved=*/true);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    DeviceOut got(x.size(), bf16);
    got.buf = std::move(dx.buf);
    test::expect_close(got.download(), ref, tol, what);
}

TEST(RopeCuda, InterleavedMatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    RopeConfig llama3;  // Llama 3.1 scaling, to show the pairing and the frequencies are independent
    llama3.theta = 500000.0f, llama3.type = RopeType::Llama3, llama3.factor = 8.0f;
    llama3.low_freq_factor = 1.0f, llama3.high_freq_factor = 4.0f, llama3.original_max_position = 8192;
    RopeConfig partial;  // GLM-style: half of each head rotated, interleaved
    partial.partial_rotary_factor = 0.5f;
    for (bool bf16 : {false, true}) {
        interleaved_case(rng, RopeConfig{}, 5, 4, 64, bf16);
        interleaved_case(rng, llama3, 37, 8, 128, bf16);
        interleaved_case(rng, partial, 9, 3, 128, bf16);
        interleaved_case(rng, RopeConfig{}, 1, 1, 8, bf16);  // one thread: a single group of 4 pairs
        interleaved_case(rng, llama3, 40, 4, 16, bf16);      // the golden fixtures' head_dim 16
        interleaved_case(rng, RopeConfig{}, 7, 2, 32, bf16);
    }
}

}  // namespace
}  // namespace nibble
