// Device tests of the prefill matmuls (ops/linear/gemm_cuda.h), the row gather and the device argmax,
// against host references on fresh random inputs with poisoned outputs.
//
// GEMM tolerance, per output element: the device multiplies BF16 x by the exactly dequantized BF16 weight
// (e2m1 x e4m3 and e4m3 fit BF16's significand) with float32 accumulation in an order we do not control,
// then scales by alpha and rounds to BF16 (and, with a bias, adds it and rounds again). The CPU reference
// (linear_cpu) sums the same exact products in float32. Both sums are within gamma_k u32 S of the exact
// one (S = sum |w_i x_i|), so |device - cpu| <= 2 k u32 S + the BF16 roundings u_bf16 (|y| + |y + b|).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "ops/embed/gather_rows_cuda.h"
#include "ops/linear/gemm_cuda.h"
#include "ops/linear/linear.h"
#include "ops/sampling/argmax_cuda.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;

enum class Kind { Nvfp4, Bf16, Fp8 };

void check_gemm(Kind kind, int64_t m, int64_t n, int64_t k, bool with_bias) {
    const uint64_t seed = test::fresh_seed();
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> byte(0, 255);
    LinearWeight w;
    w.name = "test";
    w.n_out = n;
    w.n_in = k;
    std::vector<uint8_t> packed, scales, fp8;
    std::vector<uint16_t> bf16;
    cuda::DeviceBuffer dw, ds;
    if (kind == Kind::Nvfp4) {
        packed.resize(static_cast<size_t>(n * k / 2));
        for (auto& b : packed) b = static_cast<uint8_t>(byte(rng));
        scales.resize(static_cast<size_t>(n * k / 16));
        for (auto& s : scales) do s = static_cast<uint8_t>(byte(rng) & 0xd7);  // small, non-NaN scales of both signs
            while ((s & 0x7f) == 0x7f);
        w.format = WeightFormat::Nvfp4;
        w.dtype = DType::U8;
        w.data = packed.data();
        w.block_scales = scales.data();
        w.scale = 0.37f;
        dw = cuda::DeviceBuffer(packed.size());
        dw.upload(packed.data(), packed.size());
        ds = cuda::DeviceBuffer(scales.size());
        ds.upload(scales.data(), scales.size());
    } else if (kind == Kind::Fp8) {
        fp8.resize(static_cast<size_t>(n * k));
        for (auto& b : fp8) do b = static_cast<uint8_t>(byte(rng));
            while ((b & 0x7f) == 0x7f);
        w.format = WeightFormat::Fp8;
        w.dtype = DType::F8_E4M3;
        w.data = fp8.data();
        w.scale = 0.013f;
        dw = cuda::DeviceBuffer(fp8.size());
        dw.upload(fp8.data(), fp8.size());
    } else {
        const auto vals = test::random_normal(rng, static_cast<size_t>(n * k), 0.05f);
        bf16.resize(vals.size());
        for (size_t i = 0; i < vals.size(); ++i) bf16[i] = bf16_from_float(vals[i]);
        w.format = WeightFormat::Dense;
        w.dtype = DType::BF16;
        w.data = bf16.data();
        dw = cuda::DeviceBuffer(bf16.size() * 2);
        dw.upload(bf16.data(), bf16.size() * 2);
    }
    cuda::DeviceBuffer db;
    if (with_bias) {
        w.bias = test::random_normal(rng, static_cast<size_t>(n), 0.5f);
        db = cuda::DeviceBuffer(w.bias.size() * 4);
        db.upload(w.bias.data(), w.bias.size() * 4);
    }
    std::vector<float> x = test::random_normal(rng, static_cast<size_t>(m * k), 1.0f);
    DeviceActs dx;
    dx.upload(x, true);  // x now holds the BF16-rounded values the device reads
    DeviceOut dy(static_cast<size_t>(m * n), true);

    cuda::GemmContext ctx(n * k);
    const float* bias = with_bias ? db.as<float>() : nullptr;
    if (kind == Kind::Nvfp4)
        cuda::gemm_nvfp4(ctx, dx.buf.get(), m, {dw.as<uint8_t>(), ds.as<uint8_t>(), w.scale, n, k}, bias, dy.buf.get(), nullptr);
    else if (kind == Kind::Fp8)
        cuda::gemm_fp8(ctx, dx.buf.get(), m, dw.as<uint8_t>(), n, k, w.scale, bias, dy.buf.get(), nullptr);
    else
        cuda::gemm_bf16(ctx, dx.buf.get(), m, dw.as<uint16_t>(), n, k, 1.0f, bias, dy.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());

    ThreadPool pool(0);
    std::vector<float> ref(static_cast<size_t>(m * n));
    linear_cpu(pool, x.data(), m, w, ref.data());
    // S per element: sum |w_i x_i| with the dequantized row.
    std::vector<double> tol(ref.size());
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
        w.dequantize_row(r, row.data());
        for (int64_t i = 0; i < m; ++i) {
            double s = 0;
            for (int64_t j = 0; j < k; ++j) s += std::fabs(static_cast<double>(row[static_cast<size_t>(j)]) * x[static_cast<size_t>(i * k + j)]);
            const double y = std::fabs(ref[static_cast<size_t>(i * n + r)]);
            const double b = with_bias ? std::fabs(w.bias[static_cast<size_t>(r)]) : 0.0;
            tol[static_cast<size_t>(i * n + r)] = 2.0 * static_cast<double>(k) * test::kEpsF32 * s +
                                                  test::kEpsBf16 * (2.0 * (y + b) + 1e-30) * 1.01;
        }
    }
    const char* names[] = {"gemm_nvfp4", "gemm_bf16", "gemm_fp8"};
    test::expect_close(dy.download(), ref, tol,
                       std::string(names[static_cast<int>(kind)]) + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                           " k=" + std::to_string(k) + (with_bias ? " +bias" : ""));
}

