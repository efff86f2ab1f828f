#include <algorithm>
#include <cmath>
#include <vector>

#include "base/error.h"
#include "ops/attention/attention.h"

namespace nibble {

namespace {
// Physical block and slot of logical position `pos`; throws if the block table does not reach it.
std::pair<int64_t, int64_t> locate(const SequenceKv& seq, int64_t block_size, int64_t pos) {
    const int64_t logical = pos / block_size;
    NIBBLE_CHECK(logical < seq.n_table, "position {} needs logical block {}, but the block table has {} blocks",
                 pos, logical, seq.n_table);
    return {seq.block_table[logical], pos % block_size};
}
}  // namespace

void kv_cache_write_cpu(KvCache& cache, int64_t layer, const SequenceKv& seq, int64_t n, const float* k,
                        const float* v) {
    const auto& s = cache.shape();
    const int64_t hd = s.head_dim, row = s.n_kv_heads * hd;
    const float k_scale = cache.k_layer_scale(layer), v_scale = cache.v_layer_scale(layer);
    for (int64_t i = 0; i < n; ++i) {
        auto [block, slot] = locate(seq, s.block_size, seq.start_pos + i);
        uint8_t* kb = cache.k_block(layer, block);
        uint8_t* vb = cache.v_block(layer, block);
        for (int64_t h = 0; h < s.n_kv_heads; ++h) {
            kv_encode_head(s, k_scale, k + i * row + h * hd, kb, slot, h);
            kv_encode_head(s, v_scale, v + i * row + h * hd, vb, slot, h);
        }
    }
}

void paged_attention_cpu(ThreadPool& pool, const float* q, int64_t n, const KvCache& cache, int64_t layer,
                         const SequenceKv& seq, const AttentionParams& p, float* out) {
    const auto& s = cache.shape();
    NIBBLE_CHECK(p.n_kv_heads == s.n_kv_heads && p.head_dim == s.head_dim && p.n_heads % p.n_kv_heads == 0,
                 "attention shape (heads {}, kv heads {}, head dim {}) does not match the KV cache (kv heads {}, "
                 "head dim {})",
                 p.n_heads, p.n_kv_heads, p.head_dim, s.n_kv_heads, s.head_dim);
    const int64_t group = p.n_heads / p.n_kv_heads;
    const int64_t hd = p.head_dim;
    const float k_scale = cache.k_layer_scale(layer), v_scale = cache.v_layer_scale(layer);
    // Each K/V row is dequantized from the stored format into a head_dim-long local buffer right before
    // use (the CPU twin of dequantizing in registers); no dequantized copy of the cache exists.
    pool.parallel_for(static_cast<size_t>(n * p.n_heads), 1, [&](size_t begin, size_t end) {
        std::vector<float> scores;
        std::vector<double> acc(static_cast<size_t>(hd));
        std::vector<float> kv(static_cast<size_t>(hd));
        for (size_t job = begin; job < end; ++job) {
            const int64_t i = static_cast<int64_t>(job) / p.n_heads;
            const int64_t h = static_cast<int64_t>(job) % p.n_heads;
            const int64_t kvh = h / group;
            const int64_t pos = seq.start_pos + i;
            const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
            const float* qv = q + (i * p.n_heads + h) * hd;
            scores.resize(static_cast<size_t>(pos - first + 1));
            float max_score = -INFINITY;
            for (int64_t j = first; j <= pos; ++j) {
                auto [block, slot] = locate(seq, s.block_size, j);
                kv_decode_head(s, k_scale, cache.k_block(layer, block), slot, kvh, kv.data());
                float dotp = 0.0f;
                for (int64_t d = 0; d < hd; ++d) dotp += qv[d] * kv[static_cast<size_t>(d)];
                const float sc = dotp * p.scale;
                scores[static_cast<size_t>(j - first)] = sc;
                max_score = std::max(max_score, sc);
            }
            double denom = 0.0;
            for (auto& sc : scores) {
                sc = std::exp(sc - max_score);
                denom += sc;
            }
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = first; j <= pos; ++j) {
                auto [block, slot] = locate(seq, s.block_size, j);
                kv_decode_head(s, v_scale, cache.v_block(layer, block), slot, kvh, kv.data());
                const double w = scores[static_cast<size_t>(j - first)];
                for (int64_t d = 0; d < hd; ++d) acc[static_cast<size_t>(d)] += w * kv[static_cast<size_t>(d)];
            }
            float* o = out + (i * p.n_heads + h) * hd;
            for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<float>(acc[static_cast<size_t>(d)] / denom);
        }
    });
}

}  // namespace nibble
