// Device tests of the fused q/k RMSNorm + RoPE + KV write (ops/attention/qkv_prepare_cuda.h), on fresh random
// inputs, with q and both caches poisoned (0xff bytes) first:
//  (a) against the unfused CUDA sequence it replaces (rmsnorm on q and k, rope_apply on q and k,
//      kv_cache_write): the same q bytes and the same K/V cache bytes, for the BF16, FP8 and NVFP4 caches,
//      F32 and BF16 activations, head_dim 64 / 128 (and 16, 32, 48, 96, 256), with and without the q/k norm, rotate-half
//      and interleaved RoPE, rotary_dim = head_dim, < head_dim, 0, GQA, m = 1, 3, 17, 64, padding tokens
//      (negative slots) and slots in shuffled order;
//  (b) against the CPU reference (rmsnorm_cpu, rope_apply_cpu, then kv_encode_head as kv_cache_write_cpu
//      stores a head): q element-wise and the caches dequantized, within the tolerance derived below.
// Every case also runs strided, as the decoder's fused q/k/v prefill GEMM leaves its output: q, k and v rows
// side by side in one [m, W] buffer (W 8 elements wider than the three, so only the given stride finds the
// rows), q written to a separate poisoned [m, n_heads, head_dim] buffer: the same bytes as the unfused
// sequence, and the [m, W] buffer left as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "device_test_util.h"
#include "ops/attention/attention_cuda.h"
#include "ops/attention/kv_cache.h"
#include "ops/attention/qkv_prepare_cuda.h"
#include "ops/rmsnorm/rmsnorm.h"
#include "ops/rmsnorm/rmsnorm_cuda.h"
#include "ops/rope/rope.h"
#include "ops/rope/rope_cuda.h"