TEST(GemmCuda, Nvfp4) {
    NIBBLE_REQUIRE_GPU();
    check_gemm(Kind::Nvfp4, 100, 384, 512, false);
    check_gemm(Kind::Nvfp4, 33, 256, 1024, true);
    check_gemm(Kind::Nvfp4, 512, 128, 2048, false);
}

TEST(GemmCuda, Bf16) {
    NIBBLE_REQUIRE_GPU();
    check_gemm(Kind::Bf16, 100, 384, 512, false);
    check_gemm(Kind::Bf16, 65, 256, 256, true);
}

TEST(GemmCuda, Fp8) {
    NIBBLE_REQUIRE_GPU();
    check_gemm(Kind::Fp8, 77, 256, 512, true);
    check_gemm(Kind::Fp8, 1, 128, 256, false);
}

// The dequantized BF16 weight equals the host codec's value of every (e2m1, e4m3) pair, bit for bit.
// gemm_bf16_f32 (NemotronH's float32 router at prefill sizes): BF16 operands, float32 output, no rounding to
// BF16, so the bound is the two float32 sums' alone: |device - cpu| <= 2 k u32 S.
TEST(GemmCuda, Bf16Float32Out) {
    NIBBLE_REQUIRE_GPU();
    for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{33, 128, 2688}, {2048, 128, 2688}, {100, 64, 4096}}) {
        std::mt19937_64 rng(test::fresh_seed());
        const auto vals = test::random_normal(rng, static_cast<size_t>(n * k), 0.05f);
        std::vector<uint16_t> bf16(vals.size());
        for (size_t i = 0; i < vals.size(); ++i) bf16[i] = bf16_from_float(vals[i]);
        LinearWeight w;
        w.name = "router";
        w.n_out = n;
        w.n_in = k;
        w.format = WeightFormat::Dense;
        w.dtype = DType::BF16;
        w.data = bf16.data();
        cuda::DeviceBuffer dw(bf16.size() * 2);
        dw.upload(bf16.data(), bf16.size() * 2);
        std::vector<float> x = test::random_normal(rng, static_cast<size_t>(m * k), 1.0f);
        DeviceActs dx;
        dx.upload(x, true);  // x now holds the BF16-rounded values the device reads
        DeviceOut dy(static_cast<size_t>(m * n), false);  // float32, poisoned
        cuda::GemmContext ctx(0);
        cuda::gemm_bf16_f32(ctx, dx.buf.get(), m, dw.as<uint16_t>(), n, k, dy.buf.as<float>(), nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
        ThreadPool pool(0);
        std::vector<float> ref(static_cast<size_t>(m * n));
        linear_cpu(pool, x.data(), m, w, ref.data());
        std::vector<double> tol(ref.size());
        for (int64_t r = 0; r < n; ++r)
            for (int64_t i = 0; i < m; ++i) {
                double sum = 0;
                for (int64_t j = 0; j < k; ++j)
                    sum += std::fabs(static_cast<double>(bf16_to_float(bf16[static_cast<size_t>(r * k + j)])) *
                                     x[static_cast<size_t>(i * k + j)]);
                tol[static_cast<size_t>(i * n + r)] = 2.0 * static_cast<double>(k) * test::kEpsF32 * sum + 1e-30;
            }
        test::expect_close(dy.download(), ref, tol,
                           "gemm_bf16_f32 m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    }
}

TEST(GemmCuda, Nvfp4DequantizeIsExact) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int> byte(0, 255);
    const int64_t n = 96, k = 1040;  // 6,240 blocks: the last thread block of 256 partly past the end
    std::vector<uint8_t> packed(static_cast<size_t>(n * k / 2)), scales(static_cast<size_t>(n * k / 16));
    for (auto& b : packed) b = static_cast<uint8_t>(byte(rng));
    for (auto& s : scales) do s = static_cast<uint8_t>(byte(rng));
        while ((s & 0x7f) == 0x7f);
    cuda::DeviceBuffer dp(packed.size()), ds(scales.size()), out(static_cast<size_t>(n * k) * 2);
    dp.upload(packed.data(), packed.size());
    ds.upload(scales.data(), scales.size());
    out.fill_bytes(0xff);
    cuda::dequantize_nvfp4_to_bf16({dp.as<uint8_t>(), ds.as<uint8_t>(), 1.0f, n, k}, out.as<uint16_t>(), nullptr);
    std::vector<uint16_t> got(static_cast<size_t>(n * k));
    out.download(got.data(), got.size() * 2);
    std::vector<float> row(static_cast<size_t>(k));
    int bad = 0;
    for (int64_t r = 0; r < n; ++r) {
        nvfp4_dequantize_row(packed.data() + r * k / 2, scales.data() + r * k / 16, k, 1.0f, row.data());
        for (int64_t j = 0; j < k; ++j)
            if (got[static_cast<size_t>(r * k + j)] != bf16_from_float(row[static_cast<size_t>(j)]) && ++bad <= 5)
                ADD_FAILURE() << "row " << r << " col " << j << ": device " << got[static_cast<size_t>(r * k + j)]
                              << " host " << row[static_cast<size_t>(j)];
    }
    EXPECT_EQ(bad, 0);
}

TEST(GemmCuda, Fp8DequantizeIsExact) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int> byte(0, 255);
    const int64_t n = 40, k = 2056;  // 10,280 octets: the last thread block of 256 partly past the end
    std::vector<uint8_t> w(static_cast<size_t>(n * k));
    for (auto& b : w) do b = static_cast<uint8_t>(byte(rng));
        while ((b & 0x7f) == 0x7f);  // no NaN codes
    cuda::DeviceBuffer dw(w.size()), out(w.size() * 2);
    dw.upload(w.data(), w.size());
    out.fill_bytes(0xff);
    cuda::dequantize_fp8_to_bf16(dw.as<uint8_t>(), n, k, out.as<uint16_t>(), nullptr);
    std::vector<uint16_t> got(w.size());
    out.download(got.data(), got.size() * 2);
    int bad = 0;
    for (size_t i = 0; i < w.size(); ++i)
        if (got[i] != bf16_from_float(e4m3_to_float(w[i])) && ++bad <= 5)
            ADD_FAILURE() << "element " << i << ": device " << got[i] << " host " << e4m3_to_float(w[i]);
    EXPECT_EQ(bad, 0);
}

