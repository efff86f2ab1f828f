// Scheduler: the token budget, decodes before prefills, chunked prefill of a long prompt, max_num_seqs,
// preemption of the newest sequence when blocks run out and its recompute, FCFS admission, and n > 1
// samples sharing the prompt's blocks. A fake "forward" marks chunks computed and appends token 7 to each
// sequence that samples; the invariant checker runs after every step.
#include <gtest/gtest.h>

#include <memory>
#include <numeric>
#include <vector>

#include "engine/scheduler.h"

namespace nibble {
namespace {

struct Harness {
    Harness(int64_t num_blocks, int64_t block_size, SchedulerConfig config, bool caching = true,
            int64_t num_snapshots = 0)
        : pool(num_blocks, block_size, caching, hash_block_tokens, num_snapshots), scheduler(config, pool) {}

    Sequence* add(int n_prompt, int first_token = 0) {
        auto s = std::make_unique<Sequence>();
        s->id = static_cast<int64_t>(seqs.size());
        s->tokens.resize(static_cast<size_t>(n_prompt));
        std::iota(s->tokens.begin(), s->tokens.end(), first_token);
        s->n_prompt = n_prompt;
        scheduler.add(s.get());
        seqs.push_back(std::move(s));
        return seqs.back().get();
    }
    // One step: schedule, "run", append a token to each sampling sequence.
    SchedulerOutput step() {
        SchedulerOutput out = scheduler.schedule();
        for (const auto& c : out.chunks) {
            EXPECT_EQ(c.sample, c.seq->num_computed + c.n_tokens == c.seq->num_tokens());
            scheduler.finish_chunk(c);
            if (c.sample) c.seq->tokens.push_back(7);
        }
        EXPECT_NO_THROW(scheduler.check_invariants());
        return out;
    }
    int64_t tokens_of(const SchedulerOutput& out, const Sequence* s) {
        for (const auto& c : out.chunks)
            if (c.seq == s) return c.n_tokens;
        return 0;
    }

    BlockPool pool;
    Scheduler scheduler;
    std::vector<std::unique_ptr<Sequence>> seqs;
};

int64_t total_tokens(const SchedulerOutput& out) {
    int64_t n = 0;
    for (const auto& c : out.chunks) n += c.n_tokens;
    return n;
}

TEST(Scheduler, RespectsTheTokenBudget) {
    Harness h(64, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 32});
    for (int i = 0; i < 5; ++i) h.add(30, 100 * i);
    int64_t steps = 0;
    while (std::any_of(h.seqs.begin(), h.seqs.end(), [](const auto& s) { return s->num_output() < 3; }) && steps < 100) {
        auto out = h.step();
        EXPECT_LE(total_tokens(out), 32);
        EXPECT_GT(total_tokens(out), 0);
        for (auto& s : h.seqs)
            if (s->num_output() >= 3 && s->status == SequenceStatus::Running) h.scheduler.finish(s.get());
        ++steps;
    }
    // 5 x 30 prompt tokens + 5 x 2 decodes = 160 tokens at <= 32 a step: at least 5 steps.
    EXPECT_GE(steps, 5);
    EXPECT_LT(steps, 100);
}

TEST(Scheduler, DecodesComeBeforePrefills) {
    Harness h(64, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 16});
    Sequence* a = h.add(8);
    h.step();  // a's prompt, sampled
    Sequence* b = h.add(40, 1000);
    auto out = h.step();
    ASSERT_EQ(out.chunks.size(), 2u);
    EXPECT_EQ(out.chunks[0].seq, a);
    EXPECT_EQ(out.chunks[0].n_tokens, 1);
    EXPECT_EQ(out.chunks[1].seq, b);
    EXPECT_EQ(out.chunks[1].n_tokens, 15);  // the rest of the budget
    // b is now running with a partial prefill; a's decode still comes first.
    out = h.step();
    EXPECT_EQ(out.chunks[0].seq, a);
    EXPECT_EQ(h.tokens_of(out, b), 15);
}

TEST(Scheduler, ChunksALongPromptAcrossSteps) {
    Harness h(64, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 32});
    Sequence* s = h.add(100);
    std::vector<int64_t> chunks;
    std::vector<bool> samples;
    for (int i = 0; i < 5; ++i) {
        auto out = h.step();
        ASSERT_EQ(out.chunks.size(), 1u);
        chunks.push_back(out.chunks[0].n_tokens);
        samples.push_back(out.chunks[0].sample);
    }
    EXPECT_EQ(chunks, (std::vector<int64_t>{32, 32, 32, 4, 1}));
    EXPECT_EQ(samples, (std::vector<bool>{false, false, false, true, true}));
    EXPECT_EQ(s->num_output(), 2);
    EXPECT_EQ(s->num_computed, 101);
    EXPECT_EQ(s->block_table.size(), 26u);  // ceil(101 / 4)
}

