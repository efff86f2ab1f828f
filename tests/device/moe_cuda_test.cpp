// Device tests of the MoE kernels (ops/moe/moe_cuda.h) against the CPU references of ops/moe/moe.h, on
// fresh random inputs with every device output poisoned first (0xff bytes: NaN floats, -1 ints).
//
// Routing: expert ids must equal the CPU's exactly. Random logits are redrawn (per token) when two
// candidates that decide the choice lie within 1e-5 (relative) of each other, since the device's expf
// (2 ulp, CUDA guide) and glibc's (1 ulp) may round them apart; a separate test draws integer logits so
// that exact ties abound and both sides must apply the lower-id rule. Weights (u = u32, an ulp <= 2 u;
// the device's expf within 4 u, glibc's within 2 u): the softmax p = exp(l - max) / sum is within
// (n_experts + 5) u on the device and (n_experts + 3) u on the CPU; normalised by the sum of the chosen p
// the common divisor cancels and about (2 top_k + 18) u remain for both sides; 2 (n_experts + top_k + 4) u
// |w| covers either. The sigmoid 1 / (1 + exp(-l)) is within 6 u (device) and 4 u (CPU); after the
// top_k-term sum, the division and the scaling factor (top_k + 13) u and (top_k + 9) u: 2 (top_k + 16) u |w|.
//
// Experts (permute, up, down, combine against moe_experts_cpu with linear_cpu over the same NVFP4
// weights): each GEMV output differs by at most 2 (k + 32) u32 S, S = sum |w x| (the bound of
// linear_cuda_test.cpp); the activation propagates it (SwiGLU: |silu'| <= 1.1; relu^2: 2 |u|), plus
// 16 u32 |a| (SwiGLU: expf, the add, division and multiply on both sides; relu^2: 4 u32 |a| for the
// square); the down GEMV adds sum |W_down| da + 2 (n_ff + 32) u32 sum |W_down a|; the combine
// sum |w_j| do_j + 2 (top_k + 1) u32 (sum |w_j o_j| + |shared|); a BF16 output one u_bf16 of the result.
// The plain GEMV (moe_uses_plain_kernel: widths of 16 mod 32, or BF16 experts off the GEMM) sums in float32 as the GEMV
// does (a block's 16 products, its scale, the blocks, a warp sum: far fewer than k + 32 roundings), under the
// same bound; for BF16 experts S is over the BF16 weights.
// The grouped GEMM (MoeExpertKernel::Gemm) multiplies BF16 operands: its dequantized (or BF16) weights are
// exact in BF16, but F32 activations x are rounded (u_bf16 |x_i| each: u_bf16 sum |w x| more on every up / gate
// output) and so is h before the down GEMM (u_bf16 (|a| + da) more on each a).
#include "ops/moe/moe_cuda.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "base/thread_pool.h"
#include "device_test_util.h"
#include "ops/linear/linear.h"
#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe.h"
#include "ops/moe/moe_mma_gemv.h"
#include "ops/moe/moe_workspace.h"
#include "ops/rmsnorm/rmsnorm_cuda.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

using test::DeviceActs;
using test::DeviceOut;
using test::kEpsBf16;
using test::kEpsF32;

using test::download_vec;
using test::upload_vec;

cuda::DeviceBuffer poisoned(size_t bytes) {
    cuda::DeviceBuffer b(std::max<size_t>(bytes, 4));
    b.fill_bytes(0xff);
    return b;
}

// True when no two of the first `decisive + 1` values of `scores` (sorted descending) are closer than
// 1e-5 relative without being equal: the ranks the choice depends on cannot flip by a few ulps.
bool clear_margins(std::vector<double> scores, size_t decisive) {
    std::sort(scores.begin(), scores.end(), std::greater<>());
    for (size_t i = 0; i + 1 < scores.size() && i < decisive; ++i) {
        const double a = scores[i], b = scores[i + 1];
        if (a != b && a - b < 1e-5 * std::max(1.0, std::fabs(a))) return false;
    }
    return true;
}

