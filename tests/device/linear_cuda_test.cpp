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
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "linear_reference.h"
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
// Which NVFP4 entry point: the dispatcher, or one of the kernels forced.
enum class Nvfp4Path { Dispatch, Mma, CudaCore, Pipelined, PipelinedDeep };

void run_case(ThreadPool& pool, std::mt19937_64& rng, Kind kind, int64_t n, int64_t k, int64_t m,
              bool bf16_acts, bool with_bias, Nvfp4Path path = Nvfp4Path::Dispatch, int k_split = 0) {
    SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " m=" + std::to_string(m) +
                 (bf16_acts ? " bf16" : " f32") + (with_bias ? " bias" : "") +
                 " k_split=" + std::to_string(k_split));
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

    std::vector<float> ref;
    std::vector<double> tol;
    test::linear_reference(pool, w, x, m, bf16_acts, ref, tol);

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
        if (path == Nvfp4Path::PipelinedDeep) {
            cuda::gemv_nvfp4_pipelined_deep(dx.buf.get(), dt, m, dwt, dbias.as<float>(), y.buf.get(), nullptr,
                                            k_split);
        } else if (path == Nvfp4Path::Pipelined) {
            cuda::gemv_nvfp4_pipelined(dx.buf.get(), dt, m, dwt, dbias.as<float>(), y.buf.get(), nullptr,
                                       k_split);
        } else {
            auto* f = path == Nvfp4Path::Mma        ? &cuda::gemv_nvfp4_mma
                      : path == Nvfp4Path::CudaCore ? &cuda::gemv_nvfp4_cuda_core
                                                    : &cuda::gemv_nvfp4;
            f(dx.buf.get(), dt, m, dwt, dbias.as<float>(), y.buf.get(), nullptr);
        }
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    }
    test::expect_close(y.download(), ref, tol,
                       std::string(kind == Kind::Bf16 ? "gemv_bf16" : "gemv_nvfp4") + " n=" + std::to_string(n) +
                           " k=" + std::to_string(k) + " m=" + std::to_string(m) + (bf16_acts ? " bf16" : " f32"));
}

// One NVFP4 projection of the fused launchers on the device, with its CPU output for x[m, k] and the
// float32 part of the tolerance, 2 (k + 32) u32 S (derived at the top of the file; the pipelined kernel's
// chains are the same: k / 16 * 3 mma steps, a sum of at most 4 k-parts, the scale and the bias).
struct DeviceProjection {
    HostWeight h;
    cuda::DeviceBuffer dq, ds, dbias;
    std::vector<float> ref;   // [m, n]
    std::vector<double> tol;  // [m, n]
    cuda::Nvfp4DeviceWeight dev() const {
        return {dq.as<uint8_t>(), ds.as<uint8_t>(), h.w.scale, h.w.n_out, h.w.n_in};
    }
};

// Fills p in place (its LinearWeight points into its own vectors, so p is not moved afterwards).
void build_projection(DeviceProjection& p, ThreadPool& pool, std::mt19937_64& rng, int64_t n, int64_t k,
                      const std::vector<float>& x, int64_t m, bool with_bias) {
    p.h = quantized_nvfp4(rng, n, k);
    LinearWeight& w = p.h.w;
    w.name = "test";
    w.n_out = n, w.n_in = k;
    w.format = WeightFormat::Nvfp4, w.dtype = DType::U8, w.data = p.h.packed.data();
    w.block_scales = p.h.scales.data();
    if (with_bias) {
        w.bias = test::random_normal(rng, static_cast<size_t>(n), 0.5f);
        p.dbias = cuda::DeviceBuffer(w.bias.size() * 4);
        p.dbias.upload(w.bias.data(), w.bias.size() * 4);
    }
    p.dq = cuda::DeviceBuffer(p.h.packed.size());
    p.ds = cuda::DeviceBuffer(p.h.scales.size());
    p.dq.upload(p.h.packed.data(), p.dq.bytes());
    p.ds.upload(p.h.scales.data(), p.ds.bytes());
    // The float32 bound; the callers add a BF16 output's rounding (output_tol).
    test::linear_reference(pool, w, x, m, /*bf16_acts=*/false, p.ref, p.tol);
}

// A BF16 output adds its own rounding to a float32 bound.
double output_tol(double fp, double ref, bool bf16) {
    return bf16 ? fp * (1 + test::kEpsBf16) + test::kEpsBf16 * std::fabs(ref) : fp;
}

