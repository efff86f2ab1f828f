// Device tests of RMSNorm (plain and fused with the residual add), RoPE, SwiGLU and the embedding gather
// against their CPU references, on fresh random inputs with outputs poisoned with NaN first.
// Each tolerance is derived beside its test from the formats and the operations on either side
// (u32 = 2^-24, u_bf16 = 2^-8 unit roundoffs; CUDA's rsqrtf, expf, sincosf are within 2 ulp per the CUDA
// C++ Programming Guide, glibc's float expf/sinf/cosf within 1 ulp).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "device_test_util.h"
#include "ops/activation/activation.h"
#include "ops/activation/activation_cuda.h"
#include "ops/embed/embed.h"
#include "ops/embed/embed_cuda.h"
#include "ops/rmsnorm/rmsnorm.h"
#include "ops/rmsnorm/rmsnorm_cuda.h"
#include "ops/rope/rope.h"
#include "ops/rope/rope_cuda.h"
#include "tensor/tensor.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;
using test::kEpsBf16;
using test::kEpsF32;

cuda::DeviceBuffer upload_floats(const std::vector<float>& v) {
    cuda::DeviceBuffer b(v.size() * 4);
    b.upload(v.data(), b.bytes());
    return b;
}

// RMSNorm: the CPU sums squares in double, then takes 1 / sqrt in float (<= 4 roundings on the inverse)
// and two products; the device sums d squares in float32 (relative error <= d u32 on the sum, half of it
// after the square root), rsqrtf (2 ulp = 4 u32) and two products. Together <= (d / 2 + 16) u32 |y|.
void rmsnorm_case(std::mt19937_64& rng, int64_t m, int64_t d, bool bf16, bool fused) {
    SCOPED_TRACE("m=" + std::to_string(m) + " d=" + std::to_string(d) + (bf16 ? " bf16" : " f32") +
                 (fused ? " fused" : ""));
    auto x = test::random_normal(rng, static_cast<size_t>(m * d), 2.0f);
    auto res = test::random_normal(rng, static_cast<size_t>(m * d), 2.0f);
    auto weight = test::random_normal(rng, static_cast<size_t>(d), 1.0f);
    const float eps = 1e-5f;
    DeviceActs dx, dres;
    dx.upload(x, bf16);
    dres.upload(res, bf16);
    auto dw = upload_floats(weight);
    DeviceOut out(x.size(), bf16);
    const DType dt = bf16 ? DType::BF16 : DType::F32;

    std::vector<float> h = x;  // what is normalized
    if (fused) {
        for (size_t i = 0; i < h.size(); ++i) h[i] = bf16 ? test::round_bf16(x[i] + res[i]) : x[i] + res[i];
        cuda::rmsnorm_residual(dx.buf.get(), dres.buf.get(), dt, m, d, dw.as<float>(), eps, out.buf.get(), nullptr);
    } else {
        cuda::rmsnorm(dx.buf.get(), dt, m, d, dw.as<float>(), eps, out.buf.get(), nullptr);
    }
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(h.size());
    rmsnorm_cpu(h.data(), m, d, weight.data(), eps, ref.data());
    std::vector<double> tol(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
        const double fp = (static_cast<double>(d) / 2 + 16) * kEpsF32 * std::fabs(ref[i]) * 1.01;
        tol[i] = bf16 ? fp + kEpsBf16 * (std::fabs(ref[i]) + fp) : fp;
    }
    test::expect_close(out.download(), ref, tol, "rmsnorm");
    if (fused) {
        // The stored residual is x + residual rounded as the dtype: exact, so zero tolerance.
        DeviceOut got_res(h.size(), bf16);
        got_res.buf = std::move(dres.buf);
        test::expect_close(got_res.download(), h, std::vector<double>(h.size(), 0.0), "residual");
    }
}

TEST(RmsnormCuda, MatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (bool fused : {false, true})
        for (bool bf16 : {false, true})
            for (auto [m, d] : {std::pair<int64_t, int64_t>{1, 4096}, {7, 8}, {5, 5120}, {3, 2056}, {2, 16384}})
                rmsnorm_case(rng, m, d, bf16, fused);
}

