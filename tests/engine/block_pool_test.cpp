// BlockPool: reference counts, the prefix hash chain (reuse of shared prefixes, partial blocks never
// cached), LRU eviction order, collisions never returning a wrong block, and the invariant checker.
// Expectations follow from the contract in block_pool.h (vLLM's block-manager semantics), worked by hand.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "base/error.h"
#include "engine/block_pool.h"

namespace nibble {
namespace {

using Table = std::vector<int32_t>;

void check(const BlockPool& pool, const std::vector<Table>& tables) {
    std::vector<std::span<const int32_t>> spans(tables.begin(), tables.end());
    EXPECT_NO_THROW(pool.check_invariants(spans));
}

std::vector<int32_t> iota_tokens(int n, int first) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    std::iota(t.begin(), t.end(), first);
    return t;
}

// Allocates blocks for `tokens`, registers its full blocks as the scheduler does, returns the table.
Table compute(BlockPool& pool, const std::vector<int32_t>& tokens) {
    const int64_t bs = pool.block_size();
    Table table;
    for (size_t i = 0; i < (tokens.size() + static_cast<size_t>(bs) - 1) / static_cast<size_t>(bs); ++i)
        table.push_back(pool.allocate());
    BlockLink parent;
    for (size_t j = 0; j < tokens.size() / static_cast<size_t>(bs); ++j)
        parent = pool.cache_block(table[j], parent,
                                  std::span(tokens).subspan(j * static_cast<size_t>(bs), static_cast<size_t>(bs)));
    return table;
}

void release_all(BlockPool& pool, const Table& t) {
    for (auto it = t.rbegin(); it != t.rend(); ++it) pool.release(*it);
}

TEST(BlockPool, RefCountsFollowAcquireAndRelease) {
    BlockPool pool(4, 16, true);
    EXPECT_EQ(pool.num_free(), 4);
    Table a = {pool.allocate(), pool.allocate()};
    EXPECT_EQ(pool.ref_count(a[0]), 1);
    EXPECT_EQ(pool.num_free(), 2);
    check(pool, {a});
    pool.acquire(a[0]);  // a second sequence shares block a[0]
    EXPECT_EQ(pool.ref_count(a[0]), 2);
    check(pool, {a, {a[0]}});
    pool.release(a[0]);
    EXPECT_EQ(pool.ref_count(a[0]), 1);
    release_all(pool, a);
    EXPECT_EQ(pool.num_free(), 4);
    check(pool, {});
    EXPECT_THROW(pool.release(a[0]), Error);
}

TEST(BlockPool, SharedPrefixReusesTheHashChain) {
    BlockPool pool(16, 4, true);
    const auto a_tokens = iota_tokens(10, 100);  // two full blocks and a partial one
    Table a = compute(pool, a_tokens);
    check(pool, {a});

    // Same first 8 tokens: both full blocks are found, the partial third is not.
    auto b_tokens = a_tokens;
    b_tokens[9] = 7;
    auto m = pool.match_prefix(b_tokens, 100);
    EXPECT_EQ(m.blocks, (Table{a[0], a[1]}));
    // Only the first block equal: the chain stops there.
    auto c_tokens = a_tokens;
    c_tokens[5] = 7;
    EXPECT_EQ(pool.match_prefix(c_tokens, 100).blocks, (Table{a[0]}));
    // The second block's tokens equal but after a different first block: no hit (it is a chain).
    auto d_tokens = a_tokens;
    d_tokens[0] = 7;
    EXPECT_TRUE(pool.match_prefix(d_tokens, 100).blocks.empty());
    // max_blocks caps the match.
    EXPECT_EQ(pool.match_prefix(a_tokens, 1).blocks.size(), 1u);

    // A hit survives the first owner's release: the blocks wait on the LRU list.
    release_all(pool, a);
    check(pool, {});
    EXPECT_EQ(pool.num_free(), 16);
    m = pool.match_prefix(b_tokens, 100);
    ASSERT_EQ(m.blocks, (Table{a[0], a[1]}));
    for (int32_t blk : m.blocks) pool.acquire(blk);
    check(pool, {m.blocks});
    EXPECT_EQ(pool.num_free(), 14);
}

TEST(BlockPool, PartialBlocksAreNeverCached) {
    BlockPool pool(4, 4, true);
    const auto tokens = iota_tokens(7, 0);  // one full block, three tokens of a second
    Table t = compute(pool, tokens);
    EXPECT_TRUE(pool.is_cached(t[0]));
    EXPECT_FALSE(pool.is_cached(t[1]));
    EXPECT_THROW(pool.cache_block(t[1], {}, std::span(tokens).subspan(4, 3)), Error);
    release_all(pool, t);
    check(pool, {});
    EXPECT_EQ(pool.lru_order(), (Table{t[0]}));  // the partial block went to the free list
}

TEST(BlockPool, EvictsLeastRecentlyReleasedFirst) {
    BlockPool pool(4, 2, true);
    const auto x = iota_tokens(2, 10), y = iota_tokens(2, 20), z = iota_tokens(2, 30), w = iota_tokens(2, 40);
    Table tx = compute(pool, x), ty = compute(pool, y), tz = compute(pool, z), tw = compute(pool, w);
    // Release order y, w, x, z: the LRU list is that order.
    for (const Table* t : {&ty, &tw, &tx, &tz}) release_all(pool, *t);
    EXPECT_EQ(pool.lru_order(), (Table{ty[0], tw[0], tx[0], tz[0]}));
    // A hit takes x off the list; two allocations then evict y and w, in that order.
    auto hit = pool.match_prefix(x, 1).blocks;
    ASSERT_EQ(hit, tx);
    pool.acquire(hit[0]);
    const int32_t first = pool.allocate(), second = pool.allocate();
    EXPECT_EQ(first, ty[0]);
    EXPECT_EQ(second, tw[0]);
    EXPECT_FALSE(pool.is_cached(first));
    EXPECT_TRUE(pool.match_prefix(y, 1).blocks.empty());  // evicted: no longer found
    EXPECT_TRUE(pool.match_prefix(w, 1).blocks.empty());
    EXPECT_EQ(pool.match_prefix(z, 1).blocks, tz);       // still cached
    check(pool, {hit, {first}, {second}});
    // Everything held: allocation fails with an error, not a crash.
    pool.allocate();
    EXPECT_EQ(pool.num_free(), 0);
    EXPECT_THROW(pool.allocate(), Error);
}

TEST(BlockPool, CollisionsNeverReturnAWrongBlock) {
    // A hash that ignores the parent and looks at one token only: chains collide freely.
    auto weak_hash = [](uint64_t, std::span<const int32_t> t) { return static_cast<uint64_t>(t[0]); };
    BlockPool pool(8, 2, true, weak_hash);
    const std::vector<int32_t> a = {1, 1, 2, 2}, b = {3, 3, 2, 2};
    Table ta = compute(pool, a);
    EXPECT_EQ(pool.match_prefix(a, 10).blocks, ta);
    // b's second block has a's second block's hash and tokens but another parent: it takes the hash entry.
    Table tb = compute(pool, b);
    check(pool, {ta, tb});
    EXPECT_FALSE(pool.is_cached(ta[1]));
    EXPECT_EQ(pool.match_prefix(b, 10).blocks, tb);
    // a finds its first block, and not b's second (computed after another prefix).
    EXPECT_EQ(pool.match_prefix(a, 10).blocks, (Table{ta[0]}));
    // Same hash, different tokens: a miss, not a hit.
    const std::vector<int32_t> c = {1, 5};
    EXPECT_TRUE(pool.match_prefix(c, 10).blocks.empty());
    release_all(pool, ta);
    release_all(pool, tb);
    check(pool, {});
    EXPECT_EQ(pool.num_free(), 8);
}

TEST(BlockPool, SameChainComputedTwiceKeepsOneEntry) {
    BlockPool pool(8, 2, true);
    const auto t = iota_tokens(4, 5);
    Table first = compute(pool, t), second = compute(pool, t);
    check(pool, {first, second});
    EXPECT_TRUE(pool.is_cached(first[0]) && pool.is_cached(first[1]));
    EXPECT_FALSE(pool.is_cached(second[0]) || pool.is_cached(second[1]));
    EXPECT_EQ(pool.match_prefix(t, 10).blocks, first);
    release_all(pool, second);
    EXPECT_TRUE(pool.lru_order().empty());  // the duplicates went to the free list
    release_all(pool, first);
    check(pool, {});
}

TEST(BlockPool, WithoutPrefixCachingNothingIsCached) {
    BlockPool pool(4, 2, false);
    const auto t = iota_tokens(4, 0);
    Table a = compute(pool, t);
    EXPECT_FALSE(pool.is_cached(a[0]));
    EXPECT_TRUE(pool.match_prefix(t, 10).blocks.empty());
    release_all(pool, a);
    EXPECT_TRUE(pool.lru_order().empty());
    check(pool, {});
}

// State snapshots (hybrid models): attached only to cached blocks, one per block; taken back from the
// least recently used unreferenced block when none is free (the block stays cached); freed with the block's
// cache entry on eviction.
TEST(BlockPool, SnapshotsLiveAndDieWithTheirBlocks) {
    BlockPool pool(4, 2, true, hash_block_tokens, 2);
    EXPECT_THROW(BlockPool(4, 2, false, hash_block_tokens, 1), Error);  // snapshots need prefix caching
    const auto x = iota_tokens(2, 10), y = iota_tokens(3, 20);
    Table tx = compute(pool, x), ty = compute(pool, y);  // ty[1] holds a partial block: never cached
    const int32_t s0 = pool.reserve_snapshot();
    ASSERT_GE(s0, 0);
    check(pool, {tx, ty});  // a reserved snapshot is neither free nor attached
    EXPECT_FALSE(pool.attach_snapshot(ty[1], s0));  // uncached block
    EXPECT_TRUE(pool.attach_snapshot(tx[0], s0));
    EXPECT_EQ(pool.snapshot_of(tx[0]), s0);
    const int32_t s1 = pool.reserve_snapshot();
    ASSERT_GE(s1, 0);
    EXPECT_FALSE(pool.attach_snapshot(tx[0], s1));  // one per block: the caller frees the spare
    pool.free_snapshot(s1);
    EXPECT_THROW(pool.free_snapshot(s1), Error);  // not reserved any more
    EXPECT_TRUE(pool.attach_snapshot(ty[0], pool.reserve_snapshot()));
    EXPECT_EQ(pool.num_free_snapshots(), 0);
    EXPECT_EQ(pool.num_attached_snapshots(), 2);
    check(pool, {tx, ty});
    // Both in use: nothing can be taken back.
    EXPECT_EQ(pool.reserve_snapshot(), -1);
    // Released (x first, so x is the LRU head): the next reservation takes x's, and x stays cached.
    release_all(pool, tx);
    release_all(pool, ty);
    check(pool, {});
    const int32_t taken = pool.reserve_snapshot();
    EXPECT_EQ(taken, s0);
    EXPECT_EQ(pool.snapshot_of(tx[0]), -1);
    EXPECT_EQ(pool.match_prefix(x, 1).blocks, (Table{tx[0]}));
    pool.free_snapshot(taken);
    check(pool, {});
    // Eviction: allocating every block uncaches y's block and gives its snapshot back.
    EXPECT_EQ(pool.num_attached_snapshots(), 1);
    Table all = {pool.allocate(), pool.allocate(), pool.allocate(), pool.allocate()};
    EXPECT_EQ(pool.num_attached_snapshots(), 0);
    EXPECT_EQ(pool.num_free_snapshots(), 2);
    check(pool, {all});
    // The link a chain ends at names its cached block.
    release_all(pool, all);
    Table tz = compute(pool, x);
    const BlockLink link = pool.match_prefix(x, 1).links.at(0);
    EXPECT_EQ(pool.cached_block(link), tz[0]);
    EXPECT_EQ(pool.cached_block({link.hash, link.cid + 1}), -1);
    EXPECT_EQ(pool.cached_block({}), -1);
    release_all(pool, tz);
    check(pool, {});
}

TEST(BlockPool, InvariantCheckerCatchesBrokenBookkeeping) {
    BlockPool pool(4, 2, true);
    Table a = {pool.allocate(), pool.allocate()};
    std::vector<std::span<const int32_t>> missing = {std::span<const int32_t>(a).first(1)};
    EXPECT_THROW(pool.check_invariants(missing), Error);  // a held block that no table holds
    Table twice = {a[0], a[0], a[1]};
    std::vector<std::span<const int32_t>> dup = {twice};
    EXPECT_THROW(pool.check_invariants(dup), Error);  // a block owned twice
    Table extra = {a[0], a[1], 3};
    std::vector<std::span<const int32_t>> free_in_table = {extra};
    EXPECT_THROW(pool.check_invariants(free_in_table), Error);  // a free block in a table
}

}  // namespace
}  // namespace nibble