TEST(Scheduler, RunsAtMostMaxNumSeqs) {
    Harness h(64, 4, {.max_num_seqs = 2, .max_num_batched_tokens = 256});
    for (int i = 0; i < 4; ++i) h.add(5, 10 * i);
    auto out = h.step();
    EXPECT_EQ(out.chunks.size(), 2u);
    EXPECT_EQ(h.scheduler.running().size(), 2u);
    EXPECT_EQ(h.scheduler.waiting().size(), 2u);
    h.scheduler.finish(h.seqs[0].get());
    out = h.step();
    EXPECT_EQ(h.scheduler.running().size(), 2u);
    EXPECT_EQ(h.tokens_of(out, h.seqs[2].get()), 5);  // the next in arrival order
    EXPECT_EQ(h.tokens_of(out, h.seqs[3].get()), 0);
}

TEST(Scheduler, PreemptsTheNewestAndRecomputesIt) {
    // 6 blocks of 4 tokens. a and b: prompts of 8 (2 blocks each), then they decode until the pool runs out.
    Harness h(6, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 64});
    Sequence* a = h.add(8, 0);
    Sequence* b = h.add(8, 100);
    h.step();  // both prompts: 4 blocks used
    h.step();  // decodes of token 9: a 3rd block each -> 6 used
    EXPECT_EQ(h.pool.num_free(), 0);
    for (int i = 0; i < 3; ++i) h.step();  // tokens 10..12 fit in the 3rd blocks
    EXPECT_EQ(a->num_tokens(), 13);
    // Token 13 needs a 4th block: b (newest) is preempted, a continues.
    auto out = h.step();
    EXPECT_EQ(out.preempted, (std::vector<Sequence*>{b}));
    EXPECT_EQ(h.scheduler.num_preemptions(), 1);
    EXPECT_EQ(out.chunks.size(), 1u);
    EXPECT_EQ(out.chunks[0].seq, a);
    EXPECT_EQ(b->status, SequenceStatus::Waiting);
    EXPECT_EQ(h.scheduler.waiting().front(), b);
    EXPECT_EQ(b->num_computed, 0);
    EXPECT_TRUE(b->block_table.empty());
    const std::vector<int32_t> b_tokens = b->tokens;  // prompt and 5 outputs survive the preemption
    EXPECT_EQ(b_tokens.size(), 13u);

    // b released its blocks tail first, so a's new block evicted b's block of tokens 8..11 (the LRU head)
    // and b's two prompt blocks stayed cached. a finishes; b comes back, hits those two blocks and
    // recomputes tokens 8..12 (its outputs included), then samples.
    h.scheduler.finish(a);
    out = h.step();
    ASSERT_EQ(out.chunks.size(), 1u);
    EXPECT_EQ(out.chunks[0].seq, b);
    EXPECT_EQ(out.chunks[0].n_tokens, 5);
    EXPECT_TRUE(out.chunks[0].sample);
    EXPECT_EQ(b->num_computed, 13);
    EXPECT_EQ(std::vector<int32_t>(b->tokens.begin(), b->tokens.begin() + 13), b_tokens);
    EXPECT_EQ(h.scheduler.prefix_cache().hits, 8);
}

TEST(Scheduler, PreemptionWithoutPrefixCachingRecomputesEverything) {
    Harness h(6, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 64}, /*caching=*/false);
    Sequence* a = h.add(8, 0);
    Sequence* b = h.add(8, 100);
    for (int i = 0; i < 6; ++i) h.step();
    EXPECT_EQ(b->status, SequenceStatus::Waiting);
    h.scheduler.finish(a);
    auto out = h.step();
    ASSERT_EQ(out.chunks.size(), 1u);
    EXPECT_EQ(out.chunks[0].n_tokens, 13);  // all of b's tokens again
}

TEST(Scheduler, AdmitsFirstComeFirstServed) {
    // 8 blocks of 4. r holds 5 blocks; w1 (16 tokens, 4 blocks) cannot fit; w2 (3 tokens) could, but waits.
    Harness h(8, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 64});
    Sequence* r = h.add(20, 0);
    h.step();
    Sequence* w1 = h.add(16, 500);
    Sequence* w2 = h.add(3, 900);
    auto out = h.step();
    EXPECT_EQ(h.tokens_of(out, w1), 0);
    EXPECT_EQ(h.tokens_of(out, w2), 0);
    EXPECT_EQ(h.scheduler.waiting().front(), w1);
    h.scheduler.finish(r);
    out = h.step();
    EXPECT_EQ(h.tokens_of(out, w1), 16);
    EXPECT_EQ(h.tokens_of(out, w2), 3);
    EXPECT_EQ(out.chunks[0].seq, w1);
}

TEST(Scheduler, SamplesOfOneRequestShareThePromptBlocks) {
    for (bool caching : {true, false}) {
        Harness h(32, 4, {.max_num_seqs = 8, .max_num_batched_tokens = 64}, caching);
        Sequence* p = h.add(10, 0);
        Sequence* c = h.add(10, 0);
        c->parent = p;
        auto out = h.step();  // the parent's prompt; the child waits for it
        EXPECT_EQ(h.tokens_of(out, p), 10);
        EXPECT_EQ(h.tokens_of(out, c), 0);
        out = h.step();
        // The child shares the 2 full prompt blocks and computes the 2 tail tokens itself.
        EXPECT_EQ(h.tokens_of(out, c), 2);
        ASSERT_GE(c->block_table.size(), 3u);
        EXPECT_EQ(c->block_table[0], p->block_table[0]);
        EXPECT_EQ(c->block_table[1], p->block_table[1]);
        EXPECT_NE(c->block_table[2], p->block_table[2]);
        EXPECT_EQ(h.pool.ref_count(p->block_table[0]), 2);
        h.scheduler.finish(p);
        EXPECT_EQ(h.pool.ref_count(c->block_table[0]), 1);
        h.step();
    }
}

