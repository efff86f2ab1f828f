// The paged KV cache: per layer, K and V live in fixed-size blocks of `block_size` tokens; a sequence
// owns a block table mapping its logical block i (tokens i*block_size ...) to a physical block.
// Layout of one layer's K (V alike): [n_blocks, block_size, n_kv_heads, head_dim], float32 on the CPU
// reference backend. Which blocks a sequence gets is the engine's business (engine/BlockPool); this
// class only stores them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace nibble {

struct KvCacheShape {
    int64_t n_layers = 0;
    int64_t n_blocks = 0;
    int64_t block_size = 16;
    int64_t n_kv_heads = 0;
    int64_t head_dim = 0;

    int64_t floats_per_block() const { return block_size * n_kv_heads * head_dim; }
    // Bytes of K and V for all layers and blocks.
    int64_t total_bytes() const { return 2 * n_layers * n_blocks * floats_per_block() * 4; }
};

class KvCache {
public:
    explicit KvCache(const KvCacheShape& shape);
    const KvCacheShape& shape() const { return shape_; }
    // [block_size, n_kv_heads, head_dim] of one block.
    float* k_block(int64_t layer, int64_t block);
    float* v_block(int64_t layer, int64_t block);
    const float* k_block(int64_t layer, int64_t block) const;
    const float* v_block(int64_t layer, int64_t block) const;

private:
    size_t offset(int64_t layer, int64_t block) const;
    KvCacheShape shape_;
    std::vector<float> k_, v_;
};

}  // namespace nibble
