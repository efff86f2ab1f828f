// Device tests of the expert-parallel MoE pieces (ops/moe/moe_cuda.h): moe_localize_ids against
// moe_localize_ids_cpu (exact), and moe_experts_nvfp4 over a rank's experts fed the localized ids: the
// ranks' outputs add up to the whole model's, and a rank that no token routes to outputs exactly zero.
// Device outputs and workspaces are poisoned first (0xff bytes: NaN floats, -1 ints), so a dropped pair's
// unwritten pair_position (-1) would read outside o if the combine did not skip it.
//
// Tolerance of the sum (F32 activations, the GEMV kernel, as the F32 forward runs): each pair's expert
// output o_j is computed by the same per-token arithmetic whichever experts share the launch, so only the
// combine's order differs: the whole model adds the token's top_k weighted outputs in ascending id order,
// each rank its own in the same order, and the ranks' sums are then added (here in double). Both float32 sums
// are within top_k u32 sum_j |w_j o_j| of the exact value: 2 (top_k + 1) u32 sum_j |w_j o_j| covers the
// difference, with sum_j |w_j o_j| from the whole model's o, downloaded.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <span>
#include <vector>

#include "device_test_util.h"
#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe.h"
#include "ops/moe/moe_cuda.h"
#include "ops/moe/moe_workspace.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

using test::download_vec;
using test::kEpsF32;
using test::upload_vec;

cuda::DeviceBuffer poisoned(size_t bytes) {
    cuda::DeviceBuffer b(std::max<size_t>(bytes, 4));
    b.fill_bytes(0xff);
    return b;
}

TEST(MoeExpertParallelCuda, LocalizeIdsMatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t n_experts : {8, 128, 1024})
        for (int64_t n_pairs : {1, 7, 256, 5000})
            for (int64_t ranks : {2, 4, 8}) {
                std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(n_experts - 1));
                std::vector<int32_t> ids(static_cast<size_t>(n_pairs));
                for (int32_t& v : ids) v = id(rng);
                auto dids = upload_vec(ids);
                for (int64_t r = 0; r < ranks; ++r) {
                    const int64_t begin = r * n_experts / ranks, end = (r + 1) * n_experts / ranks;
                    SCOPED_TRACE("E=" + std::to_string(n_experts) + " pairs=" + std::to_string(n_pairs) +
                                 " experts [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
                    auto local = poisoned(static_cast<size_t>(n_pairs) * 4);
                    cuda::moe_localize_ids(dids.as<int32_t>(), n_pairs, begin, end, local.as<int32_t>(), nullptr);
                    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                    EXPECT_EQ(download_vec<int32_t>(local, ids.size()), moe_localize_ids_cpu(ids, begin, end));
                }
            }
    cuda::DeviceBuffer buf(64);
    EXPECT_THROW(cuda::moe_localize_ids(buf.as<int32_t>(), 4, 3, 3, buf.as<int32_t>(), nullptr),
                 std::invalid_argument);  // an empty range
    EXPECT_THROW(cuda::moe_localize_ids(buf.as<int32_t>(), 4, 0, 2000, buf.as<int32_t>(), nullptr),
                 std::invalid_argument);  // beyond 1024 experts
}

struct Nvfp4Matrix {
    std::vector<uint8_t> packed, scales;
    float global = 1.0f;
    cuda::DeviceBuffer dpacked, dscales;
    cuda::Nvfp4DeviceWeight device(int64_t n, int64_t k) const {
        return {dpacked.as<uint8_t>(), dscales.as<uint8_t>(), global, n, k};
    }
};

Nvfp4Matrix random_nvfp4(std::mt19937_64& rng, int64_t n, int64_t k) {
    Nvfp4Matrix h;
    const std::vector<float> dense = test::random_normal(rng, static_cast<size_t>(n * k), 0.1f);
    float amax = 0;
    for (float v : dense) amax = std::max(amax, std::fabs(v));
    h.global = nvfp4_global_scale(amax);
    h.packed.resize(static_cast<size_t>(n * k / 2));
    h.scales.resize(static_cast<size_t>(n * k / 16));
    for (int64_t r = 0; r < n; ++r)
        nvfp4_quantize_row(dense.data() + r * k, k, h.global, h.packed.data() + r * k / 2,
                           h.scales.data() + r * k / 16);
    h.dpacked = upload_vec(h.packed);
    h.dscales = upload_vec(h.scales);
    return h;
}

