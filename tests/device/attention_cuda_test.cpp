// Device tests of the paged-KV-cache kernels (ops/attention/attention_cuda.h) against the CPU references
// kv_cache_write_cpu and paged_attention_cpu, on fresh random inputs, block tables shuffled, for the BF16,
// FP8 and NVFP4 caches:
//  - the KV write is compared byte for byte with the CPU cache (whose codecs are proven bit-exact with
//    cuda_fp8.h / cuda_fp4.h's host conversions by tests/tensor), including a sweep of the E2M1 ties;
//  - attention (decode with split-K, prefill with causal mask, start_pos > 0 and sliding window) is compared
//    element-wise with a tolerance derived per element below, the cache contents being the same bytes.
//    Decode with GQA <= 8 runs the tensor-core decode kernel; prefill with BF16 q (>= 16 rows of query
//    tokens x group) the tensor-core prefill kernel; decode with GQA 16/32 and prefill with F32 q the
//    CUDA-core one. head_dim 16, 32 and 256 (no tensor-core kernels) take the CUDA-core kernel everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "cuda/device_info.h"
#include "device_test_util.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_cuda.h"
#include "ops/attention/kv_cache.h"

namespace nibble {
namespace {

using test::kEpsBf16;
using test::kEpsF32;

constexpr int64_t kLayer = 1;  // of 2: the per-layer offset and scales are exercised

template <class T>
cuda::DeviceBuffer upload_vec(const std::vector<T>& v) {
    cuda::DeviceBuffer b(std::max<size_t>(1, v.size() * sizeof(T)));
    if (!v.empty()) b.upload(v.data(), v.size() * sizeof(T));
    return b;
}

KvCacheShape make_shape(std::mt19937_64& rng, KvDtype dtype, int64_t n_blocks, int64_t n_kv_heads,
                        int64_t head_dim, float scale_lo, float scale_hi, int64_t block_size = 16) {
    KvCacheShape s;
    s.n_layers = 2;
    s.n_blocks = n_blocks;
    s.block_size = block_size;
    s.n_kv_heads = n_kv_heads;
    s.head_dim = head_dim;
    s.dtype = dtype;
    std::uniform_real_distribution<float> sc(scale_lo, scale_hi);
    s.k_scales = {sc(rng), sc(rng)};
    s.v_scales = {sc(rng), sc(rng)};
    return s;
}

// The device copy of one layer of a host cache (same bytes).
struct DeviceLayer {
    cuda::DeviceBuffer k, v;
    cuda::PagedKvLayer layer;
    DeviceLayer(const KvCache& cache, int64_t l) {
        const auto& s = cache.shape();
        const size_t bytes = static_cast<size_t>(s.n_blocks * s.block_bytes());
        k = cuda::DeviceBuffer(bytes);
        v = cuda::DeviceBuffer(bytes);
        k.upload(cache.k_block(l, 0), bytes);
        v.upload(cache.v_block(l, 0), bytes);
        layer = {k.as<uint8_t>(), v.as<uint8_t>(), s.n_blocks, s.block_bytes(), s.block_size, s.n_kv_heads,
                 s.head_dim, s.dtype, cache.k_layer_scale(l), cache.v_layer_scale(l)};
    }
};

std::vector<int32_t> shuffled_blocks(std::mt19937_64& rng, int64_t n) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    return ids;
}

// ---------------------------------------------------------------- KV write

void expect_same_bytes(const cuda::DeviceBuffer& dev, const uint8_t* host, size_t n, const std::string& what) {
    std::vector<uint8_t> got(n);
    dev.download(got.data(), n);
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
        if (got[i] != host[i] && ++bad <= 5)
            ADD_FAILURE() << what << ": byte " << i << " is 0x" << std::hex << int(got[i]) << ", the CPU wrote 0x"
                          << int(host[i]) << std::dec;
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << n << " bytes differ";
}

// Writes K/V of several sequences (new tokens after already-cached ones) through shuffled block tables on both
// sides, plus padding tokens with slot -1, and compares the layer's whole K and V areas byte for byte.
// `special` replaces the random inputs by groups of 16 that start with +-6 (so with kv_scale 6 the NVFP4
// group scale is exactly 1 and every other element is encoded as e2m1(x) itself) followed by the E2M1
// midpoints, their float neighbours, signed zeros, tiny values and random values in [-6, 6].
void kv_write_case(std::mt19937_64& rng, KvDtype dtype, int64_t head_dim, int64_t n_kv_heads, bool bf16_in,
                   float scale_lo, float scale_hi, bool special) {
    SCOPED_TRACE(std::string("kv write ") + std::string(kv_dtype_name(dtype)) + " hd=" + std::to_string(head_dim) +
                 " nkv=" + std::to_string(n_kv_heads) + (bf16_in ? " bf16" : " f32") + (special ? " special" : ""));
    const std::vector<std::pair<int64_t, int64_t>> seqs = {{0, 37}, {16, 1}, {5, 300}, {100, 16}};  // (start, n)
    int64_t n_blocks = 8;
    for (auto [st, n] : seqs) n_blocks += (st + n + 15) / 16;
    KvCache cache(make_shape(rng, dtype, n_blocks, n_kv_heads, head_dim, scale_lo, scale_hi));
    const int64_t row = n_kv_heads * head_dim;
    const auto ids = shuffled_blocks(rng, n_blocks);

    std::vector<float> special_vals;
    for (float t : {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f}) {
        for (float x : {t, std::nextafter(t, 0.0f), std::nextafter(t, 10.0f)}) {
            special_vals.push_back(x);
            special_vals.push_back(-x);
        }
    }
    for (float x : {0.0f, -0.0f, 1e-30f, -1e-42f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -6.0f, 5.999f})
        special_vals.push_back(x);
    auto make_input = [&](int64_t n) {
        auto x = test::random_normal(rng, static_cast<size_t>(n * row), 1.0f);
        if (special) {
            std::uniform_real_distribution<float> uni(-6.0f, 6.0f);
            std::uniform_int_distribution<size_t> pick(0, special_vals.size() - 1);
            for (size_t i = 0; i < x.size(); ++i)
                x[i] = i % 16 == 0 ? (i % 32 == 0 ? 6.0f : -6.0f) : (i % 3 == 0 ? uni(rng) : special_vals[pick(rng)]);
        } else {
            // Some rows far smaller (E4M3 scale underflow to its floor) and some larger (saturation).
            for (size_t r = 0; r < x.size() / static_cast<size_t>(head_dim); ++r) {
                const float f = r % 7 == 3 ? 1e-6f : r % 7 == 5 ? 300.0f : 1.0f;
                for (int64_t d = 0; d < head_dim; ++d) x[r * static_cast<size_t>(head_dim) + d] *= f;
            }
        }
        if (bf16_in)
            for (auto& v : x) v = test::round_bf16(v);
        return x;
    };

    // Tokens already cached (before the device copy), written by the CPU only.
    std::vector<std::vector<int32_t>> tables;
    size_t next = 0;
    for (auto [st, n] : seqs) {
        const int64_t nb = (st + n + 15) / 16;
        tables.emplace_back(ids.begin() + static_cast<ptrdiff_t>(next), ids.begin() + static_cast<ptrdiff_t>(next + nb));
        next += static_cast<size_t>(nb);
        if (st > 0) {
            const auto k = make_input(st), v = make_input(st);
            kv_cache_write_cpu(cache, kLayer, SequenceKv{tables.back().data(), nb, 0}, st, k.data(), v.data());
        }
    }
    DeviceLayer dev(cache, kLayer);

    // The new tokens: all sequences' rows back to back, with two padding rows (slot -1) in between.
    std::vector<float> all_k, all_v;
    std::vector<int64_t> slots;
    for (size_t s = 0; s < seqs.size(); ++s) {
        auto [st, n] = seqs[s];
        const auto k = make_input(n), v = make_input(n);
        kv_cache_write_cpu(cache, kLayer, SequenceKv{tables[s].data(), static_cast<int64_t>(tables[s].size()), st}, n,
                           k.data(), v.data());
        all_k.insert(all_k.end(), k.begin(), k.end());
        all_v.insert(all_v.end(), v.begin(), v.end());
        for (int64_t i = 0; i < n; ++i) {
            const int64_t pos = st + i;
            slots.push_back(static_cast<int64_t>(tables[s][static_cast<size_t>(pos / 16)]) * 16 + pos % 16);
        }
        const auto pad = make_input(1);
        all_k.insert(all_k.end(), pad.begin(), pad.end());
        all_v.insert(all_v.end(), pad.begin(), pad.end());
        slots.push_back(-1);
    }
    const int64_t n_tokens = static_cast<int64_t>(slots.size());
    test::DeviceActs dk, dv;
    dk.upload(all_k, bf16_in);
    dv.upload(all_v, bf16_in);
    auto dslots = upload_vec(slots);
    cuda::kv_cache_write(dk.buf.get(), dv.buf.get(), bf16_in ? DType::BF16 : DType::F32, n_tokens,
                         dslots.as<int64_t>(), dev.layer, nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    const size_t bytes = static_cast<size_t>(n_blocks * cache.shape().block_bytes());
    expect_same_bytes(dev.k, cache.k_block(kLayer, 0), bytes, "K cache");
    expect_same_bytes(dev.v, cache.v_block(kLayer, 0), bytes, "V cache");
}

TEST(KvCacheWriteCuda, MatchesCpuByteForByte) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4})
        for (int64_t hd : {64, 128})
            for (bool bf16 : {false, true}) {
                kv_write_case(rng, dt, hd, hd == 64 ? 2 : 8, bf16, 0.5f, 2.0f, false);
                // Small kv_scale: FP8 saturates at 448, NVFP4 group scales saturate.
                kv_write_case(rng, dt, hd, 3, bf16, 0.002f, 0.004f, false);
            }
}

