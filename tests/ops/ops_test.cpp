// CPU reference ops against naive double-precision formulas written independently here, on random inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "ops/activation/activation.h"
#include "ops/attention/attention.h"
#include "ops/linear/linear.h"
#include "ops/rmsnorm/rmsnorm.h"
#include "ops/rope/rope.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

std::vector<float> random_vector(size_t n, std::mt19937& rng, float scale = 1.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

// float32 dot products of k terms: |error| <= k * 2^-24 * sum|a_i b_i| (Higham's bound, first order).
double dot_tolerance(int64_t k, double abs_sum) { return static_cast<double>(k) * 0x1p-24 * abs_sum + 1e-30; }

TEST(LinearCpu, DenseBf16MatchesDoubleReference) {
    std::mt19937 rng(1);
    const int64_t m = 5, n = 37, k = 96;
    auto x = random_vector(static_cast<size_t>(m * k), rng);
    auto wf = random_vector(static_cast<size_t>(n * k), rng, 0.1f);
    std::vector<uint16_t> wb(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) wb[i] = bf16_from_float(wf[i]);
    LinearWeight w{.name = "w", .format = WeightFormat::Dense, .dtype = DType::BF16, .n_out = n, .n_in = k,
                   .data = wb.data(), .bias = random_vector(static_cast<size_t>(n), rng)};
    ThreadPool pool(3);
    std::vector<float> y(static_cast<size_t>(m * n), NAN);
    linear_cpu(pool, x.data(), m, w, y.data());
    for (int64_t t = 0; t < m; ++t)
        for (int64_t r = 0; r < n; ++r) {
            double ref = w.bias[static_cast<size_t>(r)], abs_sum = 0.0;
            for (int64_t i = 0; i < k; ++i) {
                const double p = static_cast<double>(x[static_cast<size_t>(t * k + i)]) *
                                 bf16_to_float(wb[static_cast<size_t>(r * k + i)]);
                ref += p;
                abs_sum += std::fabs(p);
            }
            EXPECT_NEAR(y[static_cast<size_t>(t * n + r)], ref, dot_tolerance(k + 1, abs_sum + std::fabs(ref)))
                << "row " << r << " token " << t;
        }
}

TEST(LinearCpu, Nvfp4EqualsDenseOfDequantizedWeights) {
    std::mt19937 rng(2);
    const int64_t m = 3, n = 20, k = 64;
    auto x = random_vector(static_cast<size_t>(m * k), rng);
    auto wf = random_vector(static_cast<size_t>(n * k), rng, 0.05f);
    float amax = 0.0f;
    for (float v : wf) amax = std::max(amax, std::fabs(v));
    const float global = nvfp4_global_scale(amax);
    std::vector<uint8_t> packed(static_cast<size_t>(n * k / 2)), scales(static_cast<size_t>(n * k / 16));
    std::vector<float> deq(static_cast<size_t>(n * k));
    for (int64_t r = 0; r < n; ++r) {
        nvfp4_quantize_row(wf.data() + r * k, k, global, packed.data() + r * k / 2, scales.data() + r * k / 16);
        nvfp4_dequantize_row(packed.data() + r * k / 2, scales.data() + r * k / 16, k, global, deq.data() + r * k);
    }
    LinearWeight q{.name = "q", .format = WeightFormat::Nvfp4, .dtype = DType::U8, .n_out = n, .n_in = k,
                   .data = packed.data(), .block_scales = scales.data(), .scale = global, .bias = {}};
    LinearWeight d{.name = "d", .format = WeightFormat::Dense, .dtype = DType::F32, .n_out = n, .n_in = k,
                   .data = deq.data(), .bias = {}};
    ThreadPool pool(2);
    std::vector<float> yq(static_cast<size_t>(m * n), NAN), yd(static_cast<size_t>(m * n), NAN);
    linear_cpu(pool, x.data(), m, q, yq.data());
    linear_cpu(pool, x.data(), m, d, yd.data());
    for (size_t i = 0; i < yq.size(); ++i) EXPECT_EQ(yq[i], yd[i]) << i;  // same floats, same order
    std::vector<float> row(static_cast<size_t>(k));
    q.dequantize_row(7, row.data());
    for (int64_t i = 0; i < k; ++i) EXPECT_EQ(row[static_cast<size_t>(i)], deq[static_cast<size_t>(7 * k + i)]);
    EXPECT_EQ(q.stored_bytes(), n * k / 2 + n * k / 16);
}

TEST(LinearCpu, Fp8AppliesPerTensorScale) {
    std::mt19937 rng(3);
    const int64_t n = 4, k = 32;
    auto wf = random_vector(static_cast<size_t>(n * k), rng, 10.0f);
    std::vector<uint8_t> w8(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) w8[i] = e4m3_from_float(wf[i]);
    LinearWeight w{.name = "f", .format = WeightFormat::Fp8, .dtype = DType::F8_E4M3, .n_out = n, .n_in = k,
                   .data = w8.data(), .scale = 0.25f, .bias = {}};
    std::vector<float> row(static_cast<size_t>(k));
    w.dequantize_row(2, row.data());
    for (int64_t i = 0; i < k; ++i) EXPECT_EQ(row[static_cast<size_t>(i)], e4m3_to_float(w8[static_cast<size_t>(2 * k + i)]) * 0.25f);
}

TEST(RmsNormCpu, MatchesDoubleFormula) {
    std::mt19937 rng(4);
    const int64_t m = 4, d = 48;
    auto x = random_vector(static_cast<size_t>(m * d), rng, 3.0f);
    auto w = random_vector(static_cast<size_t>(d), rng);
    std::vector<float> out(x.size(), NAN);
    rmsnorm_cpu(x.data(), m, d, w.data(), 1e-5f, out.data());
    for (int64_t r = 0; r < m; ++r) {
        double ss = 0.0;
        for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[static_cast<size_t>(r * d + i)]) * x[static_cast<size_t>(r * d + i)];
        const double inv = 1.0 / std::sqrt(ss / d + 1e-5);
        for (int64_t i = 0; i < d; ++i) {
            const double ref = w[static_cast<size_t>(i)] * x[static_cast<size_t>(r * d + i)] * inv;
            EXPECT_NEAR(out[static_cast<size_t>(r * d + i)], ref, 4e-7 * (std::fabs(ref) + 1e-6));
        }
    }
}

