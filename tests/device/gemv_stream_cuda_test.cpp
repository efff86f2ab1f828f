// Device tests of the stream NVFP4 decode GEMVs (ops/linear/gemv_stream_cuda.h): gemv_nvfp4_stream,
// gemv_nvfp4_stream_fused and gemv_nvfp4_stream_gate_up_silu against linear_cpu on fresh random weights and
// activations, outputs poisoned with NaN first, both chunks_per_lane (U = 2, 4).
//
// Tolerance, per output element: linear_reference's 2 (k + 32) u32 S (+ a BF16 output's own rounding), S =
// sum_i |w_i x_i| + |b|. The kernel's chains are shorter than k + 32 roundings a term: its products
// (e2m1 * 2^-14) * x are exact for BF16 x (2 + 8 significant bits) and rounded once for F32 x, a block sum
// adds 16 of them, one FMA applies the block's exact E4M3 scale into a lane's running sum (k / 32 / 32
// chunks a lane), then 5 shuffle levels, the global scale and the bias. The gate/up bound is the one of
// linear_cuda_test.cpp's run_gate_up_case (derived there).
//
// Shapes: odd n leaves the second row of a warp's last group past n; k = 32 (one chunk), 96 and 160 (a
// step's chunks on some lanes only), 2080 and 4128 (65 and 129 chunks: a full step of 64 or 128 chunks and
// a partial one), 4096, 14336 (448 chunks: 7 steps of 64, 3.5 of 128), 64; n = 9001 at k = 64 puts more
// groups than resident warps on the device, so warps run several groups and reload across a group boundary.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "linear_reference.h"
#include "ops/linear/gemv_stream_cuda.h"
#include "ops/linear/linear.h"
#include "ops/linear/linear_cuda.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;

enum class Codes {
    Quantized,  // Normal(0, sigma_row) rows quantized as ModelOpt does (tensor/nvfp4.h)
    Raw,        // uniformly random bytes: every E2M1 code, every non-NaN E4M3 scale (negative, subnormal)
};

// One NVFP4 weight on host and device, with its CPU output for some x[m, k] and the float32 part of the
// tolerance. Filled in place: w points into the struct's own vectors, so it is never moved afterwards.
struct StreamWeight {
    LinearWeight w;
    std::vector<uint8_t> packed, scales;  // [n, k / 2], [n, k / 16]
    cuda::DeviceBuffer dq, ds, dbias;
    std::vector<float> ref;   // [m, n]
    std::vector<double> tol;  // [m, n], float32 bound only
    cuda::Nvfp4DeviceWeight dev() const { return {dq.as<uint8_t>(), ds.as<uint8_t>(), w.scale, w.n_out, w.n_in}; }
    const float* bias() const { return w.bias.empty() ? nullptr : dbias.as<float>(); }
};

void build_weight(StreamWeight& p, ThreadPool& pool, std::mt19937_64& rng, Codes codes, int64_t n, int64_t k,
                  const std::vector<float>& x, int64_t m, bool with_bias) {
    p.packed.resize(static_cast<size_t>(n * k / 2));
    p.scales.resize(static_cast<size_t>(n * k / 16));
    if (codes == Codes::Quantized) {
        std::vector<float> dense(static_cast<size_t>(n * k));
        std::uniform_real_distribution<float> sigma(0.01f, 0.2f);
        float amax = 0;
        for (int64_t r = 0; r < n; ++r) {
            const auto row = test::random_normal(rng, static_cast<size_t>(k), sigma(rng));
            for (int64_t i = 0; i < k; ++i) {
                dense[static_cast<size_t>(r * k + i)] = row[static_cast<size_t>(i)];
                amax = std::max(amax, std::fabs(row[static_cast<size_t>(i)]));
            }
        }
        p.w.scale = nvfp4_global_scale(amax);
        for (int64_t r = 0; r < n; ++r)
            nvfp4_quantize_row(dense.data() + r * k, k, p.w.scale, p.packed.data() + r * k / 2,
                               p.scales.data() + r * k / 16);
    } else {
        std::uniform_int_distribution<int> byte(0, 255);
        for (auto& b : p.packed) b = static_cast<uint8_t>(byte(rng));
        for (auto& s : p.scales) {
            do s = static_cast<uint8_t>(byte(rng));
            while ((s & 0x7f) == 0x7f);
        }
        p.w.scale = std::uniform_real_distribution<float>(1e-4f, 1e-2f)(rng);
    }
    p.w.name = "test";
    p.w.format = WeightFormat::Nvfp4, p.w.dtype = DType::U8;
    p.w.n_out = n, p.w.n_in = k;
    p.w.data = p.packed.data(), p.w.block_scales = p.scales.data();
    if (with_bias) {
        p.w.bias = test::random_normal(rng, static_cast<size_t>(n), 0.5f);
        p.dbias = test::upload_vec(p.w.bias);
    }
    p.dq = test::upload_vec(p.packed);
    p.ds = test::upload_vec(p.scales);
    test::linear_reference(pool, p.w, x, m, /*bf16_acts=*/false, p.ref, p.tol);
}