// Head sizes off the 64/128 of the served models: 16 (the golden fixtures'; an NVFP4 row is 8 bytes, one
// group, one scale byte), 32 and 256; odd KV head counts so rows and the NVFP4 scale area are not 16-byte
// multiples of each other.
TEST(KvCacheWriteCuda, OtherHeadDimsMatchCpuByteForByte) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4})
        for (int64_t hd : {16, 32, 256})
            for (bool bf16 : {false, true}) {
                kv_write_case(rng, dt, hd, 2, bf16, 0.5f, 2.0f, false);
                kv_write_case(rng, dt, hd, 3, bf16, 0.002f, 0.004f, false);
            }
    for (int64_t hd : {16, 32}) kv_write_case(rng, KvDtype::Nvfp4, hd, 1, false, 6.0f, 6.0f, true);
}

// A one-block BF16 cache layer of one KV head with no memory behind it: enough for the argument checks, which
// refuse a bad head_dim before anything is launched.
cuda::PagedKvLayer unlaunched_layer(int64_t head_dim) {
    cuda::PagedKvLayer kv{};
    kv.n_blocks = 1;
    kv.block_bytes = 1024;
    kv.n_kv_heads = 1;
    kv.head_dim = head_dim;
    kv.dtype = KvDtype::Bf16;
    return kv;
}

