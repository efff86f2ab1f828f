#include "ops/attention/kv_cache.h"

#include "base/error.h"

namespace nibble {

KvCache::KvCache(const KvCacheShape& shape) : shape_(shape) {
    NIBBLE_CHECK(shape.n_layers > 0 && shape.n_blocks > 0 && shape.block_size > 0 && shape.n_kv_heads > 0 &&
                     shape.head_dim > 0,
                 "KV cache shape must be positive (layers {}, blocks {}, block size {}, kv heads {}, head dim {})",
                 shape.n_layers, shape.n_blocks, shape.block_size, shape.n_kv_heads, shape.head_dim);
    const size_t n = static_cast<size_t>(shape.n_layers * shape.n_blocks * shape.floats_per_block());
    k_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
}

size_t KvCache::offset(int64_t layer, int64_t block) const {
    NIBBLE_CHECK(layer >= 0 && layer < shape_.n_layers && block >= 0 && block < shape_.n_blocks,
                 "KV cache access out of range: layer {} of {}, block {} of {}", layer, shape_.n_layers, block,
                 shape_.n_blocks);
    return static_cast<size_t>((layer * shape_.n_blocks + block) * shape_.floats_per_block());
}

float* KvCache::k_block(int64_t layer, int64_t block) { return k_.data() + offset(layer, block); }
float* KvCache::v_block(int64_t layer, int64_t block) { return v_.data() + offset(layer, block); }
const float* KvCache::k_block(int64_t layer, int64_t block) const { return k_.data() + offset(layer, block); }
const float* KvCache::v_block(int64_t layer, int64_t block) const { return v_.data() + offset(layer, block); }

}  // namespace nibble
