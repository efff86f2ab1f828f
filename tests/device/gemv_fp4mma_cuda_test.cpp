// Device tests of the W4A4 FP4 tensor-core GEMV (ops/linear/gemv_fp4mma_cuda.h) against its CPU reference
// (ops/linear/gemv_fp4mma.h), on fresh random weights and activations, outputs and workspace poisoned first.
//
// The activation quantizer runs on every GPU and must match the host byte for byte (same float32 steps,
// IEEE division on both sides). The GEMV itself needs a compute capability 12.x device (sm_120a / sm_121a);
// elsewhere its test skips, saying so, and a separate test checks that the launcher refuses the device.
//
// GEMV tolerance, per output element: both sides sum the same exact products
// p_i = e2m1(x) e4m3(sx) e2m1(w) e4m3(sw) (each exact in float32) over k, then multiply by the two global
// scales and add the bias. The reference adds exact 16-term block sums in float32 (k / 16 roundings); the
// tensor core's accumulation order and internal precision are unspecified beyond "at least single
// precision" (PTX ISA, mma "Precision and rounding"), so it is allowed the worst float32 chain, k roundings,
// plus the 4-warp sum: |device - reference| <= 2 (k + 8) u32 S, S = (sum_i |p_i|) |w_global x_global| +
// |bias|. A BF16 output adds u_bf16 (|reference| + that bound).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_check.h"
#include "device_test_util.h"
#include "ops/linear/gemv_fp4mma.h"
#include "ops/linear/gemv_fp4mma_cuda.h"
#include "ops/linear/nvfp4_activation_quant.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;

cuda::DeviceInfo current_device() {
    int index = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&index));
    return cuda::query_device(index);
}

std::string cc_text(const cuda::DeviceInfo& d) { return std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor); }

// Activations over many magnitudes: rows of Normal(0, sigma) with sigma log-uniform in [1e-3, 1e3], a few
// values much larger than the rest (the outliers decode activations have), one block all zeros.
std::vector<float> random_activations(std::mt19937_64& rng, int64_t m, int64_t k) {
    std::uniform_real_distribution<float> log_sigma(-3.0f, 3.0f);
    std::vector<float> x(static_cast<size_t>(m * k));
    for (int64_t t = 0; t < m; ++t) {
        auto row = test::random_normal(rng, static_cast<size_t>(k), std::pow(10.0f, log_sigma(rng)));
        row[static_cast<size_t>(rng() % k)] *= 50.0f;
        if (k >= 32 && t % 2 == 1) std::fill(row.begin() + 16, row.begin() + 32, 0.0f);
        std::copy(row.begin(), row.end(), x.begin() + t * k);
    }
    return x;
}

TEST(Fp4MmaQuantizeCuda, MatchesHostByteForByte) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (bool bf16 : {false, true})
        for (auto [m, k] : {std::pair<int64_t, int64_t>{1, 16}, {3, 4096}, {8, 2048 + 16}, {17, 11008}}) {
            SCOPED_TRACE((bf16 ? "bf16 m " : "f32 m ") + std::to_string(m) + " k " + std::to_string(k));
            std::vector<float> x = random_activations(rng, m, k);
            DeviceActs dx;
            dx.upload(x, bf16);  // x now holds what the device reads
            const size_t bytes = cuda::fp4mma_workspace_bytes(m, k);
            cuda::DeviceBuffer ws(bytes);
            ws.fill_bytes(0xff);
            cuda::fp4mma_quantize_activations(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, m, k, ws.get(), bytes,
                                              nullptr);
            NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
            std::vector<uint8_t> host_ws(bytes);
            ws.download(host_ws.data(), bytes);
            const cuda::Fp4Activations dev = cuda::fp4mma_workspace_view(host_ws.data(), m, k);
            std::vector<uint8_t> packed(static_cast<size_t>(k / 2)), scales(static_cast<size_t>(k / 16));
            for (int64_t t = 0; t < m; ++t) {
                const float global = fp4mma_quantize_activation_row(x.data() + t * k, k, packed.data(), scales.data());
                ASSERT_EQ(dev.global_scale[t], global) << "row " << t;
                for (int64_t b = 0; b < k / 16; ++b)
                    ASSERT_EQ(dev.scales[t * (k / 16) + b], scales[static_cast<size_t>(b)]) << "row " << t << " block " << b;
                for (int64_t i = 0; i < k / 2; ++i)
                    ASSERT_EQ(dev.packed[t * (k / 2) + i], packed[static_cast<size_t>(i)]) << "row " << t << " byte " << i;
            }
        }
}

