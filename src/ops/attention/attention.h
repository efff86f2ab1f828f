// Causal attention of one sequence's new tokens over its paged KV cache (grouped-query: n_heads query
// heads share n_kv_heads key/value heads), and the write of new K/V into the cache. CPU reference.
#pragma once

#include <cstdint>

#include "base/thread_pool.h"
#include "ops/attention/kv_cache.h"

namespace nibble {

struct AttentionParams {
    int64_t n_heads = 0;
    int64_t n_kv_heads = 0;
    int64_t head_dim = 0;
    float scale = 1.0f;          // applied to q.k, usually 1/sqrt(head_dim)
    int64_t sliding_window = 0;  // 0: attend to all earlier positions; else only the last `sliding_window`
};

// One sequence's view of the cache: its block table and how many tokens it holds before this step.
struct SequenceKv {
    const int32_t* block_table = nullptr;  // [n_table] physical block of each logical block
    int64_t n_table = 0;
    int64_t start_pos = 0;  // position of the first new token (= tokens already cached)
};

// Stores K and V of n new tokens at positions start_pos .. start_pos + n - 1, quantized to the cache's
// dtype with the layer's scales (kv_cache.h). Throws for a non-finite value written to an FP8/NVFP4 cache.
//   k, v [n, n_kv_heads, head_dim]
void kv_cache_write_cpu(KvCache& cache, int64_t layer, const SequenceKv& seq, int64_t n, const float* k,
                        const float* v);

// out[i] = softmax(q[i] . K[0 .. start_pos + i] * scale) V, per query head (causal, sliding window), with K
// and V read in the cache's stored format and dequantized one row at a time.
//   q, out [n, n_heads, head_dim]
void paged_attention_cpu(ThreadPool& pool, const float* q, int64_t n, const KvCache& cache, int64_t layer,
                         const SequenceKv& seq, const AttentionParams& params, float* out);

}  // namespace nibble