TEST(RopeCpu, RotatesHalvesByPositionAngles) {
    std::mt19937 rng(5);
    const int64_t m = 3, heads = 2, hd = 8;
    RopeConfig cfg;
    cfg.theta = 500000.0f;
    const RopeTable table = make_rope_table(cfg, hd);
    ASSERT_EQ(table.rotary_dim, hd);
    auto x = random_vector(static_cast<size_t>(m * heads * hd), rng);
    auto orig = x;
    std::vector<int64_t> pos = {0, 7, 1000};
    rope_apply_cpu(x.data(), m, heads, hd, pos.data(), table);
    for (int64_t t = 0; t < m; ++t)
        for (int64_t h = 0; h < heads; ++h)
            for (int64_t i = 0; i < hd / 2; ++i) {
                const double inv = 1.0 / std::pow(500000.0, 2.0 * i / hd);
                const double ang = pos[static_cast<size_t>(t)] * inv;
                const size_t base = static_cast<size_t>((t * heads + h) * hd);
                const double a = orig[base + i], b = orig[base + i + hd / 2];
                // float32 angles of positions up to 1000 carry ~1000 * 2^-24 rad of error
                EXPECT_NEAR(x[base + i], a * std::cos(ang) - b * std::sin(ang), 2e-4);
                EXPECT_NEAR(x[base + i + hd / 2], b * std::cos(ang) + a * std::sin(ang), 2e-4);
            }
}

TEST(RopeCpu, Llama3ScalingKeepsHighFrequenciesAndSlowsLowOnes) {
    RopeConfig cfg{.theta = 500000.0f, .type = RopeType::Llama3, .factor = 8.0f, .low_freq_factor = 1.0f,
                   .high_freq_factor = 4.0f, .original_max_position = 8192};
    RopeConfig plain{.theta = 500000.0f};
    const auto scaled = make_rope_table(cfg, 128), base = make_rope_table(plain, 128);
    const double pi = std::acos(-1.0);
    for (size_t i = 0; i < base.inv_freq.size(); ++i) {
        const double wavelen = 2 * pi / base.inv_freq[i];
        if (wavelen < 8192.0 / 4.0) EXPECT_EQ(scaled.inv_freq[i], base.inv_freq[i]);
        else if (wavelen > 8192.0) EXPECT_NEAR(scaled.inv_freq[i], base.inv_freq[i] / 8.0, 1e-6 * base.inv_freq[i]);
        else EXPECT_TRUE(scaled.inv_freq[i] < base.inv_freq[i] && scaled.inv_freq[i] > base.inv_freq[i] / 8.0);
    }
}