// gemv_nvfp4_fused: projections of ns[i] rows (0 = an empty one, skipped), biases on every other one.
void run_fused_case(ThreadPool& pool, std::mt19937_64& rng, const std::vector<int64_t>& ns, int64_t k,
                    int64_t m, bool bf16_acts, int k_split) {
    std::string what = "gemv_nvfp4_fused k=" + std::to_string(k) + " m=" + std::to_string(m) +
                       (bf16_acts ? " bf16" : " f32") + " k_split=" + std::to_string(k_split) + " n=";
    for (int64_t n : ns) what += std::to_string(n) + ",";
    SCOPED_TRACE(what);
    auto x = test::random_normal(rng, static_cast<size_t>(m * k));
    DeviceActs dx;
    dx.upload(x, bf16_acts);
    std::vector<DeviceProjection> ps(ns.size());
    std::vector<DeviceOut> outs;
    outs.reserve(ns.size());
    std::vector<cuda::Nvfp4Projection> desc;
    for (size_t i = 0; i < ns.size(); ++i) {
        if (ns[i] == 0) {
            outs.emplace_back(1, bf16_acts);  // unused
            desc.push_back({cuda::Nvfp4DeviceWeight{nullptr, nullptr, 1.0f, 0, k}, nullptr, nullptr});
            continue;
        }
        build_projection(ps[i], pool, rng, ns[i], k, x, m, i % 2 == 0);
        outs.emplace_back(static_cast<size_t>(m * ns[i]), bf16_acts);
        desc.push_back({ps[i].dev(), ps[i].dbias.as<float>(), outs.back().buf.get()});
    }
    cuda::gemv_nvfp4_fused(dx.buf.get(), bf16_acts ? DType::BF16 : DType::F32, m, desc.data(),
                           static_cast<int>(desc.size()), nullptr, k_split);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    for (size_t i = 0; i < ns.size(); ++i) {
        if (ns[i] == 0) continue;
        std::vector<double> tol(ps[i].tol.size());
        for (size_t o = 0; o < tol.size(); ++o) tol[o] = output_tol(ps[i].tol[o], ps[i].ref[o], bf16_acts);
        test::expect_close(outs[i].download(), ps[i].ref, tol, what + " projection " + std::to_string(i));
    }
}

// gemv_nvfp4_gate_up_silu against h = silu(G) U from the CPU's G = x gate^T (+ b), U = x up^T (+ b), in
// double. With |G' - G| <= tG, |U' - U| <= tU (the float32 bounds above) and |silu'| <= 1.1:
// |silu(G') U' - silu(G) U| <= 1.1 tG (|U| + tU) + |silu(G)| tU; the device's own expf (2 ulp), add,
// divide and multiplies add <= 8 u32 of its result.
void run_gate_up_case(ThreadPool& pool, std::mt19937_64& rng, int64_t n, int64_t k, int64_t m, bool bf16_acts,
                      bool with_bias, int k_split) {
    const std::string what = "gemv_nvfp4_gate_up_silu n=" + std::to_string(n) + " k=" + std::to_string(k) +
                             " m=" + std::to_string(m) + (bf16_acts ? " bf16" : " f32") +
                             (with_bias ? " bias" : "") + " k_split=" + std::to_string(k_split);
    SCOPED_TRACE(what);
    auto x = test::random_normal(rng, static_cast<size_t>(m * k));
    DeviceActs dx;
    dx.upload(x, bf16_acts);
    DeviceProjection gate, up;
    build_projection(gate, pool, rng, n, k, x, m, with_bias);
    build_projection(up, pool, rng, n, k, x, m, with_bias);
    DeviceOut h(static_cast<size_t>(m * n), bf16_acts);
    cuda::gemv_nvfp4_gate_up_silu(dx.buf.get(), bf16_acts ? DType::BF16 : DType::F32, m, gate.dev(),
                                  gate.dbias.as<float>(), up.dev(), up.dbias.as<float>(), h.buf.get(),
                                  nullptr, k_split);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(gate.ref.size());
    std::vector<double> tol(ref.size());
    for (size_t o = 0; o < ref.size(); ++o) {
        const double g = gate.ref[o], u = up.ref[o], tg = gate.tol[o], tu = up.tol[o];
        const double silu = g / (1.0 + std::exp(-g));
        const double href = silu * u;
        const double bound = 1.1 * tg * (std::fabs(u) + tu) + std::fabs(silu) * tu;
        ref[o] = static_cast<float>(href);
        tol[o] = output_tol(bound + 8 * test::kEpsF32 * (std::fabs(href) + bound), href, bf16_acts);
    }
    test::expect_close(h.download(), ref, tol, what);
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
    // The CUDA-core kernel's k split over the CTA's warps (few rows, k >= 4096; kShapes' 67 x 4096, 33 x 4128
    // and 45 x 14336 take it too) at Qwen3-30B-A3B's o_proj shape, and one row group more than a CTA per
    // group.
    for (const auto& s : {Shape{2048, 4096}, Shape{2113, 4096}})
        for (int64_t m : {1, 3})
            run_case(pool, rng, Kind::Nvfp4Quantized, s.n, s.k, m, true, m == 3, Nvfp4Path::CudaCore);
}