// head_dim not a multiple of 16 is refused by name before anything is launched (no device memory is read).
TEST(KvCacheWriteCuda, RejectsUnsupportedHeadDim) {
    for (int64_t hd : {0, 8, 24, 40}) {
        const cuda::PagedKvLayer kv = unlaunched_layer(hd);
        try {
            cuda::kv_cache_write(nullptr, nullptr, DType::F32, 1, nullptr, kv, nullptr);
            ADD_FAILURE() << "head_dim " << hd << " accepted";
        } catch (const std::invalid_argument& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find("kv_cache_write"), std::string::npos) << what;
            EXPECT_NE(what.find("head_dim " + std::to_string(hd)), std::string::npos) << what;
        }
    }
}

TEST(KvCacheWriteCuda, Nvfp4RoundsE2m1TiesToEven) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    for (bool bf16 : {false, true}) kv_write_case(rng, KvDtype::Nvfp4, 128, 4, bf16, 6.0f, 6.0f, true);
}

// ---------------------------------------------------------------- attention

struct SeqSpec {
    int64_t kv_len;  // tokens in the cache including the new ones
    int64_t n_q;     // new (query) tokens, the last n_q positions
};

struct AttnCase {
    KvDtype dtype;
    int64_t n_heads, n_kv_heads, head_dim;
    bool bf16;
    int64_t sliding_window;
    std::vector<SeqSpec> seqs;
    int n_splits = 0;  // 0: the launcher's choice (paged_attention_splits by keys); -1: its by-bytes overload
    cuda::DecodeKernel decode_kernel = cuda::DecodeKernel::Auto;
    cuda::PrefillKernel prefill_kernel = cuda::PrefillKernel::Auto;
    int64_t block_size =
        16;  // tokens a cache block (the kernels shift for powers of two and divide otherwise)
};

// Tolerance of one output element o_d of one (token, head) row, derived from float32 arithmetic on both sides
// (u = 2^-24). Notation: exact scores s_j = scale q.k_j over the attended keys, w_j = exp(s_j - max),
// l = sum w_j, a_j = scale sum_d |q_d k_jd|.
//  * Score errors. CPU: float dot (hd roundings, <= hd u a_j) and the product by scale. Device, CUDA-core
//    kernel: q times scale * k_layer_scale * log2(e) (3 roundings in the factor, 1 in q), the float dot
//    (hd u a_j), the raw K instead of the CPU's rounded dequantized K (u a_j), exp2 of a rounded difference
//    (u |s_j - m| with |s_j - m| <= a_j + a_max, exp2f 2 ulp). Tensor-core decode kernel: q as hi + lo BF16
//    parts (|q - hi - lo| <= 2^-18 |q| = 64 u |q|; fp16 parts are closer), exact products, fp32 sums in the
//    mma taken as <= 2 u per addition (2 hd u a_j: Hopper's fp32 accumulation need not round to nearest).
//    Per key, covering both: delta_j <= 1.5 u ((3 hd + 80) a_j + 2 a_max + 8) (1.5 covers log2(e)).
//    A perturbation delta_j of each score moves the output by
//    sum_j (w_j / l) |e^delta_j - 1| |v_jd - o_d| / e^-max(delta) <= 1.01 sum_j (w_j / l) delta_j |v_jd - o_d|.
//  * Accumulation on the device: the P.V sum runs in key order within each split (an fma chain, or 16-key
//    mma steps at <= 2 u an addition), so its rounding error is <= 2 u sum_k |T_k| / l with T_k the running
//    sum of w_j v_jd from the split's first key (computed here in that order); P as hi + lo parts in the mma
//    (64 u a weight), sums inside an mma step (<= 32 u), the per-tile rescales, the l sum (tiles + a warp
//    tree), the combine over warps and splits, the layer scale, the division:
//    <= (2 tiles + splits + 160) u sum_j (w_j / l) |v_jd|.
//  * The CPU accumulates in double: u |o_d| for its final rounding.
//  * Tensor-core prefill kernel: P goes into the P.V mma rounded to 16 bits (relative p_rel: BF16 2^-8 for the
//    BF16 cache, fp16 2^-11 for FP8/NVFP4; plus p_abs below the format's normal range: fp16 subnormals are
//    2^-24 apart, so 2^-25 in units of the row's final max, which only shrinks the running max's values;
//    for BF16 2^-125 covers the exp2 flushing results below 2^-126 to zero)
//    while l sums the fp32 P: <= sum_j (p_rel w_j / l + p_abs / l) |v_jd|. q is exact in the BF16 mma; for
//    the fp16 mma it is converted BF16 -> fp16, exact except below 2^-14 (fp16 subnormals, error <= 2^-25):
//    each score moves by <= q_abs scale sum_d |k_jd|, added to delta_j.
// The tolerance is 1.2x their sum; BF16 output adds one BF16 rounding.
struct RowRef {
    std::vector<double> o, tol;
};

// Rounding of P and q in the prefill kernel's 16-bit mma (zeros for the other kernels).
struct MmaRounding {
    double p_rel = 0, p_abs = 0, q_abs = 0;
};