TEST(GemmCuda, RejectsBadShapes) {
    NIBBLE_REQUIRE_GPU();
    cuda::GemmContext ctx(16 * 16);
    cuda::DeviceBuffer buf(4096);
    EXPECT_THROW(cuda::gemm_bf16(ctx, buf.get(), 4, buf.as<uint16_t>(), 16, 24, 1.0f, nullptr, buf.get(), nullptr),
                 std::invalid_argument);  // k not a multiple of 16
    EXPECT_THROW(cuda::gemm_nvfp4(ctx, buf.get(), 4, {buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 64, 64}, nullptr,
                                  buf.get(), nullptr),
                 std::invalid_argument);  // larger than the scratch
}

TEST(ArgmaxCuda, FirstMaximumPerRow) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t rows = 7, vocab = 151936;
    std::vector<float> logits = test::random_normal(rng, static_cast<size_t>(rows * vocab), 3.0f);
    // Row 1: a tie between two maxima (the first wins); row 2: NaNs that must be skipped; row 3: all equal.
    logits[static_cast<size_t>(vocab + 500)] = logits[static_cast<size_t>(vocab + 90000)] = 100.0f;
    for (int64_t i = 0; i < vocab; i += 3) logits[static_cast<size_t>(2 * vocab + i)] = std::nanf("");
    std::fill(logits.begin() + 3 * vocab, logits.begin() + 4 * vocab, -1.5f);
    cuda::DeviceBuffer dl(logits.size() * 4), dt(static_cast<size_t>(rows) * 4);
    dl.upload(logits.data(), dl.bytes());
    dt.fill_bytes(0xff);
    cuda::argmax_rows(dl.as<float>(), rows, vocab, dt.as<int32_t>(), nullptr);
    std::vector<int32_t> got(static_cast<size_t>(rows));
    dt.download(got.data(), dt.bytes());
    for (int64_t r = 0; r < rows; ++r) {
        int64_t best = -1;
        for (int64_t i = 0; i < vocab; ++i) {
            const float v = logits[static_cast<size_t>(r * vocab + i)];
            if (!std::isnan(v) && (best < 0 || v > logits[static_cast<size_t>(r * vocab + best)])) best = i;
        }
        EXPECT_EQ(got[static_cast<size_t>(r)], best) << "row " << r;
    }
    EXPECT_EQ(got[1], 500);
    EXPECT_EQ(got[3], 0);
}

TEST(GatherRowsCuda, ConvertsAndGathers) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t n = 50, d = 264;
    for (bool bf16_in : {true, false}) {
        std::vector<float> src = test::random_normal(rng, static_cast<size_t>(n * d));
        DeviceActs ds;
        ds.upload(src, bf16_in);
        const std::vector<int32_t> rows = {49, 0, 17, 17, 3};
        cuda::DeviceBuffer dr(rows.size() * 4);
        dr.upload(rows.data(), dr.bytes());
        DeviceOut out(rows.size() * static_cast<size_t>(d), false);
        cuda::gather_rows(ds.buf.get(), bf16_in ? DType::BF16 : DType::F32, d, dr.as<int32_t>(),
                          static_cast<int64_t>(rows.size()), out.buf.get(), DType::F32, nullptr);
        const std::vector<float> got = out.download();
        for (size_t i = 0; i < rows.size(); ++i)
            for (int64_t c = 0; c < d; ++c)
                ASSERT_EQ(got[i * static_cast<size_t>(d) + static_cast<size_t>(c)],
                          src[static_cast<size_t>(rows[i] * d + c)]) << "row " << i << " col " << c;
    }
}

}  // namespace
}  // namespace nibble