double sigmoid_d(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// Whether one token's sigmoid-router choice is clear (see clear_margins): the topk_group-th group score
// apart from the next, and the first top_k + 1 eligible choice values apart.
bool sigmoid_choice_clear(const float* l, const std::vector<float>& bias, int64_t n_experts, int64_t n_group,
                          int64_t topk_group, int64_t top_k) {
    const int64_t per_group = n_experts / n_group;
    std::vector<double> choice(static_cast<size_t>(n_experts)), group(static_cast<size_t>(n_group));
    for (int64_t e = 0; e < n_experts; ++e)
        choice[static_cast<size_t>(e)] = static_cast<double>(static_cast<float>(sigmoid_d(l[e]))) +
                                         static_cast<double>(bias[static_cast<size_t>(e)]);
    for (int64_t g = 0; g < n_group; ++g) {
        // the two best of a group make its score: a near tie between its second and third changes nothing
        std::vector<double> in(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
        std::sort(in.begin(), in.end(), std::greater<>());
        group[static_cast<size_t>(g)] = per_group >= 2 ? in[0] + in[1] : in[0];
    }
    std::vector<size_t> gorder(static_cast<size_t>(n_group));
    std::iota(gorder.begin(), gorder.end(), size_t{0});
    std::stable_sort(gorder.begin(), gorder.end(), [&](size_t a, size_t b) { return group[a] > group[b]; });
    if (topk_group < n_group) {
        const double a = group[gorder[static_cast<size_t>(topk_group - 1)]],
                     b = group[gorder[static_cast<size_t>(topk_group)]];
        if (a - b < 1e-5 * std::max(1.0, std::fabs(a))) return false;
    }
    std::vector<double> eligible;
    for (int64_t i = 0; i < topk_group; ++i) {
        const auto g = static_cast<int64_t>(gorder[static_cast<size_t>(i)]);
        for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e)
            eligible.push_back(choice[static_cast<size_t>(e)]);
    }
    return clear_margins(eligible, static_cast<size_t>(top_k));
}

struct DeviceRouting {
    std::vector<int32_t> ids;
    std::vector<float> weights;
};

DeviceRouting download_routing(const cuda::DeviceBuffer& ids, const cuda::DeviceBuffer& w, size_t n) {
    return {download_vec<int32_t>(ids, n), download_vec<float>(w, n)};
}

void expect_routing(const MoeRouting& ref, const DeviceRouting& got, double rel_tol,
                    const std::string& what) {
    ASSERT_EQ(got.ids.size(), ref.ids.size());
    int bad_ids = 0;
    for (size_t i = 0; i < ref.ids.size(); ++i)
        if (got.ids[i] != ref.ids[i] && ++bad_ids <= 5)
            ADD_FAILURE() << what << ": token " << i / static_cast<size_t>(ref.top_k) << " choice "
                          << i % static_cast<size_t>(ref.top_k) << ": expert " << got.ids[i] << ", CPU "
                          << ref.ids[i];
    EXPECT_EQ(bad_ids, 0) << what;
    std::vector<double> tol(ref.weights.size());
    for (size_t i = 0; i < tol.size(); ++i) tol[i] = rel_tol * std::fabs(ref.weights[i]);
    test::expect_close(got.weights, ref.weights, tol, what + " weights");
}

void run_softmax(std::mt19937_64& rng, int64_t m, int64_t n_experts, int64_t top_k, bool norm, bool bf16,
                 bool integer_logits) {
    const std::string what = "softmax m=" + std::to_string(m) + " E=" + std::to_string(n_experts) +
                             " k=" + std::to_string(top_k) + (norm ? " norm" : "") +
                             (bf16 ? " bf16" : " f32") + (integer_logits ? " ties" : "");
    std::vector<float> logits(static_cast<size_t>(m * n_experts));
    // Ties: integers in -2..1, zeros of either sign (-0 ties +0: the lower id goes first).
    std::uniform_int_distribution<int> small(-3, 1);
    auto tie_value = [&] {
        const int v = small(rng);
        return v == -3 ? -0.0f : static_cast<float>(v);
    };
    for (int64_t t = 0; t < m; ++t) {
        float* l = logits.data() + t * n_experts;
        for (;;) {
            const auto v = test::random_normal(rng, static_cast<size_t>(n_experts), 2.0f);
            for (int64_t e = 0; e < n_experts; ++e)
                l[e] = integer_logits
                           ? tie_value()
                           : (bf16 ? test::round_bf16(v[static_cast<size_t>(e)]) : v[static_cast<size_t>(e)]);
            if (integer_logits) break;
            // BF16 logits tie often, and exactly: equal values are fine, near ones are not.
            if (clear_margins(std::vector<double>(l, l + n_experts), static_cast<size_t>(top_k))) break;
        }
    }
    DeviceActs dl;
    dl.upload(logits, bf16);
    const MoeRouting ref = moe_route_softmax_cpu(logits.data(), m, n_experts, top_k, norm);
    const size_t n = static_cast<size_t>(m * top_k);
    auto ids = poisoned(n * 4), w = poisoned(n * 4);
    cuda::moe_route_softmax(dl.buf.get(), bf16 ? DType::BF16 : DType::F32, m, n_experts, top_k, norm,
                            ids.as<int32_t>(), w.as<float>(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    expect_routing(ref, download_routing(ids, w, n),
                   2.0 * static_cast<double>(n_experts + top_k + 4) * kEpsF32, what);
}

struct SigmoidShape {
    int64_t n_experts, n_group, topk_group, top_k;
};

void run_sigmoid(std::mt19937_64& rng, int64_t m, const SigmoidShape& s, bool norm, bool with_bias, bool bf16,
                 bool integer_logits) {
    const std::string what = "sigmoid m=" + std::to_string(m) + " E=" + std::to_string(s.n_experts) +
                             " groups " + std::to_string(s.topk_group) + "/" + std::to_string(s.n_group) +
                             " k=" + std::to_string(s.top_k) + (norm ? " norm" : "") +
                             (with_bias ? " bias" : "") + (bf16 ? " bf16" : " f32") +
                             (integer_logits ? " ties" : "");
    std::vector<float> bias(static_cast<size_t>(s.n_experts), 0.0f);
    if (with_bias) bias = test::random_normal(rng, bias.size(), 0.1f);
    std::vector<float> logits(static_cast<size_t>(m * s.n_experts));
    // Integer logits in 0..3: sigmoid values and sums of two differ by >= 0.009 unless equal.
    std::uniform_int_distribution<int> small(0, 3);
    for (int64_t t = 0; t < m; ++t) {
        float* l = logits.data() + t * s.n_experts;
        if (integer_logits) {
            for (int64_t e = 0; e < s.n_experts; ++e) l[e] = static_cast<float>(small(rng));
            continue;
        }
        do {
            const auto v = test::random_normal(rng, static_cast<size_t>(s.n_experts), 2.0f);
            for (int64_t e = 0; e < s.n_experts; ++e)
                l[e] = bf16 ? test::round_bf16(v[static_cast<size_t>(e)]) : v[static_cast<size_t>(e)];
        } while (!sigmoid_choice_clear(l, bias, s.n_experts, s.n_group, s.topk_group, s.top_k));
    }
    DeviceActs dl;
    dl.upload(logits, bf16);
    const MoeRouting ref =
        moe_route_sigmoid_cpu(logits.data(), m, s.n_experts, s.top_k, with_bias ? bias.data() : nullptr,
                              s.n_group, s.topk_group, norm, 2.5f);
    auto dbias = upload_vec(bias);
    const size_t n = static_cast<size_t>(m * s.top_k);
    auto ids = poisoned(n * 4), w = poisoned(n * 4);
    cuda::moe_route_sigmoid(dl.buf.get(), bf16 ? DType::BF16 : DType::F32, m, s.n_experts, s.top_k,
                            with_bias ? dbias.as<float>() : nullptr, s.n_group, s.topk_group, norm, 2.5f,
                            ids.as<int32_t>(), w.as<float>(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    expect_routing(ref, download_routing(ids, w, n), 2.0 * static_cast<double>(s.top_k + 16) * kEpsF32, what);
}

TEST(MoeCuda, SoftmaxRouter) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t m : {1, 7, 64})
        for (int64_t ne : {8, 60, 128, 512})
            for (int64_t k : {1, 2, 8})
                for (bool norm : {false, true})
                    for (bool bf16 : {false, true}) run_softmax(rng, m, ne, k, norm, bf16, false);
}

TEST(MoeCuda, SoftmaxRouterTiesGoToLowerId) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t ne : {8, 128})
        for (bool bf16 : {false, true}) run_softmax(rng, 33, ne, 8, true, bf16, true);
}

const SigmoidShape kSigmoidShapes[] = {
    {128, 8, 4, 6}, {128, 1, 1, 8}, {256, 8, 4, 8}, {16, 4, 2, 3}, {64, 8, 8, 1}};

TEST(MoeCuda, SigmoidRouter) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (const auto& s : kSigmoidShapes)
        for (int64_t m : {1, 5, 64})
            for (bool norm : {false, true})
                for (bool bias : {false, true}) run_sigmoid(rng, m, s, norm, bias, false, false);
    for (const auto& s : kSigmoidShapes) run_sigmoid(rng, 16, s, true, true, true, false);  // BF16 logits
}

TEST(MoeCuda, SigmoidRouterTiesGoToLowerId) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (const auto& s : kSigmoidShapes)
        for (bool bf16 : {false, true}) run_sigmoid(rng, 40, s, true, false, bf16, true);
}

// The warp-per-token routers (n_experts <= 256) at their slot boundaries, next to the block routers (257).
TEST(MoeCuda, SoftmaxRouterWarpSizes) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t ne : {8, 33, 64, 128, 129, 200, 256, 257})
        for (int64_t k : {1, 6, 8, 32}) {
            if (k > ne) continue;
            for (int64_t m : {1, 5, 9})
                for (bool bf16 : {false, true}) run_softmax(rng, m, ne, k, (m + k) % 2 == 0, bf16, false);
        }
    for (int64_t ne : {8, 64, 128, 256})
        for (bool bf16 : {false, true}) {
            run_softmax(rng, 37, ne, 8, true, bf16, true);
            run_softmax(rng, 6, ne, std::min<int64_t>(ne, 32), false, bf16, true);
        }
}

// The fused decode router and permutation against the two launchers it replaces: bit-identical ids,
// weights and workspace permutation (poisoned alike first), on both sides of its limits (n_experts 256 / 257,
// m top_k 1024 / 1032), F32 and BF16 logits, with and without ties.
// One router + permutation's outputs: ids and weights [n pairs], and the moe_experts_nvfp4 workspace.
struct RoutedBuffers {
    const cuda::DeviceBuffer& ids;
    const cuda::DeviceBuffer& weights;
    cuda::DeviceBuffer& workspace;
};