// A BF16 output adds its own rounding to a float32 bound.
double output_tol(double fp, double ref, bool bf16) {
    return bf16 ? fp * (1 + test::kEpsBf16) + test::kEpsBf16 * std::fabs(ref) : fp;
}

std::string describe(const char* what, int64_t k, int64_t m, bool bf16, int u) {
    return std::string(what) + " k=" + std::to_string(k) + " m=" + std::to_string(m) + (bf16 ? " bf16" : " f32") +
           " U=" + std::to_string(u);
}

// gemv_nvfp4_stream, or gemv_nvfp4_stream_fused over ns.size() projections (0 rows: an empty one, skipped);
// biases on every other projection when with_bias.
void run_case(ThreadPool& pool, std::mt19937_64& rng, Codes codes, const std::vector<int64_t>& ns, int64_t k,
              int64_t m, bool bf16, bool with_bias, int u, bool fused) {
    std::string what = describe(fused ? "gemv_nvfp4_stream_fused" : "gemv_nvfp4_stream", k, m, bf16, u) +
                       (codes == Codes::Raw ? " raw" : "") + (with_bias ? " bias" : "") + " n=";
    for (int64_t n : ns) what += std::to_string(n) + ",";
    SCOPED_TRACE(what);
    auto x = test::random_normal(rng, static_cast<size_t>(m * k));
    DeviceActs dx;
    dx.upload(x, bf16);  // x now holds exactly what the device reads
    std::vector<StreamWeight> ws(ns.size());
    std::vector<DeviceOut> outs;
    outs.reserve(ns.size());
    std::vector<cuda::Nvfp4Projection> desc;
    for (size_t i = 0; i < ns.size(); ++i) {
        if (ns[i] == 0) {
            outs.emplace_back(1, bf16);  // unused
            desc.push_back({cuda::Nvfp4DeviceWeight{nullptr, nullptr, 1.0f, 0, k}, nullptr, nullptr});
            continue;
        }
        build_weight(ws[i], pool, rng, codes, ns[i], k, x, m, with_bias && (i % 2 == 0));
        outs.emplace_back(static_cast<size_t>(m * ns[i]), bf16);
        desc.push_back({ws[i].dev(), ws[i].bias(), outs.back().buf.get()});
    }
    const DType dt = bf16 ? DType::BF16 : DType::F32;
    if (fused)
        cuda::gemv_nvfp4_stream_fused(dx.buf.get(), dt, m, desc.data(), static_cast<int>(desc.size()), nullptr, u);
    else
        cuda::gemv_nvfp4_stream(dx.buf.get(), dt, m, desc[0].w, desc[0].bias, desc[0].y, nullptr, u);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    for (size_t i = 0; i < ns.size(); ++i) {
        if (ns[i] == 0) continue;
        std::vector<double> tol(ws[i].tol.size());
        for (size_t o = 0; o < tol.size(); ++o) tol[o] = output_tol(ws[i].tol[o], ws[i].ref[o], bf16);
        test::expect_close(outs[i].download(), ws[i].ref, tol, what + " projection " + std::to_string(i));
    }
}