RowRef row_tolerance(const float* q, const float* k, const float* v, int64_t hd, int64_t first, int64_t last,
                     float scale, int64_t keys_per_split, int n_splits, const MmaRounding& mr) {
    const int64_t n = last - first + 1;
    std::vector<double> s(static_cast<size_t>(n)), a(static_cast<size_t>(n)), ksum(static_cast<size_t>(n));
    double m = -INFINITY, a_max = 0;
    for (int64_t j = 0; j < n; ++j) {
        const float* kj = k + (first + j) * hd;
        double dot = 0, abs = 0, kabs = 0;
        for (int64_t d = 0; d < hd; ++d) {
            dot += static_cast<double>(q[d]) * kj[d];
            abs += std::fabs(static_cast<double>(q[d]) * kj[d]);
            kabs += std::fabs(static_cast<double>(kj[d]));
        }
        s[static_cast<size_t>(j)] = dot * scale;
        a[static_cast<size_t>(j)] = abs * scale;
        ksum[static_cast<size_t>(j)] = kabs * std::fabs(scale);
        m = std::max(m, s[static_cast<size_t>(j)]);
        a_max = std::max(a_max, abs * scale);
    }
    double l = 0;
    for (auto& x : s) l += (x = std::exp(x - m));
    RowRef r;
    r.o.assign(static_cast<size_t>(hd), 0.0);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < hd; ++d)
            r.o[static_cast<size_t>(d)] += s[static_cast<size_t>(j)] / l * v[static_cast<size_t>((first + j) * hd + d)];
    // Tiles of 32 keys in each split ([z * keys_per_split, (z + 1) * keys_per_split) intersected with the range).
    const int64_t tiles = (n + 31) / 32 + n_splits;
    std::vector<double> e_score(static_cast<size_t>(hd), 0.0), sum_abs(static_cast<size_t>(hd), 0.0),
        prefix(static_cast<size_t>(hd), 0.0), run(static_cast<size_t>(hd), 0.0), e_p(static_cast<size_t>(hd), 0.0);
    for (int64_t j = 0; j < n; ++j) {
        const int64_t key = first + j;
        if (key % keys_per_split == 0) std::fill(run.begin(), run.end(), 0.0);
        const double w = s[static_cast<size_t>(j)] / l;
        const double delta = 1.5 * kEpsF32 * ((3.0 * hd + 80) * a[static_cast<size_t>(j)] + 2 * a_max + 8) +
                             mr.q_abs * ksum[static_cast<size_t>(j)];
        const double p_err = mr.p_rel * w + mr.p_abs / l;
        for (int64_t d = 0; d < hd; ++d) {
            const double vj = v[static_cast<size_t>(key * hd + d)];
            e_score[static_cast<size_t>(d)] += w * delta * std::fabs(vj - r.o[static_cast<size_t>(d)]);
            e_p[static_cast<size_t>(d)] += p_err * std::fabs(vj);
            sum_abs[static_cast<size_t>(d)] += w * std::fabs(vj);
            run[static_cast<size_t>(d)] += w * vj;
            prefix[static_cast<size_t>(d)] += std::fabs(run[static_cast<size_t>(d)]);
        }
    }
    r.tol.resize(static_cast<size_t>(hd));
    for (int64_t d = 0; d < hd; ++d) {
        const size_t i = static_cast<size_t>(d);
        r.tol[i] = 1.2 * (1.01 * e_score[i] + e_p[i] + 2 * kEpsF32 * prefix[i] +
                          (2.0 * tiles + n_splits + 160) * kEpsF32 * sum_abs[i] + kEpsF32 * std::fabs(r.o[i]));
    }
    return r;
}