// The pipelined kernel (version 3) with its k split picked from the shape (0) and forced to 1, 2 and 4: every
// m.
TEST(LinearCuda, Nvfp4Pipelined) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int k_split : {0, 1, 2, 4})
        for (const auto& s : kShapes)
            for (int64_t m : kAllMs)
                for (bool bf16 : {false, true})
                    run_case(pool, rng, Kind::Nvfp4Quantized, s.n, s.k, m, bf16, m % 2 == 1,
                             Nvfp4Path::Pipelined, k_split);
    for (int k_split : {1, 4})
        for (int64_t m : {1, 8, 9, 16})
            for (bool bf16 : {false, true})
                run_case(pool, rng, Kind::Nvfp4Raw, 131, 1024, m, bf16, false, Nvfp4Path::Pipelined, k_split);
    // The 4-stage alternative (its own kernel at BF16 and m <= 8; m = 9 and 19 take the default one).
    for (int k_split : {0, 1, 2, 4})
        for (const auto& s : kShapes)
            for (int64_t m : {1, 2, 5, 8, 9, 19})
                for (bool bf16 : {false, true})
                    run_case(pool, rng, Kind::Nvfp4Quantized, s.n, s.k, m, bf16, m % 2 == 1,
                             Nvfp4Path::PipelinedDeep, k_split);
}

// q, k, v in one launch: own global scales, biases on projections 0 and 2, outputs in their own buffers;
// row counts not multiples of 16, and an empty projection that must be skipped.
TEST(LinearCuda, Nvfp4FusedProjections) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int64_t m : kAllMs)
        for (bool bf16 : {false, true}) {
            run_fused_case(pool, rng, {67, 33, 17}, 4096, m, bf16, 0);
            run_fused_case(pool, rng, {1, 129, 45}, 160, m, bf16, 0);
        }
    for (int k_split : {1, 2, 4})
        for (int64_t m : {1, 5, 9, 19})
            for (bool bf16 : {false, true}) {
                run_fused_case(pool, rng, {48, 16, 31}, 4128, m, bf16, k_split);
                run_fused_case(pool, rng, {20, 0, 7}, 96, m, bf16, k_split);
                run_fused_case(pool, rng, {300}, 2048, m, bf16, k_split);
            }
}

// gate and up in one launch with silu(gate) * up in the epilogue: row counts not multiples of 8, every m.
TEST(LinearCuda, Nvfp4GateUpSilu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& s : {Shape{1, 32}, Shape{13, 160}, Shape{67, 4096}, Shape{45, 14336}, Shape{300, 2048}})
        for (int64_t m : kAllMs)
            for (bool bf16 : {false, true}) run_gate_up_case(pool, rng, s.n, s.k, m, bf16, m % 2 == 1, 0);
    for (int k_split : {1, 2, 4})
        for (int64_t m : {1, 8, 9, 19})
            for (bool bf16 : {false, true})
                run_gate_up_case(pool, rng, 37, 4128, m, bf16, m % 2 == 0, k_split);
}

