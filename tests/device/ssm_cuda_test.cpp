// Device tests of the Mamba2 kernels (ops/ssm/ssm_cuda.h) against the CPU references of ops/ssm/ssm.h on
// fresh random inputs and states, outputs poisoned with NaN first; batches of sequences of mixed lengths
// (decode: many one-token sequences; prefill: one long one; empty sequences in between).
//
// Tolerances (u = u32 = 2^-24 unit roundoff, u_b = 2^-8; CUDA expf 2 ulp and log1pf 1 ulp per the CUDA
// guide, glibc's within 1 ulp):
//   conv: acc = bias + sum_j w_j v_j, a (kernel + 1)-term sum on either side: |dacc| <= 2 (kernel + 1) u S,
//     S = |bias| + sum |w_j v_j|; silu has |silu'| <= 1.1 and costs 8 u on each side: 1.1 dacc + 16 u |out|.
//     The conv state is a copy of inputs: equal exactly.
//   scan: a bound carried through the recurrence in double, for both sides together (an ulp is at most
//     2 u relative): d = log1p(exp(v)) is within 6 u on the device (expf 4 u, passed on with a factor
//     <= 1, log1pf 2 u) and 4 u on the CPU, 10 u together (v = dt + dt_bias rounds the same on both);
//     dA = exp(fl(d A)) within 12 u |d A| + 6 u; dx = d x within 12 u; h' = h dA + dx B adds
//     4 u (|h dA| + |dx B|), so E' = E dA + |h| dA (12 u |d A| + 6 u) + |dx B| 12 u + 4 u (|h dA| + |dx B|);
//     y = h' . C + D x: sum |C| E' + 2 (N + 2) u (sum |h' C| + |D x|). The final state: E, plus for a
//     bfloat16 state one rounding on each side, u_b (2 |h| + E).
//   chunked scan (ssm_scan_chunked, chunks of Q = 64): on top of the sequential bound (which already counts
//     the CPU side), each path from an input (h_in, or token k's dt x B) to an output carries a relative
//     error rho: dt 6 u and its products 2 u; the segment sums cs are float prefix sums of Q terms fl(d A),
//     so cs_j - cs_k is off by <= (2 Q + 15) u Lambda (Lambda: the largest |cs_last| of the head's chunks)
//     and expf adds 4 u, twice on a path (the chunk-state weight or G, and exp(cs_j)); the sums over N
//     (C B^T, C . h_in) and over Q (S, G x) and the few adds: (N + Q + 8) u; each chunk crossed on the way
//     costs the state pass's decay (Q + 7) u Lambda + 4 u and its fma 2 u. So
//       rho(m) = (N + Q + 24) u + (4 Q + 30) u Lambda + m ((Q + 7) u Lambda + 6 u),  m = chunks crossed,
//     times sum_n |C_n| habs_n + |D x| for y (habs: the recurrence run on magnitudes from |h_init|, which
//     bounds the sum of the paths' magnitudes), and times habs for the final state.
//   gated RMSNorm: g = y silu(z) within 12 u on both sides together (24 u in the sum of squares, 12 u in
//     1 / rms), the group_size-term sum of squares, the square root, division and two multiplies:
//     2 (group_size + 40) u |out|.
//   A BF16 output adds u_b |out| to each.
#include "ops/ssm/ssm_cuda.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "ops/ssm/ssm.h"
#include "ops/ssm/ssm_state.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;
using test::kEpsBf16;
using test::kEpsF32;

using test::download_vec;
using test::upload_vec;

std::vector<int32_t> starts_of(const std::vector<int64_t>& lengths) {
    std::vector<int32_t> s(lengths.size() + 1, 0);
    for (size_t i = 0; i < lengths.size(); ++i) s[i + 1] = s[i] + static_cast<int32_t>(lengths[i]);
    return s;
}

std::string lengths_name(const std::vector<int64_t>& lengths) {
    std::string s = "lengths {";
    for (size_t i = 0; i < lengths.size() && i < 8; ++i) {
        if (i > 0) s += ",";
        s += std::to_string(lengths[i]);
    }
    return s + (lengths.size() > 8 ? ",...}" : "}");
}

