// Continuous batching, as vLLM's v1 scheduler does it: each step, under a budget of
// max_num_batched_tokens, first the running sequences' decodes, then the running sequences' unfinished
// prefill chunks, then new sequences from the waiting queue (first come first served: the queue's head
// blocks those behind it), each taking as many of its uncomputed tokens as the budget leaves (chunked
// prefill). At most max_num_seqs sequences run. When a running sequence needs a block and none is free,
// the newest running sequence not yet scheduled this step is preempted: its blocks are released (full
// ones stay in the prefix cache), it goes back to the front of the waiting queue and later recomputes.
// No sequence is admitted from the waiting queue in a step that preempted.
// Policy only: the engine runs the forward, then calls finish_chunk for each chunk, then samples.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "engine/block_pool.h"
#include "engine/sequence.h"

namespace nibble {

struct SchedulerConfig {
    int64_t max_num_seqs = 256;
    int64_t max_num_batched_tokens = 2048;
    // Hybrid models: slots of per-sequence recurrent state (>= max_num_seqs); 0 for attention-only models.
    // A sequence holds one while running. Its state covers exactly its computed tokens, so blocks computed
    // by others (prefix cache, a parent's prompt) can be reused only up to a block that carries a state
    // snapshot (the pool's snapshots; without any, every sequence computes from token 0).
    int64_t num_state_slots = 0;
    // Hybrid prefix caching: where states are snapshotted (each point is a block boundary, so a later prompt
    // sharing the blocks up to it resumes there):
    //   - every snapshot_interval tokens of a prefill (a multiple of the block size; 0: none), bounding the
    //     recompute of a partly shared long prompt;
    //   - the prompt's last reusable boundary, ((n_prompt - 1) / block_size) * block_size: the same prompt
    //     again (or n > 1 samples) resumes there;
    //   - where a prompt's match of cached KV blocks ends, when it goes deeper than the deepest snapshot
    //     (the prefix is shared, e.g. a system prompt, but no state was kept at its end): the next prompt
    //     sharing it resumes there;
    //   - in decode, each block boundary, replacing the sequence's previous decode snapshot: when it ends,
    //     its last full block keeps one, so the next turn of a conversation (this prompt + output + more)
    //     resumes there.
    // The state exists only at a chunk's end, so a prefill chunk that crosses a point is cut to end at the
    // last point it crosses (its remaining tokens run next step), as vLLM's block-aligned Mamba caching does;
    // a shared point is taken before any other in the chunk.
    int64_t snapshot_interval = 0;
};

// Tokens [seq->num_computed, seq->num_computed + n_tokens) run this step; blocks for them are allocated.
struct ScheduledChunk {
    Sequence* seq = nullptr;
    int64_t n_tokens = 0;
    bool sample = false;  // the chunk ends the sequence's tokens: its last logits row is sampled
};

struct SchedulerOutput {
    std::vector<ScheduledChunk> chunks;  // decodes first, then prefill chunks
    std::vector<Sequence*> preempted;    // this step, newest first
};

struct PrefixCacheCounters {
    int64_t queries = 0, hits = 0;  // tokens looked up and found at admission
};

class Scheduler {
public:
    Scheduler(const SchedulerConfig& config, BlockPool& pool);

    // Queues a new sequence at the tail of the waiting queue.
    void add(Sequence* seq);
    SchedulerOutput schedule();
    // After the forward: the chunk's tokens are computed; registers the sequence's newly full blocks in
    // the prefix cache.
    void finish_chunk(const ScheduledChunk& chunk);
    // Removes a sequence from the queues and releases its blocks (status Finished).
    void finish(Sequence* seq);

    const std::deque<Sequence*>& waiting() const { return waiting_; }
    const std::vector<Sequence*>& running() const { return running_; }
    int64_t num_preemptions() const { return num_preemptions_; }
    const PrefixCacheCounters& prefix_cache() const { return prefix_cache_; }
    BlockPool& pool() { return pool_; }

    // Queue consistency (statuses, tables of waiting sequences empty, running within max_num_seqs, blocks
    // covering computed tokens) and the pool's invariants over the running sequences' tables.
    void check_invariants() const;

private:
    int64_t blocks_needed(const Sequence& seq, int64_t n_tokens) const;
    void allocate(Sequence& seq, int64_t n_tokens);
    void release_blocks(Sequence& seq);
    void preempt(Sequence* seq);
    // Tries to start the waiting queue's head with up to `budget` tokens; false if it must wait.
    bool admit(Sequence* seq, int64_t budget, SchedulerOutput& out);
    bool snapshots_on() const { return config_.num_state_slots > 0 && pool_.num_snapshots() > 0; }
    // Hybrid prefix caching: n_tokens cut so that the chunk ends at its last snapshot point, if it crosses one.
    int64_t cut_at_snapshot_point(const Sequence& seq, int64_t n_tokens) const;
    // Reserves seq.save_snapshot when a chunk of n_tokens ends at a snapshot point (none free: no snapshot).
    void reserve_snapshot(Sequence& seq, int64_t n_tokens);

    SchedulerConfig config_;
    BlockPool& pool_;
    std::vector<int32_t> free_state_slots_;
    std::deque<Sequence*> waiting_;
    std::vector<Sequence*> running_;  // in admission order: the back is the newest
    int64_t num_preemptions_ = 0;
    PrefixCacheCounters prefix_cache_;
};

}  // namespace nibble