// RoPE: both sides form the same float32 angle (one product); cos and sin differ by at most 3 ulp
// (<= 3 * 2^-24 absolute, |cos|, |sin| <= 1), and each output is two products and a sum (2 roundings a
// side), so |device - cpu| <= 8 u32 (|a| + |b|). Dimensions past rotary_dim must come back unchanged.
void rope_case(std::mt19937_64& rng, const RopeConfig& cfg, int64_t m, int64_t n_heads, int64_t head_dim, bool bf16) {
    SCOPED_TRACE("m=" + std::to_string(m) + " heads=" + std::to_string(n_heads) + (bf16 ? " bf16" : " f32"));
    const RopeTable table = make_rope_table(cfg, head_dim);
    auto x = test::random_normal(rng, static_cast<size_t>(m * n_heads * head_dim), 3.0f);
    std::vector<int64_t> pos(static_cast<size_t>(m));
    std::uniform_int_distribution<int64_t> pd(0, 131071);
    for (auto& p : pos) p = pd(rng);
    DeviceActs dx;
    dx.upload(x, bf16);
    cuda::DeviceBuffer dpos(pos.size() * 8);
    dpos.upload(pos.data(), dpos.bytes());
    auto dinv = upload_floats(table.inv_freq);

    std::vector<float> ref = x;
    rope_apply_cpu(ref.data(), m, n_heads, head_dim, pos.data(), table);
    std::vector<double> tol(ref.size(), 0.0);
    const int64_t half = table.rotary_dim / 2;
    for (int64_t th = 0; th < m * n_heads; ++th)
        for (int64_t i = 0; i < half; ++i) {
            const size_t ia = static_cast<size_t>(th * head_dim + i), ib = ia + static_cast<size_t>(half);
            const double fp = 8 * kEpsF32 * (std::fabs(x[ia]) + std::fabs(x[ib]));
            tol[ia] = bf16 ? fp + kEpsBf16 * (std::fabs(ref[ia]) + fp) : fp;
            tol[ib] = bf16 ? fp + kEpsBf16 * (std::fabs(ref[ib]) + fp) : fp;
        }
    // In place, so no poison: an element the kernel skipped keeps its input value, which fails the check
    // unless its rotation angle is ~0 (position 0: then the input is the right answer anyway).
    cuda::rope_apply(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, m, n_heads, head_dim, dpos.as<int64_t>(),
                     dinv.as<float>(), table.rotary_dim, nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    DeviceOut got(x.size(), bf16);
    got.buf = std::move(dx.buf);
    test::expect_close(got.download(), ref, tol, "rope");
}

TEST(RopeCuda, MatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    RopeConfig llama3;  // Llama 3.1: theta 500000, factor 8, low 1, high 4, original 8192
    llama3.theta = 500000.0f, llama3.type = RopeType::Llama3, llama3.factor = 8.0f;
    llama3.low_freq_factor = 1.0f, llama3.high_freq_factor = 4.0f, llama3.original_max_position = 8192;
    RopeConfig plain;  // default rope, half the head rotated
    plain.partial_rotary_factor = 0.5f;
    for (bool bf16 : {false, true}) {
        rope_case(rng, llama3, 5, 32, 128, bf16);
        rope_case(rng, llama3, 17, 8, 128, bf16);
        rope_case(rng, plain, 9, 4, 128, bf16);
        rope_case(rng, plain, 3, 2, 64, bf16);
    }
}

// The golden fixtures' head sizes: head_dim 16 (2 threads a head, one group of 4 pairs each) and 32, whole
// heads rotated, the default table and the fixtures' llama3 scaling (factor 8, low 1, high 4, original 32).
TEST(RopeCuda, SmallHeadDimsMatchCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    RopeConfig llama3;
    llama3.type = RopeType::Llama3, llama3.factor = 8.0f;
    llama3.low_freq_factor = 1.0f, llama3.high_freq_factor = 4.0f, llama3.original_max_position = 32;
    for (bool bf16 : {false, true})
        for (int64_t hd : {16, 32}) {
            rope_case(rng, RopeConfig{}, 40, 4, hd, bf16);
            rope_case(rng, llama3, 33, 2, hd, bf16);
            rope_case(rng, RopeConfig{}, 1, 1, hd, bf16);
        }
}

// SwiGLU: e^-g within 2 ulp (device) and 1 ulp (CPU), then 1 + e, a division and a product: each side
// within ~10 u32 relative, so |device - cpu| <= 32 u32 |y| (inputs |g| < 88: no overflow of e^-g).
TEST(SiluMulCuda, MatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (bool bf16 : {false, true})
        for (int64_t n : {int64_t{8}, int64_t{14336}, int64_t{4 * 14336 + 5}, int64_t{3}}) {
            SCOPED_TRACE("n=" + std::to_string(n) + (bf16 ? " bf16" : " f32"));
            auto g = test::random_normal(rng, static_cast<size_t>(n), 4.0f);
            auto u = test::random_normal(rng, static_cast<size_t>(n), 2.0f);
            DeviceActs dg, du;
            dg.upload(g, bf16);
            du.upload(u, bf16);
            DeviceOut out(static_cast<size_t>(n), bf16);
            cuda::silu_mul(dg.buf.get(), du.buf.get(), bf16 ? DType::BF16 : DType::F32, n, out.buf.get(), nullptr);
            NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
            std::vector<float> ref(static_cast<size_t>(n));
            silu_mul_cpu(g.data(), u.data(), n, ref.data());
            std::vector<double> tol(ref.size());
            for (size_t i = 0; i < ref.size(); ++i) {
                const double fp = 32 * kEpsF32 * std::fabs(ref[i]);
                tol[i] = bf16 ? fp + kEpsBf16 * (std::fabs(ref[i]) + fp) : fp;
            }
            test::expect_close(out.download(), ref, tol, "silu_mul");
        }
}

// Embedding gather: BF16 to F32 or BF16 is exact, so zero tolerance; an id outside the vocabulary gives a
// NaN row (checked separately, since expect_close treats NaN as unwritten).
TEST(EmbedCuda, MatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t vocab = 1000, d = 4096, m = 37;
    auto values = test::random_normal(rng, static_cast<size_t>(vocab * d));
    std::vector<uint16_t> bits(values.size());
    for (size_t i = 0; i < bits.size(); ++i) bits[i] = bf16_from_float(values[i]);
    std::vector<int32_t> tokens(static_cast<size_t>(m));
    std::uniform_int_distribution<int32_t> td(0, static_cast<int32_t>(vocab - 1));
    for (auto& t : tokens) t = td(rng);
    tokens[0] = 0, tokens[1] = static_cast<int32_t>(vocab - 1);
    cuda::DeviceBuffer dtable(bits.size() * 2), dtok(tokens.size() * 4);
    dtable.upload(bits.data(), dtable.bytes());
    dtok.upload(tokens.data(), dtok.bytes());

    Tensor table{bits.data(), DType::BF16, Shape{vocab, d}};
    std::vector<float> ref(static_cast<size_t>(m * d));
    embed_cpu(table, tokens.data(), m, ref.data());
    for (bool bf16 : {false, true}) {
        DeviceOut out(ref.size(), bf16);
        cuda::embed(dtable.as<uint16_t>(), vocab, d, dtok.as<int32_t>(), m, bf16 ? DType::BF16 : DType::F32,
                    out.buf.get(), nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
        test::expect_close(out.download(), ref, std::vector<double>(ref.size(), 0.0), "embed");
    }

    tokens[3] = static_cast<int32_t>(vocab);  // out of range
    tokens[4] = -1;
    dtok.upload(tokens.data(), dtok.bytes());
    DeviceOut out(ref.size(), false);
    out.buf.fill_bytes(0);
    cuda::embed(dtable.as<uint16_t>(), vocab, d, dtok.as<int32_t>(), m, DType::F32, out.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = out.download();
    for (int64_t i = 0; i < d; ++i) {
        ASSERT_TRUE(std::isnan(got[static_cast<size_t>(3 * d + i)]));
        ASSERT_TRUE(std::isnan(got[static_cast<size_t>(4 * d + i)]));
        ASSERT_EQ(got[static_cast<size_t>(5 * d + i)], ref[static_cast<size_t>(5 * d + i)]);
    }
}

}  // namespace
}  // namespace nibble