// Programmatic launches (every GEMV when built with NIBBLE_PROGRAMMATIC_LAUNCH, cuda/pdl.cuh) consume what
// the launch before them wrote: y1 = x W1^T (the v2 kernel; y1 poisoned with NaN first), then y2 = y1 W2^T and
// h = silu(y1 G^T) * (y1 U^T) straight after it, so they start early and must wait for y1.
TEST(LinearCuda, Nvfp4ProgrammaticChain) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const int64_t k1 = 4096, k2 = 2048, n2 = 300, n_ff = 77;
    for (int64_t m : {1, 5, 16, 19})
        for (bool bf16 : {false, true}) {
            SCOPED_TRACE("m=" + std::to_string(m) + (bf16 ? " bf16" : " f32"));
            const DType dt = bf16 ? DType::BF16 : DType::F32;
            auto x = test::random_normal(rng, static_cast<size_t>(m * k1));
            DeviceActs dx;
            dx.upload(x, bf16);
            DeviceProjection w1;
            build_projection(w1, pool, rng, k2, k1, x, m, false);
            DeviceOut y1(static_cast<size_t>(m * k2), bf16);
            cuda::gemv_nvfp4_mma(dx.buf.get(), dt, m, w1.dev(), nullptr, y1.buf.get(), nullptr);
            // Stage 2's weights are built before the launches (they do not depend on y1); their references
            // are computed from y1 as the device wrote it, after the synchronization below.
            HostWeight h2 = quantized_nvfp4(rng, n2, k2), hg = quantized_nvfp4(rng, n_ff, k2),
                       hu = quantized_nvfp4(rng, n_ff, k2);
            auto upload = [](const std::vector<uint8_t>& v) {
                cuda::DeviceBuffer b(v.size());
                b.upload(v.data(), v.size());
                return b;
            };
            cuda::DeviceBuffer q2 = upload(h2.packed), s2 = upload(h2.scales), qg = upload(hg.packed),
                               sg = upload(hg.scales), qu = upload(hu.packed), su = upload(hu.scales);
            DeviceOut y2(static_cast<size_t>(m * n2), bf16), hout(static_cast<size_t>(m * n_ff), bf16);
            cuda::gemv_nvfp4_pipelined(y1.buf.get(), dt, m,
                                       {q2.as<uint8_t>(), s2.as<uint8_t>(), h2.w.scale, n2, k2}, nullptr,
                                       y2.buf.get(), nullptr, 0);
            cuda::gemv_nvfp4_gate_up_silu(y1.buf.get(), dt, m,
                                          {qg.as<uint8_t>(), sg.as<uint8_t>(), hg.w.scale, n_ff, k2}, nullptr,
                                          {qu.as<uint8_t>(), su.as<uint8_t>(), hu.w.scale, n_ff, k2}, nullptr,
                                          hout.buf.get(), nullptr, 0);
            NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
            const std::vector<float> y1_host = y1.download();  // exactly what stage 2 read
            std::vector<double> tol1(w1.tol.size());
            for (size_t o = 0; o < tol1.size(); ++o) tol1[o] = output_tol(w1.tol[o], w1.ref[o], bf16);
            test::expect_close(y1_host, w1.ref, tol1, "chain stage 1");

            auto reference = [&](const HostWeight& hw, int64_t n, std::vector<float>& ref,
                                 std::vector<double>& tol) {
                LinearWeight w = hw.w;
                w.name = "test";
                w.n_out = n, w.n_in = k2;
                w.format = WeightFormat::Nvfp4, w.dtype = DType::U8, w.data = hw.packed.data();
                w.block_scales = hw.scales.data();
                ref.assign(static_cast<size_t>(m * n), 0.0f);
                linear_cpu(pool, y1_host.data(), m, w, ref.data());
                tol.assign(ref.size(), 0.0);
                std::vector<float> row(static_cast<size_t>(k2));
                for (int64_t r = 0; r < n; ++r) {
                    w.dequantize_row(r, row.data());
                    for (int64_t t = 0; t < m; ++t) {
                        double sum = 0;
                        for (int64_t i = 0; i < k2; ++i)
                            sum += std::fabs(static_cast<double>(row[static_cast<size_t>(i)]) *
                                             y1_host[static_cast<size_t>(t * k2 + i)]);
                        tol[static_cast<size_t>(t * n + r)] =
                            2.0 * static_cast<double>(k2 + 32) * test::kEpsF32 * sum;
                    }
                }
            };
            std::vector<float> ref2, refg, refu;
            std::vector<double> tol2, tolg, tolu;
            reference(h2, n2, ref2, tol2);
            reference(hg, n_ff, refg, tolg);
            reference(hu, n_ff, refu, tolu);
            for (size_t o = 0; o < tol2.size(); ++o) tol2[o] = output_tol(tol2[o], ref2[o], bf16);
            test::expect_close(y2.download(), ref2, tol2, "chain stage 2, pipelined");
            std::vector<float> refh(refg.size());
            std::vector<double> tolh(refg.size());
            for (size_t o = 0; o < refh.size(); ++o) {  // the bound of run_gate_up_case
                const double g = refg[o], u = refu[o], tg = tolg[o], tu = tolu[o];
                const double silu = g / (1.0 + std::exp(-g)), href = silu * u;
                const double bound = 1.1 * tg * (std::fabs(u) + tu) + std::fabs(silu) * tu;
                refh[o] = static_cast<float>(href);
                tolh[o] = output_tol(bound + 8 * test::kEpsF32 * (std::fabs(href) + bound), href, bf16);
            }
            test::expect_close(hout.download(), refh, tolh, "chain stage 2, gate/up");
        }
}