namespace nibble {
namespace {

using test::kEpsBf16;
using test::kEpsF32;

constexpr int64_t kLayer = 1;  // of 2: the per-layer scales differ
constexpr float kNormEps = 1e-6f;

struct Case {
    KvDtype kv;
    int64_t head_dim;
    bool bf16;
    bool qk_norm;
    bool interleaved;
    int64_t rotary_dim;
    int64_t n_heads, n_kv_heads;
    int64_t m;
    bool strided = false;  // q, k, v rows in one [m, W] buffer; q out to its own
};

std::string name_of(const Case& c) {
    return std::string(kv_dtype_name(c.kv)) + " hd=" + std::to_string(c.head_dim) + (c.bf16 ? " bf16" : " f32") +
           (c.qk_norm ? " qk-norm" : "") + (c.interleaved ? " interleaved" : " rotate-half") +
           " rotary=" + std::to_string(c.rotary_dim) + " heads=" + std::to_string(c.n_heads) + "/" +
           std::to_string(c.n_kv_heads) + " m=" + std::to_string(c.m) + (c.strided ? " strided" : "");
}

// One device cache layer (layer kLayer's K and V areas only), poisoned.
struct DeviceCacheLayer {
    cuda::DeviceBuffer k, v;
    cuda::PagedKvLayer layer;
    explicit DeviceCacheLayer(const KvCache& cache) {
        const auto& s = cache.shape();
        const size_t bytes = static_cast<size_t>(s.n_blocks * s.block_bytes());
        k = cuda::DeviceBuffer(bytes);
        v = cuda::DeviceBuffer(bytes);
        k.fill_bytes(0xff);
        v.fill_bytes(0xff);
        layer = {k.as<uint8_t>(), v.as<uint8_t>(), s.n_blocks, s.block_bytes(), s.block_size, s.n_kv_heads,
                 s.head_dim, s.dtype, cache.k_layer_scale(kLayer), cache.v_layer_scale(kLayer)};
    }
    std::vector<uint8_t> download_k() const { return download(k); }
    std::vector<uint8_t> download_v() const { return download(v); }
    static std::vector<uint8_t> download(const cuda::DeviceBuffer& b) {
        std::vector<uint8_t> out(b.bytes());
        b.download(out.data(), out.size());
        return out;
    }
};

std::vector<uint8_t> download_bytes(const cuda::DeviceBuffer& b, size_t n) {
    std::vector<uint8_t> out(n);
    b.download(out.data(), n);
    return out;
}

void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    size_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (got[i] != want[i] && ++bad <= 5)
            ADD_FAILURE() << what << ": byte " << i << " is 0x" << std::hex << int(got[i]) << ", unfused 0x"
                          << int(want[i]) << std::dec;
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " bytes differ";
}

// The CPU reference of q or k [m, n_rows_per_token, hd] in place, with a bound err[i] on how far the device's
// value (before any cache quantization) may be from it. Derivation (u = 2^-24, the device's stores rounded
// to the activations dtype at the same points as here):
//  * RMSNorm: the device sums squares in float (fma chains and a tree: <= hd u relative), rsqrtf (2 ulp),
//    the division and the eps add, then two products; the CPU sums in double and takes 1 / sqrt in float:
//    <= (hd + 16) u relative to the normed value y.
//  * A BF16 store after a step: both sides round, the results differ by at most the incoming error plus one
//    BF16 ulp (2 kEpsBf16 relative): err' = err + 2 kEpsBf16 (|y| + err).
//  * RoPE of pair (a, b): the same float angle on both sides; sincosf (2 ulp) against std::sin/cos (1 ulp)
//    and three roundings a side: err' <= err_a + err_b + 12 u (|a| + |b|).
void reference_heads(std::vector<float>& x, std::vector<double>& err, int64_t m, int64_t n_rows, int64_t hd,
                     const std::vector<float>* norm_w, const RopeTable& rope, const std::vector<int64_t>& positions,
                     bool bf16) {
    err.assign(x.size(), 0.0);
    auto round_store = [&](size_t i) {
        if (!bf16) return;
        const double y = std::fabs(static_cast<double>(x[i]));
        x[i] = test::round_bf16(x[i]);
        err[i] += 2 * kEpsBf16 * (y + err[i]);
    };
    if (norm_w != nullptr) {
        rmsnorm_cpu(x.data(), m * n_rows, hd, norm_w->data(), kNormEps, x.data());
        for (size_t i = 0; i < x.size(); ++i) {
            err[i] = (static_cast<double>(hd) + 16) * kEpsF32 * std::fabs(static_cast<double>(x[i]));
            round_store(i);
        }
    }
    if (rope.rotary_dim == 0) return;
    const int64_t half = rope.rotary_dim / 2;
    const std::vector<float> before = x;
    const std::vector<double> err_before = err;
    rope_apply_cpu(x.data(), m, n_rows, hd, positions.data(), rope);
    for (int64_t r = 0; r < m * n_rows; ++r) {
        for (int64_t p = 0; p < half; ++p) {
            const size_t ia = static_cast<size_t>(r * hd + (rope.interleaved ? 2 * p : p));
            const size_t ib = static_cast<size_t>(r * hd + (rope.interleaved ? 2 * p + 1 : p + half));
            const double e = err_before[ia] + err_before[ib] +
                             12 * kEpsF32 * (std::fabs(static_cast<double>(before[ia])) + std::fabs(before[ib]));
            err[ia] = err[ib] = e;
            round_store(ia);
            round_store(ib);
        }
    }
}

// Bound on |dequantized device value - dequantized CPU value| of one cache element whose CPU reference is x
// (err: the device's distance to it; group_amax, group_err: the largest |x| and err of its NVFP4 group of
// 16): each side is within one quantization error of its own input. BF16: half an ulp (kEpsBf16 relative).
// FP8 (E4M3 x ls, no saturation at these magnitudes): 2^-4 relative, 2^-10 ls absolute below the normal
// range. NVFP4: the group's E4M3 scale s is amax / 6 ls rounded (2^-4 relative, or 2^-10 absolute when
// subnormal), so s ls <= (amax / 6)(1 + 2^-4) + 2^-10 ls; an element is off by at most half the widest grid
// step (s ls), or by its saturation to 6 s ls, which is at most 6 2^-10 ls.
double cache_tolerance(KvDtype dt, double x, double err, double group_amax, double group_err, float ls) {
    const double a = std::fabs(x) + err;
    switch (dt) {
        case KvDtype::Bf16: return err + 2 * kEpsBf16 * a;
        case KvDtype::Fp8: return err + 2 * (0x1p-4 * a + 0x1p-10 * ls);
        default: return err + 2 * ((group_amax + group_err) / 6.0 * (1 + 0x1p-4) + 6 * 0x1p-10 * ls) * 1.001;
    }
}

void run_case(std::mt19937_64& rng, const Case& c) {
    SCOPED_TRACE(name_of(c));
    const int64_t hd = c.head_dim, m = c.m, nh = c.n_heads, nkv = c.n_kv_heads;
    const DType act = c.bf16 ? DType::BF16 : DType::F32;

    // The cache: room for every token plus spare blocks; the tokens' slots distinct and shuffled, every
    // fourth token a padding one (negative slot).
    KvCacheShape shape;
    shape.n_layers = 2;
    shape.n_blocks = (m + 15) / 16 + 3;
    shape.block_size = 16;
    shape.n_kv_heads = nkv;
    shape.head_dim = hd;
    shape.dtype = c.kv;
    std::uniform_real_distribution<float> scale_dist(0.5f, 2.0f);
    shape.k_scales = {scale_dist(rng), scale_dist(rng)};
    shape.v_scales = {scale_dist(rng), scale_dist(rng)};
    KvCache cache(shape);  // the CPU reference's (zeroed; only the written rows are compared)
    std::vector<int64_t> all_slots(static_cast<size_t>(shape.n_blocks * 16));
    std::iota(all_slots.begin(), all_slots.end(), 0);
    std::shuffle(all_slots.begin(), all_slots.end(), rng);
    std::vector<int64_t> slots(static_cast<size_t>(m));
    for (int64_t t = 0; t < m; ++t) slots[static_cast<size_t>(t)] = t % 4 == 1 ? -1 - t % 3 : all_slots[static_cast<size_t>(t)];
    std::uniform_int_distribution<int64_t> pos_dist(0, 100000);
    std::vector<int64_t> positions(static_cast<size_t>(m));
    for (auto& p : positions) p = pos_dist(rng);

    RopeTable rope;
    rope.rotary_dim = c.rotary_dim;
    rope.interleaved = c.interleaved;
    for (int64_t i = 0; i < c.rotary_dim / 2; ++i)
        rope.inv_freq.push_back(static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(i) / c.rotary_dim)));
    std::uniform_real_distribution<float> w_dist(0.5f, 1.5f);
    std::vector<float> q_norm(static_cast<size_t>(hd)), k_norm(static_cast<size_t>(hd));
    for (auto& w : q_norm) w = w_dist(rng);
    for (auto& w : k_norm) w = w_dist(rng);

    // Inputs; some heads far larger or smaller (the norm's range, FP8 saturation, NVFP4 scale floor).
    auto make = [&](int64_t rows) {
        auto x = test::random_normal(rng, static_cast<size_t>(m * rows * hd), 1.0f);
        for (size_t r = 0; r < x.size() / static_cast<size_t>(hd); ++r) {
            const float f = r % 5 == 2 ? 30.0f : r % 7 == 3 ? 1e-3f : 1.0f;
            for (int64_t d = 0; d < hd; ++d) x[r * static_cast<size_t>(hd) + static_cast<size_t>(d)] *= f;
        }
        return x;
    };
    std::vector<float> q = make(nh), k = make(nkv), v = make(nkv);
    test::DeviceActs dq_fused, dq_unfused, dk_fused, dk_unfused, dv;
    dq_fused.upload(q, c.bf16);  // q, k, v now hold the values the device reads
    dq_unfused.upload(q, c.bf16);
    dk_fused.upload(k, c.bf16);
    dk_unfused.upload(k, c.bf16);
    dv.upload(v, c.bf16);
    const size_t q_bytes = q.size() * (c.bf16 ? 2 : 4);
    const std::vector<uint8_t> q_input = download_bytes(dq_fused.buf, q_bytes);
    auto d_slots = test::upload_vec(slots);
    auto d_pos = test::upload_vec(positions);
    auto d_inv_freq = test::upload_vec(rope.inv_freq);
    auto d_q_norm = test::upload_vec(q_norm), d_k_norm = test::upload_vec(k_norm);

    DeviceCacheLayer fused(cache), unfused(cache);
    cuda::QkvPrepareArgs args{.q = dq_fused.buf.get(),
                              .k = dk_fused.buf.get(),
                              .v = dv.buf.get(),
                              .dtype = act,
                              .m = m,
                              .n_heads = nh,
                              .q_norm_weight = c.qk_norm ? d_q_norm.as<float>() : nullptr,
                              .k_norm_weight = c.qk_norm ? d_k_norm.as<float>() : nullptr,
                              .norm_eps = kNormEps,
                              .positions = d_pos.as<int64_t>(),
                              .inv_freq = d_inv_freq.as<float>(),
                              .rotary_dim = c.rotary_dim,
                              .interleaved = c.interleaved,
                              .slot_mapping = d_slots.as<int64_t>(),
                              .kv = fused.layer};
    // Strided: [m, W] rows of q | k | v | 8 random padding elements (q, k, v: the values the device reads).
    const int64_t width = (nh + 2 * nkv) * hd + 8;
    std::vector<uint8_t> packed_bytes;
    cuda::DeviceBuffer packed;
    test::DeviceOut q_strided_out(q.size(), c.bf16);  // poisoned
    if (c.strided) {
        std::vector<float> rows = test::random_normal(rng, static_cast<size_t>(m * width));
        for (int64_t t = 0; t < m; ++t) {
            float* row = rows.data() + t * width;
            std::copy_n(q.data() + t * nh * hd, nh * hd, row);
            std::copy_n(k.data() + t * nkv * hd, nkv * hd, row + nh * hd);
            std::copy_n(v.data() + t * nkv * hd, nkv * hd, row + (nh + nkv) * hd);
        }
        packed_bytes = test::bytes_of(rows, act);
        packed = cuda::DeviceBuffer(packed_bytes.size());
        packed.upload(packed_bytes.data(), packed_bytes.size());
        const size_t es = dtype_size(act);
        args.q = packed.get();
        args.k = packed.as<uint8_t>() + static_cast<size_t>(nh * hd) * es;
        args.v = packed.as<uint8_t>() + static_cast<size_t>((nh + nkv) * hd) * es;
        args.q_stride = args.k_stride = args.v_stride = width;
        args.q_out = q_strided_out.buf.get();
    }
    cuda::qk_norm_rope_kv_write(args, nullptr);
    if (c.qk_norm) {
        cuda::rmsnorm(dq_unfused.buf.get(), act, m * nh, hd, d_q_norm.as<float>(), kNormEps, dq_unfused.buf.get(),
                      nullptr);
        cuda::rmsnorm(dk_unfused.buf.get(), act, m * nkv, hd, d_k_norm.as<float>(), kNormEps, dk_unfused.buf.get(),
                      nullptr);
    }
    if (c.rotary_dim > 0) {
        cuda::rope_apply(dq_unfused.buf.get(), act, m, nh, hd, d_pos.as<int64_t>(), d_inv_freq.as<float>(),
                         c.rotary_dim, nullptr, c.interleaved);
        cuda::rope_apply(dk_unfused.buf.get(), act, m, nkv, hd, d_pos.as<int64_t>(), d_inv_freq.as<float>(),
                         c.rotary_dim, nullptr, c.interleaved);
    }
    cuda::kv_cache_write(dk_unfused.buf.get(), dv.buf.get(), act, m, d_slots.as<int64_t>(), unfused.layer, nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());

    // (a) The unfused sequence's bytes.
    const std::vector<uint8_t> q_fused = download_bytes(c.strided ? q_strided_out.buf : dq_fused.buf, q_bytes);
    if (c.strided) expect_same_bytes(download_bytes(packed, packed_bytes.size()), packed_bytes, "strided q/k/v input");
    expect_same_bytes(q_fused, download_bytes(dq_unfused.buf, q_bytes), "q");
    if (!c.qk_norm && c.rotary_dim == 0) expect_same_bytes(q_fused, q_input, "q (untouched)");
    const std::vector<uint8_t> kc = fused.download_k(), vc = fused.download_v();
    expect_same_bytes(kc, unfused.download_k(), "K cache");
    expect_same_bytes(vc, unfused.download_v(), "V cache");
    // Padding tokens and unused slots keep the poison (checked on the fused cache's K rows' first byte).
    {
        std::vector<bool> used(static_cast<size_t>(shape.n_blocks * 16), false);
        for (int64_t s : slots)
            if (s >= 0) used[static_cast<size_t>(s)] = true;
        for (int64_t s = 0; s < shape.n_blocks * 16; ++s) {
            if (used[static_cast<size_t>(s)]) continue;
            const size_t at = static_cast<size_t>((s / 16) * shape.block_bytes() + (s % 16) * nkv * shape.row_data_bytes());
            EXPECT_EQ(kc[at], 0xff) << "slot " << s << " (no token) was written";
        }
    }

    // (b) The CPU reference.
    std::vector<double> q_err, k_err, v_err(v.size(), 0.0);
    reference_heads(q, q_err, m, nh, hd, c.qk_norm ? &q_norm : nullptr, rope, positions, c.bf16);
    reference_heads(k, k_err, m, nkv, hd, c.qk_norm ? &k_norm : nullptr, rope, positions, c.bf16);
    {
        test::DeviceOut q_out(q.size(), c.bf16);  // q_fused as floats
        q_out.buf.upload(q_fused.data(), q_bytes);
        test::expect_close(q_out.download(), q, q_err, "q vs CPU");
    }
    const float k_ls = cache.k_layer_scale(kLayer), v_ls = cache.v_layer_scale(kLayer);
    int bad = 0;
    for (int64_t t = 0; t < m; ++t) {
        const int64_t slot = slots[static_cast<size_t>(t)];
        if (slot < 0) continue;
        for (int pass = 0; pass < 2; ++pass) {
            const bool is_v = pass == 1;
            const std::vector<float>& ref = is_v ? v : k;
            const std::vector<double>& err = is_v ? v_err : k_err;
            const float ls = is_v ? v_ls : k_ls;
            const std::vector<uint8_t>& dev = is_v ? vc : kc;
            uint8_t* cpu_block = is_v ? cache.v_block(kLayer, slot / 16) : cache.k_block(kLayer, slot / 16);
            const uint8_t* dev_block = dev.data() + (slot / 16) * shape.block_bytes();
            for (int64_t h = 0; h < nkv; ++h) {
                const size_t base = static_cast<size_t>((t * nkv + h) * hd);
                kv_encode_head(shape, ls, ref.data() + base, cpu_block, slot % 16, h);
                std::vector<float> got(static_cast<size_t>(hd)), want(static_cast<size_t>(hd));
                kv_decode_head(shape, ls, dev_block, slot % 16, h, got.data());
                kv_decode_head(shape, ls, cpu_block, slot % 16, h, want.data());
                for (int64_t d = 0; d < hd; ++d) {
                    const size_t i = base + static_cast<size_t>(d);
                    double amax = 0, group_err = 0;
                    for (int64_t j = d / 16 * 16; j < d / 16 * 16 + 16; ++j) {
                        const size_t ij = base + static_cast<size_t>(j);
                        amax = std::max(amax, std::fabs(static_cast<double>(ref[ij])));
                        group_err = std::max(group_err, err[ij]);
                    }
                    const double tol = cache_tolerance(c.kv, ref[i], err[i], amax, group_err, ls);
                    const double diff = std::fabs(static_cast<double>(got[static_cast<size_t>(d)]) - want[static_cast<size_t>(d)]);
                    if (!(diff <= tol) && ++bad <= 5)
                        ADD_FAILURE() << (is_v ? "V" : "K") << " cache vs CPU: token " << t << " head " << h << " dim "
                                      << d << " got " << got[static_cast<size_t>(d)] << " expected "
                                      << want[static_cast<size_t>(d)] << " (tolerance " << tol << ")";
                }
            }
        }
    }
    EXPECT_EQ(bad, 0) << "cache elements off the CPU reference";
}

