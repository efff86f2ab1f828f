// One ModelRunner call as bytes: what rank 0 of a tensor-parallel group sends the other ranks so that they
// run the same forward (parallel/step_channel.h carries the bytes). A step is the call's kind and, for
// execute calls, the batch (every RunnerSequence's tokens, block table, start_pos, needs_logits,
// state_slot); for snapshot calls the slot and snapshot ids.
//
// Wire (host byte order: every rank runs the same build):
//   "NBRS" uint32 version(1) uint32 call int32 state_slot int32 snapshot uint32 n_seqs
//   n_seqs x { int64 start_pos int32 state_slot uint32 needs_logits(0|1) uint32 n_tokens uint32 n_blocks
//              int32 tokens[n_tokens] int32 block_table[n_blocks] }
// Decoding checks every count against the bytes left, so a truncated or corrupted message is an error
// naming what was being read, never a read past the end.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "engine/model_runner.h"

namespace nibble {

enum class RunnerCall : uint32_t {
    Execute = 1,
    ExecuteGreedy = 2,
    SaveStateSnapshot = 3,     // state_slot -> snapshot
    RestoreStateSnapshot = 4,  // snapshot -> state_slot
    Shutdown = 5,              // rank 0 is stopping: followers end their loop
};
std::string_view runner_call_name(RunnerCall call);

// A decoded step. batch's spans point into `ids`, which it owns: a RunnerStep can be moved (a vector's move
// keeps its buffer) but not copied.
struct RunnerStep {
    RunnerCall call = RunnerCall::Shutdown;
    int32_t state_slot = -1, snapshot = -1;  // snapshot calls
    std::vector<int32_t> ids;                // every sequence's tokens then its block table, back to back
    std::vector<RunnerSequence> batch;       // execute calls

    RunnerStep() = default;
    RunnerStep(RunnerStep&&) = default;
    RunnerStep& operator=(RunnerStep&&) = default;
    RunnerStep(const RunnerStep&) = delete;
    RunnerStep& operator=(const RunnerStep&) = delete;
};

// out = the step's bytes (replaced; its capacity is reused). batch only for Execute / ExecuteGreedy;
// state_slot and snapshot only for the snapshot calls (-1 otherwise).
void encode_runner_step(RunnerCall call, std::span<const RunnerSequence> batch, int32_t state_slot, int32_t snapshot,
                        std::vector<uint8_t>& out);
inline std::vector<uint8_t> encode_runner_step(RunnerCall call, std::span<const RunnerSequence> batch = {},
                                               int32_t state_slot = -1, int32_t snapshot = -1) {
    std::vector<uint8_t> out;
    encode_runner_step(call, batch, state_slot, snapshot, out);
    return out;
}

// Throws nibble::Error for bytes that are not a step: wrong magic or version, an unknown call, counts that
// run past the end, needs_logits other than 0/1, a batch on a non-execute call, bytes left over.
RunnerStep decode_runner_step(std::span<const uint8_t> bytes);

}  // namespace nibble