// ids [m, top_k]: distinct per token, uniform over all experts, or (only_first) from experts [0, limit).
std::vector<int32_t> draw_ids(std::mt19937_64& rng, int64_t m, int64_t top_k, int64_t limit) {
    std::vector<int32_t> all(static_cast<size_t>(limit)), ids(static_cast<size_t>(m * top_k));
    std::iota(all.begin(), all.end(), 0);
    for (int64_t t = 0; t < m; ++t) {
        std::shuffle(all.begin(), all.end(), rng);
        std::copy_n(all.begin(), top_k, ids.begin() + t * top_k);
    }
    return ids;
}

// n_experts random NVFP4 experts (gate and up [ff, d], down [d, ff]) on the device, and their tables; of() is
// a rank's window of them (experts [begin, end)).
struct RandomExperts {
    std::vector<Nvfp4Matrix> gate, up, down;  // own the device weights the tables point at
    cuda::DeviceBuffer gate_arr, up_arr, down_arr;
    int64_t d = 0, ff = 0;
    RandomExperts(std::mt19937_64& rng, int64_t n_experts, int64_t d_, int64_t ff_) : d(d_), ff(ff_) {
        std::vector<cuda::Nvfp4DeviceWeight> dgate, dup, ddown;
        for (int64_t e = 0; e < n_experts; ++e) {
            gate.push_back(random_nvfp4(rng, ff, d));
            up.push_back(random_nvfp4(rng, ff, d));
            down.push_back(random_nvfp4(rng, d, ff));
        }
        for (int64_t e = 0; e < n_experts; ++e) {
            const auto i = static_cast<size_t>(e);
            dgate.push_back(gate[i].device(ff, d));
            dup.push_back(up[i].device(ff, d));
            ddown.push_back(down[i].device(d, ff));
        }
        gate_arr = upload_vec(dgate), up_arr = upload_vec(dup), down_arr = upload_vec(ddown);
    }
    cuda::MoeDeviceExperts of(int64_t begin, int64_t end) const {
        return cuda::MoeDeviceExperts{gate_arr.as<cuda::Nvfp4DeviceWeight>() + begin,
                                      up_arr.as<cuda::Nvfp4DeviceWeight>() + begin,
                                      down_arr.as<cuda::Nvfp4DeviceWeight>() + begin, end - begin, d, ff};
    }
};