// Decode (32 one-token sequences), prefill (one sequence), and a mixed batch with empty sequences and
// sequences shorter than the conv history.
const std::vector<std::vector<int64_t>> kBatches = {
    std::vector<int64_t>(32, 1), {1}, {77}, {3, 0, 1, 2, 40, 0, 5}, {130, 1, 1}};

void run_conv(std::mt19937_64& rng, const std::vector<int64_t>& lengths, int64_t channels, int64_t kernel,
              bool bf16, bool with_bias) {
    const std::string what = "conv1d " + lengths_name(lengths) + " ch=" + std::to_string(channels) +
                             " K=" + std::to_string(kernel) + (bf16 ? " bf16" : " f32") +
                             (with_bias ? " bias" : "");
    SCOPED_TRACE(what);
    const auto starts = starts_of(lengths);
    const int64_t n_tokens = starts.back(), n_seqs = static_cast<int64_t>(lengths.size()), hist = kernel - 1;
    const int64_t x_stride = channels + 7;  // x inside a wider projection row, as in the mixer
    auto x = test::random_normal(rng, static_cast<size_t>(std::max<int64_t>(n_tokens, 1) * x_stride));
    DeviceActs dx;
    dx.upload(x, bf16);
    const auto weight = test::random_normal(rng, static_cast<size_t>(channels * kernel), 0.4f);
    std::vector<float> bias;
    if (with_bias) bias = test::random_normal(rng, static_cast<size_t>(channels), 0.5f);
    std::vector<std::vector<float>> states, ref_states;
    for (int64_t s = 0; s < n_seqs; ++s)
        states.push_back(
            test::random_normal(rng, static_cast<size_t>(std::max<int64_t>(hist, 1) * channels)));
    ref_states = states;

    std::vector<float> ref(static_cast<size_t>(n_tokens * channels));
    std::vector<double> tol(ref.size());
    for (int64_t s = 0; s < n_seqs; ++s) {
        const int64_t st = starts[static_cast<size_t>(s)], len = lengths[static_cast<size_t>(s)];
        // tolerance first, from the state before the CPU advances it
        for (int64_t t = 0; t < len; ++t)
            for (int64_t c = 0; c < channels; ++c) {
                double S = with_bias ? std::fabs(bias[static_cast<size_t>(c)]) : 0.0;
                for (int64_t j = 0; j < kernel; ++j) {
                    const int64_t src = t - hist + j;
                    const double v = src >= 0 ? x[static_cast<size_t>((st + src) * x_stride + c)]
                                              : states[static_cast<size_t>(s)]
                                                      [static_cast<size_t>((hist + src) * channels + c)];
                    S += std::fabs(static_cast<double>(weight[static_cast<size_t>(c * kernel + j)]) * v);
                }
                tol[static_cast<size_t>((st + t) * channels + c)] =
                    1.1 * 2.0 * static_cast<double>(kernel + 1) * kEpsF32 * S;
            }
        if (len > 0)
            mamba_conv1d_cpu(x.data() + st * x_stride, x_stride, len, channels, weight.data(),
                             with_bias ? bias.data() : nullptr, kernel,
                             ref_states[static_cast<size_t>(s)].data(), ref.data() + st * channels);
    }
    for (size_t i = 0; i < ref.size(); ++i) {
        tol[i] += 16.0 * kEpsF32 * std::fabs(ref[i]);
        if (bf16) tol[i] = tol[i] * (1 + kEpsBf16) + kEpsBf16 * std::fabs(ref[i]);
    }

    auto dstarts = upload_vec(starts);
    auto dweight = upload_vec(weight);
    auto dbias = upload_vec(bias);
    std::vector<cuda::DeviceBuffer> dstates;
    std::vector<float*> ptrs;
    for (const auto& st : states) {
        dstates.push_back(upload_vec(st));
        ptrs.push_back(dstates.back().as<float>());
    }
    auto dptrs = upload_vec(ptrs);
    DeviceOut out(ref.size(), bf16);
    cuda::mamba_conv1d(dx.buf.get(), bf16 ? DType::BF16 : DType::F32, x_stride, n_tokens, channels,
                       dstarts.as<int32_t>(), n_seqs, dweight.as<float>(),
                       with_bias ? dbias.as<float>() : nullptr, kernel, dptrs.as<float* const>(),
                       out.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    if (!ref.empty()) test::expect_close(out.download(), ref, tol, what);
    for (int64_t s = 0; s < n_seqs; ++s) {
        const auto got =
            download_vec<float>(dstates[static_cast<size_t>(s)], static_cast<size_t>(hist * channels));
        const std::vector<float> want(ref_states[static_cast<size_t>(s)].begin(),
                                      ref_states[static_cast<size_t>(s)].begin() + hist * channels);
        EXPECT_EQ(got, want) << what << ": conv state of sequence " << s;
    }
}

TEST(SsmCuda, Conv1d) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (const auto& lengths : kBatches)
        for (int64_t kernel : {4, 1, 2, 8})
            for (bool bf16 : {false, true}) run_conv(rng, lengths, 200, kernel, bf16, kernel != 2);
    run_conv(rng, {5, 1}, 4096 + 2 * 8 * 128, 4, true, true);  // NemotronH Nano conv_dim: x + B + C
}

