// The ModelRunner turns a scheduled batch into one batched forward on a backend and hands back the logits
// rows the sampler needs. The interface is backend-neutral (the CUDA backend implements it too, owning
// device buffers and CUDA graphs); CpuModelRunner drives Model::forward on the CPU and owns the KV cache.
// Hybrid models' per-sequence recurrent state lives in a pool of MambaState slots owned by the runner
// (one per sequence that may run at once); RunnerSequence names the slot. With prefix caching, the runner
// also keeps state snapshots (the state after some cached block, see BlockPool) and copies between slots
// and snapshots on the engine's word; a runner without them says 0 and hybrid prefix caching stays off.
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

// One sampled row's draw for execute_sample: the filters of engine/sampler.h and the uniform u that
// sample_token(logits, params, u) takes (drawn by the engine from the sequence's own stream; unused at
// temperature 0).
struct RowSampling {
    float temperature = 1.0f;  // 0: greedy
    int32_t top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
    double u = 0.0;
};

class ModelRunner {
public:
    virtual ~ModelRunner() = default;
    virtual int64_t vocab_size() const = 0;
    // One forward over the batch, appending every new token's K/V to the cache.
    //   logits [number of entries with needs_logits, vocab], in batch order.
    virtual void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) = 0;
    // Whether execute_greedy picks tokens where the logits are (the device) rather than copying them back.
    virtual bool samples_greedy_on_device() const { return false; }
    // As execute, but each sampled row's argmax token (the first maximum) instead of its logits.
    virtual void execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens);
    // Whether execute_sample draws tokens where the logits are (the device) rather than copying them back.
    virtual bool samples_on_device() const { return false; }
    // As execute, but each sampled row's token as sample_token(row logits, rows[i] filters, rows[i].u) draws it
    // (rows: one per entry with needs_logits, in batch order). The default runs execute and samples on the host.
    virtual void execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                                std::vector<int32_t>& tokens);

    // Hybrid prefix caching. Snapshots this runner holds, ids [0, n): 0 by default (feature off).
    virtual int64_t num_state_snapshots() const { return 0; }
    // Copies a slot's whole recurrent state (conv and SSM, every Mamba layer) into a snapshot, and back.
    // Ordered with execute() as called (a device runner enqueues them on its forward stream).
    virtual void save_state_snapshot(int32_t state_slot, int32_t snapshot);
    virtual void restore_state_snapshot(int32_t snapshot, int32_t state_slot);
};

class CpuModelRunner final : public ModelRunner {
public:
    // A KV cache of num_blocks blocks of block_size tokens, shaped by the model.
    // Hybrid models also get num_state_slots recurrent states with the SSM part stored as ssm_dtype.
    CpuModelRunner(Model& model, int64_t num_blocks, int64_t block_size, KvDtype kv_dtype = KvDtype::F32,
                   int64_t num_state_slots = 0,
                   SsmStateDtype ssm_dtype = SsmStateDtype::F32, int64_t num_state_snapshots = 0);
    int64_t vocab_size() const override { return model_.config().vocab_size; }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override;
    int64_t num_state_snapshots() const override { return static_cast<int64_t>(snapshots_.size()); }
    void save_state_snapshot(int32_t state_slot, int32_t snapshot) override;
    void restore_state_snapshot(int32_t snapshot, int32_t state_slot) override;

private:
    MambaState& slot(int32_t state_slot);
    MambaState& snapshot(int32_t id);

    Model& model_;
    KvCache cache_;
    std::vector<MambaState> states_;  // [num_state_slots], empty for attention-only models
    std::vector<MambaState> snapshots_;  // [num_state_snapshots], same shape as the slots
    std::vector<float> rows_;  // [batch size, vocab]: the forward's last-token rows
};

}  // namespace nibble
