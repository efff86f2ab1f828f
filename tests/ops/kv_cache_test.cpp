// The typed paged KV cache (F32, BF16, FP8, NVFP4): the byte layout kv_cache.h promises the CUDA kernels,
// round trips within each format's error bound, and attention over each format equal to attention over the
// dequantized values, computed here independently in double. The codecs used as references
// (tensor/float_formats.h, tensor/nvfp4.h) are proven bit-exact against CUDA's own conversions in tests/tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "ops/attention/attention.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

std::vector<float> random_vector(size_t n, std::mt19937& rng, float scale) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

const KvDtype kAllDtypes[] = {KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4};

// The values a row of `x` becomes in `dtype` with FP8-convention scale kv_scale, built from the codecs
// directly (not through kv_cache.cpp).
std::vector<float> reference_dequantized(KvDtype dtype, float kv_scale, const float* x, int64_t hd) {
    std::vector<float> out(static_cast<size_t>(hd));
    switch (dtype) {
        case KvDtype::F32: std::copy(x, x + hd, out.begin()); break;
        case KvDtype::Bf16:
            for (int64_t d = 0; d < hd; ++d) out[static_cast<size_t>(d)] = bf16_to_float(bf16_from_float(x[d]));
            break;
        case KvDtype::Fp8:
            for (int64_t d = 0; d < hd; ++d)
                out[static_cast<size_t>(d)] = e4m3_to_float(e4m3_from_float(x[d] / kv_scale)) * kv_scale;
            break;
        case KvDtype::Nvfp4: {
            std::vector<uint8_t> packed(static_cast<size_t>(hd / 2)), scales(static_cast<size_t>(hd / 16));
            nvfp4_quantize_row(x, hd, kv_scale / 6.0f, packed.data(), scales.data());
            nvfp4_dequantize_row(packed.data(), scales.data(), hd, kv_scale / 6.0f, out.data());
            break;
        }
    }
    return out;
}

TEST(KvCache, BytesPerTokenAndBlockBytes) {
    // Llama-3.1-8B's attention: 32 layers, 8 KV heads of 128. BF16 KV is the widely quoted 128 KiB per token.
    KvCacheShape s{.n_layers = 32, .n_blocks = 1, .block_size = 16, .n_kv_heads = 8, .head_dim = 128};
    const int64_t want[] = {32 * 2 * 8 * 128 * 4, 131072, 65536, 32 * 2 * 8 * (64 + 8)};
    for (size_t i = 0; i < 4; ++i) {
        s.dtype = kAllDtypes[i];
        EXPECT_EQ(s.bytes_per_token(), want[i]) << kv_dtype_name(s.dtype);
        EXPECT_EQ(s.block_bytes() * 2 * s.n_layers, want[i] * 16) << kv_dtype_name(s.dtype);
    }
    // A block whose raw size is not a multiple of 16 is padded so every block starts 16-byte aligned.
    KvCacheShape odd{.n_layers = 1, .n_blocks = 3, .block_size = 3, .n_kv_heads = 1, .head_dim = 16, .dtype = KvDtype::Nvfp4};
    EXPECT_EQ(odd.block_bytes(), 32);  // 3 * (8 + 1) = 27 -> 32
    KvCache cache(odd);
    EXPECT_EQ(cache.k_block(0, 1) - cache.k_block(0, 0), 32);
}

TEST(KvCache, DtypeNames) {
    for (KvDtype d : kAllDtypes) EXPECT_EQ(kv_dtype_from_name(kv_dtype_name(d)), d);
    EXPECT_EQ(kv_dtype_from_name("bfloat16"), KvDtype::Bf16);
    EXPECT_EQ(kv_dtype_from_name("fp8_e4m3"), KvDtype::Fp8);
    EXPECT_FALSE(kv_dtype_from_name("fp8_e5m2").has_value());
    EXPECT_FALSE(kv_dtype_from_name("auto").has_value());  // resolved by the caller, who knows the checkpoint
}