constexpr int64_t kChunk = 64;  // ssm_scan_chunked's chunk length (ssm_cuda.cu)

struct ScanShape {
    int64_t n_heads, head_dim, state_size, n_groups;
};

// chunked: cuda::ssm_scan_chunked instead of cuda::ssm_scan, against the same CPU reference.
void run_scan(ThreadPool& pool, std::mt19937_64& rng, const std::vector<int64_t>& lengths,
              const ScanShape& sh, SsmStateDtype state_dtype, bool bf16, bool clamp_dt,
              bool chunked = false) {
    const bool bf16_state = state_dtype == SsmStateDtype::Bf16;
    const std::string what = "scan " + lengths_name(lengths) + " H=" + std::to_string(sh.n_heads) +
                             " P=" + std::to_string(sh.head_dim) + " N=" + std::to_string(sh.state_size) +
                             " G=" + std::to_string(sh.n_groups) +
                             (bf16_state ? " bf16 state" : " f32 state") + (bf16 ? " bf16" : " f32") +
                             (clamp_dt ? " clamped dt" : "") + (chunked ? " chunked" : "");
    SCOPED_TRACE(what);
    const int64_t H = sh.n_heads, P = sh.head_dim, N = sh.state_size, G = sh.n_groups;
    const int64_t d_inner = H * P, xbc_stride = d_inner + 2 * G * N + 3, dt_stride = H + 2;
    const auto starts = starts_of(lengths);
    const int64_t n_tokens = starts.back(), n_seqs = static_cast<int64_t>(lengths.size());
    const int64_t state_elems = H * P * N;

    auto xbc = test::random_normal(rng, static_cast<size_t>(std::max<int64_t>(n_tokens, 1) * xbc_stride));
    auto dt = test::random_normal(rng, static_cast<size_t>(std::max<int64_t>(n_tokens, 1) * dt_stride));
    DeviceActs dxbc, ddt;
    dxbc.upload(xbc, bf16);
    ddt.upload(dt, bf16);
    // Mamba2's initialisation ranges: dt_bias = softplus^-1(dt0), dt0 in [0.001, 0.1]; A = -exp(A_log),
    // A_log in [0, log 16].
    std::vector<float> A(static_cast<size_t>(H)), D = test::random_normal(rng, static_cast<size_t>(H)),
                                                  dt_bias(A.size());
    std::uniform_real_distribution<float> u01(0.0f, 1.0f);
    for (int64_t h = 0; h < H; ++h) {
        const auto i = static_cast<size_t>(h);
        A[i] = -std::exp(u01(rng) * std::log(16.0f));
        const float dt0 = std::exp(std::log(0.001f) + u01(rng) * (std::log(0.1f) - std::log(0.001f)));
        dt_bias[i] = std::log(std::expm1(dt0));
    }
    SsmScanParams p;
    p.n_heads = H, p.head_dim = P, p.state_size = N, p.n_groups = G;
    p.A = A.data(), p.D = D.data(), p.dt_bias = dt_bias.data();
    p.dt_min = clamp_dt ? 0.005f : 0.0f;
    p.dt_max = clamp_dt ? 0.05f : INFINITY;

    // Initial states through a MambaState of one layer (its storage dtype and rounding).
    MambaStateShape shape;
    shape.n_layers = 1, shape.n_heads = H, shape.head_dim = P, shape.state_size = N,
    shape.ssm_dtype = state_dtype;
    std::vector<float> init_f32;  // [n_seqs, H, P, N] as stored, widened
    std::vector<MambaState> host_states;
    for (int64_t s = 0; s < n_seqs; ++s) {
        host_states.emplace_back(shape);
        host_states.back().store_ssm(0,
                                     test::random_normal(rng, static_cast<size_t>(state_elems), 0.5f).data());
        std::vector<float> w(static_cast<size_t>(state_elems));
        host_states.back().load_ssm(0, w.data());
        init_f32.insert(init_f32.end(), w.begin(), w.end());
    }

    std::vector<float> ref_y(static_cast<size_t>(n_tokens * d_inner));
    std::vector<float> ref_state(init_f32.size());
    std::vector<double> tol_y(ref_y.size()), tol_state(ref_state.size());
    const double u = kEpsF32;
    for (int64_t s = 0; s < n_seqs; ++s) {
        const int64_t st = starts[static_cast<size_t>(s)], len = lengths[static_cast<size_t>(s)];
        std::vector<float> state(init_f32.begin() + s * state_elems,
                                 init_f32.begin() + (s + 1) * state_elems);
        // The bound, with a double shadow of the state for magnitudes.
        std::vector<double> hd(state.begin(), state.end()), E(state.size(), 0.0);
        // The chunked scan's extra error (the file's header): habs runs the recurrence on magnitudes,
        // so sum |C| habs bounds every path's |contribution| to y; Lambda[h] = max over chunks of |cs_last|.
        std::vector<double> habs(hd.size()), Lambda(static_cast<size_t>(H), 0.0);
        for (size_t e = 0; e < hd.size(); ++e) habs[e] = std::fabs(hd[e]);
        auto d_of = [&](int64_t t, int64_t h) {
            const float v =
                dt[static_cast<size_t>((st + t) * dt_stride + h)] + dt_bias[static_cast<size_t>(h)];
            const double d = v > 20.0f ? v : std::log1p(std::exp(static_cast<double>(v)));
            return std::clamp(d, static_cast<double>(p.dt_min), static_cast<double>(p.dt_max));
        };
        for (int64_t h = 0; h < H && chunked; ++h)
            for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
                double cs = 0;
                for (int64_t t = c0; t < std::min(len, c0 + kChunk); ++t)
                    cs += d_of(t, h) * A[static_cast<size_t>(h)];
                Lambda[static_cast<size_t>(h)] = std::max(Lambda[static_cast<size_t>(h)], std::fabs(cs));
            }
        auto chunk_rho = [&](int64_t h, int64_t crossings) {
            const double L = Lambda[static_cast<size_t>(h)], Q = kChunk;
            return (static_cast<double>(N) + Q + 24) * u + (4 * Q + 30) * u * L +
                   static_cast<double>(crossings) * ((Q + 7) * u * L + 6 * u);
        };
        for (int64_t t = 0; t < len; ++t) {
            const float* row = xbc.data() + (st + t) * xbc_stride;
            for (int64_t h = 0; h < H; ++h) {
                const int64_t g = h / (H / G);
                const float v =
                    dt[static_cast<size_t>((st + t) * dt_stride + h)] + dt_bias[static_cast<size_t>(h)];
                double d = v > 20.0f ? v : std::log1p(std::exp(static_cast<double>(v)));
                d = std::clamp(d, static_cast<double>(p.dt_min), static_cast<double>(p.dt_max));
                const double arg = d * A[static_cast<size_t>(h)], dA = std::exp(arg);
                const double dA_rel = 12.0 * u * std::fabs(arg) + 6.0 * u;
                for (int64_t i = 0; i < P; ++i) {
                    const double xv = row[h * P + i], dx = d * xv;
                    double y = 0, ys = 0, ye = 0;
                    double yabs = 0;
                    for (int64_t k = 0; k < N; ++k) {
                        const auto si = static_cast<size_t>((h * P + i) * N + k);
                        const double B = row[d_inner + g * N + k], C = row[d_inner + G * N + g * N + k];
                        habs[si] = habs[si] * dA + std::fabs(dx * B);
                        yabs += habs[si] * std::fabs(C);
                        const double hdA = std::fabs(hd[si] * dA), dxB = std::fabs(dx * B);
                        E[si] = E[si] * dA + hdA * dA_rel + dxB * 12.0 * u + 4.0 * u * (hdA + dxB);
                        hd[si] = hd[si] * dA + dx * B;
                        y += hd[si] * C;
                        ys += std::fabs(hd[si] * C);
                        ye += E[si] * std::fabs(C);
                    }
                    const double Dx = static_cast<double>(D[static_cast<size_t>(h)]) * xv;
                    y += Dx;
                    const auto yi = static_cast<size_t>((st + t) * d_inner + h * P + i);
                    tol_y[yi] = ye + 2.0 * static_cast<double>(N + 2) * u * (ys + std::fabs(Dx));
                    if (chunked) tol_y[yi] += chunk_rho(h, t / kChunk + 1) * (yabs + std::fabs(Dx));
                }
            }
        }
        if (len > 0)
            ssm_scan_cpu(pool, p, len, xbc.data() + st * xbc_stride, xbc_stride, dt.data() + st * dt_stride,
                         dt_stride, state.data(), ref_y.data() + st * d_inner);
        // the stored state: rounded to bfloat16 once per forward when stored so
        host_states[static_cast<size_t>(s)].store_ssm(0, state.data());
        host_states[static_cast<size_t>(s)].load_ssm(0, ref_state.data() + s * state_elems);
        for (int64_t e = 0; e < state_elems; ++e) {
            const auto i = static_cast<size_t>(s * state_elems + e);
            if (chunked && len > 0)  // folded into E: the bfloat16 rounding term below then covers it too
                E[static_cast<size_t>(e)] +=
                    chunk_rho(e / (P * N), (len + kChunk - 1) / kChunk + 1) * habs[static_cast<size_t>(e)];
            tol_state[i] =
                E[static_cast<size_t>(e)] +
                (bf16_state && len > 0
                     ? kEpsBf16 * (2.0 * std::fabs(hd[static_cast<size_t>(e)]) + E[static_cast<size_t>(e)])
                     : 0.0);
        }
    }
    for (size_t i = 0; i < ref_y.size(); ++i)
        if (bf16) tol_y[i] = tol_y[i] * (1 + kEpsBf16) + kEpsBf16 * std::fabs(ref_y[i]);

    // Device: the same initial states in their storage dtype, one buffer per sequence.
    std::vector<cuda::DeviceBuffer> dstates;
    std::vector<void*> ptrs;
    for (int64_t s = 0; s < n_seqs; ++s) {
        const float* init = init_f32.data() + s * state_elems;
        if (bf16_state) {
            std::vector<uint16_t> bits(static_cast<size_t>(state_elems));
            for (size_t i = 0; i < bits.size(); ++i)
                bits[i] = bf16_from_float(init[i]);  // exact: init is bf16
            dstates.push_back(upload_vec(bits));
        } else {
            dstates.push_back(upload_vec(std::vector<float>(init, init + state_elems)));
        }
        ptrs.push_back(dstates.back().get());
    }
    auto dptrs = upload_vec(ptrs);
    auto dstarts = upload_vec(starts);
    auto dA = upload_vec(A), dD = upload_vec(D), ddt_bias = upload_vec(dt_bias);
    SsmScanParams dp = p;
    dp.A = dA.as<float>(), dp.D = dD.as<float>(), dp.dt_bias = ddt_bias.as<float>();
    DeviceOut y(ref_y.size(), bf16);
    if (chunked) {
        // The workspace poisoned too: every chunk state must be written before it is read.
        cuda::DeviceBuffer workspace(cuda::ssm_scan_chunked_workspace_bytes(dp, n_tokens, n_seqs));
        workspace.fill_bytes(0xff);
        cuda::ssm_scan_chunked(dp, n_tokens, dstarts.as<int32_t>(), n_seqs, dxbc.buf.get(), xbc_stride,
                               ddt.buf.get(), dt_stride, bf16 ? DType::BF16 : DType::F32,
                               dptrs.as<void* const>(), state_dtype, y.buf.get(), workspace.get(),
                               workspace.bytes(), nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    } else {
        cuda::ssm_scan(dp, n_tokens, dstarts.as<int32_t>(), n_seqs, dxbc.buf.get(), xbc_stride, ddt.buf.get(),
                       dt_stride, bf16 ? DType::BF16 : DType::F32, dptrs.as<void* const>(), state_dtype,
                       y.buf.get(), nullptr);
    }
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    if (!ref_y.empty()) test::expect_close(y.download(), ref_y, tol_y, what + " y");
    std::vector<float> got_state;
    for (int64_t s = 0; s < n_seqs; ++s) {
        if (bf16_state) {
            const auto bits =
                download_vec<uint16_t>(dstates[static_cast<size_t>(s)], static_cast<size_t>(state_elems));
            for (uint16_t b : bits) got_state.push_back(bf16_to_float(b));
        } else {
            const auto v =
                download_vec<float>(dstates[static_cast<size_t>(s)], static_cast<size_t>(state_elems));
            got_state.insert(got_state.end(), v.begin(), v.end());
        }
    }
    test::expect_close(got_state, ref_state, tol_state, what + " state");
}