TEST(MoeExpertParallelCuda, RanksPartialSumsAddUpToTheWholeModel) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const int64_t n_experts = 16, d = 128, ff = 64;
    const RandomExperts experts(rng, n_experts, d, ff);
    for (int64_t top_k : {2, 8})
        for (int64_t m : {1, 5, 40})
            for (int64_t ranks : {2, 4, 8})
                for (bool only_first_rank : {false, true}) {
                    const int64_t per_rank = n_experts / ranks;
                    if (only_first_rank && top_k > per_rank) continue;
                    SCOPED_TRACE("top_k=" + std::to_string(top_k) + " m=" + std::to_string(m) + " ranks=" +
                                 std::to_string(ranks) + (only_first_rank ? " all on rank 0" : ""));
                    const int64_t n_pairs = m * top_k;
                    const std::vector<int32_t> ids = draw_ids(rng, m, top_k, only_first_rank ? per_rank : n_experts);
                    std::uniform_real_distribution<float> wdist(0.05f, 1.0f);
                    std::vector<float> weights(ids.size());
                    for (float& w : weights) w = wdist(rng);
                    const std::vector<float> x = test::random_normal(rng, static_cast<size_t>(m * d));
                    auto dids = upload_vec(ids), dweights = upload_vec(weights), dx = upload_vec(x);

                    // The whole model, step by step, keeping o and the pair positions for the tolerance.
                    const cuda::MoeDeviceExperts whole = experts.of(0, n_experts);
                    auto counts = poisoned(n_experts * 4), offsets = poisoned((n_experts + 1) * 4),
                         sorted = poisoned(static_cast<size_t>(n_pairs) * 4),
                         position = poisoned(static_cast<size_t>(n_pairs) * 4), active = poisoned(n_experts * 4),
                         n_active = poisoned(4);
                    const cuda::MoePermutation perm{counts.as<int32_t>(),   offsets.as<int32_t>(),
                                                    sorted.as<int32_t>(),   position.as<int32_t>(),
                                                    active.as<int32_t>(),   n_active.as<int32_t>()};
                    auto h = poisoned(static_cast<size_t>(n_pairs * ff) * 4);
                    auto o = poisoned(static_cast<size_t>(n_pairs * d) * 4);
                    auto y_whole = poisoned(static_cast<size_t>(m * d) * 4);
                    cuda::moe_permute(dids.as<int32_t>(), m, top_k, n_experts, perm, nullptr);
                    cuda::moe_experts_up_nvfp4(dx.get(), DType::F32, m, top_k, whole, MoeActivation::SwiGlu, perm,
                                               h.as<float>(), nullptr, cuda::MoeExpertKernel::Gemv);
                    cuda::moe_experts_down_nvfp4(h.as<float>(), m, top_k, whole, perm, o.as<float>(), nullptr,
                                                 cuda::MoeExpertKernel::Gemv);
                    cuda::moe_combine(o.as<float>(), dids.as<int32_t>(), dweights.as<float>(),
                                      perm.pair_position, m, top_k, d, nullptr, DType::F32, y_whole.get(), nullptr);
                    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                    const std::vector<float> ref = download_vec<float>(y_whole, static_cast<size_t>(m * d));
                    const std::vector<float> o_host = download_vec<float>(o, static_cast<size_t>(n_pairs * d));
                    const std::vector<int32_t> pos = download_vec<int32_t>(position, static_cast<size_t>(n_pairs));
                    std::vector<double> tol(ref.size(), 0.0);
                    for (int64_t t = 0; t < m; ++t)
                        for (int64_t c = 0; c < d; ++c) {
                            double s = 0;
                            for (int64_t j = 0; j < top_k; ++j) {
                                const auto pj = static_cast<size_t>(t * top_k + j);
                                s += std::fabs(static_cast<double>(weights[pj]) *
                                               o_host[static_cast<size_t>(pos[pj] * d + c)]);
                            }
                            tol[static_cast<size_t>(t * d + c)] = 2.0 * static_cast<double>(top_k + 1) * kEpsF32 * s;
                        }

                    // Each rank: its experts, the localized ids, through the one-call launcher.
                    std::vector<double> sum(ref.size(), 0.0);
                    auto local = poisoned(static_cast<size_t>(n_pairs) * 4);
                    for (int64_t r = 0; r < ranks; ++r) {
                        const int64_t begin = r * per_rank, end = begin + per_rank;
                        cuda::moe_localize_ids(dids.as<int32_t>(), n_pairs, begin, end, local.as<int32_t>(), nullptr);
                        auto ws = poisoned(cuda::moe_workspace_bytes(m, top_k, per_rank, d, ff));
                        auto y = poisoned(static_cast<size_t>(m * d) * 4);
                        cuda::moe_experts_nvfp4(dx.get(), DType::F32, m, local.as<int32_t>(), dweights.as<float>(),
                                                top_k, experts.of(begin, end), MoeActivation::SwiGlu, nullptr,
                                                ws.get(), y.get(), nullptr);
                        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                        const std::vector<float> part = download_vec<float>(y, ref.size());
                        if (only_first_rank && r > 0) {  // no token routes here: exactly zero, no NaN
                            for (size_t i = 0; i < part.size(); ++i)
                                ASSERT_EQ(part[i], 0.0f) << "rank " << r << " element " << i;
                        }
                        for (size_t i = 0; i < part.size(); ++i) sum[i] += part[i];
                    }
                    for (size_t i = 0; i < ref.size(); ++i) {
                        ASSERT_TRUE(std::isfinite(sum[i])) << i;
                        ASSERT_LE(std::fabs(sum[i] - ref[i]), tol[i])
                            << "element " << i << ": ranks' sum " << sum[i] << " vs whole " << ref[i];
                    }
                    if (only_first_rank) {  // one rank holds every chosen expert: the same sum, bit for bit
                        for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(static_cast<float>(sum[i]), ref[i]) << i;
                    }
                }
}