// Permutes the two-launch path's ids (moe_permute into its workspace), then expects the fused launch's ids,
// weights and permutation (the workspace before h, padding included) equal to it bit for bit.
void expect_fused_route_permute_equal(const RoutedBuffers& fused, const RoutedBuffers& two,
                                      const MoeWorkspaceLayout& l, int64_t m, int64_t top_k,
                                      int64_t n_experts) {
    const int64_t n = m * top_k;
    auto* base = two.workspace.as<unsigned char>();
    const cuda::MoePermutation perm{
        reinterpret_cast<int32_t*>(base + l.counts), reinterpret_cast<int32_t*>(base + l.offsets),
        reinterpret_cast<int32_t*>(base + l.sorted), reinterpret_cast<int32_t*>(base + l.position),
        reinterpret_cast<int32_t*>(base + l.active), reinterpret_cast<int32_t*>(base + l.n_active)};
    cuda::moe_permute(two.ids.as<int32_t>(), m, top_k, n_experts, perm, nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got_ids = download_vec<int32_t>(fused.ids, static_cast<size_t>(n));
    EXPECT_EQ(got_ids, download_vec<int32_t>(two.ids, static_cast<size_t>(n)));
    EXPECT_EQ(download_vec<uint32_t>(fused.weights, static_cast<size_t>(n)),
              download_vec<uint32_t>(two.weights, static_cast<size_t>(n)));
    for (int32_t id : got_ids) ASSERT_TRUE(id >= 0 && id < n_experts) << id;
    EXPECT_EQ(download_vec<uint32_t>(fused.workspace, l.h / 4),
              download_vec<uint32_t>(two.workspace, l.h / 4));
}

// The buffers of one fused-vs-two-launches comparison, poisoned alike: experts of the workspace's widths
// (their weights are not read) and each side's ids, weights and workspace.
struct FusedRouteCase {
    int64_t m, k, n_experts;
    cuda::MoeDeviceExperts experts;
    MoeWorkspaceLayout layout;
    cuda::DeviceBuffer ws_fused, ws_two, ids_fused, w_fused, ids_two, w_two;
    FusedRouteCase(int64_t m_, int64_t k_, int64_t ne)
        : m(m_),
          k(k_),
          n_experts(ne),
          experts{.n_experts = ne, .n_embd = 64, .n_ff = 32},
          layout(moe_workspace_layout(m, k, ne, experts.n_embd, experts.n_ff)),
          ws_fused(poisoned(cuda::moe_workspace_bytes(m, k, ne, experts.n_embd, experts.n_ff))),
          ws_two(poisoned(cuda::moe_workspace_bytes(m, k, ne, experts.n_embd, experts.n_ff))),
          ids_fused(poisoned(static_cast<size_t>(m * k) * 4)),
          w_fused(poisoned(static_cast<size_t>(m * k) * 4)),
          ids_two(poisoned(static_cast<size_t>(m * k) * 4)),
          w_two(poisoned(static_cast<size_t>(m * k) * 4)) {}
    void expect_equal() {
        expect_fused_route_permute_equal({ids_fused, w_fused, ws_fused}, {ids_two, w_two, ws_two}, layout, m,
                                         k, n_experts);
    }
};

TEST(MoeCuda, RouteSoftmaxPermuteMatchesTwoLaunches) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    struct Shape {
        int64_t m, k;
    };
    std::uniform_int_distribution<int> small(-3, 1);
    for (int64_t ne : {8, 128, 256, 257})
        for (const Shape sh :
             {Shape{1, 8}, Shape{3, 6}, Shape{33, 1}, Shape{128, 8}, Shape{129, 8}, Shape{32, 32}})
            for (bool bf16 : {false, true})
                for (bool ties : {false, true}) {
                    const int64_t m = sh.m, k = std::min(sh.k, ne);
                    const bool norm = (m + k) % 2 == 1;
                    SCOPED_TRACE("m=" + std::to_string(m) + " E=" + std::to_string(ne) + " k=" +
                                 std::to_string(k) + (bf16 ? " bf16" : " f32") + (ties ? " ties" : ""));
                    std::vector<float> logits = test::random_normal(rng, static_cast<size_t>(m * ne), 2.0f);
                    if (ties)
                        for (float& v : logits) {
                            const int t = small(rng);
                            v = t == -3 ? -0.0f : static_cast<float>(t);
                        }
                    DeviceActs dl;
                    dl.upload(logits, bf16);
                    const DType dtype = bf16 ? DType::BF16 : DType::F32;
                    FusedRouteCase c(m, k, ne);
                    cuda::moe_route_softmax_permute(dl.buf.get(), dtype, m, k, norm, c.experts,
                                                    c.ids_fused.as<int32_t>(), c.w_fused.as<float>(),
                                                    c.ws_fused.get(), nullptr);
                    cuda::moe_route_softmax(dl.buf.get(), dtype, m, ne, k, norm, c.ids_two.as<int32_t>(),
                                            c.w_two.as<float>(), nullptr);
                    c.expect_equal();
                }
}

// Group counts above 32 (a lane scores several groups), groups of one expert, no group excluded with
// top_k 32.
const SigmoidShape kWarpSigmoidShapes[] = {{256, 64, 16, 8}, {256, 256, 32, 8}, {200, 8, 3, 6},
                                           {96, 3, 2, 4},    {256, 1, 1, 32},   {8, 2, 1, 2}};

TEST(MoeCuda, SigmoidRouterWarpShapes) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (const auto& s : kWarpSigmoidShapes) {
        for (int64_t m : {1, 9})
            for (bool norm : {false, true}) run_sigmoid(rng, m, s, norm, true, false, false);
        run_sigmoid(rng, 5, s, true, false, true, false);
        for (bool bf16 : {false, true}) run_sigmoid(rng, 21, s, true, false, bf16, true);
    }
}

// The fused sigmoid router + permutation against its two launches: ids, weights and the permutation bit for
// bit, over group-limited and ungrouped shapes, more tokens than routing warps (m = 33, 129), ties, bias on
// and off, and 257 experts / 1056 pairs (the two launches themselves).
TEST(MoeCuda, RouteSigmoidPermuteMatchesTwoLaunches) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const SigmoidShape shapes[] = {
        {128, 1, 1, 6}, {128, 8, 4, 6}, {256, 8, 4, 8}, {257, 1, 1, 8}, {16, 4, 2, 3}};
    std::uniform_int_distribution<int> small(0, 3);
    for (const SigmoidShape& sh : shapes)
        for (int64_t m : {1, 3, 33, 132})
            for (bool bf16 : {false, true})
                for (bool ties : {false, true}) {
                    const int64_t ne = sh.n_experts, k = sh.top_k;
                    const bool norm = (m + k) % 2 == 1, with_bias = !ties || m % 2 == 1;
                    SCOPED_TRACE("m=" + std::to_string(m) + " E=" + std::to_string(ne) +
                                 " k=" + std::to_string(k) + " groups " + std::to_string(sh.topk_group) +
                                 "/" + std::to_string(sh.n_group) + (bf16 ? " bf16" : " f32") +
                                 (ties ? " ties" : ""));
                    std::vector<float> logits = test::random_normal(rng, static_cast<size_t>(m * ne), 2.0f);
                    if (ties)
                        for (float& v : logits) v = static_cast<float>(small(rng));
                    std::vector<float> bias = test::random_normal(rng, static_cast<size_t>(ne), 0.1f);
                    auto dbias = upload_vec(bias);
                    const float* b = with_bias ? dbias.as<float>() : nullptr;
                    DeviceActs dl;
                    dl.upload(logits, bf16);
                    const DType dtype = bf16 ? DType::BF16 : DType::F32;
                    FusedRouteCase c(m, k, ne);
                    cuda::moe_route_sigmoid_permute(dl.buf.get(), dtype, m, k, b, sh.n_group, sh.topk_group,
                                                    norm, 2.5f, c.experts, c.ids_fused.as<int32_t>(),
                                                    c.w_fused.as<float>(), c.ws_fused.get(), nullptr);
                    cuda::moe_route_sigmoid(dl.buf.get(), dtype, m, ne, k, b, sh.n_group, sh.topk_group, norm,
                                            2.5f, c.ids_two.as<int32_t>(), c.w_two.as<float>(), nullptr);
                    c.expect_equal();
                }
}

// Random distinct expert ids per token, or a skewed draw where every token picks from a few experts.
std::vector<int32_t> random_ids(std::mt19937_64& rng, int64_t m, int64_t top_k, int64_t n_experts,
                                bool skewed) {
    std::vector<int32_t> ids(static_cast<size_t>(m * top_k));
    std::vector<int32_t> all(static_cast<size_t>(n_experts));
    std::iota(all.begin(), all.end(), 0);
    const int64_t pool = skewed ? std::min(n_experts, top_k + 1) : n_experts;
    for (int64_t t = 0; t < m; ++t) {
        std::shuffle(all.begin(), all.begin() + pool, rng);
        std::copy_n(all.begin(), top_k, ids.begin() + t * top_k);
    }
    return ids;
}

struct DevicePermutation {
    cuda::DeviceBuffer counts, offsets, sorted, position, active, n_active;
    cuda::MoePermutation view;
    DevicePermutation(int64_t n_pairs, int64_t n_experts)
        : counts(poisoned(static_cast<size_t>(n_experts) * 4)),
          offsets(poisoned(static_cast<size_t>(n_experts + 1) * 4)),
          sorted(poisoned(static_cast<size_t>(n_pairs) * 4)),
          position(poisoned(static_cast<size_t>(n_pairs) * 4)),
          active(poisoned(static_cast<size_t>(n_experts) * 4)),
          n_active(poisoned(4)) {
        view = {counts.as<int32_t>(),   offsets.as<int32_t>(), sorted.as<int32_t>(),
                position.as<int32_t>(), active.as<int32_t>(),  n_active.as<int32_t>()};
    }
};