TEST(SsmCuda, ScanF32State) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& lengths : kBatches)
        for (const ScanShape& sh : {ScanShape{8, 16, 64, 2}, ScanShape{4, 6, 128, 1}, ScanShape{6, 8, 16, 3},
                                    ScanShape{2, 4, 200, 2}})
            for (bool bf16 : {false, true}) run_scan(pool, rng, lengths, sh, SsmStateDtype::F32, bf16, false);
    run_scan(pool, rng, {9, 1}, {8, 16, 64, 2}, SsmStateDtype::F32, false, true);
}

TEST(SsmCuda, ScanBf16State) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& lengths : kBatches)
        for (bool bf16 : {false, true})
            run_scan(pool, rng, lengths, {8, 16, 128, 4}, SsmStateDtype::Bf16, bf16, false);
    run_scan(pool, rng, {9, 1}, {8, 16, 64, 2}, SsmStateDtype::Bf16, true, true);
}

// A NemotronH-Nano-like layer (64 heads x 64, state 128, 8 groups): one decode step and a short prefill.
TEST(SsmCuda, ScanModelShape) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    run_scan(pool, rng, {1, 1, 1}, {64, 64, 128, 8}, SsmStateDtype::F32, true, false);
    run_scan(pool, rng, {24}, {64, 64, 128, 8}, SsmStateDtype::Bf16, true, false);
}

