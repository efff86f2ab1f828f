#include "engine/model_runner.h"

#include <algorithm>

#include "base/error.h"
#include "engine/sampler.h"

namespace nibble {

void ModelRunner::save_state_snapshot(int32_t, int32_t) {
    fail("this model runner keeps no recurrent-state snapshots (num_state_snapshots() is 0)");
}

void ModelRunner::restore_state_snapshot(int32_t, int32_t) {
    fail("this model runner keeps no recurrent-state snapshots (num_state_snapshots() is 0)");
}

void ModelRunner::execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens) {
    std::vector<float> logits;
    execute(batch, logits);
    const size_t vocab = static_cast<size_t>(vocab_size());
    tokens.clear();
    for (size_t r = 0; r * vocab < logits.size(); ++r) {
        const auto row = logits.begin() + static_cast<std::ptrdiff_t>(r * vocab);
        tokens.push_back(static_cast<int32_t>(std::max_element(row, row + static_cast<std::ptrdiff_t>(vocab)) - row));
    }
}

void ModelRunner::execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                                 std::vector<int32_t>& tokens) {
    std::vector<float> logits;
    execute(batch, logits);
    const size_t vocab = static_cast<size_t>(vocab_size());
    NIBBLE_CHECK(logits.size() == rows.size() * vocab, "execute_sample: {} sampling rows for {} logits rows",
                 rows.size(), logits.size() / vocab);
    tokens.clear();
    for (size_t r = 0; r < rows.size(); ++r) {
        const RowSampling& q = rows[r];
        tokens.push_back(sample_token(std::span<const float>(logits).subspan(r * vocab, vocab),
                                      {.temperature = q.temperature, .top_k = q.top_k, .top_p = q.top_p,
                                       .min_p = q.min_p},
                                      q.u));
    }
}

CpuModelRunner::CpuModelRunner(Model& model, int64_t num_blocks, int64_t block_size, KvDtype kv_dtype,
                               int64_t num_state_slots, SsmStateDtype ssm_dtype, int64_t num_state_snapshots)
    : model_(model), cache_(model.kv_cache_shape(num_blocks, block_size, kv_dtype)) {
    const MambaStateShape shape = model.mamba_state_shape(ssm_dtype);
    if (!shape.empty()) {
        for (int64_t i = 0; i < num_state_slots; ++i) states_.emplace_back(shape);
        for (int64_t i = 0; i < num_state_snapshots; ++i) snapshots_.emplace_back(shape);
    }
}

MambaState& CpuModelRunner::slot(int32_t state_slot) {
    NIBBLE_CHECK(state_slot >= 0 && state_slot < static_cast<int32_t>(states_.size()),
                 "runner: recurrent-state slot {} out of range [0, {})", state_slot, states_.size());
    return states_[static_cast<size_t>(state_slot)];
}

MambaState& CpuModelRunner::snapshot(int32_t id) {
    NIBBLE_CHECK(id >= 0 && id < static_cast<int32_t>(snapshots_.size()), "runner: state snapshot {} out of range [0, {})",
                 id, snapshots_.size());
    return snapshots_[static_cast<size_t>(id)];
}

// Whole-object copies: the shapes are equal, so the vectors keep their storage.
void CpuModelRunner::save_state_snapshot(int32_t state_slot, int32_t id) { snapshot(id) = slot(state_slot); }

void CpuModelRunner::restore_state_snapshot(int32_t id, int32_t state_slot) { slot(state_slot) = snapshot(id); }

void CpuModelRunner::execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) {
    std::vector<ForwardSequence> seqs;
    seqs.reserve(batch.size());
    for (const RunnerSequence& s : batch) {
        seqs.push_back({.tokens = s.tokens,
                        .kv = {.block_table = s.block_table.data(),
                               .n_table = static_cast<int64_t>(s.block_table.size()),
                               .start_pos = s.start_pos},
                        .all_logits = false,
                        .state = nullptr});
        if (!states_.empty()) {
            NIBBLE_CHECK(s.state_slot >= 0 && s.state_slot < static_cast<int32_t>(states_.size()),
                         "runner: sequence without a recurrent-state slot ({}) for a hybrid model", s.state_slot);
            seqs.back().state = &states_[static_cast<size_t>(s.state_slot)];
        }
    }
    model_.forward(seqs, cache_, rows_);
    const size_t vocab = static_cast<size_t>(vocab_size());
    NIBBLE_CHECK(rows_.size() == batch.size() * vocab, "forward returned {} logits for {} sequences of vocab {}",
                 rows_.size(), batch.size(), vocab);
    // Keep only the rows that are sampled (a prefill chunk that does not end its prompt needs none).
    logits.clear();
    for (size_t i = 0; i < batch.size(); ++i)
        if (batch[i].needs_logits)
            logits.insert(logits.end(), rows_.begin() + static_cast<std::ptrdiff_t>(i * vocab),
                          rows_.begin() + static_cast<std::ptrdiff_t>((i + 1) * vocab));
}

}  // namespace nibble
