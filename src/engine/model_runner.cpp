#include "engine/model_runner.h"

#include <algorithm>

#include "base/error.h"

namespace nibble {

CpuModelRunner::CpuModelRunner(Model& model, int64_t num_blocks, int64_t block_size, KvDtype kv_dtype,
                               int64_t num_state_slots, SsmStateDtype ssm_dtype)
    : model_(model), cache_(model.kv_cache_shape(num_blocks, block_size, kv_dtype)) {
    const MambaStateShape shape = model.mamba_state_shape(ssm_dtype);
    if (!shape.empty())
        for (int64_t i = 0; i < num_state_slots; ++i) states_.emplace_back(shape);
}

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
