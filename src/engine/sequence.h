// One of a request's n sequences as the scheduler sees it: its tokens (prompt, then output), the KV blocks
// holding them, how many of them are computed, and where it stands. The tokens still to compute are
// tokens[num_computed ..]: a whole prompt on admission, one token per decode step, everything again after
// a preemption (recompute). The engine owns Sequence objects; the scheduler holds pointers to them.
// Hybrid models keep a recurrent state (Mamba conv/SSM state) per sequence beside its KV blocks: a slot
// of the runner's state pool, taken where block_table is (Scheduler::admit) and given back where it is
// released (preempt, finish); a sequence computed from token 0 again starts from a zero state. With prefix
// caching on, a hybrid sequence admitted on cached blocks restores its slot from the snapshot attached to
// the last of them (restore_snapshot), and a chunk that ends on a snapshot point saves the state into a
// reserved snapshot (save_snapshot) that finish_chunk attaches to the block ending there.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/block_pool.h"

namespace nibble {

enum class SequenceStatus { Waiting, Running, Finished };

struct Sequence {
    int64_t id = 0;                      // engine-wide, increasing with arrival
    int index = 0;                       // which of the request's n samples
    std::vector<int32_t> tokens;         // prompt then output
    int64_t n_prompt = 0;
    std::vector<int32_t> block_table;    // [ceil(computed or scheduled tokens / block_size)] physical blocks
    std::vector<BlockLink> chain;        // prefix-cache identity of the leading full computed blocks
    int64_t num_computed = 0;            // tokens whose K/V are in the cache
    int32_t state_slot = -1;             // hybrid models: the runner's MambaState slot while running
    int32_t restore_snapshot = -1;       // hybrid: load the slot from this snapshot before the next forward
    int32_t save_snapshot = -1;          // hybrid: reserved; the state after this step's chunk goes there
    int32_t rolling_block = -1;          // hybrid: the block of its latest decode snapshot (replaced at the next)
    int64_t shared_point = 0;            // hybrid: end of the cached KV blocks it matched at admission
    int64_t num_cached_tokens = -1;      // prompt tokens found in the prefix cache at first admission
    SequenceStatus status = SequenceStatus::Waiting;
    // Sample i > 0 of a request waits for sample 0's prompt to be computed, then shares its full prompt
    // blocks (reference counts) and computes only the tail. Cleared once admitted.
    const Sequence* parent = nullptr;

    int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
    int64_t num_output() const { return num_tokens() - n_prompt; }
    std::span<const int32_t> prompt() const { return std::span(tokens).first(static_cast<size_t>(n_prompt)); }
    std::span<const int32_t> output() const { return std::span(tokens).subspan(static_cast<size_t>(n_prompt)); }
};

}  // namespace nibble