// Hybrid prefix caching (SchedulerConfig::snapshot_interval gives the points). Block size 4, interval 16.
TEST(Scheduler, HybridChunksEndAtSnapshotPointsAndResumeFromThem) {
    Harness h(64, 4, {.max_num_seqs = 4, .max_num_batched_tokens = 64, .num_state_slots = 4, .snapshot_interval = 16},
              true, 8);
    // A 30-token prompt: one chunk would cover the interval point 16 and the prompt point 28; it is cut at
    // the last (28), the state there is kept on block 6, then the 2 tail tokens run.
    Sequence* a = h.add(30, 0);
    auto out = h.scheduler.schedule();
    EXPECT_EQ(h.tokens_of(out, a), 28);
    EXPECT_GE(a->save_snapshot, 0);
    for (const auto& c : out.chunks) h.scheduler.finish_chunk(c);
    EXPECT_NO_THROW(h.scheduler.check_invariants());
    EXPECT_GE(h.pool.snapshot_of(a->block_table[6]), 0);
    EXPECT_EQ(h.pool.snapshot_of(a->block_table[3]), -1);  // 16: crossed inside the chunk, no state there
    out = h.step();
    EXPECT_EQ(h.tokens_of(out, a), 2);
    // Decode: each block boundary at or past the prompt keeps a snapshot, replacing the previous one,
    // except interval points (32), which stay.
    while (a->num_computed < 32) h.step();
    EXPECT_GE(h.pool.snapshot_of(a->block_table[7]), 0);
    while (a->num_computed < 36) h.step();
    const int32_t at36 = h.pool.snapshot_of(a->block_table[8]);
    EXPECT_GE(at36, 0);
    while (a->num_computed < 40) h.step();
    EXPECT_EQ(h.pool.snapshot_of(a->block_table[8]), -1);
    EXPECT_EQ(h.pool.snapshot_of(a->block_table[9]), at36);  // the same snapshot moved on
    EXPECT_GE(h.pool.snapshot_of(a->block_table[7]), 0);     // the interval point stays
    EXPECT_GE(h.pool.snapshot_of(a->block_table[6]), 0);     // and so does the prompt point
    EXPECT_EQ(h.pool.num_attached_snapshots(), 3);

    // The same prompt again resumes from block 6's snapshot: 28 tokens cached, 2 to compute.
    Sequence* b = h.add(30, 0);
    out = h.scheduler.schedule();
    EXPECT_EQ(h.tokens_of(out, b), 2);
    EXPECT_EQ(b->num_computed, 28);
    EXPECT_EQ(b->restore_snapshot, h.pool.snapshot_of(a->block_table[6]));
    EXPECT_EQ(b->block_table[6], a->block_table[6]);
    for (const auto& c : out.chunks) {
        h.scheduler.finish_chunk(c);
        if (c.sample) c.seq->tokens.push_back(7);
    }
    EXPECT_EQ(b->restore_snapshot, -1);
    EXPECT_NO_THROW(h.scheduler.check_invariants());

    // A prompt sharing only 22 tokens: 5 cached KV blocks (20 tokens) but no snapshot among them, so it
    // computes from 0, and its first chunk ends where the shared blocks end (20) to keep a state there.
    Sequence* c = h.add(40, 0);
    for (int i = 22; i < 40; ++i) c->tokens[static_cast<size_t>(i)] = 1000 + i;
    out = h.scheduler.schedule();
    EXPECT_EQ(c->num_computed, 0);
    EXPECT_EQ(h.tokens_of(out, c), 20);
    EXPECT_GE(c->save_snapshot, 0);
    for (const auto& ch : out.chunks) {
        h.scheduler.finish_chunk(ch);
        if (ch.sample) ch.seq->tokens.push_back(7);
    }
    // c's own block 4 duplicates a's chain, so the snapshot goes to the cached copy, a's block 4.
    EXPECT_FALSE(h.pool.is_cached(c->block_table[4]));
    EXPECT_GE(h.pool.snapshot_of(a->block_table[4]), 0);
    EXPECT_NO_THROW(h.scheduler.check_invariants());

    // Ending sequences give back their slots and reservations; the snapshots stay with the cached blocks.
    for (Sequence* s : {a, b, c}) h.scheduler.finish(s);
    EXPECT_NO_THROW(h.scheduler.check_invariants());
    EXPECT_EQ(h.pool.num_free_snapshots() + h.pool.num_attached_snapshots(), 8);
}

}  // namespace
}  // namespace nibble