// Writes random K/V through kv_cache_write_cpu and checks every block byte against the documented layout,
// filled here from the codecs.
TEST(KvCache, WriteFollowsDocumentedLayout) {
    std::mt19937 rng(11);
    const int64_t bs = 4, nkv = 2, hd = 32, n = 7;
    const float k_scale = 0.03f, v_scale = 0.007f;
    for (KvDtype dtype : kAllDtypes) {
        KvCacheShape shape{.n_layers = 2, .n_blocks = 3, .block_size = bs, .n_kv_heads = nkv, .head_dim = hd,
                           .dtype = dtype, .k_scales = {1.0f, k_scale}, .v_scales = {1.0f, v_scale}};
        KvCache cache(shape);
        std::vector<int32_t> table = {2, 0};
        auto k = random_vector(static_cast<size_t>(n * nkv * hd), rng, 0.5f);
        auto v = random_vector(static_cast<size_t>(n * nkv * hd), rng, 0.1f);
        kv_cache_write_cpu(cache, 1, SequenceKv{.block_table = table.data(), .n_table = 2, .start_pos = 0}, n,
                           k.data(), v.data());
        for (int side = 0; side < 2; ++side) {
            const float kv_scale = side == 0 ? k_scale : v_scale;
            const std::vector<float>& src = side == 0 ? k : v;
            std::vector<uint8_t> want(static_cast<size_t>(shape.block_bytes()) * 2, 0);  // logical blocks 0, 1
            for (int64_t t = 0; t < n; ++t)
                for (int64_t h = 0; h < nkv; ++h) {
                    const float* x = src.data() + (t * nkv + h) * hd;
                    uint8_t* block = want.data() + (t / bs) * shape.block_bytes();
                    const int64_t r = (t % bs) * nkv + h;
                    switch (dtype) {
                        case KvDtype::F32: std::memcpy(block + r * hd * 4, x, static_cast<size_t>(hd) * 4); break;
                        case KvDtype::Bf16:
                            for (int64_t d = 0; d < hd; ++d) {
                                const uint16_t b = bf16_from_float(x[d]);
                                std::memcpy(block + (r * hd + d) * 2, &b, 2);
                            }
                            break;
                        case KvDtype::Fp8:
                            for (int64_t d = 0; d < hd; ++d) block[r * hd + d] = e4m3_from_float(x[d] / kv_scale);
                            break;
                        case KvDtype::Nvfp4:
                            nvfp4_quantize_row(x, hd, kv_scale / 6.0f, block + r * hd / 2,
                                               block + bs * nkv * hd / 2 + r * hd / 16);
                            break;
                    }
                }
            for (int64_t logical = 0; logical < 2; ++logical) {
                const int64_t physical = table[static_cast<size_t>(logical)];
                const uint8_t* got = side == 0 ? cache.k_block(1, physical) : cache.v_block(1, physical);
                const uint8_t* w = want.data() + logical * shape.block_bytes();
                for (int64_t b = 0; b < shape.block_bytes(); ++b)
                    ASSERT_EQ(got[b], w[b]) << kv_dtype_name(dtype) << (side ? " V" : " K") << " logical block "
                                            << logical << " byte " << b;
            }
        }
        // Layer 0 and the unused block stay untouched (zero).
        for (int64_t b = 0; b < shape.block_bytes(); ++b) ASSERT_EQ(cache.k_block(0, 2)[b], 0);
        for (int64_t b = 0; b < shape.block_bytes(); ++b) ASSERT_EQ(cache.k_block(1, 1)[b], 0);
    }
}