TEST(MoeCuda, Permute) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t m : {1, 3, 64, 300})
        for (int64_t ne : {8, 128, 1000})
            for (int64_t k : {1, 6, 8})
                for (bool skewed : {false, true}) {
                    SCOPED_TRACE("m=" + std::to_string(m) + " E=" + std::to_string(ne) +
                                 " k=" + std::to_string(k) + (skewed ? " skewed" : ""));
                    const int64_t n_pairs = m * k;
                    const auto ids = random_ids(rng, m, k, ne, skewed);
                    // Expected: a stable sort of pair indices by expert id.
                    std::vector<int32_t> sorted(static_cast<size_t>(n_pairs)), position(sorted.size());
                    std::iota(sorted.begin(), sorted.end(), 0);
                    std::stable_sort(sorted.begin(), sorted.end(), [&](int32_t a, int32_t b) {
                        return ids[static_cast<size_t>(a)] < ids[static_cast<size_t>(b)];
                    });
                    for (size_t p = 0; p < sorted.size(); ++p)
                        position[static_cast<size_t>(sorted[p])] = static_cast<int32_t>(p);
                    std::vector<int32_t> counts(static_cast<size_t>(ne), 0),
                        offsets(static_cast<size_t>(ne + 1), 0), active;
                    for (int32_t e : ids) ++counts[static_cast<size_t>(e)];
                    for (int64_t e = 0; e < ne; ++e) {
                        offsets[static_cast<size_t>(e + 1)] =
                            offsets[static_cast<size_t>(e)] + counts[static_cast<size_t>(e)];
                        if (counts[static_cast<size_t>(e)] > 0) active.push_back(static_cast<int32_t>(e));
                    }

                    auto dids = upload_vec(ids);
                    DevicePermutation dp(n_pairs, ne);
                    cuda::moe_permute(dids.as<int32_t>(), m, k, ne, dp.view, nullptr);
                    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                    EXPECT_EQ(download_vec<int32_t>(dp.counts, counts.size()), counts);
                    EXPECT_EQ(download_vec<int32_t>(dp.offsets, offsets.size()), offsets);
                    EXPECT_EQ(download_vec<int32_t>(dp.sorted, sorted.size()), sorted);
                    EXPECT_EQ(download_vec<int32_t>(dp.position, position.size()), position);
                    EXPECT_EQ(download_vec<int32_t>(dp.n_active, 1)[0], static_cast<int32_t>(active.size()));
                    EXPECT_EQ(download_vec<int32_t>(dp.active, active.size()), active);
                }
}

// The one-CTA permutation's boundary (n_pairs <= 1024) on both sides, up to 1024 experts, with some ids
// dropped (negative or >= n_experts): not counted, not placed, their pair_position left as poisoned.
TEST(MoeCuda, PermuteSmallBatchesAndDroppedIds) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    struct Shape {
        int64_t m, k;
    };
    for (const Shape sh :
         {Shape{1, 1}, Shape{1, 8}, Shape{341, 3}, Shape{128, 8}, Shape{205, 5}, Shape{33, 32}})
        for (int64_t ne : {8, 128, 1000, 1024})
            for (int drop_pct : {0, 10}) {
                const int64_t m = sh.m, k = std::min(sh.k, ne), n_pairs = m * k;
                SCOPED_TRACE("m=" + std::to_string(m) + " E=" + std::to_string(ne) +
                             " k=" + std::to_string(k) + " dropped " + std::to_string(drop_pct) + "%");
                auto ids = random_ids(rng, m, k, ne, false);
                std::uniform_int_distribution<int> pct(0, 99), kind(0, 2);
                for (auto& e : ids)
                    if (pct(rng) < drop_pct) {
                        const int which = kind(rng);
                        e = which == 0   ? -1
                            : which == 1 ? static_cast<int32_t>(ne)
                                         : static_cast<int32_t>(ne + 7);
                    }
                std::vector<int32_t> sorted, position(static_cast<size_t>(n_pairs), -1);
                for (int32_t i = 0; i < static_cast<int32_t>(n_pairs); ++i) {
                    const int32_t e = ids[static_cast<size_t>(i)];
                    if (e >= 0 && e < ne) sorted.push_back(i);
                }
                std::stable_sort(sorted.begin(), sorted.end(), [&](int32_t a, int32_t b) {
                    return ids[static_cast<size_t>(a)] < ids[static_cast<size_t>(b)];
                });
                for (size_t p = 0; p < sorted.size(); ++p)
                    position[static_cast<size_t>(sorted[p])] = static_cast<int32_t>(p);
                const size_t n_routed = sorted.size();
                sorted.resize(static_cast<size_t>(n_pairs),
                              -1);  // positions past the routed ones stay poisoned
                std::vector<int32_t> counts(static_cast<size_t>(ne), 0),
                    offsets(static_cast<size_t>(ne + 1), 0), active;
                for (int32_t e : ids)
                    if (e >= 0 && e < ne) ++counts[static_cast<size_t>(e)];
                for (int64_t e = 0; e < ne; ++e) {
                    offsets[static_cast<size_t>(e + 1)] =
                        offsets[static_cast<size_t>(e)] + counts[static_cast<size_t>(e)];
                    if (counts[static_cast<size_t>(e)] > 0) active.push_back(static_cast<int32_t>(e));
                }
                ASSERT_EQ(static_cast<size_t>(offsets.back()), n_routed);

                auto dids = upload_vec(ids);
                DevicePermutation dp(n_pairs, ne);
                cuda::moe_permute(dids.as<int32_t>(), m, k, ne, dp.view, nullptr);
                NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                EXPECT_EQ(download_vec<int32_t>(dp.counts, counts.size()), counts);
                EXPECT_EQ(download_vec<int32_t>(dp.offsets, offsets.size()), offsets);
                EXPECT_EQ(download_vec<int32_t>(dp.sorted, sorted.size()), sorted);
                EXPECT_EQ(download_vec<int32_t>(dp.position, position.size()), position);
                EXPECT_EQ(download_vec<int32_t>(dp.n_active, 1)[0], static_cast<int32_t>(active.size()));
                EXPECT_EQ(download_vec<int32_t>(dp.active, active.size()), active);
            }
}

// ---- experts ----

struct HostNvfp4 {
    std::vector<uint8_t> packed, scales;
    float global = 1.0f;
    cuda::DeviceBuffer dpacked, dscales;
};

