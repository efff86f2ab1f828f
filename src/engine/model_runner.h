// The ModelRunner turns a scheduled batch into one batched forward on a backend and hands back the logits
// rows the sampler needs. The interface is backend-neutral (the CUDA backend implements it too, owning
// device buffers and CUDA graphs); CpuModelRunner drives Model::forward on the CPU and owns the KV cache.
// Hybrid models' per-sequence recurrent state lives in a pool of MambaState slots owned by the runner
// (one per sequence that may run at once); RunnerSequence names the slot.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/model.h"

namespace nibble {

struct RunnerSequence {
    std::span<const int32_t> tokens;       // the new tokens of this step
    std::span<const int32_t> block_table;  // covers start_pos + tokens.size() positions
    int64_t start_pos = 0;                 // tokens already in the cache
    bool needs_logits = false;             // the last new token's logits are sampled
    int32_t state_slot = -1;               // hybrid models: the sequence's recurrent-state slot
};

class ModelRunner {
public:
    virtual ~ModelRunner() = default;
    virtual int64_t vocab_size() const = 0;
    // One forward over the batch, appending every new token's K/V to the cache.
    //   logits [number of entries with needs_logits, vocab], in batch order.
    virtual void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) = 0;
};

class CpuModelRunner final : public ModelRunner {
public:
    // A KV cache of num_blocks blocks of block_size tokens, shaped by the model.
    // Hybrid models also get num_state_slots recurrent states with the SSM part stored as ssm_dtype.
    CpuModelRunner(Model& model, int64_t num_blocks, int64_t block_size, KvDtype kv_dtype = KvDtype::F32,
                   int64_t num_state_slots = 0,
                   SsmStateDtype ssm_dtype = SsmStateDtype::F32);
    int64_t vocab_size() const override { return model_.config().vocab_size; }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override;

private:
    Model& model_;
    KvCache cache_;
    std::vector<MambaState> states_;  // [num_state_slots], empty for attention-only models
    std::vector<float> rows_;  // [batch size, vocab]: the forward's last-token rows
};

}  // namespace nibble