std::vector<Case> cases_for(KvDtype kv, int64_t hd, bool bf16) {
    // {qk_norm, interleaved, rotary_dim, n_heads, n_kv_heads, m}
    struct Shape {
        bool qk_norm, interleaved;
        int64_t rotary_dim, n_heads, n_kv_heads, m;
    };
    const int64_t part = hd == 64 ? 24 : hd * 5 / 16;  // rotary_dim / 2 not a multiple of 8 (pairs across lanes)
    const Shape shapes[] = {
        {true, false, hd, 8, 2, 1},        {false, false, hd, 4, 4, 3},      {true, true, hd / 2, 16, 2, 17},
        {false, false, part, 6, 2, 64},    {true, false, part, 8, 1, 3},     {true, false, 0, 8, 1, 17},
        {false, false, 0, 4, 2, 3},        {true, true, hd, 32, 8, 64},      {false, true, part, 2, 2, 17},
    };
    std::vector<Case> out;
    for (const Shape& s : shapes)
        out.push_back({kv, hd, bf16, s.qk_norm, s.interleaved, s.rotary_dim, s.n_heads, s.n_kv_heads, s.m});
    return out;
}

TEST(QkvPrepareCuda, MatchesUnfusedAndCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (KvDtype kv : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4})
        for (int64_t hd : {64, 128})
            for (bool bf16 : {false, true})
                for (Case c : cases_for(kv, hd, bf16))
                    for (bool strided : {false, true}) {
                        c.strided = strided;
                        run_case(rng, c);
                        if (::testing::Test::HasFatalFailure()) return;
                    }
}

