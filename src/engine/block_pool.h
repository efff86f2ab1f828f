// The pool of paged KV blocks: a fixed number of blocks of block_size tokens, each with a reference
// count (one per sequence whose block table holds it). With prefix caching, a FULL computed block is
// registered under the hash chain hash(parent block's hash, its token ids) (XXH3_64bits); a later
// sequence whose leading full blocks have the same chain reuses them instead of computing them again.
// A block whose count drops to 0 goes to the free list if uncached, or to the tail of the LRU list if
// cached: it keeps its contents and can still be hit, until allocate() evicts it (LRU head first).
//
// Collisions: each cached block keeps its token ids, its parent's link and a unique cache id (cid); a hit
// needs equal tokens and the same parent cid, so a 64-bit collision can cost a miss, never a wrong block.
// A registration that collides with a different cached block replaces it in the hash map (the old block
// becomes uncached).
//
// Block states:  free (ref 0, uncached) | cached on the LRU (ref 0) | in use (ref > 0, cached or not).
//
// Hybrid models (recurrent Mamba state): a KV block alone cannot resume a sequence, the state at its end is
// needed too. The pool then also owns num_snapshots state-snapshot ids (the memory itself lives in the
// ModelRunner). A snapshot is free, reserved (a sequence will save its state into it after this step's
// forward), or attached to one cached block: the state after that block's last token. It lives and dies
// with the block's cache entry (uncache(): eviction from the LRU or a collision frees it). When none is free,
// reserve_snapshot() takes the one of the least recently used unreferenced cached block holding one (the
// block itself stays cached for its KV).
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

namespace nibble {

// Where a full block sits in the prefix-cache chain. The root (no parent) is {0, 0}.
struct BlockLink {
    uint64_t hash = 0;  // hash(parent hash, tokens)
    uint64_t cid = 0;   // cache id of the block registered under it (0: root)
};

using BlockHashFn = std::function<uint64_t(uint64_t parent_hash, std::span<const int32_t> tokens)>;
// XXH3_64bits of the parent hash (8 bytes, little-endian) followed by the token ids (4 bytes each).
uint64_t hash_block_tokens(uint64_t parent_hash, std::span<const int32_t> tokens);

class BlockPool {
public:
    // hash: replaceable so tests can force collisions.
    BlockPool(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching,
              BlockHashFn hash = hash_block_tokens, int64_t num_snapshots = 0);

    int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
    int64_t block_size() const { return block_size_; }
    bool prefix_caching() const { return prefix_caching_; }
    // Blocks allocate() can hand out now: free plus evictable cached ones.
    int64_t num_free() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
    int ref_count(int32_t block) const { return blocks_[index(block)].ref; }
    bool is_cached(int32_t block) const { return blocks_[index(block)].cached; }
    // Cached blocks with no reference, least recently released first (the eviction order).
    std::vector<int32_t> lru_order() const { return {lru_.begin(), lru_.end()}; }

    struct Match {
        std::vector<int32_t> blocks;  // physical blocks of the leading full blocks found
        std::vector<BlockLink> links;
    };
    // The longest run of cached blocks equal to tokens' leading full blocks, at most max_blocks. Does not
    // mutate: acquire() the blocks before the next allocate(), which may evict them.
    Match match_prefix(std::span<const int32_t> tokens, int64_t max_blocks) const;

    // Takes one more reference to a block (a cached one at 0 leaves the LRU list).
    void acquire(int32_t block);
    // A block with one reference and no cache entry: from the free list, else by evicting the LRU head.
    // Fails (nibble::Error) when every block is in use; callers check num_free() first.
    int32_t allocate();
    // Drops one reference; at 0 the block goes to the LRU tail if cached, else to the free list.
    void release(int32_t block);
    // Registers a computed full block (held, ref > 0) under parent's chain; returns the link the next block
    // chains from. If the same chain is already cached in another block, that entry is kept and its link
    // returned (this block stays uncached). No-op returning {} without prefix caching.
    BlockLink cache_block(int32_t block, const BlockLink& parent, std::span<const int32_t> tokens);

    // Throws nibble::Error naming the first broken invariant: ref counts equal the references in `tables`
    // (every live sequence's block table), no table holds a block twice, every unreferenced block is on
    // exactly one of the free and LRU lists (LRU iff cached), and the hash map and the cached flags agree.
    // With snapshots: each is free, reserved or attached to exactly one cached block, and the free list
    // holds exactly the free ones.
    void check_invariants(std::span<const std::span<const int32_t>> tables) const;

    // State snapshots (hybrid models; see the header comment). Ids are [0, num_snapshots).
    int64_t num_snapshots() const { return static_cast<int64_t>(snapshot_owner_.size()); }
    int64_t num_free_snapshots() const { return static_cast<int64_t>(free_snapshots_.size()); }
    int64_t num_attached_snapshots() const;
    // The snapshot attached to a block, or -1.
    int32_t snapshot_of(int32_t block) const { return blocks_[index(block)].snapshot; }
    // A snapshot id for the caller to fill (free, else taken from the LRU-most unreferenced cached block that
    // has one), or -1 if every snapshot is reserved or attached to a block in use.
    int32_t reserve_snapshot();
    // Gives a reserved snapshot back (the sequence that reserved it ended or did not fill it).
    void free_snapshot(int32_t snapshot);
    // Attaches a reserved, filled snapshot to a cached block. False (the snapshot stays reserved: the caller
    // frees it) if the block is not cached or already has one.
    bool attach_snapshot(int32_t block, int32_t snapshot);
    // Detaches a block's snapshot and returns it reserved to the caller (-1 if it had none).
    int32_t detach_snapshot(int32_t block);
    // The cached block registered under a link (the one a chain ends at), or -1.
    int32_t cached_block(const BlockLink& link) const;

private:
    struct Block {
        int ref = 0;
        bool cached = false;
        bool in_lru = false;
        std::list<int32_t>::iterator lru_pos;
        uint64_t hash = 0;             // when cached
        uint64_t cid = 0;              // when cached
        BlockLink parent;              // when cached
        std::vector<int32_t> tokens;   // when cached: [block_size]
        int32_t snapshot = -1;         // when cached: the state after this block, or -1
    };
    size_t index(int32_t block) const;
    void uncache(int32_t block);

    int64_t block_size_;
    bool prefix_caching_;
    BlockHashFn hash_;
    std::vector<Block> blocks_;
    std::vector<int32_t> free_;                       // uncached, ref 0; allocate() pops the back
    std::list<int32_t> lru_;                          // cached, ref 0; least recently released first
    std::unordered_map<uint64_t, int32_t> by_hash_;   // cached blocks
    uint64_t next_cid_ = 1;
    static constexpr int32_t kSnapshotFree = -2, kSnapshotReserved = -1;
    std::vector<int32_t> snapshot_owner_;   // [num_snapshots]: kSnapshotFree, kSnapshotReserved or a block
    std::vector<int32_t> free_snapshots_;   // reserve_snapshot() pops the back
};

}  // namespace nibble