// The chunked scan: chunk edges (1, 63, 64, 65 tokens), several chunks (300, 2048), batches of several
// sequences with empty ones between, random (non-zero) initial states, both state and activation dtypes.
const std::vector<std::vector<int64_t>> kChunkedBatches = {
    {1}, {63}, {64}, {65}, {300}, {2048}, {65, 0, 1, 300, 64, 0, 63, 129}, {3, 0}};

TEST(SsmCuda, ChunkedScan) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& lengths : kChunkedBatches)
        for (const ScanShape& sh :
             {ScanShape{8, 16, 64, 2}, ScanShape{6, 8, 16, 3}, ScanShape{2, 96, 200, 2}})
            for (bool bf16 : {false, true})
                for (SsmStateDtype sd : {SsmStateDtype::F32, SsmStateDtype::Bf16})
                    run_scan(pool, rng, lengths, sh, sd, bf16, false, true);
    run_scan(pool, rng, {9, 130, 1}, {8, 16, 64, 2}, SsmStateDtype::F32, false, true, true);
    run_scan(pool, rng, {9, 130, 1}, {8, 16, 64, 2}, SsmStateDtype::Bf16, true, true, true);
}

// Nemotron-3-Nano's mixer shape (64 heads x 64, state 128, 8 groups): a 2048-token prefill and a mixed batch.
TEST(SsmCuda, ChunkedScanModelShape) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    run_scan(pool, rng, {2048}, {64, 64, 128, 8}, SsmStateDtype::F32, true, false, true);
    run_scan(pool, rng, {300, 1, 65, 0, 128}, {64, 64, 128, 8}, SsmStateDtype::Bf16, true, false, true);
    run_scan(pool, rng, {200, 64}, {64, 64, 128, 8}, SsmStateDtype::F32, false, false, true);
}