// h = silu(G) U against the CPU's G = x gate^T (+ b), U = x up^T (+ b) in double, with the bound of
// linear_cuda_test.cpp: 1.1 tG (|U| + tU) + |silu(G)| tU, plus 8 u32 of the result for the device's expf,
// add, divide and multiplies.
void run_gate_up_case(ThreadPool& pool, std::mt19937_64& rng, Codes codes, int64_t n, int64_t k, int64_t m,
                      bool bf16, bool with_bias, int u) {
    const std::string what = describe("gemv_nvfp4_stream_gate_up_silu", k, m, bf16, u) + " n=" +
                             std::to_string(n) + (codes == Codes::Raw ? " raw" : "") + (with_bias ? " bias" : "");
    SCOPED_TRACE(what);
    auto x = test::random_normal(rng, static_cast<size_t>(m * k));
    DeviceActs dx;
    dx.upload(x, bf16);
    StreamWeight gate, up;
    build_weight(gate, pool, rng, codes, n, k, x, m, with_bias);
    build_weight(up, pool, rng, codes, n, k, x, m, with_bias);
    DeviceOut h(static_cast<size_t>(m * n), bf16);
    cuda::gemv_nvfp4_stream_gate_up_silu(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, m, gate.dev(), gate.bias(),
                                         up.dev(), up.bias(), h.buf.get(), nullptr, u);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(gate.ref.size());
    std::vector<double> tol(ref.size());
    for (size_t o = 0; o < ref.size(); ++o) {
        const double g = gate.ref[o], v = up.ref[o], tg = gate.tol[o], tu = up.tol[o];
        const double silu = g / (1.0 + std::exp(-g));
        const double href = silu * v;
        const double bound = 1.1 * tg * (std::fabs(v) + tu) + std::fabs(silu) * tu;
        ref[o] = static_cast<float>(href);
        tol[o] = output_tol(bound + 8 * test::kEpsF32 * (std::fabs(href) + bound), href, bf16);
    }
    test::expect_close(h.download(), ref, tol, what);
}

struct Shape {
    int64_t n, k;
};
const Shape kShapes[] = {{1, 32}, {17, 96}, {129, 160}, {31, 64}, {67, 2080}, {33, 4128}, {67, 4096}, {45, 14336}};
const int kUs[] = {2, 4};

// Every m of a launch (1..8, tiles 1, 2, 4, 8 partly and wholly filled), 9 and 19 (two and three launches).
TEST(GemvStreamCuda, QuantizedWeights) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int u : kUs)
        for (const auto& s : kShapes)
            for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 19})
                for (bool bf16 : {false, true})
                    run_case(pool, rng, Codes::Quantized, {s.n}, s.k, m, bf16, m % 2 == 1, u, false);
}

TEST(GemvStreamCuda, EveryCode) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    // 131 x 1024: 67 KB of codes (every E2M1 code thousands of times), 8384 scale bytes (each of the 254
    // non-NaN E4M3 codes ~33 times).
    for (int u : kUs)
        for (int64_t m = 1; m <= 8; ++m)
            for (bool bf16 : {false, true}) {
                run_case(pool, rng, Codes::Raw, {131}, 1024, m, bf16, m % 2 == 0, u, false);
                run_gate_up_case(pool, rng, Codes::Raw, 45, 1024, m, bf16, m % 2 == 1, u);
            }
}

// More row groups than the device holds warps (n = 9001, 4501 groups; 8 CTAs of 4 warps on each of at most
// 132 SMs = 4224 warps at U = 2, fewer at U = 4): warps run several groups, and with k = 64 (one step a
// group) every reload crosses into the warp's next group. k = 4128 adds partial steps in between.
TEST(GemvStreamCuda, ManyGroupsPerWarp) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int u : kUs)
        for (bool bf16 : {false, true}) {
            for (int64_t m : {1, 2, 5, 8}) {
                run_case(pool, rng, Codes::Quantized, {9001}, 64, m, bf16, m != 2, u, false);
                run_gate_up_case(pool, rng, Codes::Quantized, 9001, 64, m, bf16, m != 2, u);
            }
            run_case(pool, rng, Codes::Quantized, {9001}, 4128, 1, bf16, true, u, false);
            run_case(pool, rng, Codes::Quantized, {4001, 2000, 3001}, 160, 3, bf16, true, u, true);
        }
}

