// Device tests of the decode GEMV kernels (ops/linear/linear_cuda.h) against linear_cpu, on fresh random
// weights and activations, outputs poisoned with NaN first.
//
// Tolerance, per output element: both sides compute y = sum_i w_i x_i (+ b) in float32, in different
// orders. Each term passes through at most k + 32 roundings on either side (the CPU's dequantized weight
// w_i = fl(e2m1 * e4m3 * global) one, its product one, accumulation chains of at most k; the NVFP4
// device kernel's products are exact (bf16 e2m1 * scale and bf16 or exactly split F32 activations), its
// sums run through the mma accumulators (at most k / 16 * 3 mma steps of 16 products each), the 8-warp
// sum, the final scale and the bias; the BF16 kernel's per-lane chains, 5 shuffle levels and the bias),
// so each is within gamma_(k+32) ~ (k + 32) u32 * S of the exact sum,
// S = sum_i |w_i x_i| + |b|, and |device - cpu| <= 2 (k + 32) u32 S. A BF16 output adds its own rounding,
// u_bf16 |y_device| <= u_bf16 (|y_cpu| + that bound).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "ops/linear/linear.h"
#include "ops/linear/linear_cuda.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;

struct HostWeight {
    LinearWeight w;
    std::vector<uint8_t> packed, scales;  // NVFP4
    std::vector<uint16_t> bf16;           // dense BF16
};

// NVFP4 weights quantized from Normal(0, sigma_row) rows (ModelOpt recipe, tensor/nvfp4.h).
HostWeight quantized_nvfp4(std::mt19937_64& rng, int64_t n, int64_t k) {
    HostWeight h;
    std::vector<float> dense(static_cast<size_t>(n * k));
    std::uniform_real_distribution<float> sigma(0.01f, 0.2f);
    float amax = 0;
    for (int64_t r = 0; r < n; ++r) {
        auto row = test::random_normal(rng, static_cast<size_t>(k), sigma(rng));
        for (int64_t i = 0; i < k; ++i) {
            dense[static_cast<size_t>(r * k + i)] = row[static_cast<size_t>(i)];
            amax = std::max(amax, std::fabs(row[static_cast<size_t>(i)]));
        }
    }
    const float global = nvfp4_global_scale(amax);
    h.packed.resize(static_cast<size_t>(n * k / 2));
    h.scales.resize(static_cast<size_t>(n * k / 16));
    for (int64_t r = 0; r < n; ++r)
        nvfp4_quantize_row(dense.data() + r * k, k, global, h.packed.data() + r * k / 2, h.scales.data() + r * k / 16);
    h.w.scale = global;
    return h;
}

// NVFP4 weights of uniformly random bytes: every E2M1 code, and every non-NaN E4M3 scale code (negative
// and subnormal scales included), with a random global scale.
HostWeight raw_nvfp4(std::mt19937_64& rng, int64_t n, int64_t k) {
    HostWeight h;
    std::uniform_int_distribution<int> byte(0, 255);
    h.packed.resize(static_cast<size_t>(n * k / 2));
    for (auto& b : h.packed) b = static_cast<uint8_t>(byte(rng));
    h.scales.resize(static_cast<size_t>(n * k / 16));
    for (auto& s : h.scales) {
        do s = static_cast<uint8_t>(byte(rng));
        while ((s & 0x7f) == 0x7f);
    }
    h.w.scale = std::uniform_real_distribution<float>(1e-4f, 1e-2f)(rng);
    return h;
}

HostWeight random_bf16(std::mt19937_64& rng, int64_t n, int64_t k) {
    HostWeight h;
    const auto v = test::random_normal(rng, static_cast<size_t>(n * k), 0.05f);
    h.bf16.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) h.bf16[i] = bf16_from_float(v[i]);
    return h;
}

enum class Kind { Nvfp4Quantized, Nvfp4Raw, Bf16 };
// Which NVFP4 entry point: the dispatcher, or one of its two kernels forced.
enum class Nvfp4Path { Dispatch, Mma, CudaCore };