void run_gated_norm(std::mt19937_64& rng, int64_t m, int64_t d, int64_t group_size, bool bf16,
                    bool in_place) {
    const std::string what = "gated_rmsnorm m=" + std::to_string(m) + " d=" + std::to_string(d) +
                             " group=" + std::to_string(group_size) + (bf16 ? " bf16" : " f32") +
                             (in_place ? " in place" : "");
    const int64_t z_stride = d + 5;
    auto y = test::random_normal(rng, static_cast<size_t>(m * d));
    auto z = test::random_normal(rng, static_cast<size_t>(m * z_stride), 1.5f);
    DeviceActs dy, dz;
    dy.upload(y, bf16);
    dz.upload(z, bf16);
    std::vector<float> weight = test::random_normal(rng, static_cast<size_t>(d), 0.2f);
    for (float& w : weight) w += 1.0f;
    std::vector<float> ref(y.size());
    gated_rmsnorm_cpu(y.data(), z.data(), z_stride, m, d, group_size, weight.data(), 1e-5f, ref.data());
    std::vector<double> tol(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
        tol[i] = 2.0 * static_cast<double>(group_size + 40) * kEpsF32 * std::fabs(ref[i]);
        if (bf16) tol[i] = tol[i] * (1 + kEpsBf16) + kEpsBf16 * std::fabs(ref[i]);
    }
    auto dweight = upload_vec(weight);
    DeviceOut out(ref.size(), bf16);
    const DType dt = bf16 ? DType::BF16 : DType::F32;
    if (in_place) {
        cuda::gated_rmsnorm(dy.buf.get(), dz.buf.get(), z_stride, dt, m, d, group_size, dweight.as<float>(),
                            1e-5f, dy.buf.get(), nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
        std::vector<float> got(ref.size());
        if (bf16) {
            std::vector<uint16_t> bits(ref.size());
            dy.buf.download(bits.data(), bits.size() * 2);
            for (size_t i = 0; i < bits.size(); ++i) got[i] = bf16_to_float(bits[i]);
        } else {
            dy.buf.download(got.data(), got.size() * 4);
        }
        test::expect_close(got, ref, tol, what);
        return;
    }
    cuda::gated_rmsnorm(dy.buf.get(), dz.buf.get(), z_stride, dt, m, d, group_size, dweight.as<float>(),
                        1e-5f, out.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    test::expect_close(out.download(), ref, tol, what);
}

TEST(SsmCuda, GatedRmsNorm) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t m : {1, 5, 33})
        for (bool bf16 : {false, true}) {
            run_gated_norm(rng, m, 1024, 128, bf16, false);
            run_gated_norm(rng, m, 1024, 1024, bf16, false);
            run_gated_norm(rng, m, 96, 24, bf16, false);
            run_gated_norm(rng, m, 8192, 1024, bf16, m == 5);
        }
}