// q, k, v in one launch: own global scales, biases on projections 0 and 2, outputs in their own buffers; row
// counts odd or not, and an empty projection that must be skipped.
TEST(GemvStreamCuda, FusedProjections) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int u : kUs)
        for (int64_t m = 1; m <= 8; ++m)
            for (bool bf16 : {false, true}) {
                run_case(pool, rng, Codes::Quantized, {67, 33, 17}, 4096, m, bf16, true, u, true);
                run_case(pool, rng, Codes::Quantized, {1, 129, 45}, 160, m, bf16, m % 2 == 0, u, true);
                run_case(pool, rng, Codes::Quantized, {20, 0, 7}, 96, m, bf16, true, u, true);
                run_case(pool, rng, Codes::Quantized, {48, 16}, 14336, m, bf16, m % 2 == 1, u, true);
            }
    for (int64_t m : {9, 19}) run_case(pool, rng, Codes::Quantized, {30, 11, 5}, 2080, m, true, true, 2, true);
}

// gate and up in one launch with silu(gate) * up in the epilogue: every m, with and without biases.
TEST(GemvStreamCuda, GateUpSilu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (int u : kUs)
        for (const auto& s : {Shape{1, 32}, Shape{13, 160}, Shape{37, 4128}, Shape{67, 4096}, Shape{45, 14336}})
            for (int64_t m = 1; m <= 8; ++m)
                for (bool bf16 : {false, true})
                    run_gate_up_case(pool, rng, Codes::Quantized, s.n, s.k, m, bf16, m % 2 == 1, u);
    for (int64_t m : {9, 19}) run_gate_up_case(pool, rng, Codes::Quantized, 21, 2080, m, true, true, 4);
}

// Programmatic launches consume what the launch before them wrote: y1 = x W1^T (gemv_nvfp4_mma; y1 poisoned
// with NaN first), then y2 = y1 W2^T and h = silu(y1 G^T) * (y1 U^T) by the stream kernels, launched with
// programmatic stream serialization straight after it: they start early and must wait for y1. The references
// are computed from y1 as the device wrote it.
TEST(GemvStreamCuda, ProgrammaticChain) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const int64_t k1 = 4096, k2 = 2048, n2 = 301, n_ff = 77;
    for (int u : kUs)
        for (int64_t m : {1, 5, 8})
            for (bool bf16 : {false, true}) {
                SCOPED_TRACE(describe("chain", k2, m, bf16, u));
                const DType dt = bf16 ? DType::BF16 : DType::F32;
                auto x = test::random_normal(rng, static_cast<size_t>(m * k1));
                DeviceActs dx;
                dx.upload(x, bf16);
                StreamWeight w1;
                build_weight(w1, pool, rng, Codes::Quantized, k2, k1, x, m, false);
                // Stage 2's weights do not depend on y1: built (their references on placeholder
                // activations) and uploaded before the launches; the references are redone from y1 below.
                std::vector<float> placeholder(static_cast<size_t>(m * k2), 1.0f);
                StreamWeight w2, wg, wu;
                build_weight(w2, pool, rng, Codes::Quantized, n2, k2, placeholder, m, true);
                build_weight(wg, pool, rng, Codes::Quantized, n_ff, k2, placeholder, m, false);
                build_weight(wu, pool, rng, Codes::Quantized, n_ff, k2, placeholder, m, true);
                DeviceOut y1(static_cast<size_t>(m * k2), bf16), y2(static_cast<size_t>(m * n2), bf16),
                    hout(static_cast<size_t>(m * n_ff), bf16);
                NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                cuda::gemv_nvfp4_mma(dx.buf.get(), dt, m, w1.dev(), nullptr, y1.buf.get(), nullptr);
                cuda::gemv_nvfp4_stream(y1.buf.get(), dt, m, w2.dev(), w2.bias(), y2.buf.get(), nullptr, u);
                cuda::gemv_nvfp4_stream_gate_up_silu(y1.buf.get(), dt, m, wg.dev(), wg.bias(), wu.dev(), wu.bias(),
                                                     hout.buf.get(), nullptr, u);
                NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                const std::vector<float> y1_host = y1.download();  // exactly what stage 2 read
                std::vector<double> tol1(w1.tol.size());
                for (size_t o = 0; o < tol1.size(); ++o) tol1[o] = output_tol(w1.tol[o], w1.ref[o], bf16);
                test::expect_close(y1_host, w1.ref, tol1, "chain stage 1");

                for (StreamWeight* p : {&w2, &wg, &wu})
                    test::linear_reference(pool, p->w, y1_host, m, /*bf16_acts=*/false, p->ref, p->tol);
                std::vector<double> tol2(w2.tol.size());
                for (size_t o = 0; o < tol2.size(); ++o) tol2[o] = output_tol(w2.tol[o], w2.ref[o], bf16);
                test::expect_close(y2.download(), w2.ref, tol2, "chain stage 2, gemv_nvfp4_stream");
                std::vector<float> refh(wg.ref.size());
                std::vector<double> tolh(refh.size());
                for (size_t o = 0; o < refh.size(); ++o) {  // the bound of run_gate_up_case
                    const double g = wg.ref[o], v = wu.ref[o], tg = wg.tol[o], tu = wu.tol[o];
                    const double silu = g / (1.0 + std::exp(-g)), href = silu * v;
                    const double bound = 1.1 * tg * (std::fabs(v) + tu) + std::fabs(silu) * tu;
                    refh[o] = static_cast<float>(href);
                    tolh[o] = output_tol(bound + 8 * test::kEpsF32 * (std::fabs(href) + bound), href, bf16);
                }
                test::expect_close(hout.download(), refh, tolh, "chain stage 2, gate/up");
            }
}