TEST(SiluMulCpu, MatchesFormula) {
    std::mt19937 rng(6);
    auto g = random_vector(64, rng, 4.0f), u = random_vector(64, rng);
    std::vector<float> out(64, NAN);
    silu_mul_cpu(g.data(), u.data(), 64, out.data());
    for (size_t i = 0; i < 64; ++i) EXPECT_NEAR(out[i], g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i], 1e-6 * (1 + std::fabs(out[i])));
}

// Attention over a paged cache (shuffled block table, filled in chunks) equals dense causal attention
// computed in double over the same K/V.
TEST(PagedAttentionCpu, ChunkedPagedEqualsDenseCausal) {
    std::mt19937 rng(7);
    const int64_t heads = 4, kv_heads = 2, hd = 16, n = 37, block = 8, window = 0;
    for (int64_t sliding : {window, int64_t{10}}) {
        const int64_t n_blocks = (n + block - 1) / block + 3;
        KvCache cache(KvCacheShape{.n_layers = 2, .n_blocks = n_blocks, .block_size = block, .n_kv_heads = kv_heads, .head_dim = hd});
        std::vector<int32_t> table(static_cast<size_t>(n_blocks));
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), rng);
        auto q = random_vector(static_cast<size_t>(n * heads * hd), rng);
        auto k = random_vector(static_cast<size_t>(n * kv_heads * hd), rng);
        auto v = random_vector(static_cast<size_t>(n * kv_heads * hd), rng);
        AttentionParams p{.n_heads = heads, .n_kv_heads = kv_heads, .head_dim = hd, .scale = 0.25f, .sliding_window = sliding};
        ThreadPool pool(2);
        std::vector<float> out(q.size(), NAN);
        for (int64_t start = 0; start < n;) {
            const int64_t len = std::min<int64_t>(start == 0 ? 13 : 5, n - start);
            SequenceKv seq{.block_table = table.data(), .n_table = n_blocks, .start_pos = start};
            kv_cache_write_cpu(cache, 1, seq, len, k.data() + start * kv_heads * hd, v.data() + start * kv_heads * hd);
            paged_attention_cpu(pool, q.data() + start * heads * hd, len, cache, 1, seq, p, out.data() + start * heads * hd);
            start += len;
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t h = 0; h < heads; ++h) {
                const int64_t kvh = h / (heads / kv_heads);
                const int64_t first = sliding > 0 ? std::max<int64_t>(0, i - sliding + 1) : 0;
                std::vector<double> s;
                double mx = -1e300;
                for (int64_t j = first; j <= i; ++j) {
                    double d = 0;
                    for (int64_t e = 0; e < hd; ++e) d += static_cast<double>(q[static_cast<size_t>((i * heads + h) * hd + e)]) * k[static_cast<size_t>((j * kv_heads + kvh) * hd + e)];
                    s.push_back(d * 0.25);
                    mx = std::max(mx, s.back());
                }
                double den = 0;
                for (auto& x : s) den += (x = std::exp(x - mx));
                for (int64_t e = 0; e < hd; ++e) {
                    double ref = 0;
                    for (int64_t j = first; j <= i; ++j) ref += s[static_cast<size_t>(j - first)] * v[static_cast<size_t>((j * kv_heads + kvh) * hd + e)];
                    ref /= den;
                    EXPECT_NEAR(out[static_cast<size_t>((i * heads + h) * hd + e)], ref, 1e-5) << "token " << i << " head " << h << " window " << sliding;
                }
            }
    }
}

TEST(PagedAttentionCpu, BlockTableTooShortIsAnError) {
    KvCache cache(KvCacheShape{.n_layers = 1, .n_blocks = 2, .block_size = 4, .n_kv_heads = 1, .head_dim = 4});
    std::vector<int32_t> table = {1};
    std::vector<float> kv(8 * 4, 1.0f);
    SequenceKv seq{.block_table = table.data(), .n_table = 1, .start_pos = 2};
    try {
        kv_cache_write_cpu(cache, 0, seq, 4, kv.data(), kv.data());
        FAIL() << "expected an error";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("block table has 1 blocks"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace nibble