void attention_case(ThreadPool& pool, std::mt19937_64& rng, const AttnCase& c) {
    const char* kernel_name = c.decode_kernel == cuda::DecodeKernel::Mma           ? " decode=mma"
                              : c.decode_kernel == cuda::DecodeKernel::Pipelined   ? " decode=pipelined"
                              : c.decode_kernel == cuda::DecodeKernel::Pipelined16 ? " decode=pipelined16"
                                                                                   : "";
    std::string name =
        std::string(kv_dtype_name(c.dtype)) + kernel_name + " heads=" + std::to_string(c.n_heads) + "/" +
        std::to_string(c.n_kv_heads) + " hd=" + std::to_string(c.head_dim) + (c.bf16 ? " bf16" : " f32") +
        " window=" + std::to_string(c.sliding_window) + " block=" + std::to_string(c.block_size) + " seqs=";
    for (const auto& s : c.seqs) name += std::to_string(s.kv_len) + "/" + std::to_string(s.n_q) + " ";
    SCOPED_TRACE(name);
    const int64_t hd = c.head_dim, nkv = c.n_kv_heads, group = c.n_heads / nkv, bs = c.block_size;
    int64_t n_blocks = 3, max_blocks = 1, max_q = 1, max_kv = 1, n_tokens = 0;
    for (const auto& s : c.seqs) {
        n_blocks += (s.kv_len + bs - 1) / bs;
        max_blocks = std::max(max_blocks, (s.kv_len + bs - 1) / bs);
        max_q = std::max(max_q, s.n_q);
        max_kv = std::max(max_kv, s.kv_len);
        n_tokens += s.n_q;
    }
    KvCache cache(make_shape(rng, c.dtype, n_blocks, nkv, hd, 0.5f, 2.0f, bs));
    const auto ids = shuffled_blocks(rng, n_blocks);
    std::vector<int32_t> tables(static_cast<size_t>(c.seqs.size() * max_blocks), 0);
    std::vector<int32_t> q_start{0}, start_pos;
    // Dequantized K/V per sequence, [kv_len, nkv, hd] (what the CPU reference reads), for the tolerances.
    std::vector<std::vector<float>> kd(c.seqs.size()), vd(c.seqs.size());
    size_t next = 0;
    for (size_t si = 0; si < c.seqs.size(); ++si) {
        const auto& s = c.seqs[si];
        const int64_t nb = (s.kv_len + bs - 1) / bs;
        int32_t* table = tables.data() + si * static_cast<size_t>(max_blocks);
        for (int64_t b = 0; b < nb; ++b) table[b] = ids[next++];
        const auto k = test::random_normal(rng, static_cast<size_t>(s.kv_len * nkv * hd));
        const auto v = test::random_normal(rng, static_cast<size_t>(s.kv_len * nkv * hd));
        kv_cache_write_cpu(cache, kLayer, SequenceKv{table, nb, 0}, s.kv_len, k.data(), v.data());
        q_start.push_back(q_start.back() + static_cast<int32_t>(s.n_q));
        start_pos.push_back(static_cast<int32_t>(s.kv_len - s.n_q));
        // Per KV head, contiguous [kv_len, hd].
        kd[si].resize(k.size());
        vd[si].resize(v.size());
        for (int64_t j = 0; j < s.kv_len; ++j)
            for (int64_t h = 0; h < nkv; ++h) {
                const int32_t blk = table[j / bs];
                const size_t dst = static_cast<size_t>((h * s.kv_len + j) * hd);
                kv_decode_head(cache.shape(), cache.k_layer_scale(kLayer), cache.k_block(kLayer, blk), j % bs,
                               h, kd[si].data() + dst);
                kv_decode_head(cache.shape(), cache.v_layer_scale(kLayer), cache.v_block(kLayer, blk), j % bs,
                               h, vd[si].data() + dst);
            }
    }
    DeviceLayer dev(cache, kLayer);

    auto q = test::random_normal(rng, static_cast<size_t>(n_tokens * c.n_heads * hd));
    test::DeviceActs dq;
    dq.upload(q, c.bf16);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

    // CPU reference, one sequence at a time.
    std::vector<float> ref(q.size());
    AttentionParams params{c.n_heads, nkv, hd, scale, c.sliding_window};
    for (size_t si = 0; si < c.seqs.size(); ++si) {
        const size_t off = static_cast<size_t>(q_start[si] * c.n_heads * hd);
        paged_attention_cpu(pool, q.data() + off, c.seqs[si].n_q, cache, kLayer,
                            SequenceKv{tables.data() + si * static_cast<size_t>(max_blocks), max_blocks, start_pos[si]},
                            params, ref.data() + off);
    }

    auto d_qs = upload_vec(q_start), d_sp = upload_vec(start_pos), d_bt = upload_vec(tables);
    cuda::AttentionBatch batch{static_cast<int64_t>(c.seqs.size()), n_tokens, d_qs.as<int32_t>(), d_sp.as<int32_t>(),
                               d_bt.as<int32_t>(), max_blocks, max_q, max_kv};
    const int sm_count = cuda::query_device(0).sm_count;
    const int splits = c.n_splits > 0    ? c.n_splits
                       : c.n_splits == 0 ? cuda::paged_attention_splits(batch, nkv, c.n_heads, sm_count)
                                         : cuda::paged_attention_splits(batch, dev.layer, c.n_heads, sm_count);
    ASSERT_GE(splits, 1);
    const size_t ws_bytes = cuda::paged_attention_workspace_bytes(splits, n_tokens, c.n_heads, hd);
    cuda::DeviceBuffer ws(std::max<size_t>(ws_bytes, 16));
    ws.fill_bytes(0xff);
    test::DeviceOut out(q.size(), c.bf16);
    cuda::paged_attention(
        dq.buf.get(), c.bf16 ? DType::BF16 : DType::F32, dev.layer, batch,
        cuda::AttentionArgs{c.n_heads, scale, c.sliding_window, c.decode_kernel, c.prefill_kernel}, splits,
        ws.get(), ws_bytes, out.buf.get(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());

    // Which kernel runs (attention_cuda.cu): the tensor-core prefill kernel for BF16 q with >= 16 rows of
    // query tokens x group in some sequence. Its split boundaries: ceil(max_kv / splits) rounded up to its
    // 64-key tile (32 for the other kernels).
    const bool tc_prefill = (hd == 64 || hd == 128) && c.bf16 && max_q > 1 && max_q * group >= 16;
    const int64_t align = tc_prefill ? 64 : 32;
    const int64_t per = (max_kv + splits - 1) / splits;
    const int64_t keys_per_split = std::max<int64_t>(align, (per + align - 1) / align * align);
    MmaRounding mr;
    if (tc_prefill && c.dtype == KvDtype::Bf16) mr = {kEpsBf16, 0x1p-125, 0.0};  // P < 2^-126 may flush to 0
    if (tc_prefill && c.dtype != KvDtype::Bf16) mr = {0x1p-11, 0x1p-25, 0x1p-25};
    std::vector<double> tol(q.size());
    const int64_t rows = n_tokens * c.n_heads;
    pool.parallel_for(static_cast<size_t>(rows), 1, [&](size_t begin, size_t end) {
        for (size_t rr = begin; rr < end; ++rr) {
            const int64_t token = static_cast<int64_t>(rr) / c.n_heads, head = static_cast<int64_t>(rr) % c.n_heads;
            size_t si = 0;
            while (q_start[si + 1] <= token) ++si;
            const auto& s = c.seqs[si];
            const int64_t pos = start_pos[si] + (token - q_start[si]);
            const int64_t first = c.sliding_window > 0 ? std::max<int64_t>(0, pos - c.sliding_window + 1) : 0;
            const int64_t kvh = head / group;
            // Views of this KV head's keys: [kv_len, hd].
            const float* kh = kd[si].data() + kvh * s.kv_len * hd;
            const float* vh = vd[si].data() + kvh * s.kv_len * hd;
            const RowRef r = row_tolerance(q.data() + rr * static_cast<size_t>(hd), kh, vh, hd, first, pos, scale,
                                           keys_per_split, splits, mr);
            for (int64_t d = 0; d < hd; ++d) {
                const size_t i = rr * static_cast<size_t>(hd) + static_cast<size_t>(d);
                const double fp = r.tol[static_cast<size_t>(d)];
                tol[i] = c.bf16 ? fp + kEpsBf16 * (std::fabs(ref[i]) + fp) : fp;
            }
        }
    });
    std::printf("[  detail  ] %s splits=%d%s\n", name.c_str(), splits, tc_prefill ? " (tensor-core prefill)" : "");
    test::expect_close(out.download(), ref, tol, "paged attention " + name);
}

TEST(PagedAttentionCuda, DecodeMatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const std::vector<SeqSpec> seqs = {{1, 1}, {17, 1}, {300, 1}, {2000, 1}, {4097, 1}, {33, 1}};
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
        attention_case(pool, rng, {dt, 32, 8, 128, true, 0, seqs});   // GQA 4
        attention_case(pool, rng, {dt, 16, 2, 64, false, 0, seqs});   // GQA 8
        attention_case(pool, rng, {dt, 4, 4, 128, false, 0, seqs});   // GQA 1
        attention_case(pool, rng, {dt, 32, 4, 64, true, 100, seqs});  // sliding window
        attention_case(pool, rng, {dt, 32, 2, 128, false, 0, seqs});  // GQA 16: the CUDA-core kernel
        attention_case(
            pool, rng,  // the CUDA-core kernel over blocks of 12 tokens (divided, not shifted)
            {dt, 32, 2, 128, false, 0, seqs, 0, cuda::DecodeKernel::Auto, cuda::PrefillKernel::Auto, 12});
    }
}