TEST(GemvStreamCuda, RejectsBadShapes) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer buf(1 << 16);
    const cuda::Nvfp4DeviceWeight w48{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 48};  // k % 32 != 0
    const cuda::Nvfp4DeviceWeight w64{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 64};
    const cuda::Nvfp4DeviceWeight w96{buf.as<uint8_t>(), buf.as<uint8_t>(), 1.0f, 4, 96};
    EXPECT_THROW(cuda::gemv_nvfp4_stream(buf.get(), DType::F32, 1, w48, nullptr, buf.get(), nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::gemv_nvfp4_stream(buf.get(), DType::F16, 1, w64, nullptr, buf.get(), nullptr),
                 std::invalid_argument);  // activations neither F32 nor BF16
    EXPECT_THROW(cuda::gemv_nvfp4_stream(buf.get(), DType::F32, -1, w64, nullptr, buf.get(), nullptr),
                 std::invalid_argument);  // negative m
    EXPECT_THROW(cuda::gemv_nvfp4_stream(buf.get(), DType::F32, 1, w64, nullptr, buf.get(), nullptr, 3),
                 std::invalid_argument);  // chunks_per_lane must be 0, 2 or 4
    const cuda::Nvfp4DeviceWeight unaligned{buf.as<uint8_t>() + 1, buf.as<uint8_t>(), 1.0f, 4, 64};
    EXPECT_THROW(cuda::gemv_nvfp4_stream(buf.get(), DType::F32, 1, unaligned, nullptr, buf.get(), nullptr),
                 std::invalid_argument);  // packed weights not 16-byte aligned
    EXPECT_THROW(cuda::gemv_nvfp4_stream_gate_up_silu(buf.get(), DType::F32, 1, w64, nullptr, w96, nullptr,
                                                      buf.get(), nullptr),
                 std::invalid_argument);  // gate and up differ
    const cuda::Nvfp4Projection two[] = {{w64, nullptr, buf.get()}, {w96, nullptr, buf.get()}};
    EXPECT_THROW(cuda::gemv_nvfp4_stream_fused(buf.get(), DType::F32, 1, two, 2, nullptr),
                 std::invalid_argument);  // projections with different k
    const cuda::Nvfp4Projection four[] = {{w64, nullptr, buf.get()}, {w64, nullptr, buf.get()},
                                          {w64, nullptr, buf.get()}, {w64, nullptr, buf.get()}};
    EXPECT_THROW(cuda::gemv_nvfp4_stream_fused(buf.get(), DType::F32, 1, four, 4, nullptr),
                 std::invalid_argument);  // at most 3 projections
}

}  // namespace
}  // namespace nibble