HostNvfp4 quantized(std::mt19937_64& rng, int64_t n, int64_t k, float sigma) {
    HostNvfp4 h;
    auto dense = test::random_normal(rng, static_cast<size_t>(n * k), sigma);
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

LinearWeight as_linear(const HostNvfp4& h, int64_t n, int64_t k) {
    LinearWeight w;
    w.name = "expert";
    w.format = WeightFormat::Nvfp4;
    w.dtype = DType::U8;
    w.n_out = n, w.n_in = k;
    w.data = h.packed.data();
    w.block_scales = h.scales.data();
    w.scale = h.global;
    return w;
}

std::vector<float> dequantized(const LinearWeight& w) {
    std::vector<float> out(static_cast<size_t>(w.n_out * w.n_in));
    for (int64_t r = 0; r < w.n_out; ++r) w.dequantize_row(r, out.data() + r * w.n_in);
    return out;
}

// How tokens pick experts in the expert tests: uniformly; all from the same top_k + 1 experts; or expert 0
// always (most of the pairs) with the rest from the lower half of the experts (the upper half gets none).
enum class Draw { Uniform, Few, Hot };

std::vector<int32_t> draw_ids(std::mt19937_64& rng, int64_t m, int64_t top_k, int64_t n_experts, Draw draw) {
    if (draw != Draw::Hot) return random_ids(rng, m, top_k, n_experts, draw == Draw::Few);
    const int64_t pool = std::max<int64_t>(top_k - 1, n_experts / 2 - 1);  // experts 1 .. pool
    std::vector<int32_t> others(static_cast<size_t>(pool));
    std::iota(others.begin(), others.end(), 1);
    std::vector<int32_t> ids(static_cast<size_t>(m * top_k));
    for (int64_t t = 0; t < m; ++t) {
        std::shuffle(others.begin(), others.end(), rng);
        ids[static_cast<size_t>(t * top_k)] = 0;
        std::copy_n(others.begin(), top_k - 1, ids.begin() + t * top_k + 1);
    }
    return ids;
}

struct ExpertsCase {
    MoeActivation act;
    int64_t n_experts, n_embd, n_ff, top_k;
    bool bf16_weights = false;  // BF16 experts (the plain GEMV, or the GEMM when chosen) instead of NVFP4
};

// one_call: through moe_experts_nvfp4 and its workspace instead of the four launchers.
// kernel: the launchers' choice; the tolerance follows the kernel that runs (Auto: moe_prefers_gemm).
void run_experts(ThreadPool& pool, std::mt19937_64& rng, const ExpertsCase& c, int64_t m, bool bf16,
                 Draw draw, bool with_shared, bool one_call = false,
                 cuda::MoeExpertKernel kernel = cuda::MoeExpertKernel::Auto) {
    const bool gated = c.act == MoeActivation::SwiGlu;
    // Which kernels run: Auto's up follows the activations' dtype; the separate down launcher decides as
    // for BF16 (h has no dtype), the one-call launcher as its up.
    // Widths not a multiple of 32 take the plain GEMV whatever the kernel asked; BF16 experts take the GEMM
    // when it is chosen and the plain GEMV otherwise.
    const bool auto_pick = kernel == cuda::MoeExpertKernel::Auto;
    const DType dt = bf16 ? DType::BF16 : DType::F32;
    const bool narrow = c.n_embd % 32 != 0 || c.n_ff % 32 != 0;
    const bool gemm_up_asked = kernel == cuda::MoeExpertKernel::Gemm ||
                               (auto_pick && cuda::moe_prefers_gemm(m, c.top_k, c.n_experts, dt));
    const bool gemm_down_asked =
        one_call ? gemm_up_asked
                 : kernel == cuda::MoeExpertKernel::Gemm ||
                       (auto_pick && cuda::moe_prefers_gemm(m, c.top_k, c.n_experts, DType::BF16));
    const bool gemm_up = !narrow && gemm_up_asked, gemm_down = !narrow && gemm_down_asked;
    const bool plain = narrow || (c.bf16_weights && !gemm_up && !gemm_down);
    const char* draw_name = draw == Draw::Uniform ? "" : draw == Draw::Few ? " skewed" : " hot";
    const std::string what =
        std::string(gated ? "swiglu" : "relu2") + " E=" + std::to_string(c.n_experts) +
        " d=" + std::to_string(c.n_embd) + " ff=" + std::to_string(c.n_ff) + " k=" + std::to_string(c.top_k) +
        " m=" + std::to_string(m) + (bf16 ? " bf16" : " f32") + draw_name + (with_shared ? " shared" : "") +
        (one_call ? " one call" : "") + (c.bf16_weights ? " bf16 experts" : "") +
        (plain ? " plain"
               : std::string(gemm_up ? " gemm" : c.bf16_weights ? " plain" : " gemv") +
                     (gemm_down ? "/gemm" : c.bf16_weights ? "/plain" : "/gemv"));
    SCOPED_TRACE(what);
    const int64_t d = c.n_embd, ff = c.n_ff, k = c.top_k;
    std::vector<HostNvfp4> gate, up, down;
    std::vector<MoeExpertWeights> cpu_experts(static_cast<size_t>(c.n_experts));
    std::vector<cuda::Nvfp4DeviceWeight> dgate, dup, ddown;
    // BF16 experts: [mats, n_experts, ff * d] ([gate,] up, down), the layout the device reads.
    const int64_t mats = gated ? 3 : 2;
    std::vector<uint16_t> bf16_host;
    if (c.bf16_weights) {
        const auto v = test::random_normal(rng, static_cast<size_t>(mats * c.n_experts * ff * d), 0.1f);
        bf16_host.resize(v.size());
        for (size_t i = 0; i < v.size(); ++i) bf16_host[i] = bf16_from_float(v[i]);
        auto dense = [&](int64_t mat, int64_t e, int64_t n, int64_t kk) {
            LinearWeight w;
            w.name = "expert";
            w.format = WeightFormat::Dense;
            w.dtype = DType::BF16;
            w.n_out = n, w.n_in = kk;
            w.data = bf16_host.data() + (mat * c.n_experts + e) * ff * d;
            return w;
        };
        for (int64_t e = 0; e < c.n_experts; ++e) {
            MoeExpertWeights& w = cpu_experts[static_cast<size_t>(e)];
            if (gated) w.gate = dense(0, e, ff, d);
            w.up = dense(mats - 2, e, ff, d);
            w.down = dense(mats - 1, e, d, ff);
        }
    }
    for (int64_t e = 0; e < c.n_experts && !c.bf16_weights; ++e) {
        if (gated) gate.push_back(quantized(rng, ff, d, 0.1f));
        up.push_back(quantized(rng, ff, d, 0.1f));
        down.push_back(quantized(rng, d, ff, 0.1f));
    }
    for (int64_t e = 0; e < c.n_experts && !c.bf16_weights; ++e) {
        const auto i = static_cast<size_t>(e);
        MoeExpertWeights& w = cpu_experts[i];
        if (gated) {
            w.gate = as_linear(gate[i], ff, d);
            dgate.push_back(
                {gate[i].dpacked.as<uint8_t>(), gate[i].dscales.as<uint8_t>(), gate[i].global, ff, d});
        }
        w.up = as_linear(up[i], ff, d);
        w.down = as_linear(down[i], d, ff);
        dup.push_back({up[i].dpacked.as<uint8_t>(), up[i].dscales.as<uint8_t>(), up[i].global, ff, d});
        ddown.push_back(
            {down[i].dpacked.as<uint8_t>(), down[i].dscales.as<uint8_t>(), down[i].global, d, ff});
    }
    auto dgate_arr = upload_vec(dgate), dup_arr = upload_vec(dup), ddown_arr = upload_vec(ddown);
    auto dbf16 = upload_vec(bf16_host);

    MoeRouting routing;
    routing.m = m, routing.top_k = k;
    routing.ids = draw_ids(rng, m, k, c.n_experts, draw);
    std::uniform_real_distribution<float> wdist(0.05f, 1.0f);
    routing.weights.resize(routing.ids.size());
    for (auto& w : routing.weights) w = wdist(rng);

    auto x = test::random_normal(rng, static_cast<size_t>(m * d));
    DeviceActs dx;
    dx.upload(x, bf16);
    std::vector<float> shared;
    DeviceActs dshared;
    if (with_shared) {
        shared = test::random_normal(rng, static_cast<size_t>(m * d), 0.5f);
        dshared.upload(shared, bf16);
    }

    std::vector<float> ref(static_cast<size_t>(m * d));
    moe_experts_cpu(
        x.data(), d, cpu_experts, routing, c.act,
        [&](const LinearWeight& w, const float* in, int64_t rows, float* out) {
            linear_cpu(pool, in, rows, w, out);
        },
        ref.data());
    if (with_shared)
        for (size_t i = 0; i < ref.size(); ++i) ref[i] += shared[i];

    // Tolerance (see the file comment), from the dequantized weights in double.
    std::vector<double> tol(ref.size(), 0.0), mag(ref.size(), 0.0);
    {
        std::vector<std::vector<float>> dg(static_cast<size_t>(c.n_experts)), du(dg.size()), dd(dg.size());
        std::vector<double> a(static_cast<size_t>(ff)), da(a.size());
        for (int64_t t = 0; t < m; ++t) {
            const float* xt = x.data() + t * d;
            for (int64_t j = 0; j < k; ++j) {
                const auto e = static_cast<size_t>(routing.ids[static_cast<size_t>(t * k + j)]);
                const double rw = routing.weights[static_cast<size_t>(t * k + j)];
                if (du[e].empty()) {
                    if (gated) dg[e] = dequantized(cpu_experts[e].gate);
                    du[e] = dequantized(cpu_experts[e].up);
                    dd[e] = dequantized(cpu_experts[e].down);
                }
                for (int64_t r = 0; r < ff; ++r) {
                    double u = 0, su = 0, g = 0, sg = 0;
                    for (int64_t i = 0; i < d; ++i) {
                        const double pu = static_cast<double>(du[e][static_cast<size_t>(r * d + i)]) * xt[i];
                        u += pu, su += std::fabs(pu);
                        if (gated) {
                            const double pg =
                                static_cast<double>(dg[e][static_cast<size_t>(r * d + i)]) * xt[i];
                            g += pg, sg += std::fabs(pg);
                        }
                    }
                    const double x_rounding = gemm_up && !bf16 ? kEpsBf16 : 0.0;  // F32 x to BF16
                    const double eu = (2.0 * static_cast<double>(d + 32) * kEpsF32 + x_rounding) * su;
                    const double eg = (2.0 * static_cast<double>(d + 32) * kEpsF32 + x_rounding) * sg;
                    const auto ri = static_cast<size_t>(r);
                    if (gated) {
                        const double sil = g / (1.0 + std::exp(-g));
                        a[ri] = sil * u;
                        da[ri] = 1.1 * std::fabs(u) * eg + std::fabs(sil) * eu + eg * eu +
                                 16.0 * kEpsF32 * std::fabs(a[ri]);
                    } else {
                        a[ri] = u > 0 ? u * u : 0.0;
                        da[ri] = 2.0 * std::fabs(u) * eu + eu * eu + 4.0 * kEpsF32 * std::fabs(a[ri]);
                    }
                    if (gemm_down) da[ri] += kEpsBf16 * (std::fabs(a[ri]) + da[ri]);  // h to BF16
                }
                for (int64_t r = 0; r < d; ++r) {
                    double o = 0, so = 0, dsum = 0;
                    for (int64_t i = 0; i < ff; ++i) {
                        const double w = dd[e][static_cast<size_t>(r * ff + i)];
                        o += w * a[static_cast<size_t>(i)];
                        so += std::fabs(w * a[static_cast<size_t>(i)]);
                        dsum += std::fabs(w) * da[static_cast<size_t>(i)];
                    }
                    const double doo = dsum + 2.0 * static_cast<double>(ff + 32) * kEpsF32 * so;
                    const auto oi = static_cast<size_t>(t * d + r);
                    tol[oi] += std::fabs(rw) * doo;
                    mag[oi] += std::fabs(rw * o);
                }
            }
        }
        for (size_t i = 0; i < tol.size(); ++i) {
            if (with_shared) mag[i] += std::fabs(shared[i]);
            tol[i] += 2.0 * static_cast<double>(k + 1) * kEpsF32 * mag[i];
            if (bf16) tol[i] = tol[i] * (1 + kEpsBf16) + kEpsBf16 * std::fabs(ref[i]);
        }
    }

    const int64_t n_pairs = m * k;
    auto dids = upload_vec(routing.ids);
    auto dweights = upload_vec(routing.weights);
    DevicePermutation dp(n_pairs, c.n_experts);
    auto h = poisoned(static_cast<size_t>(n_pairs * ff) * 4);
    auto o = poisoned(static_cast<size_t>(n_pairs * d) * 4);
    DeviceOut y(ref.size(), bf16);
    cuda::MoeDeviceExperts ex{gated ? dgate_arr.as<cuda::Nvfp4DeviceWeight>() : nullptr,
                              dup_arr.as<cuda::Nvfp4DeviceWeight>(),
                              ddown_arr.as<cuda::Nvfp4DeviceWeight>(),
                              c.n_experts,
                              d,
                              ff};
    if (c.bf16_weights) {
        const uint16_t* b = dbf16.as<uint16_t>();
        ex.gate = ex.up = ex.down = nullptr;
        ex.bf16_gate = gated ? b : nullptr;
        ex.bf16_up = b + (mats - 2) * c.n_experts * ff * d;
        ex.bf16_down = b + (mats - 1) * c.n_experts * ff * d;
    }
    EXPECT_EQ(cuda::moe_uses_plain_kernel(ex, gemm_up), narrow || (c.bf16_weights && !gemm_up));
    EXPECT_EQ(cuda::moe_uses_plain_kernel(ex, gemm_down), narrow || (c.bf16_weights && !gemm_down));
    if (one_call) {
        auto ws = poisoned(cuda::moe_workspace_bytes(m, k, c.n_experts, d, ff));
        cuda::moe_experts_nvfp4(dx.buf.get(), dt, m, dids.as<int32_t>(), dweights.as<float>(), k, ex, c.act,
                                with_shared ? dshared.buf.get() : nullptr, ws.get(), y.buf.get(), nullptr,
                                kernel);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
        test::expect_close(y.download(), ref, tol, what);
        return;
    }
    cuda::moe_permute(dids.as<int32_t>(), m, k, c.n_experts, dp.view, nullptr);
    cuda::moe_experts_up_nvfp4(dx.buf.get(), dt, m, k, ex, c.act, dp.view, h.as<float>(), nullptr, kernel);
    cuda::moe_experts_down_nvfp4(h.as<float>(), m, k, ex, dp.view, o.as<float>(), nullptr, kernel);
    cuda::moe_combine(o.as<float>(), dids.as<int32_t>(), dweights.as<float>(), dp.view.pair_position, m, k, d,
                      with_shared ? dshared.buf.get() : nullptr, dt, y.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    test::expect_close(y.download(), ref, tol, what);
}

// The combine fused with the residual add and the next RMSNorm against the two launches it replaces
// (moe_combine into y, then rmsnorm_residual of y): residual and out equal bit for bit, with and without a
// shared expert, some choices dropped (negative ids), widths of one and several 2048-column passes (Qwen3's
// 2048, NemotronH's 2688) and a narrow one.
TEST(MoeCuda, CombineResidualRmsnormMatchesTwoLaunches) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (int64_t d : {2048, 2688, 4104, 40})
        for (int64_t m : {1, 3, 34})
            for (int64_t k : {1, 6, 8})
                for (bool bf16 : {false, true})
                    for (bool with_shared : {false, true}) {
                        SCOPED_TRACE("d=" + std::to_string(d) + " m=" + std::to_string(m) +
                                     " k=" + std::to_string(k) + (bf16 ? " bf16" : " f32") +
                                     (with_shared ? " shared" : ""));
                        const int64_t n = m * k;
                        const DType dtype = bf16 ? DType::BF16 : DType::F32;
                        std::vector<float> o = test::random_normal(rng, static_cast<size_t>(n * d), 1.5f);
                        std::vector<int32_t> ids(static_cast<size_t>(n)), position(static_cast<size_t>(n));
                        std::vector<float> weights(static_cast<size_t>(n));
                        std::iota(position.begin(), position.end(), 0);
                        std::shuffle(position.begin(), position.end(), rng);
                        std::uniform_int_distribution<int32_t> expert(-1, 15);  // -1: dropped
                        std::uniform_real_distribution<float> weight(0.0f, 1.0f);
                        for (auto& e : ids) e = expert(rng);
                        for (auto& w : weights) w = weight(rng);
                        std::vector<float> shared =
                            test::random_normal(rng, static_cast<size_t>(m * d), 1.0f);
                        std::vector<float> residual =
                            test::random_normal(rng, static_cast<size_t>(m * d), 4.0f);
                        std::vector<float> norm_w = test::random_normal(rng, static_cast<size_t>(d), 1.0f);
                        auto d_o = upload_vec(o);
                        auto d_ids = upload_vec(ids);
                        auto d_w = upload_vec(weights);
                        auto d_pos = upload_vec(position);
                        auto d_norm = upload_vec(norm_w);
                        DeviceActs d_shared, res_two, res_fused;
                        d_shared.upload(shared, bf16);
                        res_two.upload(residual, bf16);
                        res_fused.upload(residual, bf16);
                        const void* sh = with_shared ? d_shared.buf.get() : nullptr;
                        DeviceOut y(static_cast<size_t>(m * d), bf16),
                            out_two(static_cast<size_t>(m * d), bf16),
                            out_fused(static_cast<size_t>(m * d), bf16);
                        cuda::moe_combine(d_o.as<float>(), d_ids.as<int32_t>(), d_w.as<float>(),
                                          d_pos.as<int32_t>(), m, k, d, sh, dtype, y.buf.get(), nullptr);
                        cuda::rmsnorm_residual(y.buf.get(), res_two.buf.get(), dtype, m, d,
                                               d_norm.as<float>(), 1e-5f, out_two.buf.get(), nullptr);
                        const cuda::MoeResidualNorm norm{.residual = res_fused.buf.get(),
                                                         .weight = d_norm.as<float>(),
                                                         .eps = 1e-5f,
                                                         .out = out_fused.buf.get()};
                        cuda::moe_combine_residual_rmsnorm(d_o.as<float>(), d_ids.as<int32_t>(),
                                                           d_w.as<float>(), d_pos.as<int32_t>(), m, k, d, sh,
                                                           dtype, norm, nullptr);
                        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                        const size_t bytes = static_cast<size_t>(m * d) * (bf16 ? 2 : 4);
                        const auto two = download_vec<uint8_t>(out_two.buf, bytes);
                        EXPECT_EQ(download_vec<uint8_t>(out_fused.buf, bytes), two);
                        EXPECT_EQ(download_vec<uint8_t>(res_fused.buf, bytes),
                                  download_vec<uint8_t>(res_two.buf, bytes));
                        const std::vector<float> got = out_fused.download();
                        ASSERT_TRUE(
                            std::all_of(got.begin(), got.end(), [](float v) { return std::isfinite(v); }));
                    }
    // A missing residual, weight or output, and a width the 8-column passes cannot take, are refused.
    auto buf = poisoned(4096);
    const cuda::MoeResidualNorm none{};
    EXPECT_THROW(
        cuda::moe_combine_residual_rmsnorm(buf.as<float>(), buf.as<int32_t>(), buf.as<float>(),
                                           buf.as<int32_t>(), 1, 2, 64, nullptr, DType::F32, none, nullptr),
        std::invalid_argument);
    const cuda::MoeResidualNorm some{
        .residual = buf.get(), .weight = buf.as<float>(), .eps = 1e-5f, .out = buf.get()};
    EXPECT_THROW(
        cuda::moe_combine_residual_rmsnorm(buf.as<float>(), buf.as<int32_t>(), buf.as<float>(),
                                           buf.as<int32_t>(), 1, 2, 60, nullptr, DType::F32, some, nullptr),
        std::invalid_argument);
}

// Qwen3-MoE-like (SwiGLU) and NemotronH-like (relu^2, odd multiples of 32) shapes at small scale.
const ExpertsCase kExpertCases[] = {
    {MoeActivation::SwiGlu, 16, 256, 128, 4},
    {MoeActivation::SwiGlu, 64, 128, 96, 8},
    {MoeActivation::Relu2, 16, 224, 160, 6},
    {MoeActivation::Relu2, 8, 96, 1056, 2},
};

TEST(MoeCuda, ExpertsNvfp4) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& c : kExpertCases)
        for (int64_t m : {1, 3, 17, 64})
            for (bool bf16 : {false, true}) run_experts(pool, rng, c, m, bf16, Draw::Uniform, m % 2 == 1);
}