// Device-side inputs of one GEMV: NVFP4 weights, bias, activations, workspace.
struct Fp4Case {
    int64_t m, n, k;
    std::vector<uint8_t> packed, scales;
    float w_global = 1.0f;
    std::vector<float> bias;
    cuda::DeviceBuffer d_packed, d_scales, d_bias;
};

// quantized: rows of Normal(0, sigma) through nvfp4_quantize_row (the checkpoints' recipe); otherwise
// uniformly random bytes (every E2M1 code) with every unsigned non-NaN scale code 0x00..0x7e.
Fp4Case make_case(std::mt19937_64& rng, int64_t m, int64_t n, int64_t k, bool quantized, bool with_bias) {
    Fp4Case c{m, n, k};
    c.packed.resize(static_cast<size_t>(n * k / 2));
    c.scales.resize(static_cast<size_t>(n * k / 16));
    if (quantized) {
        std::vector<float> w(static_cast<size_t>(n * k));
        std::uniform_real_distribution<float> sigma(0.01f, 0.2f);
        float amax = 0.0f;
        for (int64_t r = 0; r < n; ++r) {
            auto row = test::random_normal(rng, static_cast<size_t>(k), sigma(rng));
            for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(w[r * k + i] = row[static_cast<size_t>(i)]));
        }
        c.w_global = nvfp4_global_scale(amax);
        for (int64_t r = 0; r < n; ++r)
            nvfp4_quantize_row(&w[r * k], k, c.w_global, &c.packed[r * k / 2], &c.scales[r * k / 16]);
    } else {
        for (uint8_t& b : c.packed) b = static_cast<uint8_t>(rng());
        for (uint8_t& s : c.scales) s = static_cast<uint8_t>(rng() % 0x7f);
        c.w_global = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, -static_cast<int>(rng() % 12));
    }
    if (with_bias) c.bias = test::random_normal(rng, static_cast<size_t>(n), 0.5f);
    c.d_packed = cuda::DeviceBuffer(c.packed.size());
    c.d_packed.upload(c.packed.data(), c.packed.size());
    c.d_scales = cuda::DeviceBuffer(c.scales.size());
    c.d_scales.upload(c.scales.data(), c.scales.size());
    if (with_bias) {
        c.d_bias = cuda::DeviceBuffer(c.bias.size() * 4);
        c.d_bias.upload(c.bias.data(), c.bias.size() * 4);
    }
    return c;
}

cuda::Nvfp4DeviceWeight device_weight(const Fp4Case& c) {
    cuda::Nvfp4DeviceWeight w;
    w.packed = c.d_packed.as<uint8_t>();
    w.scales = c.d_scales.as<uint8_t>();
    w.global_scale = c.w_global;
    w.n = c.n, w.k = c.k;
    return w;
}

// The bound in the header comment, per element.
std::vector<double> tolerances(const Fp4Case& c, const std::vector<float>& x, const std::vector<float>& ref, bool bf16) {
    std::vector<double> tol(ref.size());
    std::vector<uint8_t> xq(static_cast<size_t>(c.k / 2)), xs(static_cast<size_t>(c.k / 16));
    std::vector<float> xu(static_cast<size_t>(c.k)), wu(static_cast<size_t>(c.k));
    for (int64_t t = 0; t < c.m; ++t) {
        const float xg = fp4mma_quantize_activation_row(&x[t * c.k], c.k, xq.data(), xs.data());
        nvfp4_dequantize_row(xq.data(), xs.data(), c.k, 1.0f, xu.data());
        for (int64_t r = 0; r < c.n; ++r) {
            nvfp4_dequantize_row(&c.packed[r * c.k / 2], &c.scales[r * c.k / 16], c.k, 1.0f, wu.data());
            double s = 0.0;
            for (int64_t i = 0; i < c.k; ++i) s += std::fabs(static_cast<double>(xu[i]) * wu[i]);
            s = s * std::fabs(static_cast<double>(c.w_global) * xg) + (c.bias.empty() ? 0.0 : std::fabs(c.bias[r]));
            double bound = 2.0 * static_cast<double>(c.k + 8) * test::kEpsF32 * s + 1e-30;
            const size_t i = static_cast<size_t>(t * c.n + r);
            if (bf16) bound += test::kEpsBf16 * (std::fabs(ref[i]) + bound);
            tol[i] = bound;
        }
    }
    return tol;
}

