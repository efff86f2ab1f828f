// Device tests of the FP8 (E4M3, per-tensor scale) decode GEMVs, cuda::gemv_fp8 (CUDA cores) and
// cuda::gemv_fp8_mma (tensor cores, BF16 activations), against linear_cpu on fresh random weights and
// activations, outputs poisoned with NaN first.
//
// Tolerance, per output element (the derivation of linear_cuda_test.cpp): both sides compute
// y = sum_i w_i x_i (+ b) in float32 in different orders. The CPU rounds each dequantized weight
// fl(e4m3 * scale) once, each product once and accumulates in chains of at most k; the device's products
// e4m3 * x are exact for BF16 x (4 + 8 significant bits) and rounded once for F32 x, its per-lane chains,
// 5 shuffle levels, the final scale and the bias add at most k + 32 roundings (the tensor-core kernel: exact
// bf16 products, float32 accumulation over k / 16 mma steps, a sum of 4 warps' parts, the scale and the
// bias). Each side is within
// gamma_(k+32) ~ (k + 32) u32 S of the exact sum, S = sum_i |w_i x_i| + |b|, so
// |device - cpu| <= 2 (k + 32) u32 S; a BF16 output adds its own rounding, u_bf16 (|y_cpu| + that bound).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "linear_reference.h"
#include "ops/linear/linear.h"
#include "ops/linear/linear_cuda.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;

enum class Codes {
    Quantized,  // Normal(0, sigma) rows quantized with a per-tensor scale (amax / 448), as ModelOpt's FP8
    Raw,        // uniformly random bytes: every non-NaN E4M3 code (subnormals, -0, +-448) and a random scale
};

void run_case(ThreadPool& pool, std::mt19937_64& rng, Codes codes, int64_t n, int64_t k, int64_t m, bool bf16_acts,
              bool with_bias, bool mma = false) {
    const std::string what = std::string(mma ? "gemv_fp8_mma " : "gemv_fp8 ") +
                             (codes == Codes::Raw ? "raw" : "quantized") +
                             " n=" + std::to_string(n) + " k=" + std::to_string(k) + " m=" + std::to_string(m) +
                             (bf16_acts ? " bf16" : " f32") + (with_bias ? " bias" : "");
    SCOPED_TRACE(what);
    std::vector<uint8_t> fp8(static_cast<size_t>(n * k));
    float scale = 1.0f;
    if (codes == Codes::Quantized) {
        const auto dense = test::random_normal(rng, fp8.size(), std::uniform_real_distribution<float>(0.01f, 0.2f)(rng));
        float amax = 0;
        for (float v : dense) amax = std::max(amax, std::fabs(v));
        scale = amax / 448.0f;
        for (size_t i = 0; i < fp8.size(); ++i) fp8[i] = e4m3_from_float(dense[i] / scale);
    } else {
        std::uniform_int_distribution<int> byte(0, 255);
        for (auto& b : fp8) {
            do b = static_cast<uint8_t>(byte(rng));
            while ((b & 0x7f) == 0x7f);
        }
        scale = std::uniform_real_distribution<float>(1e-4f, 1e-2f)(rng);
    }
    LinearWeight w;
    w.name = "test";
    w.format = WeightFormat::Fp8, w.dtype = DType::F8_E4M3, w.data = fp8.data(), w.scale = scale;
    w.n_out = n, w.n_in = k;
    if (with_bias) w.bias = test::random_normal(rng, static_cast<size_t>(n), 0.5f);

    auto x = test::random_normal(rng, static_cast<size_t>(m * k));
    DeviceActs dx;
    dx.upload(x, bf16_acts);  // x now holds exactly what the device reads

    std::vector<float> ref;
    std::vector<double> tol;
    test::linear_reference(pool, w, x, m, bf16_acts, ref, tol);

    const cuda::DeviceBuffer dw = test::upload_vec(fp8);
    cuda::DeviceBuffer dbias;
    if (with_bias) dbias = test::upload_vec(w.bias);
    DeviceOut y(ref.size(), bf16_acts);
    auto* launch = mma ? &cuda::gemv_fp8_mma : &cuda::gemv_fp8;
    launch(dx.buf.get(), bf16_acts ? DType::BF16 : DType::F32, m, dw.as<uint8_t>(), n, k, scale,
           with_bias ? dbias.as<float>() : nullptr, y.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    test::expect_close(y.download(), ref, tol, what);
}

struct Shape {
    int64_t n, k;
};
// k in 16-wide chunks: 1 chunk; 3 (inside a lane's first load); 33 and 65 (a step's second chunk only on
// some lanes: 64 chunks a warp step); 256 (whole steps); 129 and 896 (Llama's 14336). Odd n leaves a warp's
// second row past the end.
const Shape kShapes[] = {{1, 16}, {17, 48}, {129, 528}, {67, 1040}, {33, 4096}, {300, 2064}, {45, 14336}};
// Every M tile (1, 2, 4, 8, 16) partly and wholly filled, and 17..33 rows in two or three launches.
const int64_t kMs[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 19, 32, 33};

TEST(GemvFp8Cuda, QuantizedWeights) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& s : kShapes)
        for (int64_t m : kMs)
            for (bool bf16 : {false, true}) run_case(pool, rng, Codes::Quantized, s.n, s.k, m, bf16, m % 2 == 1);
}

