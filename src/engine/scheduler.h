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
    // by others (prefix cache, a parent's prompt) cannot be reused: every sequence computes from token 0.
    int64_t num_state_slots = 0;
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

    SchedulerConfig config_;
    BlockPool& pool_;
    std::vector<int32_t> free_state_slots_;
    std::deque<Sequence*> waiting_;
    std::vector<Sequence*> running_;  // in admission order: the back is the newest
    int64_t num_preemptions_ = 0;
    PrefixCacheCounters prefix_cache_;
};

}  // namespace nibble