TEST(SsmCuda, RejectsBadArguments) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer buf(1 << 16);
    EXPECT_THROW(cuda::mamba_conv1d(buf.get(), DType::F32, 16, 1, 16, buf.as<int32_t>(), 1, buf.as<float>(),
                                    nullptr, 9, buf.as<float* const>(), buf.get(), nullptr),
                 std::invalid_argument);  // kernel 9
    SsmScanParams p;
    p.n_heads = 6, p.head_dim = 4, p.state_size = 16, p.n_groups = 4;  // 6 heads in 4 groups
    p.A = p.D = p.dt_bias = buf.as<float>();
    EXPECT_THROW(cuda::ssm_scan(p, 1, buf.as<int32_t>(), 1, buf.get(), 1000, buf.get(), 8, DType::F32,
                                buf.as<void* const>(), SsmStateDtype::F32, buf.get(), nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::ssm_scan_chunked(p, 1, buf.as<int32_t>(), 1, buf.get(), 1000, buf.get(), 8, DType::F32,
                                        buf.as<void* const>(), SsmStateDtype::F32, buf.get(), buf.get(),
                                        buf.bytes(), nullptr),
                 std::invalid_argument);
    p.n_groups = 2;  // valid now; a workspace too small for 2048 tokens
    EXPECT_THROW(
        cuda::ssm_scan_chunked(p, 2048, buf.as<int32_t>(), 1, buf.get(), 1000, buf.get(), 8, DType::F32,
                               buf.as<void* const>(), SsmStateDtype::F32, buf.get(), buf.get(), 64, nullptr),
        std::invalid_argument);
    EXPECT_THROW(cuda::gated_rmsnorm(buf.get(), buf.get(), 100, DType::F32, 1, 100, 30, buf.as<float>(),
                                     1e-5f, buf.get(), nullptr),
                 std::invalid_argument);  // 100 not a multiple of 30
}

}  // namespace
}  // namespace nibble