TEST(PagedAttentionCuda, LongDecodeSplitK) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4})
        attention_case(pool, rng, {dt, 32, 8, 128, true, 0, {{32768, 1}, {20001, 1}}});
    // An explicit split count that leaves some splits without keys for the short sequence.
    attention_case(pool, rng, {KvDtype::Nvfp4, 16, 2, 128, false, 0, {{9000, 1}, {40, 1}}, 37});
}

// The tensor-core decode kernels (the pipelined one, Auto's choice for FP8/NVFP4, its 16-key-step NVFP4
// variant Pipelined16, and the older Mma one; a BF16 cache asked for a pipelined one runs Mma), on batches of one-token sequences of different lengths: 1,
// lengths off the 16-key block, the 16/32-key warp steps and the 64/128-key CTA steps, a sequence shorter
// than one warp step next to long ones; GQA 1, 4 and 8 (and 2: rows 2..7 of the mma unused); head_dim 64
// and 128; F32 and BF16 q/out; sliding windows shorter and longer than a warp step; explicit split counts
// leaving many splits without keys; the splits-by-bytes overload.
TEST(PagedAttentionCuda, DecodeKernelsMatchCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const std::vector<SeqSpec> batch = {{1, 1},   {2, 1},   {17, 1},  {31, 1},   {33, 1},  {65, 1},
                                        {129, 1}, {300, 1}, {1000, 1}, {2049, 1}, {4097, 1}};
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
        for (cuda::DecodeKernel dk :
             {cuda::DecodeKernel::Mma, cuda::DecodeKernel::Pipelined, cuda::DecodeKernel::Pipelined16}) {
            attention_case(pool, rng, {dt, 32, 8, 128, true, 0, batch, 0, dk});     // GQA 4
            attention_case(pool, rng, {dt, 32, 8, 128, false, 0, batch, -1, dk});   // GQA 4, F32, by bytes
            attention_case(pool, rng, {dt, 16, 2, 64, false, 0, batch, 0, dk});     // GQA 8, head_dim 64
            attention_case(pool, rng, {dt, 64, 8, 128, true, 0, batch, -1, dk});    // GQA 8
            attention_case(pool, rng, {dt, 8, 8, 64, true, 0, batch, 0, dk});       // GQA 1, head_dim 64
            attention_case(pool, rng, {dt, 4, 4, 128, false, 0, batch, 0, dk});     // GQA 1
            attention_case(pool, rng, {dt, 8, 4, 128, true, 0, batch, 5, dk});      // GQA 2, 5 splits
            attention_case(pool, rng, {dt, 32, 4, 64, true, 100, batch, 0, dk});    // window > warp step
            attention_case(pool, rng, {dt, 16, 4, 128, false, 13, batch, 0, dk});   // window < warp step
            attention_case(pool, rng, {dt, 16, 2, 128, true, 0, {{9000, 1}, {40, 1}, {1, 1}}, 37, dk});  // empty splits
            attention_case(pool, rng, {dt, 32, 8, 64, false, 0, {{5000, 1}, {3, 1}}, 200, dk});  // 25-key splits
            // Other block sizes: a larger power of two (shift and mask) and one that is not (division).
            for (int64_t bs : {64, 12})
                attention_case(pool, rng,
                               {dt, 32, 8, 128, true, 0, batch, 0, dk, cuda::PrefillKernel::Auto, bs});
        }
    }
}

