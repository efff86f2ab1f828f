// Device test of the shared-expert gate (ops/moe/shared_expert_gate_cuda.h) against shared_expert_gate_cpu,
// on fresh random inputs. The rows are updated in place, so they cannot be poisoned: one poisoned row past the
// m rows must stay untouched, and every row's expected value differs from its input (sigmoid of a dot product
// of random normals is far from 1), so a row left unscaled fails.
// Tolerance (u = u32): both dot products are within (n_embd + 32) u S of the exact one, S = sum |x_j g_j|
// (float32 sums of n_embd products, in any order); sigmoid's slope is at most 1/4, and expf, the add and the
// division add at most 6 u s on each side: ds <= 2 (n_embd + 32) u S / 4 + 12 u s; the scaled row element
// r s then differs by |r| (ds + 2 u s), plus one BF16 rounding (u_bf16 |r s|) with BF16 activations.
#include "ops/moe/shared_expert_gate_cuda.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "device_test_util.h"
#include "ops/moe/shared_expert_gate.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

using test::kEpsBf16;
using test::kEpsF32;

void run_gate(std::mt19937_64& rng, int64_t m, int64_t d, bool bf16) {
    const std::string what = "m=" + std::to_string(m) + " d=" + std::to_string(d) + (bf16 ? " bf16" : " f32");
    SCOPED_TRACE(what);
    std::vector<float> x = test::random_normal(rng, static_cast<size_t>(m * d));
    std::vector<float> rows = test::random_normal(rng, static_cast<size_t>(m * d), 0.5f);
    // Gate weights giving x . g ~ N(0, 1) (so 1 - s >= 0.004, which tells a scaled row from an unscaled BF16 one,
    // fails only beyond 5.5 sigma), rounded to BF16 as the device holds them.
    std::vector<float> gate = test::random_normal(rng, static_cast<size_t>(d), 1.0f / std::sqrt(static_cast<float>(d)));
    std::vector<uint16_t> gate_bits(gate.size());
    for (size_t i = 0; i < gate.size(); ++i) {
        gate_bits[i] = bf16_from_float(gate[i]);
        gate[i] = bf16_to_float(gate_bits[i]);
    }
    test::DeviceActs dx, drows;
    dx.upload(x, bf16);
    // rows with one poisoned row after the m rows (0xff bytes: NaN in F32 and BF16).
    const size_t elem = bf16 ? 2 : 4;
    std::vector<float> rows_dev = rows;  // rounded to BF16 by upload when bf16
    drows.upload(rows_dev, bf16);
    cuda::DeviceBuffer padded(static_cast<size_t>((m + 1) * d) * elem);
    padded.fill_bytes(0xff);
    NIBBLE_CUDA_CHECK(cudaMemcpy(padded.get(), drows.buf.get(), static_cast<size_t>(m * d) * elem,
                                 cudaMemcpyDeviceToDevice));
    cuda::DeviceBuffer dgate = test::upload_vec(gate_bits);

    std::vector<float> ref = rows_dev;
    shared_expert_gate_cpu(x.data(), m, d, gate.data(), ref.data());
    std::vector<double> tol(ref.size());
    for (int64_t t = 0; t < m; ++t) {
        double dot = 0, sum_abs = 0;
        for (int64_t j = 0; j < d; ++j) {
            const double p = static_cast<double>(x[static_cast<size_t>(t * d + j)]) * gate[static_cast<size_t>(j)];
            dot += p, sum_abs += std::fabs(p);
        }
        const double s = 1.0 / (1.0 + std::exp(-dot));
        const double ds = 2.0 * static_cast<double>(d + 32) * kEpsF32 * sum_abs / 4.0 + 12.0 * kEpsF32 * s;
        for (int64_t i = 0; i < d; ++i) {
            const auto k = static_cast<size_t>(t * d + i);
            const double r = std::fabs(static_cast<double>(rows_dev[k]));
            tol[k] = r * (ds + 2.0 * kEpsF32 * s) + (bf16 ? kEpsBf16 * std::fabs(ref[k]) * (1 + kEpsBf16) : 0.0);
            if (rows_dev[k] != 0.0f) {
                ASSERT_GT(std::fabs(static_cast<double>(ref[k]) - rows_dev[k]), tol[k])
                    << "an unscaled row would pass at element " << k;
            }
        }
    }
    cuda::shared_expert_gate(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, m, d, dgate.as<uint16_t>(), padded.get(),
                             nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<uint8_t> all(static_cast<size_t>((m + 1) * d) * elem);
    padded.download(all.data(), all.size());
    std::vector<float> got(static_cast<size_t>(m * d));
    for (size_t i = 0; i < got.size(); ++i) {
        if (bf16) {
            uint16_t b;
            std::memcpy(&b, all.data() + i * 2, 2);
            got[i] = bf16_to_float(b);
        } else {
            std::memcpy(&got[i], all.data() + i * 4, 4);
        }
    }
    test::expect_close(got, ref, tol, what);
    for (size_t i = got.size() * elem; i < all.size(); ++i)
        ASSERT_EQ(all[i], 0xff) << "byte " << i << " past the m rows was written";
}

TEST(SharedExpertGateCuda, MatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    // n_embd: Qwen2-MoE's fixture (64), a width below one vector per lane (136 = 17 vectors), Qwen1.5-MoE-A2.7B's
    // 2048 and Qwen2-57B-A14B's 3584 (lanes with unequal vector counts); m: decode, a CTA's tail, prefill.
    for (int64_t d : {64, 136, 2048, 3584})
        for (int64_t m : {1, 3, 5, 130})
            for (bool bf16 : {false, true}) run_gate(rng, m, d, bf16);
}

TEST(SharedExpertGateCuda, RejectsBadArguments) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer a(4096), b(4096), g(4096);
    const auto* gate = g.as<uint16_t>();
    EXPECT_THROW(cuda::shared_expert_gate(a.get(), DType::F16, 1, 64, gate, b.get(), nullptr), std::invalid_argument);
    EXPECT_THROW(cuda::shared_expert_gate(a.get(), DType::F32, 1, 60, gate, b.get(), nullptr), std::invalid_argument);
    EXPECT_THROW(cuda::shared_expert_gate(a.get(), DType::F32, 1, 64, gate, a.get(), nullptr), std::invalid_argument);
    EXPECT_THROW(cuda::shared_expert_gate(a.as<uint8_t>() + 4, DType::F32, 1, 64, gate, b.get(), nullptr),
                 std::invalid_argument);
}

}  // namespace
}  // namespace nibble