TEST(GemvFp8Cuda, EveryCode) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    // 131 x 2048 random bytes hold every code about a thousand times.
    for (int64_t m : {1, 3, 8, 16})
        for (bool bf16 : {false, true}) run_case(pool, rng, Codes::Raw, 131, 2048, m, bf16, m == 3);
}

// The tensor-core kernel: k in 64-wide chunks, 4 warps taking every 4th, 4 chunks a step: 1 chunk; 3 (one
// warp idle); 33 (uneven warps, a partial step); 64 and 224 (Llama's 14336). Every m of a 16-token launch and
// 17..32 in two.
TEST(GemvFp8Cuda, MmaKernel) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const Shape shapes[] = {{1, 64}, {17, 192}, {129, 2112}, {67, 4096}, {45, 14336}, {300, 1024}};
    for (const auto& s : shapes)
        for (int64_t m : {1, 2, 3, 5, 8, 9, 12, 16, 17, 32})
            run_case(pool, rng, Codes::Quantized, s.n, s.k, m, true, m % 2 == 1, true);
    for (int64_t m : {1, 8, 16}) run_case(pool, rng, Codes::Raw, 131, 2048, m, true, m == 1, true);
}

TEST(GemvFp8Cuda, RejectsBadShapes) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer x(64 * 4), w(64 * 64 + 16), y(64 * 4);
    const auto* wp = w.as<uint8_t>();
    EXPECT_THROW(cuda::gemv_fp8(x.get(), DType::F32, 1, wp, 4, 24, 1.0f, nullptr, y.get(), nullptr),
                 std::invalid_argument);  // k not a multiple of 16
    EXPECT_THROW(cuda::gemv_fp8(x.get(), DType::F32, 1, wp + 1, 4, 32, 1.0f, nullptr, y.get(), nullptr),
                 std::invalid_argument);  // weights not 16-byte aligned
    EXPECT_THROW(cuda::gemv_fp8(x.get(), DType::F16, 1, wp, 4, 32, 1.0f, nullptr, y.get(), nullptr),
                 std::invalid_argument);  // activations neither F32 nor BF16
    EXPECT_THROW(cuda::gemv_fp8(x.get(), DType::F32, -1, wp, 4, 32, 1.0f, nullptr, y.get(), nullptr),
                 std::invalid_argument);  // negative m
    EXPECT_THROW(cuda::gemv_fp8_mma(x.get(), DType::BF16, 1, wp, 4, 32, 1.0f, nullptr, y.get(), nullptr),
                 std::invalid_argument);  // k not a multiple of 64
    EXPECT_THROW(cuda::gemv_fp8_mma(x.get(), DType::F32, 1, wp, 4, 64, 1.0f, nullptr, y.get(), nullptr),
                 std::invalid_argument);  // F32 activations
}

}  // namespace
}  // namespace nibble