// The decode split count (a host function), within 1..256. Up to 8192 keys (latency-bound, by CTAs and keys):
// at least 64 CTAs when every split can keep >= 48 keys, never fewer than 48 keys a split, at most one wave
// of resident CTAs beyond that floor. Longer caches (by bytes): every split reads >= 64 KiB of K + V unless
// there is one split. Everywhere a smaller cache dtype gets at most 4x BF16's count at the same shape, and
// prefill fills the resident slots of the kernel PrefillKernel::Auto runs for the dtype. Pointers are not
// read.
TEST(PagedAttentionCuda, DecodeSplitsByBytes) {
    for (int sm_count : {78, 132}) {
        for (int64_t n_seqs : {1, 3, 8, 32}) {
            for (int64_t depth : {100, 576, 1024, 4096, 8192, 65536, 131072}) {
                cuda::AttentionBatch b{n_seqs, n_seqs, nullptr, nullptr, nullptr, (depth + 15) / 16, 1, depth};
                int bf16_splits = 0;
                for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
                    const int64_t row = dt == KvDtype::Bf16 ? 256 : dt == KvDtype::Fp8 ? 128 : 72;
                    cuda::PagedKvLayer kv{};
                    kv.n_kv_heads = 8;
                    kv.head_dim = 128;
                    kv.dtype = dt;
                    const int s = cuda::paged_attention_splits(b, kv, 32, sm_count);
                    SCOPED_TRACE(std::string(kv_dtype_name(dt)) + " seqs=" + std::to_string(n_seqs) +
                                 " depth=" + std::to_string(depth) + " sms=" + std::to_string(sm_count));
                    EXPECT_GE(s, 1);
                    EXPECT_LE(s, 256);
                    const int64_t ctas = n_seqs * 8;
                    if (depth <= 8192) {
                        if (s > 1) {
                            EXPECT_GE(depth / s, 48);
                        }
                        if (depth / 48 >= (64 + ctas - 1) / ctas) {
                            EXPECT_GE(ctas * s, 64);
                        }
                        const int64_t slots = (dt == KvDtype::Bf16 ? 3 : 2) * sm_count;
                        EXPECT_LE(ctas * s, std::max<int64_t>(64 + ctas - 1, slots));
                    } else if (s > 1) {
                        EXPECT_GE(depth * 2 * row / s, 64 * 1024);
                    }
                    if (dt == KvDtype::Bf16) {
                        bf16_splits = s;
                    } else {
                        EXPECT_LE(s, 4 * bf16_splits);
                    }
                }
            }
        }
    }
    cuda::AttentionBatch prefill{1, 512, nullptr, nullptr, nullptr, 4096, 512, 65536};
    cuda::PagedKvLayer kv{};
    kv.n_kv_heads = 8;
    kv.head_dim = 128;
    kv.dtype = KvDtype::Nvfp4;
    EXPECT_EQ(cuda::paged_attention_splits(prefill, kv, 32, 132), cuda::paged_attention_splits(prefill, 8, 32, 132));
    // 512 tokens x GQA 4 = 16 tiles of 128 rows a KV head, 128 CTAs: the wide kernel (FP8 / NVFP4, two CTAs
    // an SM) takes 2 splits to fill 264 slots; the narrow one (BF16, one an SM) stays at one wave of 1.
    EXPECT_EQ(cuda::paged_attention_splits(prefill, kv, 32, 132), 2);
    kv.dtype = KvDtype::Bf16;
    EXPECT_EQ(cuda::paged_attention_splits(prefill, kv, 32, 132), 1);
}

// Long decode on both kernels with the launcher's split choices (by keys and by bytes).
TEST(PagedAttentionCuda, LongDecodeKernelsMatchCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (KvDtype dt : {KvDtype::Fp8, KvDtype::Nvfp4})
        for (cuda::DecodeKernel dk :
             {cuda::DecodeKernel::Mma, cuda::DecodeKernel::Pipelined, cuda::DecodeKernel::Pipelined16}) {
            attention_case(pool, rng, {dt, 32, 8, 128, true, 0, {{65536 + 7, 1}, {1, 1}, {20001, 1}}, -1, dk});
            attention_case(pool, rng, {dt, 32, 8, 128, true, 0, {{32768, 1}, {3000, 1}}, 0, dk});
        }
}

TEST(PagedAttentionCuda, PrefillMatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    // (kv_len, n_q): a fresh prompt, a chunk after cached tokens, a short one.
    const std::vector<SeqSpec> seqs = {{600, 600}, {1400, 250}, {50, 7}};
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
        attention_case(pool, rng, {dt, 16, 4, 128, true, 0, seqs});   // GQA 4
        attention_case(pool, rng, {dt, 16, 2, 64, false, 0, seqs});   // GQA 8
        attention_case(pool, rng, {dt, 4, 4, 128, false, 0, seqs});   // GQA 1
    }
    attention_case(pool, rng, {KvDtype::Nvfp4, 16, 4, 64, true, 200, seqs});     // sliding window
    attention_case(pool, rng, {KvDtype::Fp8, 8, 8, 128, false, 0, seqs, 3});     // prefill with split-K
}