// Round trip through the cache, against each format's error bound.
TEST(KvCache, RoundTripWithinFormatBound) {
    std::mt19937 rng(3);
    const int64_t bs = 8, nkv = 2, hd = 64;
    const float kv_scale = 0.02f;  // FP8: 448 * 0.02 = 8.96 is the largest magnitude before saturation
    for (KvDtype dtype : kAllDtypes) {
        KvCacheShape shape{.n_layers = 1, .n_blocks = 1, .block_size = bs, .n_kv_heads = nkv, .head_dim = hd,
                           .dtype = dtype, .k_scales = {kv_scale}, .v_scales = {kv_scale}};
        KvCache cache(shape);
        // Magnitudes over several binades, a few beyond FP8/NVFP4 saturation (|x| > 8.96), some zeros.
        std::vector<float> x(static_cast<size_t>(bs * nkv * hd));
        std::uniform_real_distribution<float> expo(-12.0f, 3.6f);
        for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 29 == 0) ? 0.0f : std::exp2(expo(rng)) * (rng() % 2 ? 1.0f : -1.0f);
        std::vector<int32_t> table = {0};
        kv_cache_write_cpu(cache, 0, SequenceKv{.block_table = table.data(), .n_table = 1, .start_pos = 0}, bs,
                           x.data(), x.data());
        const float ls = cache.k_layer_scale(0);
        std::vector<float> got(static_cast<size_t>(hd));
        for (int64_t t = 0; t < bs; ++t)
            for (int64_t h = 0; h < nkv; ++h) {
                kv_decode_head(shape, ls, cache.k_block(0, 0), t, h, got.data());
                const float* xr = x.data() + (t * nkv + h) * hd;
                for (int64_t d = 0; d < hd; ++d) {
                    const double xv = xr[d], q = got[static_cast<size_t>(d)];
                    double bound = 0;
                    switch (dtype) {
                        case KvDtype::F32: bound = 0; break;
                        case KvDtype::Bf16: bound = 0x1p-8 * std::fabs(xv); break;  // unit roundoff, 8-bit significand
                        case KvDtype::Fp8:
                            if (std::fabs(xv) >= 448.0 * kv_scale) {
                                EXPECT_EQ(q, std::copysign(448.0f * kv_scale, xr[d])) << "saturates";
                                continue;
                            }
                            // 4-bit significand in the normal range; half the subnormal step 2^-9 below it;
                            // plus one float rounding of the product e4m3 * scale.
                            bound = std::max(0x1p-4 * std::fabs(xv), 0x1p-10 * kv_scale) + 0x1p-24 * std::fabs(q);
                            break;
                        case KvDtype::Nvfp4: {
                            // The group's scale s = e4m3 * layer_scale, read back from the stored byte; E2M1's
                            // grid {0, .5, 1, 1.5, 2, 3, 4, 6} * s gives half-gaps .25 s, .5 s, 1 s; beyond 6 s the
                            // element saturates to 6 s.
                            const uint8_t* scales = cache.k_block(0, 0) + bs * nkv * hd / 2 + (t * nkv + h) * hd / 16;
                            const double s = static_cast<double>(e4m3_to_float(scales[d / 16])) * ls;
                            const double a = std::fabs(xv) / s;
                            if (a > 6) {
                                EXPECT_NEAR(q, std::copysign(6 * s, xv), 1e-6 * s) << "saturates";
                                // Only values beyond the layer's range (448 * kv_scale) saturate, or those of a
                                // group whose E4M3 scale was rounded down (by at most 2^-4 relative).
                                EXPECT_TRUE(std::fabs(xv) > 448.0 * kv_scale || std::fabs(xv) - 6 * s <= 6 * s * 0x1p-4)
                                    << xv << " with group scale " << s;
                                continue;
                            }
                            bound = (a < 2 ? 0.25 : a < 4 ? 0.5 : 1.0) * s * (1 + 1e-6);
                            break;
                        }
                    }
                    ASSERT_LE(std::fabs(q - xv), bound) << kv_dtype_name(dtype) << " x " << xv << " got " << q;
                    ASSERT_EQ(got[static_cast<size_t>(d)], reference_dequantized(dtype, kv_scale, xr, hd)[static_cast<size_t>(d)]);
                }
            }
    }
}

// Dense causal attention in double over given (already dequantized) K/V.
std::vector<double> reference_attention(const std::vector<float>& q, const std::vector<float>& k,
                                        const std::vector<float>& v, int64_t n, int64_t heads, int64_t kv_heads,
                                        int64_t hd, double scale) {
    std::vector<double> out(static_cast<size_t>(n * heads * hd));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t kvh = h / (heads / kv_heads);
            std::vector<double> s;
            double mx = -1e300;
            for (int64_t j = 0; j <= i; ++j) {
                double d = 0;
                for (int64_t e = 0; e < hd; ++e)
                    d += static_cast<double>(q[static_cast<size_t>((i * heads + h) * hd + e)]) *
                         k[static_cast<size_t>((j * kv_heads + kvh) * hd + e)];
                s.push_back(d * scale);
                mx = std::max(mx, s.back());
            }
            double den = 0;
            for (auto& x : s) den += (x = std::exp(x - mx));
            for (int64_t e = 0; e < hd; ++e) {
                double acc = 0;
                for (int64_t j = 0; j <= i; ++j)
                    acc += s[static_cast<size_t>(j)] * v[static_cast<size_t>((j * kv_heads + kvh) * hd + e)];
                out[static_cast<size_t>((i * heads + h) * hd + e)] = acc / den;
            }
        }
    return out;
}