// The decode GEMV's row grouping (lanes per row from k: 1 at k <= 128, 2 at 256, 8 at 768, 16 at 1856 and
// 2048), with CTA row tails (k = 256 and 160 over 96 and 800 rows: 64 rows a CTA; k = 96 over 256 rows) and
// chunk counts not a multiple of the lanes (1856 / 32 = 58 over 16); n_embd 2048 also splits the combine's
// columns over CTAs. m = 2 (m top_k <= n_experts: the 1-token tile) drawn over top_k + 1 experts passes
// over some experts' rows twice; m = 17 puts more than one 8-token tile on some experts. The register GEMV
// (k <= 4096: weights in registers, inputs staged 8 rows at a time, fewer at large k; 16 rows a warp at
// down's k = 768) gets warps without rows (n_embd 96 and 160), a warp with some rows (96 at 64 rows a warp),
// n_ff 4096 (32 lanes of 4 chunks, 3 rows staged: several tiles at m = 17), and k = 4128 (past it: the
// generic GEMV, its 8-token tile at m = 17) for down and for both up epilogues. Those are the one-token runs;
// at m = 2 and 17 the same shapes take the tensor-core GEMV (moe_mma_gemv_preferred), k split over 2, 4 and 8
// warps for down (k = 1856, 4096, 4128: 15, 32 and 33 spans), except k = 4128 for SwiGLU (past it: the
// generic GEMV).
const ExpertsCase kGemvRowGroupCases[] = {
    {MoeActivation::SwiGlu, 8, 768, 256, 3},  {MoeActivation::Relu2, 8, 2048, 1856, 2},
    {MoeActivation::Relu2, 8, 96, 256, 2},    {MoeActivation::SwiGlu, 4, 160, 800, 2},
    {MoeActivation::SwiGlu, 6, 2048, 768, 2}, {MoeActivation::Relu2, 4, 96, 4096, 2},
    {MoeActivation::Relu2, 4, 64, 4128, 2},   {MoeActivation::Relu2, 4, 4128, 64, 2},
    {MoeActivation::SwiGlu, 4, 4128, 64, 2},
};