// Every expert kernel (the GEMV, the grouped GEMM, and Auto's pick) with other ranks' pairs dropped, F32 and
// BF16 activations, as the expert-parallel forward runs a MoE layer: moe_route_softmax, moe_localize_ids,
// then moe_experts_nvfp4 on the rank's experts with a workspace sized as the forward sizes it (max tokens,
// the whole model's expert count); and the same rank step by step (moe_permute, up, down, combine with the
// kernel Auto resolves to) must give the same bits. The whole model runs the unsharded forward's path
// (moe_route_softmax_permute, moe_experts_nvfp4_permuted) with the kernel the ranks resolve to, so that
// every pair's expert output o_j is computed by the same per-row arithmetic in both (the GEMV's per row,
// the GEMM's per position: an mma row does not depend on the tile's other rows); only the combine's grouping
// differs. Tolerance: F32 as the test above, 2 (top_k + 1) u32 sum_j |w_j o_j|; a BF16 output adds each
// rank's and the whole model's final rounding, u_bf16 (|whole| + sum_r |part_r|). Prefill sizes (m = 37,
// 40, 130) reach the GEMM and the register GEMV's several token tiles with dropped pairs in the permutation.
struct EpKernelShape {
    int64_t n_experts, top_k, n_embd, n_ff;
    std::vector<int64_t> ranks;
};

std::vector<float> download_acts(const cuda::DeviceBuffer& b, size_t n, bool bf16) {
    if (!bf16) return download_vec<float>(b, n);
    const std::vector<uint16_t> bits = download_vec<uint16_t>(b, n);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(bits[i]);
    return out;
}

