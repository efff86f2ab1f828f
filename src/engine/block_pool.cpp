#include "engine/block_pool.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "base/error.h"

namespace nibble {

uint64_t hash_block_tokens(uint64_t parent_hash, std::span<const int32_t> tokens) {
    // Bytes: parent hash then token ids, little-endian (the host order on every target we build for).
    std::vector<unsigned char> bytes(8 + tokens.size() * 4);
    std::memcpy(bytes.data(), &parent_hash, 8);
    std::memcpy(bytes.data() + 8, tokens.data(), tokens.size() * 4);
    return XXH3_64bits(bytes.data(), bytes.size());
}

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, BlockHashFn hash,
                     int64_t num_snapshots)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching), hash_(std::move(hash)) {
    NIBBLE_CHECK(num_snapshots >= 0 && num_snapshots < (int64_t{1} << 31),
                 "KV block pool: num_snapshots must be in [0, 2^31), got {}", num_snapshots);
    NIBBLE_CHECK(num_snapshots == 0 || enable_prefix_caching, "KV block pool: state snapshots need prefix caching");
    snapshot_owner_.assign(static_cast<size_t>(num_snapshots), kSnapshotFree);
    for (int64_t s = num_snapshots - 1; s >= 0; --s) free_snapshots_.push_back(static_cast<int32_t>(s));
    NIBBLE_CHECK(num_blocks > 0 && num_blocks < (int64_t{1} << 31), "KV block pool: num_blocks must be in [1, 2^31), got {}",
                 num_blocks);
    NIBBLE_CHECK(block_size > 0, "KV block pool: block_size must be positive, got {}", block_size);
    blocks_.resize(static_cast<size_t>(num_blocks));
    // allocate() pops the back: hand out blocks 0, 1, 2, ... first.
    for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

size_t BlockPool::index(int32_t block) const {
    NIBBLE_CHECK(block >= 0 && static_cast<size_t>(block) < blocks_.size(), "KV block {} out of range [0, {})", block,
                 blocks_.size());
    return static_cast<size_t>(block);
}

BlockPool::Match BlockPool::match_prefix(std::span<const int32_t> tokens, int64_t max_blocks) const {
    Match m;
    if (!prefix_caching_) return m;
    BlockLink parent;
    const int64_t full = std::min(max_blocks, static_cast<int64_t>(tokens.size()) / block_size_);
    for (int64_t i = 0; i < full; ++i) {
        auto chunk = tokens.subspan(static_cast<size_t>(i * block_size_), static_cast<size_t>(block_size_));
        auto it = by_hash_.find(hash_(parent.hash, chunk));
        if (it == by_hash_.end()) break;
        const Block& b = blocks_[static_cast<size_t>(it->second)];
        if (b.parent.cid != parent.cid || !std::equal(chunk.begin(), chunk.end(), b.tokens.begin(), b.tokens.end()))
            break;  // a hash collision: a different chain under the same hash
        parent = {b.hash, b.cid};
        m.blocks.push_back(it->second);
        m.links.push_back(parent);
    }
    return m;
}

void BlockPool::acquire(int32_t block) {
    Block& b = blocks_[index(block)];
    NIBBLE_CHECK(b.ref > 0 || b.cached, "KV block {}: acquire of a free, uncached block", block);
    if (b.ref == 0) {
        lru_.erase(b.lru_pos);
        b.in_lru = false;
    }
    ++b.ref;
}

int32_t BlockPool::allocate() {
    int32_t block;
    if (!free_.empty()) {
        block = free_.back();
        free_.pop_back();
    } else {
        NIBBLE_CHECK(!lru_.empty(), "KV block pool: all {} blocks are in use", blocks_.size());
        block = lru_.front();
        lru_.pop_front();
        Block& b = blocks_[static_cast<size_t>(block)];
        b.in_lru = false;
        uncache(block);
    }
    blocks_[static_cast<size_t>(block)].ref = 1;
    return block;
}

void BlockPool::release(int32_t block) {
    Block& b = blocks_[index(block)];
    NIBBLE_CHECK(b.ref > 0, "KV block {}: released more often than acquired", block);
    if (--b.ref > 0) return;
    if (b.cached) {
        b.lru_pos = lru_.insert(lru_.end(), block);
        b.in_lru = true;
    } else {
        free_.push_back(block);
    }
}

void BlockPool::uncache(int32_t block) {
    Block& b = blocks_[static_cast<size_t>(block)];
    if (!b.cached) return;
    auto it = by_hash_.find(b.hash);
    if (it != by_hash_.end() && it->second == block) by_hash_.erase(it);
    if (b.snapshot >= 0) {  // the snapshot belongs to the cache entry: evicted with it
        snapshot_owner_[static_cast<size_t>(b.snapshot)] = kSnapshotFree;
        free_snapshots_.push_back(b.snapshot);
        b.snapshot = -1;
    }
    b.cached = false;
    b.tokens.clear();
    b.hash = b.cid = 0;
    b.parent = {};
}

BlockLink BlockPool::cache_block(int32_t block, const BlockLink& parent, std::span<const int32_t> tokens) {
    if (!prefix_caching_) return {};
    Block& b = blocks_[index(block)];
    NIBBLE_CHECK(b.ref > 0, "KV block {}: only a held block can be cached", block);
    NIBBLE_CHECK(static_cast<int64_t>(tokens.size()) == block_size_, "KV block {}: caching {} tokens, not a full block",
                 block, tokens.size());
    if (b.cached) return {b.hash, b.cid};  // shared from another sequence, registered already
    const uint64_t h = hash_(parent.hash, tokens);
    if (auto it = by_hash_.find(h); it != by_hash_.end()) {
        Block& other = blocks_[static_cast<size_t>(it->second)];
        if (other.parent.cid == parent.cid && std::equal(tokens.begin(), tokens.end(), other.tokens.begin(), other.tokens.end()))
            return {other.hash, other.cid};  // the same chain computed twice: keep the first
        // A collision: the newer block takes the hash; the older one stays valid for its holders, uncached.
        const int32_t old = it->second;
        if (other.in_lru) {
            lru_.erase(other.lru_pos);
            other.in_lru = false;
            free_.push_back(old);
        }
        uncache(old);
    }
    b.cached = true;
    b.hash = h;
    b.cid = next_cid_++;
    b.parent = parent;
    b.tokens.assign(tokens.begin(), tokens.end());
    by_hash_[h] = block;
    return {b.hash, b.cid};
}

void BlockPool::check_invariants(std::span<const std::span<const int32_t>> tables) const {
    const size_t n = blocks_.size();
    std::vector<int> refs(n, 0);
    for (size_t t = 0; t < tables.size(); ++t) {
        std::vector<bool> in_table(n, false);
        for (int32_t block : tables[t]) {
            NIBBLE_CHECK(block >= 0 && static_cast<size_t>(block) < n, "invariant: table {} holds block {} out of range",
                         t, block);
            NIBBLE_CHECK(!in_table[static_cast<size_t>(block)], "invariant: table {} holds block {} twice", t, block);
            in_table[static_cast<size_t>(block)] = true;
            ++refs[static_cast<size_t>(block)];
        }
    }
    std::vector<int> on_free(n, 0), on_lru(n, 0);
    for (int32_t block : free_) ++on_free[index(block)];
    for (int32_t block : lru_) ++on_lru[index(block)];
    size_t n_cached = 0;
    for (size_t i = 0; i < n; ++i) {
        const Block& b = blocks_[i];
        NIBBLE_CHECK(b.ref == refs[i], "invariant: block {} has ref count {} but {} tables hold it", i, b.ref, refs[i]);
        const int lists = on_free[i] + on_lru[i];
        if (b.ref > 0)
            NIBBLE_CHECK(lists == 0, "invariant: block {} is in use (ref {}) and on the free or LRU list", i, b.ref);
        else
            NIBBLE_CHECK(lists == 1, "invariant: unreferenced block {} is on {} of the free and LRU lists", i, lists);
        NIBBLE_CHECK(on_lru[i] == (b.in_lru ? 1 : 0), "invariant: block {} LRU flag disagrees with the LRU list", i);
        if (b.ref == 0)
            NIBBLE_CHECK(b.cached == (on_lru[i] == 1), "invariant: unreferenced block {} is {} but on the {} list", i,
                         b.cached ? "cached" : "uncached", on_lru[i] ? "LRU" : "free");
        if (b.cached) {
            ++n_cached;
            NIBBLE_CHECK(prefix_caching_, "invariant: block {} cached with prefix caching off", i);
            auto it = by_hash_.find(b.hash);
            NIBBLE_CHECK(it != by_hash_.end() && it->second == static_cast<int32_t>(i),
                         "invariant: cached block {} is not in the hash map under its hash", i);
            NIBBLE_CHECK(static_cast<int64_t>(b.tokens.size()) == block_size_,
                         "invariant: cached block {} keeps {} token ids, not {}", i, b.tokens.size(), block_size_);
        }
    }
    NIBBLE_CHECK(n_cached == by_hash_.size(), "invariant: {} blocks cached but {} hash map entries", n_cached,
                 by_hash_.size());

    std::vector<int> on_free_snapshots(snapshot_owner_.size(), 0);
    for (int32_t s : free_snapshots_) {
        NIBBLE_CHECK(s >= 0 && static_cast<size_t>(s) < snapshot_owner_.size(),
                     "invariant: free snapshot {} out of range", s);
        ++on_free_snapshots[static_cast<size_t>(s)];
    }
    for (size_t s = 0; s < snapshot_owner_.size(); ++s) {
        const int32_t owner = snapshot_owner_[s];
        NIBBLE_CHECK(on_free_snapshots[s] == (owner == kSnapshotFree ? 1 : 0),
                     "invariant: snapshot {} is {} but on the free snapshot list {} times", s,
                     owner == kSnapshotFree ? "free" : "taken", on_free_snapshots[s]);
        if (owner >= 0) {
            NIBBLE_CHECK(static_cast<size_t>(owner) < n && blocks_[static_cast<size_t>(owner)].cached &&
                             blocks_[static_cast<size_t>(owner)].snapshot == static_cast<int32_t>(s),
                         "invariant: snapshot {} says block {} owns it, which is not a cached block holding it", s,
                         owner);
        }
    }
    for (size_t i = 0; i < n; ++i) {
        const int32_t s = blocks_[i].snapshot;
        if (s < 0) continue;
        NIBBLE_CHECK(blocks_[i].cached, "invariant: uncached block {} holds snapshot {}", i, s);
        NIBBLE_CHECK(static_cast<size_t>(s) < snapshot_owner_.size() &&
                         snapshot_owner_[static_cast<size_t>(s)] == static_cast<int32_t>(i),
                     "invariant: block {} holds snapshot {} owned elsewhere", i, s);
    }
}

int64_t BlockPool::num_attached_snapshots() const {
    return std::count_if(snapshot_owner_.begin(), snapshot_owner_.end(), [](int32_t o) { return o >= 0; });
}

int32_t BlockPool::reserve_snapshot() {
    if (!free_snapshots_.empty()) {
        const int32_t s = free_snapshots_.back();
        free_snapshots_.pop_back();
        snapshot_owner_[static_cast<size_t>(s)] = kSnapshotReserved;
        return s;
    }
    for (int32_t block : lru_)  // least recently released first
        if (blocks_[static_cast<size_t>(block)].snapshot >= 0) return detach_snapshot(block);
    return -1;
}

void BlockPool::free_snapshot(int32_t snapshot) {
    NIBBLE_CHECK(snapshot >= 0 && static_cast<size_t>(snapshot) < snapshot_owner_.size() &&
                     snapshot_owner_[static_cast<size_t>(snapshot)] == kSnapshotReserved,
                 "state snapshot {}: freed but not reserved", snapshot);
    snapshot_owner_[static_cast<size_t>(snapshot)] = kSnapshotFree;
    free_snapshots_.push_back(snapshot);
}

bool BlockPool::attach_snapshot(int32_t block, int32_t snapshot) {
    Block& b = blocks_[index(block)];
    NIBBLE_CHECK(snapshot >= 0 && static_cast<size_t>(snapshot) < snapshot_owner_.size() &&
                     snapshot_owner_[static_cast<size_t>(snapshot)] == kSnapshotReserved,
                 "state snapshot {}: attached to block {} but not reserved", snapshot, block);
    if (!b.cached || b.snapshot >= 0) return false;
    b.snapshot = snapshot;
    snapshot_owner_[static_cast<size_t>(snapshot)] = block;
    return true;
}

int32_t BlockPool::detach_snapshot(int32_t block) {
    Block& b = blocks_[index(block)];
    const int32_t s = b.snapshot;
    if (s < 0) return -1;
    b.snapshot = -1;
    snapshot_owner_[static_cast<size_t>(s)] = kSnapshotReserved;
    return s;
}

int32_t BlockPool::cached_block(const BlockLink& link) const {
    if (link.cid == 0) return -1;
    auto it = by_hash_.find(link.hash);
    if (it == by_hash_.end() || blocks_[static_cast<size_t>(it->second)].cid != link.cid) return -1;
    return it->second;
}

}  // namespace nibble