TEST(MoeCuda, ExpertsNvfp4GemvRowGroups) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const auto gemv = cuda::MoeExpertKernel::Gemv;
    for (const auto& c : kGemvRowGroupCases)
        for (int64_t m : {1, 2, 17})
            for (bool bf16 : {false, true})
                run_experts(pool, rng, c, m, bf16, m == 1 ? Draw::Uniform : Draw::Few, bf16, !bf16, gemv);
}

// Every token on the same few experts: more than one 8-token tile per expert, most experts idle. The BF16
// runs go through the one-call launcher.
TEST(MoeCuda, ExpertsNvfp4Skewed) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& c : kExpertCases)
        for (int64_t m : {9, 40})
            for (bool bf16 : {false, true}) run_experts(pool, rng, c, m, bf16, Draw::Few, true, bf16);
}

// The prefill grouped GEMM, forced (Auto would take the GEMV at the smaller m): shapes with column tails
// (SwiGLU n_ff % 64, relu^2 n_embd % 128 and n_ff % 128 not 0), uniform loads, a hot expert with the upper
// half of the experts idle, and all pairs on top_k + 1 experts (several 64-position tiles each).
const ExpertsCase kGemmCases[] = {
    {MoeActivation::SwiGlu, 32, 256, 192, 8},
    {MoeActivation::SwiGlu, 8, 96, 96, 2},
    {MoeActivation::Relu2, 16, 224, 160, 6},
};

TEST(MoeCuda, ExpertsNvfp4Gemm) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const auto gemm = cuda::MoeExpertKernel::Gemm;
    for (const auto& c : kGemmCases)
        for (int64_t m : {1, 33, 200, 1000})
            for (bool bf16 : {false, true})
                run_experts(pool, rng, c, m, bf16, Draw::Uniform, m % 2 == 1, false, gemm);
    for (const auto& c : kGemmCases)
        for (bool bf16 : {false, true}) {
            run_experts(pool, rng, c, 300, bf16, Draw::Hot, true, !bf16, gemm);
            run_experts(pool, rng, c, 150, bf16, Draw::Few, false, bf16, gemm);
        }
}

// Auto at a prefill size with BF16 activations (the GEMM) through the one-call launcher, at Qwen3-30B-A3B's
// and Nemotron-3-Nano's expert counts and top_k.
TEST(MoeCuda, ExpertsNvfp4GemmPrefill) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const ExpertsCase c{MoeActivation::SwiGlu, 128, 128, 64, 8};
    ASSERT_TRUE(cuda::moe_prefers_gemm(2048, c.top_k, c.n_experts, DType::BF16));
    run_experts(pool, rng, c, 2048, true, Draw::Uniform, true, true);
    run_experts(pool, rng, c, 2048, true, Draw::Hot, false, true);
    const ExpertsCase r{MoeActivation::Relu2, 128, 160, 96, 6};
    run_experts(pool, rng, r, 2048, true, Draw::Uniform, false, true);
}

// The plain GEMV (moe_uses_plain_kernel): NVFP4 experts whose n_embd or n_ff is 16 (mod 32) (NemotronH's golden
// fixture: 48 and 80 wide), and BF16 experts at any width, both activations, SwiGLU and relu^2, through the
// launchers and the one-call launcher (whatever kernel is asked for: GEMM included; BF16 experts of widths
// that are multiples of 32 then run the GEMM), with uniform, skewed and hot routing, m up to a prefill that
// asks Auto for the GEMM.
const ExpertsCase kPlainCases[] = {
    {MoeActivation::Relu2, 4, 64, 48, 2},          {MoeActivation::Relu2, 4, 80, 32, 2},
    {MoeActivation::SwiGlu, 8, 48, 80, 3},         {MoeActivation::Relu2, 6, 1040, 48, 2},
    {MoeActivation::Relu2, 4, 64, 32, 2, true},    {MoeActivation::Relu2, 4, 48, 80, 2, true},
    {MoeActivation::SwiGlu, 8, 80, 48, 3, true},   {MoeActivation::SwiGlu, 16, 256, 128, 4, true},
};

TEST(MoeCuda, ExpertsPlainGemv) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& c : kPlainCases)
        for (int64_t m : {1, 2, 17, 40})
            for (bool bf16 : {false, true}) {
                run_experts(pool, rng, c, m, bf16, m == 2 ? Draw::Few : Draw::Uniform, m % 2 == 1);
                run_experts(pool, rng, c, m, bf16, Draw::Hot, m % 2 == 0, true, cuda::MoeExpertKernel::Gemm);
            }
    for (const auto& c : kPlainCases) {
        ASSERT_TRUE(cuda::moe_prefers_gemm(300, c.top_k, c.n_experts, DType::BF16));
        run_experts(pool, rng, c, 300, true, Draw::Uniform, true, true);
    }
}