TEST(GemvFp4MmaCuda, RefusesDevicesOtherThanComputeCapability12) {
    NIBBLE_REQUIRE_GPU();
    const cuda::DeviceInfo d = current_device();
    if (d.cc_major == 12) GTEST_SKIP() << "this device (compute capability " << cc_text(d) << ") runs the kernel";
    std::mt19937_64 rng(test::fresh_seed());
    Fp4Case c = make_case(rng, 1, 16, 64, true, false);
    std::vector<float> x = random_activations(rng, 1, 64);
    DeviceActs dx;
    dx.upload(x, false);
    DeviceOut y(16, false);
    const size_t bytes = cuda::fp4mma_workspace_bytes(1, 64);
    cuda::DeviceBuffer ws(bytes);
    EXPECT_FALSE(cuda::fp4mma_device_supported());
    try {
        cuda::gemv_nvfp4_fp4mma(dx.buf.get(), DType::F32, 1, device_weight(c), nullptr, y.buf.get(), ws.get(), bytes,
                                nullptr);
        ADD_FAILURE() << "gemv_nvfp4_fp4mma launched on compute capability " << cc_text(d);
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("compute capability 12.x"), std::string::npos) << e.what();
    }
    // Nothing was launched: the context has no error, and y is still the poison.
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (float v : y.download()) EXPECT_TRUE(std::isnan(v));
}

TEST(GemvFp4MmaCuda, MatchesCpuReference) {
    NIBBLE_REQUIRE_GPU();
    const cuda::DeviceInfo d = current_device();
    if (d.cc_major != 12)
        GTEST_SKIP() << "needs a compute capability 12.x GPU (sm_120a / sm_121a FP4 block-scaled mma.sync); this "
                        "device is "
                     << d.name << ", compute capability " << cc_text(d) << ": the FP4 MMA GEMV is untested here";
    EXPECT_TRUE(cuda::fp4mma_device_supported());
    std::mt19937_64 rng(test::fresh_seed());
    struct Shape {
        int64_t m, n, k;
    };
    const Shape shapes[] = {{1, 16, 64}, {1, 4096, 4096}, {3, 40, 192}, {8, 256, 1024}, {13, 272, 4096}, {16, 96, 11008}};
    for (const Shape& s : shapes)
        for (bool bf16 : {false, true})
            for (bool quantized : {true, false}) {
                const bool with_bias = (s.n + s.m) % 2 == 0;
                SCOPED_TRACE(std::string(bf16 ? "bf16" : "f32") + (quantized ? " quantized" : " random-bytes") +
                             " m " + std::to_string(s.m) + " n " + std::to_string(s.n) + " k " + std::to_string(s.k));
                Fp4Case c = make_case(rng, s.m, s.n, s.k, quantized, with_bias);
                std::vector<float> x = random_activations(rng, s.m, s.k);
                DeviceActs dx;
                dx.upload(x, bf16);
                DeviceOut y(static_cast<size_t>(s.m * s.n), bf16);
                const size_t bytes = cuda::fp4mma_workspace_bytes(s.m, s.k);
                cuda::DeviceBuffer ws(bytes);
                ws.fill_bytes(0xff);
                cuda::gemv_nvfp4_fp4mma(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, s.m, device_weight(c),
                                        with_bias ? c.d_bias.as<float>() : nullptr, y.buf.get(), ws.get(), bytes,
                                        nullptr);
                NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                std::vector<float> ref(static_cast<size_t>(s.m * s.n));
                gemv_fp4mma_reference(x.data(), s.m, s.k, c.packed.data(), c.scales.data(), c.w_global, s.n,
                                      with_bias ? c.bias.data() : nullptr, ref.data());
                test::expect_close(y.download(), ref, tolerances(c, x, ref, bf16), "gemv_nvfp4_fp4mma");
            }
}

TEST(GemvFp4MmaCuda, RejectsBadArguments) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    Fp4Case c = make_case(rng, 1, 16, 128, true, false);
    std::vector<float> x = random_activations(rng, 1, 128);
    DeviceActs dx;
    dx.upload(x, false);
    DeviceOut y(16, false);
    const size_t bytes = cuda::fp4mma_workspace_bytes(1, 128);
    cuda::DeviceBuffer ws(bytes);
    cuda::Nvfp4DeviceWeight w = device_weight(c);
    w.k = 96;  // not a multiple of 64
    EXPECT_THROW(cuda::gemv_nvfp4_fp4mma(dx.buf.get(), DType::F32, 1, w, nullptr, y.buf.get(), ws.get(), bytes, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::fp4mma_quantize_activations(dx.buf.get(), DType::F32, 1, 128, ws.get(), bytes - 1, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::fp4mma_quantize_activations(dx.buf.get(), DType::F32, 1, 120, ws.get(), bytes, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::fp4mma_quantize_activations(dx.buf.get(), DType::F16, 1, 128, ws.get(), bytes, nullptr),
                 std::invalid_argument);
}

}  // namespace
}  // namespace nibble
