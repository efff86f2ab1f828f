#include "engine/scheduler.h"

#include <algorithm>
#include <unordered_set>

#include "base/error.h"

namespace nibble {

Scheduler::Scheduler(const SchedulerConfig& config, BlockPool& pool) : config_(config), pool_(pool) {
    NIBBLE_CHECK(config.max_num_seqs > 0, "max_num_seqs must be positive, got {}", config.max_num_seqs);
    NIBBLE_CHECK(config.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive, got {}",
                 config.max_num_batched_tokens);
    NIBBLE_CHECK(config.num_state_slots == 0 || config.num_state_slots >= config.max_num_seqs,
                 "num_state_slots {} must cover max_num_seqs {}", config.num_state_slots, config.max_num_seqs);
    NIBBLE_CHECK(config.snapshot_interval >= 0 && config.snapshot_interval % pool.block_size() == 0,
                 "the Mamba state snapshot interval {} must be a multiple of the block size {}",
                 config.snapshot_interval, pool.block_size());
    for (int64_t i = config.num_state_slots - 1; i >= 0; --i) free_state_slots_.push_back(static_cast<int32_t>(i));
}

void Scheduler::add(Sequence* seq) {
    seq->status = SequenceStatus::Waiting;
    waiting_.push_back(seq);
}

int64_t Scheduler::blocks_needed(const Sequence& seq, int64_t n_tokens) const {
    const int64_t bs = pool_.block_size();
    const int64_t total = (seq.num_computed + n_tokens + bs - 1) / bs;
    return std::max<int64_t>(0, total - static_cast<int64_t>(seq.block_table.size()));
}

void Scheduler::allocate(Sequence& seq, int64_t n_tokens) {
    for (int64_t i = blocks_needed(seq, n_tokens); i > 0; --i) seq.block_table.push_back(pool_.allocate());
}

namespace {

enum class SnapshotPoint { None, Kept, Rolling };

// What a hybrid sequence's state after `end` computed tokens is to the prefix cache (SchedulerConfig::
// snapshot_interval says why these points).
SnapshotPoint snapshot_point(const Sequence& seq, int64_t end, int64_t block_size, int64_t interval) {
    if (end <= 0 || end % block_size != 0) return SnapshotPoint::None;
    if (interval > 0 && end % interval == 0) return SnapshotPoint::Kept;
    if (end == (seq.n_prompt - 1) / block_size * block_size || end == seq.shared_point) return SnapshotPoint::Kept;
    return end >= seq.n_prompt ? SnapshotPoint::Rolling : SnapshotPoint::None;
}

}  // namespace

int64_t Scheduler::cut_at_snapshot_point(const Sequence& seq, int64_t n_tokens) const {
    if (!snapshots_on()) return n_tokens;
    const int64_t bs = pool_.block_size(), start = seq.num_computed, end = start + n_tokens;
    // A shared point comes first (it costs a step more when the prompt point follows in the same chunk): a
    // prefix that two prompts have shared is the likeliest to come again.
    if (seq.shared_point > start && seq.shared_point <= end) return seq.shared_point - start;
    int64_t point = 0;  // the last kept point in (start, end]
    if (config_.snapshot_interval > 0) point = end / config_.snapshot_interval * config_.snapshot_interval;
    const int64_t prompt_point = (seq.n_prompt - 1) / bs * bs;
    if (prompt_point <= end) point = std::max(point, prompt_point);
    return point > start ? point - start : n_tokens;
}

void Scheduler::reserve_snapshot(Sequence& seq, int64_t n_tokens) {
    if (!snapshots_on()) return;
    const SnapshotPoint point =
        snapshot_point(seq, seq.num_computed + n_tokens, pool_.block_size(), config_.snapshot_interval);
    if (point == SnapshotPoint::None) return;
    if (point == SnapshotPoint::Rolling && seq.rolling_block >= 0) {
        // The previous decode snapshot gives way to this one (same id, no new memory).
        seq.save_snapshot = pool_.detach_snapshot(seq.rolling_block);
        seq.rolling_block = -1;
        if (seq.save_snapshot >= 0) return;
    }
    seq.save_snapshot = pool_.reserve_snapshot();
}

void Scheduler::release_blocks(Sequence& seq) {
    if (seq.save_snapshot >= 0) pool_.free_snapshot(seq.save_snapshot);
    seq.save_snapshot = seq.restore_snapshot = seq.rolling_block = -1;
    seq.shared_point = 0;
    // Tail first: the LRU then evicts a sequence's last blocks before its first, which more requests share.
    for (auto it = seq.block_table.rbegin(); it != seq.block_table.rend(); ++it) pool_.release(*it);
    seq.block_table.clear();
    seq.chain.clear();
    seq.num_computed = 0;
    if (seq.state_slot >= 0) {
        free_state_slots_.push_back(seq.state_slot);
        seq.state_slot = -1;
    }
}

void Scheduler::preempt(Sequence* seq) {
    running_.erase(std::find(running_.begin(), running_.end(), seq));
    release_blocks(*seq);
    seq->status = SequenceStatus::Waiting;
    waiting_.push_front(seq);
    ++num_preemptions_;
}

SchedulerOutput Scheduler::schedule() {
    SchedulerOutput out;
    int64_t budget = config_.max_num_batched_tokens;
    std::unordered_set<const Sequence*> scheduled;

    // Running sequences: decodes (one token left) in the first pass, unfinished prefills in the second.
    for (bool decodes : {true, false}) {
        size_t i = 0;
        while (i < running_.size() && budget > 0) {
            Sequence* seq = running_[i];
            const int64_t left = seq->num_tokens() - seq->num_computed;
            if (left <= 0 || (left == 1) != decodes || scheduled.count(seq)) {
                ++i;
                continue;
            }
            const int64_t n = cut_at_snapshot_point(*seq, std::min(left, budget));
            bool self_preempted = false;
            while (pool_.num_free() < blocks_needed(*seq, n)) {
                // The newest running sequence not yet scheduled (running_[i] itself at the latest): its
                // index is >= i, so the loop's position stays valid.
                auto victim = std::find_if(running_.rbegin(), running_.rend(),
                                           [&](const Sequence* s) { return !scheduled.count(s); });
                Sequence* v = *victim;
                preempt(v);
                out.preempted.push_back(v);
                if (v == seq) {
                    self_preempted = true;
                    break;
                }
            }
            if (self_preempted) continue;  // running_[i] is now the next sequence
            allocate(*seq, n);
            reserve_snapshot(*seq, n);
            out.chunks.push_back({.seq = seq, .n_tokens = n, .sample = n == left});
            scheduled.insert(seq);
            budget -= n;
            ++i;
        }
    }

    if (out.preempted.empty()) {
        while (!waiting_.empty() && budget > 0 && static_cast<int64_t>(running_.size()) < config_.max_num_seqs) {
            if (!admit(waiting_.front(), budget, out)) break;
            budget -= out.chunks.back().n_tokens;
        }
    }
    return out;
}

bool Scheduler::admit(Sequence* seq, int64_t budget, SchedulerOutput& out) {
    const int64_t bs = pool_.block_size();
    // Reusable leading full blocks, leaving at least one token to compute (its logits are sampled).
    const int64_t max_reuse = (seq->num_tokens() - 1) / bs;
    std::vector<int32_t> reuse;
    std::vector<BlockLink> links;
    bool from_cache = false;
    const Sequence* parent = seq->parent;
    const bool recurrent = config_.num_state_slots > 0;
    int32_t restore = -1;
    if (recurrent) {
        // A slot is always free while running_ is below max_num_seqs.
        NIBBLE_CHECK(!free_state_slots_.empty(), "scheduler: no free recurrent-state slot");
        if (snapshots_on()) {
            // Sample i > 0 waits for sample 0's prompt (and its snapshot), then finds it in the cache.
            if (parent != nullptr && parent->status == SequenceStatus::Running && parent->num_computed < parent->n_prompt)
                return false;
            // Reuse up to the deepest matched block with a state snapshot; the rest is recomputed.
            BlockPool::Match m = pool_.match_prefix(seq->tokens, max_reuse);
            size_t k = m.blocks.size();
            while (k > 0 && pool_.snapshot_of(m.blocks[k - 1]) < 0) --k;
            reuse.assign(m.blocks.begin(), m.blocks.begin() + static_cast<std::ptrdiff_t>(k));
            links.assign(m.links.begin(), m.links.begin() + static_cast<std::ptrdiff_t>(k));
            if (k > 0) restore = pool_.snapshot_of(reuse.back());
            seq->shared_point = static_cast<int64_t>(m.blocks.size()) * bs;
            from_cache = true;
        }
    } else if (parent != nullptr && parent->status == SequenceStatus::Running) {
        if (parent->num_computed < parent->n_prompt) return false;  // wait for sample 0's prompt
        const int64_t n = std::min<int64_t>(max_reuse, parent->n_prompt / bs);
        reuse.assign(parent->block_table.begin(), parent->block_table.begin() + n);
        links.assign(parent->chain.begin(), parent->chain.begin() + std::min<int64_t>(n, parent->chain.size()));
    } else if (pool_.prefix_caching()) {
        BlockPool::Match m = pool_.match_prefix(seq->tokens, max_reuse);
        reuse = std::move(m.blocks);
        links = std::move(m.links);
        from_cache = true;
    }

    const int64_t computed = static_cast<int64_t>(reuse.size()) * bs;
    seq->num_computed = computed;  // waiting: 0 before; reset below if it must wait
    const int64_t n = cut_at_snapshot_point(*seq, std::min(seq->num_tokens() - computed, budget));
    seq->num_computed = 0;
    const int64_t new_blocks = (computed + n + bs - 1) / bs - static_cast<int64_t>(reuse.size());
    int64_t reuse_evictable = 0;  // reused blocks now on the LRU list count in num_free() until acquired
    for (int32_t b : reuse) reuse_evictable += pool_.ref_count(b) == 0 ? 1 : 0;
    if (pool_.num_free() - reuse_evictable < new_blocks) return false;

    for (int32_t b : reuse) pool_.acquire(b);
    seq->block_table = std::move(reuse);
    seq->chain = std::move(links);
    seq->num_computed = computed;
    if (from_cache) {
        prefix_cache_.queries += seq->num_tokens();
        prefix_cache_.hits += computed;
    }
    if (seq->num_cached_tokens < 0) seq->num_cached_tokens = std::min(computed, seq->n_prompt);
    seq->parent = nullptr;
    if (recurrent) {
        seq->state_slot = free_state_slots_.back();
        free_state_slots_.pop_back();
        seq->restore_snapshot = restore;
    }
    allocate(*seq, n);
    reserve_snapshot(*seq, n);
    seq->status = SequenceStatus::Running;
    waiting_.pop_front();
    running_.push_back(seq);
    out.chunks.push_back({.seq = seq, .n_tokens = n, .sample = computed + n == seq->num_tokens()});
    return true;
}

void Scheduler::finish_chunk(const ScheduledChunk& chunk) {
    Sequence& seq = *chunk.seq;
    seq.num_computed += chunk.n_tokens;
    NIBBLE_CHECK(seq.num_computed <= seq.num_tokens(), "sequence {}: computed {} of {} tokens", seq.id,
                 seq.num_computed, seq.num_tokens());
    seq.restore_snapshot = -1;  // the runner restored it before this forward
    if (!pool_.prefix_caching()) return;
    const int64_t bs = pool_.block_size();
    while (static_cast<int64_t>(seq.chain.size()) < seq.num_computed / bs) {
        const size_t j = seq.chain.size();
        const BlockLink parent = j == 0 ? BlockLink{} : seq.chain[j - 1];
        auto tokens = std::span(seq.tokens).subspan(j * static_cast<size_t>(bs), static_cast<size_t>(bs));
        seq.chain.push_back(pool_.cache_block(seq.block_table[j], parent, tokens));
    }
    if (seq.save_snapshot < 0) return;
    // The runner saved the state after this chunk: attach it to the cached block ending here (this
    // sequence's, or the first copy of the same chain); if that block has one already, it is not needed.
    const int32_t snapshot = seq.save_snapshot;
    seq.save_snapshot = -1;
    const size_t j = static_cast<size_t>(seq.num_computed / bs) - 1;
    const int32_t block = pool_.cached_block(seq.chain[j]);
    if (block < 0 || !pool_.attach_snapshot(block, snapshot)) {
        pool_.free_snapshot(snapshot);
        return;
    }
    if (block == seq.block_table[j] &&
        snapshot_point(seq, seq.num_computed, bs, config_.snapshot_interval) == SnapshotPoint::Rolling)
        seq.rolling_block = block;
}

void Scheduler::finish(Sequence* seq) {
    if (seq->status == SequenceStatus::Running) {
        running_.erase(std::find(running_.begin(), running_.end(), seq));
        release_blocks(*seq);
    } else if (seq->status == SequenceStatus::Waiting) {
        auto it = std::find(waiting_.begin(), waiting_.end(), seq);
        if (it != waiting_.end()) waiting_.erase(it);
    }
    seq->status = SequenceStatus::Finished;
}

void Scheduler::check_invariants() const {
    NIBBLE_CHECK(static_cast<int64_t>(running_.size()) <= config_.max_num_seqs, "invariant: {} running > max_num_seqs {}",
                 running_.size(), config_.max_num_seqs);
    std::unordered_set<const Sequence*> seen;
    std::vector<std::span<const int32_t>> tables;
    const int64_t bs = pool_.block_size();
    for (const Sequence* s : running_) {
        NIBBLE_CHECK(seen.insert(s).second, "invariant: sequence {} queued twice", s->id);
        NIBBLE_CHECK(s->status == SequenceStatus::Running, "invariant: sequence {} in the running list, not running",
                     s->id);
        NIBBLE_CHECK(s->num_computed >= 0 && s->num_computed <= s->num_tokens(),
                     "invariant: sequence {} computed {} of {} tokens", s->id, s->num_computed, s->num_tokens());
        NIBBLE_CHECK(static_cast<int64_t>(s->block_table.size()) * bs >= s->num_computed,
                     "invariant: sequence {} has {} blocks for {} computed tokens", s->id, s->block_table.size(),
                     s->num_computed);
        NIBBLE_CHECK(static_cast<int64_t>(s->chain.size()) <= s->num_computed / bs,
                     "invariant: sequence {} chains {} blocks but computed only {} tokens", s->id, s->chain.size(),
                     s->num_computed);
        NIBBLE_CHECK(s->save_snapshot < 0 && s->restore_snapshot < 0,
                     "invariant: sequence {} holds snapshot {} to save / {} to restore between steps", s->id,
                     s->save_snapshot, s->restore_snapshot);
        tables.emplace_back(s->block_table);
    }
    for (const Sequence* s : waiting_) {
        NIBBLE_CHECK(seen.insert(s).second, "invariant: sequence {} queued twice", s->id);
        NIBBLE_CHECK(s->status == SequenceStatus::Waiting, "invariant: sequence {} in the waiting queue, not waiting",
                     s->id);
        NIBBLE_CHECK(s->block_table.empty() && s->num_computed == 0,
                     "invariant: waiting sequence {} holds {} blocks, {} computed tokens", s->id, s->block_table.size(),
                     s->num_computed);
    }
    // Between steps no snapshot is reserved: each reservation is attached or freed by finish_chunk or release.
    const int64_t reserved = pool_.num_snapshots() - pool_.num_free_snapshots() - pool_.num_attached_snapshots();
    NIBBLE_CHECK(reserved == 0, "invariant: {} state snapshots reserved between steps (leaked)", reserved);
    pool_.check_invariants(tables);
}

}  // namespace nibble