void run_case(ThreadPool& pool, std::mt19937_64& rng, Kind kind, int64_t n, int64_t k, int64_t m, bool bf16_acts,
              bool with_bias, Nvfp4Path path = Nvfp4Path::Dispatch) {
    SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " m=" + std::to_string(m) +
                 (bf16_acts ? " bf16" : " f32") + (with_bias ? " bias" : ""));
    HostWeight h = kind == Kind::Nvfp4Quantized ? quantized_nvfp4(rng, n, k)
                   : kind == Kind::Nvfp4Raw     ? raw_nvfp4(rng, n, k)
                                                : random_bf16(rng, n, k);
    LinearWeight& w = h.w;
    w.name = "test";
    w.n_out = n, w.n_in = k;
    if (kind == Kind::Bf16) {
        w.format = WeightFormat::Dense, w.dtype = DType::BF16, w.data = h.bf16.data();
    } else {
        w.format = WeightFormat::Nvfp4, w.dtype = DType::U8, w.data = h.packed.data();
        w.block_scales = h.scales.data();
    }
    if (with_bias) w.bias = test::random_normal(rng, static_cast<size_t>(n), 0.5f);

    auto x = test::random_normal(rng, static_cast<size_t>(m * k));
    DeviceActs dx;
    dx.upload(x, bf16_acts);  // x now holds exactly what the device reads

    std::vector<float> ref(static_cast<size_t>(m * n));
    linear_cpu(pool, x.data(), m, w, ref.data());

    // S = sum |w_i x_i| + |b| per output, from the dequantized rows, in double.
    std::vector<double> tol(ref.size());
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
        w.dequantize_row(r, row.data());
        for (int64_t t = 0; t < m; ++t) {
            double s = with_bias ? std::fabs(w.bias[static_cast<size_t>(r)]) : 0.0;
            for (int64_t i = 0; i < k; ++i) s += std::fabs(static_cast<double>(row[static_cast<size_t>(i)]) * x[static_cast<size_t>(t * k + i)]);
            const double fp = 2.0 * static_cast<double>(k + 32) * test::kEpsF32 * s;
            const size_t o = static_cast<size_t>(t * n + r);
            tol[o] = bf16_acts ? fp * (1 + test::kEpsBf16) + test::kEpsBf16 * std::fabs(ref[o]) : fp;
        }
    }

    cuda::DeviceBuffer dbias;
    if (with_bias) {
        dbias = cuda::DeviceBuffer(w.bias.size() * 4);
        dbias.upload(w.bias.data(), w.bias.size() * 4);
    }
    DeviceOut y(ref.size(), bf16_acts);
    const DType dt = bf16_acts ? DType::BF16 : DType::F32;
    if (kind == Kind::Bf16) {
        cuda::DeviceBuffer dw(h.bf16.size() * 2);
        dw.upload(h.bf16.data(), dw.bytes());
        cuda::gemv_bf16(dx.buf.get(), dt, m, dw.as<uint16_t>(), n, k, dbias.as<float>(), y.buf.get(), nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    } else {
        cuda::DeviceBuffer dq(h.packed.size()), ds(h.scales.size());
        dq.upload(h.packed.data(), dq.bytes());
        ds.upload(h.scales.data(), ds.bytes());
        cuda::Nvfp4DeviceWeight dwt{dq.as<uint8_t>(), ds.as<uint8_t>(), w.scale, n, k};
        auto* f = path == Nvfp4Path::Mma ? &cuda::gemv_nvfp4_mma
                  : path == Nvfp4Path::CudaCore ? &cuda::gemv_nvfp4_cuda_core : &cuda::gemv_nvfp4;
        f(dx.buf.get(), dt, m, dwt, dbias.as<float>(), y.buf.get(), nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    }
    test::expect_close(y.download(), ref, tol,
                       std::string(kind == Kind::Bf16 ? "gemv_bf16" : "gemv_nvfp4") + " n=" + std::to_string(n) +
                           " k=" + std::to_string(k) + " m=" + std::to_string(m) + (bf16_acts ? " bf16" : " f32"));
}

struct Shape {
    int64_t n, k;
};
// Odd row counts exercise the last partial 16-row tile; k = 32 is one 32-wide chunk, 96 / 160 / 4128 end
// inside a warp's 8-chunk step (3, 5 and 129 chunks), 14336 is the Llama MLP width.
const Shape kShapes[] = {{1, 32}, {17, 96}, {129, 160}, {67, 4096}, {33, 4128}, {300, 2048}, {45, 14336}};
const int64_t kMs[] = {1, 2, 3, 4, 5, 8, 11, 16, 19};
// The NVFP4 kernel pads m to 8 or 16 tokens: every m from 1 to 19 (19 = a 16-token launch and a 3-token one).
const int64_t kAllMs[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};

TEST(LinearCuda, Nvfp4QuantizedWeights) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& s : kShapes)
        for (int64_t m : kAllMs)
            for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Nvfp4Quantized, s.n, s.k, m, bf16, m % 2 == 1);
}

// Both kernels forced, whatever the dispatcher picks (it sends m = 1 to the CUDA-core kernel).
TEST(LinearCuda, Nvfp4EachKernel) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (auto path : {Nvfp4Path::Mma, Nvfp4Path::CudaCore})
        for (const auto& s : kShapes)
            for (int64_t m : {1, 2, 9, 16})
                for (bool bf16 : {false, true})
                    run_case(pool, rng, Kind::Nvfp4Quantized, s.n, s.k, m, bf16, m % 2 == 1, path);
    for (auto path : {Nvfp4Path::Mma, Nvfp4Path::CudaCore})
        for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Nvfp4Raw, 131, 1024, 1, bf16, false, path);
}

TEST(LinearCuda, Nvfp4EveryCode) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int64_t m : {1, 4, 8, 9, 16, 19})
        for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Nvfp4Raw, 131, 1024, m, bf16, false);
}

TEST(LinearCuda, Bf16Weights) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& s : {Shape{1, 16}, Shape{67, 4096}, Shape{45, 14336}, Shape{130, 48}})
        for (int64_t m : kMs)
            for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Bf16, s.n, s.k, m, bf16, m % 2 == 0);
}

TEST(LinearCuda, RejectsBadShapes) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer buf(1 << 16);
    cuda::Nvfp4DeviceWeight w{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 48};  // k % 32 != 0
    EXPECT_THROW(cuda::gemv_nvfp4(buf.get(), DType::F32, 1, w, nullptr, buf.get(), nullptr), std::invalid_argument);
    EXPECT_THROW(cuda::gemv_bf16(buf.get(), DType::F16, 1, buf.as<uint16_t>(), 4, 16, nullptr, buf.get(), nullptr),
                 std::invalid_argument);
}

}  // namespace
}  // namespace nibble