TEST(QkvPrepareCuda, OtherHeadDims) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (KvDtype kv : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4})
        for (bool bf16 : {false, true}) {
            run_case(rng, {kv, 96, bf16, true, false, 96, 4, 2, 5});
            run_case(rng, {kv, 96, bf16, true, true, 32, 4, 1, 3});
            run_case(rng, {kv, 256, bf16, true, false, 256, 8, 2, 17});
            run_case(rng, {kv, 256, bf16, false, true, 64, 4, 4, 3});
            // The golden fixtures' head_dim 16 (2 lanes a row, one NVFP4 group) and 32, and 48 (3 groups).
            run_case(rng, {kv, 16, bf16, true, false, 16, 4, 2, 40});
            run_case(rng, {kv, 16, bf16, false, true, 8, 4, 1, 3});
            run_case(rng, {kv, 16, bf16, false, false, 0, 4, 2, 17});  // KV write alone (NemotronH)
            run_case(rng, {kv, 32, bf16, true, false, 32, 4, 2, 17});
            run_case(rng, {kv, 32, bf16, true, true, 16, 8, 2, 3});
            run_case(rng, {kv, 48, bf16, true, false, 48, 4, 2, 5});
            run_case(rng, {kv, 16, bf16, false, false, 0, 4, 2, 17, true});  // strided q copied to q_out
            run_case(rng, {kv, 256, bf16, true, true, 64, 4, 2, 5, true});
        }
}