template <class T>
std::vector<T> download_at(const cuda::DeviceBuffer& b, size_t byte_offset, size_t n) {
    std::vector<T> v(n);
    if (n > 0)
        NIBBLE_CUDA_CHECK(cudaMemcpy(v.data(), static_cast<const unsigned char*>(b.get()) + byte_offset,
                                     n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

const char* kernel_name(cuda::MoeExpertKernel k) {
    switch (k) {
        case cuda::MoeExpertKernel::Auto: return "auto";
        case cuda::MoeExpertKernel::Gemv: return "gemv";
        case cuda::MoeExpertKernel::Gemm: return "gemm";
    }
    return "?";
}

TEST(MoeExpertParallelCuda, EveryExpertKernelDropsOtherRanksPairs) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const std::vector<EpKernelShape> shapes = {
        {8, 2, 256, 128, {2}},         // the EP forward test's top2_of_8 (Qwen3-MoE tiny: n_embd 256, moe_ff 128)
        {4, 4, 256, 128, {2}},         // its all_of_4: top_k above a rank's 2 experts
        {16, 2, 128, 64, {2, 4, 8}},   // the test above's shapes
        {16, 8, 128, 64, {2, 4, 8}},
    };
    const int64_t kMaxTokens = 130;  // the forward's workspace holds max_tokens rows, not m
    for (const EpKernelShape& s : shapes) {
        const int64_t n_experts = s.n_experts, top_k = s.top_k, d = s.n_embd, ff = s.n_ff;
        const RandomExperts experts(rng, n_experts, d, ff);
        const cuda::MoeDeviceExperts whole = experts.of(0, n_experts);
        for (int64_t ranks : s.ranks)
            for (bool bf16 : {false, true})
                for (int64_t m : {1, 5, 37, 40, 130})
                    for (cuda::MoeExpertKernel kernel :
                         {cuda::MoeExpertKernel::Auto, cuda::MoeExpertKernel::Gemv, cuda::MoeExpertKernel::Gemm})
                        for (bool only_first_rank : {false, true}) {
                            const int64_t per_rank = n_experts / ranks;
                            if (only_first_rank && top_k > per_rank) continue;
                            const DType act = bf16 ? DType::BF16 : DType::F32;
                            const size_t esize = bf16 ? 2 : 4;
                            // Auto decides per call from the rank's expert count: the whole model runs that.
                            const cuda::MoeExpertKernel resolved =
                                kernel != cuda::MoeExpertKernel::Auto ? kernel
                                : cuda::moe_prefers_gemm(m, top_k, per_rank, act) ? cuda::MoeExpertKernel::Gemm
                                                                                  : cuda::MoeExpertKernel::Gemv;
                            SCOPED_TRACE("E=" + std::to_string(n_experts) + " top_k=" + std::to_string(top_k) +
                                         " d=" + std::to_string(d) + " ff=" + std::to_string(ff) +
                                         " m=" + std::to_string(m) + " ranks=" + std::to_string(ranks) +
                                         (bf16 ? " bf16 " : " f32 ") + kernel_name(kernel) + " -> " +
                                         kernel_name(resolved) + (only_first_rank ? " all on rank 0" : ""));
                            const int64_t n_pairs = m * top_k;
                            // Router logits: random; with only_first_rank rank 0's experts lead by far.
                            std::vector<float> logits = test::random_normal(rng, static_cast<size_t>(m * n_experts));
                            if (only_first_rank)
                                for (int64_t t = 0; t < m; ++t)
                                    for (int64_t e = 0; e < per_rank; ++e)
                                        logits[static_cast<size_t>(t * n_experts + e)] += 30.0f;
                            std::vector<float> x = test::random_normal(rng, static_cast<size_t>(m * d));
                            test::DeviceActs dlogits, dx;
                            dlogits.upload(logits, bf16);
                            dx.upload(x, bf16);

                            // The whole model: the unsharded forward's two calls.
                            const MoeWorkspaceLayout wl = moe_workspace_layout(m, top_k, n_experts, d, ff);
                            auto ws_whole = poisoned(cuda::moe_workspace_bytes(m, top_k, n_experts, d, ff));
                            auto ids = poisoned(static_cast<size_t>(n_pairs) * 4),
                                 weights = poisoned(static_cast<size_t>(n_pairs) * 4),
                                 y_whole = poisoned(static_cast<size_t>(m * d) * esize);
                            cuda::moe_route_softmax_permute(dlogits.buf.get(), act, m, top_k, true, whole,
                                                            ids.as<int32_t>(), weights.as<float>(), ws_whole.get(),
                                                            nullptr);
                            cuda::moe_experts_nvfp4_permuted(dx.buf.get(), act, m, ids.as<int32_t>(),
                                                             weights.as<float>(), top_k, whole,
                                                             MoeActivation::SwiGlu, nullptr, ws_whole.get(),
                                                             y_whole.get(), nullptr, resolved);
                            NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                            const size_t ny = static_cast<size_t>(m * d);
                            const std::vector<float> ref = download_acts(y_whole, ny, bf16);
                            const std::vector<float> o_host =
                                download_at<float>(ws_whole, wl.o, static_cast<size_t>(n_pairs * d));
                            const std::vector<int32_t> pos =
                                download_at<int32_t>(ws_whole, wl.position, static_cast<size_t>(n_pairs));
                            const std::vector<int32_t> ids_host = download_vec<int32_t>(ids, static_cast<size_t>(n_pairs));
                            const std::vector<float> w_host = download_vec<float>(weights, static_cast<size_t>(n_pairs));
                            std::vector<double> sum_wo(ny, 0.0);  // sum_j |w_j o_j| per element
                            for (int64_t t = 0; t < m; ++t)
                                for (int64_t j = 0; j < top_k; ++j) {
                                    const auto pj = static_cast<size_t>(t * top_k + j);
                                    ASSERT_GE(pos[pj], 0);
                                    ASSERT_LT(pos[pj], n_pairs);
                                    for (int64_t c = 0; c < d; ++c)
                                        sum_wo[static_cast<size_t>(t * d + c)] +=
                                            std::fabs(static_cast<double>(w_host[pj]) *
                                                      o_host[static_cast<size_t>(pos[pj] * d + c)]);
                                }

                            // Each rank: the forward's calls, then the same steps one by one.
                            std::vector<double> sum(ny, 0.0), sum_abs(ny, 0.0);
                            for (int64_t r = 0; r < ranks; ++r) {
                                const int64_t begin = r * per_rank, end = begin + per_rank;
                                const cuda::MoeDeviceExperts mine = experts.of(begin, end);
                                auto rids = poisoned(static_cast<size_t>(n_pairs) * 4),
                                     rweights = poisoned(static_cast<size_t>(n_pairs) * 4),
                                     local = poisoned(static_cast<size_t>(n_pairs) * 4);
                                cuda::moe_route_softmax(dlogits.buf.get(), act, m, n_experts, top_k, true,
                                                        rids.as<int32_t>(), rweights.as<float>(), nullptr);
                                cuda::moe_localize_ids(rids.as<int32_t>(), n_pairs, begin, end, local.as<int32_t>(),
                                                       nullptr);
                                auto ws = poisoned(cuda::moe_workspace_bytes(kMaxTokens, top_k, n_experts, d, ff));
                                auto y = poisoned(ny * esize);
                                cuda::moe_experts_nvfp4(dx.buf.get(), act, m, local.as<int32_t>(),
                                                        rweights.as<float>(), top_k, mine, MoeActivation::SwiGlu,
                                                        nullptr, ws.get(), y.get(), nullptr, kernel);
                                // Step by step, own buffers, the resolved kernel for both projections.
                                auto counts = poisoned(static_cast<size_t>(per_rank) * 4),
                                     offsets = poisoned(static_cast<size_t>(per_rank + 1) * 4),
                                     sorted = poisoned(static_cast<size_t>(n_pairs) * 4),
                                     position = poisoned(static_cast<size_t>(n_pairs) * 4),
                                     active = poisoned(static_cast<size_t>(per_rank) * 4), n_active = poisoned(4);
                                const cuda::MoePermutation perm{counts.as<int32_t>(),   offsets.as<int32_t>(),
                                                                sorted.as<int32_t>(),   position.as<int32_t>(),
                                                                active.as<int32_t>(),   n_active.as<int32_t>()};
                                auto h = poisoned(static_cast<size_t>(n_pairs * ff) * 4);
                                auto o = poisoned(static_cast<size_t>(n_pairs * d) * 4);
                                auto y_steps = poisoned(ny * esize);
                                cuda::moe_permute(local.as<int32_t>(), m, top_k, per_rank, perm, nullptr);
                                cuda::moe_experts_up_nvfp4(dx.buf.get(), act, m, top_k, mine, MoeActivation::SwiGlu,
                                                           perm, h.as<float>(), nullptr, resolved);
                                cuda::moe_experts_down_nvfp4(h.as<float>(), m, top_k, mine, perm, o.as<float>(),
                                                             nullptr, resolved);
                                cuda::moe_combine(o.as<float>(), local.as<int32_t>(), rweights.as<float>(),
                                                  perm.pair_position, m, top_k, d, nullptr, act, y_steps.get(),
                                                  nullptr);
                                NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                                // The router is replicated: every rank routes exactly as the whole model did.
                                ASSERT_EQ(download_vec<int32_t>(rids, static_cast<size_t>(n_pairs)), ids_host)
                                    << "rank " << r;
                                ASSERT_EQ(download_vec<float>(rweights, static_cast<size_t>(n_pairs)), w_host)
                                    << "rank " << r;
                                const std::vector<float> part = download_acts(y, ny, bf16);
                                const std::vector<float> part_steps = download_acts(y_steps, ny, bf16);
                                for (size_t i = 0; i < ny; ++i) {
                                    ASSERT_TRUE(std::isfinite(part[i])) << "rank " << r << " element " << i;
                                    ASSERT_EQ(part[i], part_steps[i])
                                        << "rank " << r << " element " << i
                                        << ": moe_experts_nvfp4 vs the same steps one by one";
                                }
                                if (only_first_rank && r > 0) {  // no token routes here: exactly zero
                                    for (size_t i = 0; i < ny; ++i)
                                        ASSERT_EQ(part[i], 0.0f) << "rank " << r << " element " << i;
                                }
                                for (size_t i = 0; i < ny; ++i) {
                                    sum[i] += part[i];
                                    sum_abs[i] += std::fabs(static_cast<double>(part[i]));
                                }
                            }
                            int bad = 0;
                            for (size_t i = 0; i < ny; ++i) {
                                double tol = 2.0 * static_cast<double>(top_k + 1) * kEpsF32 * sum_wo[i];
                                if (bf16) tol += test::kEpsBf16 * (std::fabs(static_cast<double>(ref[i])) + sum_abs[i]);
                                if (!(std::fabs(sum[i] - ref[i]) <= tol) && ++bad <= 5)
                                    ADD_FAILURE() << "token " << i / static_cast<size_t>(d) << " column "
                                                  << i % static_cast<size_t>(d) << ": ranks' sum " << sum[i]
                                                  << " vs whole " << ref[i] << " (tolerance " << tol << ")";
                            }
                            ASSERT_EQ(bad, 0) << bad << " of " << ny << " elements off";
                            if (only_first_rank) {  // one rank holds every chosen expert: the same bits
                                for (size_t i = 0; i < ny; ++i)
                                    ASSERT_EQ(static_cast<float>(sum[i]), ref[i]) << i;
                            }
                        }
    }
}

}  // namespace
}  // namespace nibble