// The tensor-core prefill kernels (BF16 q; Wide, Auto's choice, and Narrow): one batch mixing a fresh
// prompt, chunks after cached tokens (start_pos > 0), lengths off the 64-key tile and off the 128-row tile
// (and off Wide's 32-row warps), a 1-token sequence and a 7-token one; GQA 1, 3 (rows of a tile not a
// multiple of the group), 4, 8 and 32 (4 tokens a tile); head_dim 64 and 128; sliding windows longer and
// shorter than a key tile; explicit splits (some empty); a single key tile (no refill) and two (one).
TEST(PagedAttentionCuda, PrefillTensorCoresMatchCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const std::vector<SeqSpec> mixed = {{600, 600}, {1400, 250}, {50, 7}, {1, 1}, {300, 129}, {77, 77}};
    for (cuda::PrefillKernel pk : {cuda::PrefillKernel::Wide, cuda::PrefillKernel::Narrow}) {
        for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
            auto run = [&](int64_t heads, int64_t kv_heads, int64_t hd, int64_t window,
                           std::vector<SeqSpec> seqs, int splits = 0) {
                AttnCase c{dt, heads, kv_heads, hd, true, window, std::move(seqs), splits};
                c.prefill_kernel = pk;
                attention_case(pool, rng, c);
            };
            run(32, 8, 128, 0, mixed);                           // GQA 4
            run(16, 2, 64, 0, mixed);                            // GQA 8, head_dim 64
            run(4, 4, 128, 0, mixed);                            // GQA 1
            run(8, 8, 64, 0, mixed);                             // GQA 1, head_dim 64
            run(12, 4, 128, 0, mixed);                           // GQA 3: 42 tokens, 126 of 128 rows
            run(32, 1, 128, 0, {{300, 40}, {64, 64}, {5, 2}});   // GQA 32
            run(16, 4, 128, 200, mixed);                         // window > key tile
            run(16, 2, 64, 37, mixed);                           // window < key tile
            run(16, 4, 128, 0, mixed, 3);                        // split-K
            run(8, 2, 64, 100, {{3000, 70}, {40, 40}}, 37);      // empty splits
            run(8, 2, 128, 0, {{64, 64}, {128, 20}, {40, 17}});  // one and two key tiles
            for (int64_t bs : {32, 12}) {                        // other block sizes: shifted, divided
                AttnCase c{dt, 32, 8, 128, true, 0, mixed, 0};
                c.prefill_kernel = pk;
                c.block_size = bs;
                attention_case(pool, rng, c);
            }
        }
    }
}

// head_dim 16 (the golden fixtures'), 32 and 256 have no tensor-core kernels: decode (GQA 1, 2, 8 and 16;
// launcher and by-bytes split choices) and prefill (BF16 q, which takes the tensor cores at 64/128, and F32 q;
// fresh prompts, chunks after cached tokens, sliding window, split-K with empty splits) all run the CUDA-core
// kernel, and the combine kernel at these widths.
TEST(PagedAttentionCuda, OtherHeadDimsMatchCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    const std::vector<SeqSpec> decode = {{1, 1}, {17, 1}, {33, 1}, {300, 1}, {2049, 1}};
    const std::vector<SeqSpec> mixed = {{600, 600}, {300, 129}, {50, 7}, {1, 1}, {77, 77}};
    for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
        for (int64_t hd : {16, 32, 256}) {
            attention_case(pool, rng, {dt, 4, 2, hd, true, 0, decode});        // GQA 2
            attention_case(pool, rng, {dt, 16, 2, hd, false, 0, decode, -1});  // GQA 8, splits by bytes
            attention_case(pool, rng, {dt, 4, 4, hd, false, 0, decode, 5});    // GQA 1, 5 splits
            attention_case(pool, rng, {dt, 32, 2, hd, true, 0, decode});       // GQA 16
            attention_case(pool, rng, {dt, 4, 2, hd, true, 0, mixed});         // prefill, BF16 q
            attention_case(pool, rng, {dt, 4, 2, hd, false, 0, mixed});        // prefill, F32 q
            attention_case(pool, rng, {dt, 8, 2, hd, true, 37, mixed, 3});     // window, split-K
            attention_case(pool, rng, {dt, 4, 2, hd, false, 0, {{3000, 70}, {40, 40}}, 37});  // empty splits
        }
    }
}

// Other head sizes are refused by name before anything is launched (no device memory is read).
TEST(PagedAttentionCuda, RejectsUnsupportedHeadDim) {
    EXPECT_TRUE(cuda::paged_attention_head_dim_supported(16));
    EXPECT_TRUE(cuda::paged_attention_head_dim_supported(128));
    for (int64_t hd : {0, 8, 24, 48, 80, 96, 192, 512}) {
        EXPECT_FALSE(cuda::paged_attention_head_dim_supported(hd)) << hd;
        const cuda::PagedKvLayer kv = unlaunched_layer(hd);
        const cuda::AttentionBatch batch{1, 1, nullptr, nullptr, nullptr, 1, 1, 1};
        try {
            cuda::paged_attention(nullptr, DType::F32, kv, batch, cuda::AttentionArgs{1, 1.0f, 0}, 1, nullptr, 0,
                                  nullptr, nullptr);
            ADD_FAILURE() << "head_dim " << hd << " accepted";
        } catch (const std::invalid_argument& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find("paged attention"), std::string::npos) << what;
            EXPECT_NE(what.find("head_dim " + std::to_string(hd)), std::string::npos) << what;
        }
    }
}

// Long prefill on the tensor cores, both kernels: 512 queries after 16K cached tokens (one split, then the
// launcher's choice of splits for a grid of few CTAs).
TEST(PagedAttentionCuda, PrefillTensorCoresLongMatchesCpu) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    ThreadPool pool;
    for (cuda::PrefillKernel pk : {cuda::PrefillKernel::Wide, cuda::PrefillKernel::Narrow}) {
        for (KvDtype dt : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
            AttnCase one{dt, 16, 4, 128, true, 0, {{16384 + 512, 512}}, 1};
            AttnCase chosen{dt, 32, 8, 128, true, 0, {{8192 + 40, 40}, {1000, 100}}};
            one.prefill_kernel = chosen.prefill_kernel = pk;
            attention_case(pool, rng, one);
            attention_case(pool, rng, chosen);
        }
    }
}

}  // namespace
}  // namespace nibble