TEST(QkvPrepareCuda, RejectsUnsupportedArguments) {
    // Checked on the host before any launch: no device needed.
    cuda::QkvPrepareArgs a;
    a.m = 1;
    a.n_heads = 4;
    a.kv.n_kv_heads = 2;
    a.kv.head_dim = 128;
    a.kv.dtype = KvDtype::Bf16;
    a.rotary_dim = 128;
    auto expect_throw = [](const cuda::QkvPrepareArgs& bad, const char* what) {
        EXPECT_THROW(cuda::qk_norm_rope_kv_write(bad, nullptr), std::invalid_argument) << what;
    };
    cuda::QkvPrepareArgs bad = a;
    bad.dtype = DType::F16;
    expect_throw(bad, "F16 activations");
    bad = a;
    bad.kv.dtype = KvDtype::F32;
    expect_throw(bad, "F32 cache");
    bad = a;
    bad.kv.head_dim = 40;
    bad.rotary_dim = 40;
    expect_throw(bad, "head_dim 40");
    bad = a;
    bad.kv.head_dim = 512;
    bad.rotary_dim = 0;
    expect_throw(bad, "head_dim 512");
    bad = a;
    bad.rotary_dim = 12;
    expect_throw(bad, "rotary_dim 12");
    bad = a;
    bad.rotary_dim = 136;
    expect_throw(bad, "rotary_dim > head_dim");
    bad = a;
    bad.n_heads = 0;
    expect_throw(bad, "no heads");
    bad = a;
    bad.q_stride = 4 * 128 - 8;
    expect_throw(bad, "q_stride below the row");
    bad = a;
    bad.k_stride = 2 * 128 + 4;
    expect_throw(bad, "k_stride not a multiple of 8");
    bad = a;
    bad.v_stride = -8;
    expect_throw(bad, "negative v_stride");
    bad = a;
    bad.q_out = reinterpret_cast<void*>(uintptr_t{0x1008});
    expect_throw(bad, "q_out misaligned");
    EXPECT_TRUE(cuda::qkv_prepare_supported(128, 64));
    EXPECT_FALSE(cuda::qkv_prepare_supported(128, 60));
    EXPECT_FALSE(cuda::qkv_prepare_supported(320, 64));
    EXPECT_TRUE(cuda::qkv_prepare_supported(16, 16));
    EXPECT_FALSE(cuda::qkv_prepare_supported(24, 8));
}

}  // namespace
}  // namespace nibble