TEST(LinearCuda, Nvfp4EveryCode) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int64_t m : {1, 4, 8, 9, 16, 19})
        for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Nvfp4Raw, 131, 1024, m, bf16, false);
}

// gemv_nvfp4 with k = 16 (mod 32) (its 16-element block kernel): k 48 and 80 (small models' shared expert and
// MLP widths), 16 (one block), 1040 (65 blocks: lane 0 takes three, the others two);
// m across its 8-token passes and the 16-row tiles the other kernels use; quantized and raw (every code) weights.
TEST(LinearCuda, Nvfp4BlockK) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& s : {Shape{64, 48}, Shape{17, 80}, Shape{48, 16}, Shape{130, 1040}, Shape{5, 48}})
        for (int64_t m : {1, 2, 7, 8, 9, 16, 17, 40})
            for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Nvfp4Quantized, s.n, s.k, m, bf16, m % 2 == 1);
    for (int64_t m : {1, 9})
        for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Nvfp4Raw, 67, 80, m, bf16, true);
}

TEST(LinearCuda, Bf16Weights) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    // Few rows with k >= 1024 run the k-split kernel (the CTA's 4 warps share the rows): 67 x 4096, 45 x
    // 14336, a MoE router (128 x 2048), a narrow projection (256 x 2688: 168 chunks, uneven over the warps)
    // and k = 1040 (65 chunks: warps 2 and 3 take none). Many rows (4100 x 1024) and k < 1024 run one warp a
    // row group.
    for (const auto& s : {Shape{1, 16}, Shape{67, 4096}, Shape{45, 14336}, Shape{130, 48}, Shape{48, 80},
                          Shape{128, 2048}, Shape{256, 2688}, Shape{33, 1040}, Shape{4100, 1024}})
        for (int64_t m : kMs)
            for (bool bf16 : {false, true}) run_case(pool, rng, Kind::Bf16, s.n, s.k, m, bf16, m % 2 == 0);
}

TEST(LinearCuda, RejectsBadShapes) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer buf(1 << 16);
    cuda::Nvfp4DeviceWeight w{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 40};  // k % 16 != 0
    EXPECT_THROW(cuda::gemv_nvfp4(buf.get(), DType::F32, 1, w, nullptr, buf.get(), nullptr), std::invalid_argument);
    // k = 48: the dispatcher takes it (block kernel), the 32-chunk kernels do not.
    cuda::Nvfp4DeviceWeight w48{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 48};
    EXPECT_THROW(cuda::gemv_nvfp4_mma(buf.get(), DType::F32, 1, w48, nullptr, buf.get(), nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::gemv_nvfp4_cuda_core(buf.get(), DType::F32, 1, w48, nullptr, buf.get(), nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::gemv_bf16(buf.get(), DType::F16, 1, buf.as<uint16_t>(), 4, 16, nullptr, buf.get(), nullptr),
                 std::invalid_argument);
    cuda::Nvfp4DeviceWeight w64{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 64};
    EXPECT_THROW(cuda::gemv_nvfp4_pipelined(buf.get(), DType::F32, 1, w64, nullptr, buf.get(), nullptr, 3),
                 std::invalid_argument);  // k_split must be 0, 1, 2 or 4
    cuda::Nvfp4DeviceWeight w96{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 96};
    EXPECT_THROW(cuda::gemv_nvfp4_gate_up_silu(buf.get(), DType::F32, 1, w64, nullptr, w96, nullptr,
                                               buf.get(), nullptr),
                 std::invalid_argument);  // gate and up differ
    const cuda::Nvfp4Projection two[] = {{w64, nullptr, buf.get()}, {w96, nullptr, buf.get()}};
    EXPECT_THROW(cuda::gemv_nvfp4_fused(buf.get(), DType::F32, 1, two, 2, nullptr), std::invalid_argument);
}

}  // namespace
}  // namespace nibble