// BF16 experts on the grouped GEMM (widths multiples of 32): forced at small and odd m, with column tails
// (SwiGLU n_ff % 64, relu^2 n_embd % 128), hot and skewed routing, and Auto at a prefill size through the
// one-call launcher (Qwen3-30B-A3B's expert count and top_k, BF16 activations), against the CPU over the
// same BF16 weights.
TEST(MoeCuda, ExpertsBf16Gemm) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const auto gemm = cuda::MoeExpertKernel::Gemm;
    const ExpertsCase cases[] = {
        {MoeActivation::SwiGlu, 32, 256, 192, 8, true},
        {MoeActivation::SwiGlu, 8, 96, 96, 2, true},
        {MoeActivation::Relu2, 16, 224, 160, 6, true},
    };
    for (const auto& c : cases) {
        for (int64_t m : {1, 33, 200})
            for (bool bf16 : {false, true}) run_experts(pool, rng, c, m, bf16, Draw::Uniform, m % 2 == 1, false, gemm);
        run_experts(pool, rng, c, 300, true, Draw::Hot, true, true, gemm);
        run_experts(pool, rng, c, 150, false, Draw::Few, false, true, gemm);
    }
    const ExpertsCase q{MoeActivation::SwiGlu, 128, 128, 64, 8, true};
    ASSERT_TRUE(cuda::moe_prefers_gemm(2048, q.top_k, q.n_experts, DType::BF16));
    run_experts(pool, rng, q, 2048, true, Draw::Uniform, true, true);
}

// The tensor-core GEMV (ops/moe/moe_mma_gemv_cuda.cu, steps of 2+ tokens) over its layouts: k split over 8
// warps (up k = 4096, SwiGLU and relu^2), 4 warps of 6 spans (k = 2688), a split warp left without spans (k =
// 1056: 9 spans over 4 warps of 3) and a last span with one chunk of 4; down over one warp per row group with
// a partial span (k = 736: 23 chunks) and 64-row CTAs past n (n_embd 96). m = 2, 9 and 17 over few experts:
// several 8-token (BF16) and 4-token (float32: hi and lo columns) tiles an expert.
const ExpertsCase kMmaGemvCases[] = {
    {MoeActivation::SwiGlu, 4, 4096, 64, 2}, {MoeActivation::Relu2, 4, 4096, 96, 2},
    {MoeActivation::Relu2, 6, 2688, 736, 2}, {MoeActivation::SwiGlu, 4, 1056, 96, 2},
    {MoeActivation::SwiGlu, 8, 96, 736, 3},
};

TEST(MoeCuda, ExpertsNvfp4MmaGemv) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (const auto& c : kMmaGemvCases) {
        ASSERT_TRUE(cuda::moe_mma_gemv_preferred(
            2, c.n_embd, c.act == MoeActivation::SwiGlu ? cuda::MoeGemvOp::SwiGlu : cuda::MoeGemvOp::Relu2));
        for (int64_t m : {2, 9, 17})
            for (bool bf16 : {false, true})
                run_experts(pool, rng, c, m, bf16, m == 2 ? Draw::Uniform : Draw::Few, m == 9,
                            m == 17 && bf16, cuda::MoeExpertKernel::Gemv);
    }
}

// The tensor-core GEMV's split of k over warps, and where the launchers take it (host only).
TEST(MoeCuda, MmaGemvLayoutAndChoice) {
    using cuda::MoeGemvOp;
    const auto qwen_up = cuda::moe_mma_gemv_layout(2048, MoeGemvOp::SwiGlu);
    EXPECT_TRUE(qwen_up.supported);
    EXPECT_EQ(qwen_up.k_splits, 4);
    EXPECT_EQ(qwen_up.spans_per_warp, 4);
    EXPECT_EQ(qwen_up.warps, 4);
    EXPECT_EQ(qwen_up.row_groups, 1);
    const auto qwen_down = cuda::moe_mma_gemv_layout(768, MoeGemvOp::Down);
    EXPECT_EQ(qwen_down.k_splits, 1);
    EXPECT_EQ(qwen_down.spans_per_warp, 6);
    EXPECT_EQ(qwen_down.row_groups, 4);
    const auto wide = cuda::moe_mma_gemv_layout(4096, MoeGemvOp::SwiGlu);
    EXPECT_EQ(wide.k_splits, 8);
    EXPECT_EQ(wide.warps, 8);
    EXPECT_EQ(wide.row_groups, 1);
    const auto nemotron_up = cuda::moe_mma_gemv_layout(2688, MoeGemvOp::Relu2);
    EXPECT_EQ(nemotron_up.k_splits, 4);
    EXPECT_EQ(nemotron_up.spans_per_warp, 6);
    EXPECT_FALSE(cuda::moe_mma_gemv_layout(4128, MoeGemvOp::SwiGlu).supported);  // 33 spans > 8 warps x 4
    EXPECT_TRUE(cuda::moe_mma_gemv_layout(6144, MoeGemvOp::Relu2).supported);    // 48 spans = 8 warps x 6
    EXPECT_FALSE(cuda::moe_mma_gemv_layout(6272, MoeGemvOp::Relu2).supported);
    EXPECT_FALSE(cuda::moe_mma_gemv_layout(100, MoeGemvOp::Down).supported);  // not a multiple of 32
    EXPECT_FALSE(cuda::moe_mma_gemv_preferred(1, 2048, MoeGemvOp::SwiGlu));   // one token: the register GEMV
    EXPECT_TRUE(cuda::moe_mma_gemv_preferred(2, 2048, MoeGemvOp::SwiGlu));
    EXPECT_TRUE(cuda::moe_mma_gemv_preferred(8, 768, MoeGemvOp::Down));
    EXPECT_TRUE(cuda::moe_mma_gemv_preferred(8, 1856, MoeGemvOp::Down));
    const auto nemotron_down = cuda::moe_mma_gemv_layout(1856, MoeGemvOp::Down);  // 15 spans, the last half
    EXPECT_EQ(nemotron_down.k_splits, 2);
    EXPECT_EQ(nemotron_down.spans_per_warp, 8);
    EXPECT_EQ(nemotron_down.row_groups, 2);
    EXPECT_FALSE(cuda::moe_mma_gemv_preferred(8, 8224, MoeGemvOp::Down));  // 65 spans > 8 warps x 8
}

TEST(MoeCuda, RejectsBadArguments) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer buf(1 << 16);
    EXPECT_THROW(cuda::moe_route_softmax(buf.get(), DType::F16, 1, 8, 2, true, buf.as<int32_t>(),
                                         buf.as<float>(), nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::moe_route_softmax(buf.get(), DType::F32, 1, 8, 9, true, buf.as<int32_t>(),
                                         buf.as<float>(), nullptr),
                 std::invalid_argument);
    EXPECT_THROW(cuda::moe_route_sigmoid(buf.get(), DType::F32, 1, 10, 2, nullptr, 4, 2, true, 1.0f,
                                         buf.as<int32_t>(), buf.as<float>(), nullptr),
                 std::invalid_argument);  // 10 experts in 4 groups
    const cuda::MoeDeviceExperts ex{
        nullptr, buf.as<cuda::Nvfp4DeviceWeight>(), buf.as<cuda::Nvfp4DeviceWeight>(), 4, 40, 64};
    cuda::MoePermutation perm;
    EXPECT_THROW(cuda::moe_experts_up_nvfp4(buf.get(), DType::F32, 1, 2, ex, MoeActivation::Relu2, perm,
                                            buf.as<float>(), nullptr),
                 std::invalid_argument);  // n_embd 40 not a multiple of 16
    const cuda::MoeDeviceExperts ex_ff{
        nullptr, buf.as<cuda::Nvfp4DeviceWeight>(), buf.as<cuda::Nvfp4DeviceWeight>(), 4, 64, 72};
    EXPECT_THROW(cuda::moe_experts_down_nvfp4(buf.as<float>(), 64, 2, ex_ff, perm, buf.as<float>(), nullptr,
                                              cuda::MoeExpertKernel::Gemm),
                 std::invalid_argument);  // n_ff 72 not a multiple of 16
    cuda::MoeDeviceExperts mixed = ex_ff;  // BF16 and NVFP4 arrays at once
    mixed.n_ff = 64;
    mixed.bf16_up = mixed.bf16_down = buf.as<uint16_t>();
    EXPECT_THROW(cuda::moe_experts_down_nvfp4(buf.as<float>(), 1, 2, mixed, perm, buf.as<float>(), nullptr),
                 std::invalid_argument);
    cuda::MoeDeviceExperts bf16_ungated{nullptr, nullptr, nullptr, 4, 64, 64};
    bf16_ungated.bf16_up = bf16_ungated.bf16_down = buf.as<uint16_t>();
    EXPECT_THROW(cuda::moe_experts_up_nvfp4(buf.get(), DType::F32, 1, 2, bf16_ungated, MoeActivation::SwiGlu, perm,
                                            buf.as<float>(), nullptr),
                 std::invalid_argument);  // SwiGLU without bf16_gate
}

}  // namespace
}  // namespace nibble
