// RoPE's two pairings on the CPU (ops/rope/rope.h): interleaved (GPT-J, pairs (2i, 2i + 1)) against a rotation
// worked out by hand, against the rotate-half form on de-interleaved values (how transformers'
// apply_rotary_pos_emb_interleave computes it), and partial rotation leaving the tail alone.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ops/rope/rope.h"

namespace nibble {
namespace {

// head_dim 4, theta 100: inv_freq = {100^0, 100^(-2/4)} = {1, 0.1}; position 3 gives angles 3 and 0.3.
TEST(RopeInterleavedCpu, RotatesAdjacentPairsByHand) {
    RopeConfig cfg{.theta = 100.0f};
    cfg.interleaved = true;
    const RopeTable table = make_rope_table(cfg, 4);
    ASSERT_TRUE(table.interleaved);
    ASSERT_EQ(table.inv_freq.size(), 2u);
    EXPECT_FLOAT_EQ(table.inv_freq[1], 0.1f);
    std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f};
    const int64_t pos = 3;
    rope_apply_cpu(x.data(), 1, 1, 4, &pos, table);
    // (x0, x1) = (1, 2) by 3 rad, (x2, x3) = (3, 4) by 0.3 rad. The float32 angle 3 * 0.1f is within
    // 2^-24 relative of 0.3, and each output is two float32 products and a sum: 1e-6 covers them.
    const double c3 = std::cos(3.0), s3 = std::sin(3.0), c03 = std::cos(0.3), s03 = std::sin(0.3);
    EXPECT_NEAR(x[0], 1 * c3 - 2 * s3, 1e-6);
    EXPECT_NEAR(x[1], 2 * c3 + 1 * s3, 1e-6);
    EXPECT_NEAR(x[2], 3 * c03 - 4 * s03, 1e-6);
    EXPECT_NEAR(x[3], 4 * c03 + 3 * s03, 1e-6);

    // The same input rotated half-wise pairs (x0, x2) by 3 rad and (x1, x3) by 0.3 rad instead.
    cfg.interleaved = false;
    std::vector<float> y = {1.0f, 2.0f, 3.0f, 4.0f};
    rope_apply_cpu(y.data(), 1, 1, 4, &pos, make_rope_table(cfg, 4));
    EXPECT_NEAR(y[0], 1 * c3 - 3 * s3, 1e-6);
    EXPECT_NEAR(y[2], 3 * c3 + 1 * s3, 1e-6);
    EXPECT_NEAR(y[1], 2 * c03 - 4 * s03, 1e-6);
    EXPECT_NEAR(y[3], 4 * c03 + 2 * s03, 1e-6);
}

TEST(RopeInterleavedCpu, PositionZeroIsIdentity) {
    RopeConfig cfg;
    cfg.interleaved = true;
    const RopeTable table = make_rope_table(cfg, 8);
    std::vector<float> x = {0.5f, -1.5f, 2.0f, 3.25f, -4.0f, 0.125f, 7.0f, -0.75f};
    const auto orig = x;
    const int64_t pos = 0;
    rope_apply_cpu(x.data(), 1, 1, 8, &pos, table);
    EXPECT_EQ(x, orig);
}

// De-interleaving a head (evens first, then odds), rotating half-wise and interleaving back is the
// interleaved rotation: the same float32 operations on the same pairs, so the results are equal exactly.
// With partial_rotary_factor 0.5 only the first half of each head rotates; the rest comes back unchanged.
TEST(RopeInterleavedCpu, EqualsRotateHalfOfDeinterleaved) {
    std::mt19937 rng(11);
    std::normal_distribution<float> dist(0.0f, 2.0f);
    for (float partial : {1.0f, 0.5f}) {
        SCOPED_TRACE("partial_rotary_factor " + std::to_string(partial));
        const int64_t m = 3, heads = 2, hd = 64;
        RopeConfig cfg{.theta = 10000.0f, .partial_rotary_factor = partial};
        const RopeTable half_table = make_rope_table(cfg, hd);
        cfg.interleaved = true;
        const RopeTable inter_table = make_rope_table(cfg, hd);
        const int64_t rd = inter_table.rotary_dim;
        ASSERT_EQ(rd, static_cast<int64_t>(hd * partial));
        std::vector<float> x(static_cast<size_t>(m * heads * hd));
        for (auto& v : x) v = dist(rng);
        std::vector<int64_t> pos = {1, 17, 4093};

        std::vector<float> inter = x;
        rope_apply_cpu(inter.data(), m, heads, hd, pos.data(), inter_table);

        std::vector<float> perm = x;  // rotary part of each head as [evens, odds]
        for (int64_t th = 0; th < m * heads; ++th)
            for (int64_t i = 0; i < rd / 2; ++i) {
                perm[static_cast<size_t>(th * hd + i)] = x[static_cast<size_t>(th * hd + 2 * i)];
                perm[static_cast<size_t>(th * hd + rd / 2 + i)] = x[static_cast<size_t>(th * hd + 2 * i + 1)];
            }
        rope_apply_cpu(perm.data(), m, heads, hd, pos.data(), half_table);
        for (int64_t th = 0; th < m * heads; ++th) {
            for (int64_t i = 0; i < rd / 2; ++i) {
                EXPECT_EQ(inter[static_cast<size_t>(th * hd + 2 * i)], perm[static_cast<size_t>(th * hd + i)]);
                EXPECT_EQ(inter[static_cast<size_t>(th * hd + 2 * i + 1)],
                          perm[static_cast<size_t>(th * hd + rd / 2 + i)]);
            }
            for (int64_t i = rd; i < hd; ++i)
                EXPECT_EQ(inter[static_cast<size_t>(th * hd + i)], x[static_cast<size_t>(th * hd + i)]);
        }
        // And it is a rotation: something moved at every non-zero position.
        EXPECT_NE(inter, x);
    }
}

// Every supported architecture's config keeps the NeoX pairing (no config key turns interleaving on).
TEST(RopeInterleavedCpu, DefaultIsRotateHalf) {
    EXPECT_FALSE(RopeConfig{}.interleaved);
    EXPECT_FALSE(make_rope_table(RopeConfig{}, 128).interleaved);
}

}  // namespace
}  // namespace nibble