// paged_attention_cpu over a quantized cache equals exact attention over the values the format stores.
TEST(KvCache, AttentionOverEachDtypeEqualsAttentionOverDequantizedValues) {
    std::mt19937 rng(5);
    const int64_t heads = 4, kv_heads = 2, hd = 32, n = 29, block = 8;
    const float k_scale = 0.01f, v_scale = 0.004f;
    const int64_t n_blocks = (n + block - 1) / block + 2;
    for (KvDtype dtype : kAllDtypes) {
        KvCache cache(KvCacheShape{.n_layers = 1, .n_blocks = n_blocks, .block_size = block, .n_kv_heads = kv_heads,
                                   .head_dim = hd, .dtype = dtype, .k_scales = {k_scale}, .v_scales = {v_scale}});
        std::vector<int32_t> table(static_cast<size_t>(n_blocks));
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), rng);
        auto q = random_vector(static_cast<size_t>(n * heads * hd), rng, 1.0f);
        auto k = random_vector(static_cast<size_t>(n * kv_heads * hd), rng, 1.0f);
        auto v = random_vector(static_cast<size_t>(n * kv_heads * hd), rng, 0.5f);
        AttentionParams p{.n_heads = heads, .n_kv_heads = kv_heads, .head_dim = hd, .scale = 0.25f};
        ThreadPool pool(2);
        std::vector<float> out(q.size(), NAN);
        for (int64_t start = 0; start < n;) {  // a prefill of 11, then chunks of 6: reads blocks written earlier
            const int64_t len = std::min<int64_t>(start == 0 ? 11 : 6, n - start);
            SequenceKv seq{.block_table = table.data(), .n_table = n_blocks, .start_pos = start};
            kv_cache_write_cpu(cache, 0, seq, len, k.data() + start * kv_heads * hd, v.data() + start * kv_heads * hd);
            paged_attention_cpu(pool, q.data() + start * heads * hd, len, cache, 0, seq, p,
                                out.data() + start * heads * hd);
            start += len;
        }
        std::vector<float> kq(k.size()), vq(v.size());
        for (int64_t r = 0; r < n * kv_heads; ++r) {
            auto kr = reference_dequantized(dtype, k_scale, k.data() + r * hd, hd);
            auto vr = reference_dequantized(dtype, v_scale, v.data() + r * hd, hd);
            std::copy(kr.begin(), kr.end(), kq.begin() + r * hd);
            std::copy(vr.begin(), vr.end(), vq.begin() + r * hd);
        }
        if (dtype != KvDtype::F32) {
            EXPECT_NE(kq, k) << "the format must actually round";
        }
        const auto ref = reference_attention(q, kq, vq, n, heads, kv_heads, hd, 0.25);
        // The only differences left are float32 rounding: the dot product (<= hd * 2^-24 * sum|q k|, about
        // 32 * 6e-8 * 32 * 0.25 = 1.5e-5 in the score, which moves an output of magnitude ~0.5 by about as
        // much) and the float32 score and exp: 1e-5 absolute, as ops_test's unquantized attention test.
        double worst = 0;
        for (size_t i = 0; i < out.size(); ++i) {
            worst = std::max(worst, std::fabs(out[i] - ref[i]));
            ASSERT_NEAR(out[i], ref[i], 1e-5) << kv_dtype_name(dtype) << " element " << i;
        }
        // ... while the format's own error is far larger than that (not testing the cache against itself).
        if (dtype == KvDtype::Fp8 || dtype == KvDtype::Nvfp4) {
            const auto exact = reference_attention(q, k, v, n, heads, kv_heads, hd, 0.25);
            double format_err = 0;
            for (size_t i = 0; i < out.size(); ++i) format_err = std::max(format_err, std::fabs(exact[i] - ref[i]));
            EXPECT_GT(format_err, 100 * worst) << kv_dtype_name(dtype);
        }
    }
}

TEST(KvCache, RefusesBadShapesAndValues) {
    EXPECT_THROW(KvCache(KvCacheShape{.n_layers = 1, .n_blocks = 1, .block_size = 4, .n_kv_heads = 1, .head_dim = 24,
                                      .dtype = KvDtype::Nvfp4}),
                 std::exception);
    EXPECT_THROW(KvCache(KvCacheShape{.n_layers = 2, .n_blocks = 1, .block_size = 4, .n_kv_heads = 1, .head_dim = 16,
                                      .dtype = KvDtype::Fp8, .k_scales = {1.0f}, .v_scales = {1.0f, 1.0f}}),
                 std::exception);
    EXPECT_THROW(KvCache(KvCacheShape{.n_layers = 1, .n_blocks = 1, .block_size = 4, .n_kv_heads = 1, .head_dim = 16,
                                      .dtype = KvDtype::Fp8, .k_scales = {0.0f}, .v_scales = {1.0f}}),
                 std::exception);
    for (KvDtype dtype : {KvDtype::Fp8, KvDtype::Nvfp4}) {
        KvCache cache(KvCacheShape{.n_layers = 1, .n_blocks = 1, .block_size = 4, .n_kv_heads = 1, .head_dim = 16,
                                   .dtype = dtype});
        std::vector<float> x(16, 1.0f);
        x[5] = NAN;
        std::vector<int32_t> table = {0};
        EXPECT_THROW(kv_cache_write_cpu(cache, 0, SequenceKv{.block_table = table.data(), .n_table = 1}, 1, x.data(),
                                        x.data()),
                     std::exception)
            << kv_dtype_name(dtype);
    }
}

}  // namespace
}  // namespace nibble
