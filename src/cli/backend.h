// The backend a CLI command runs a model on, from `--device auto|cuda|cpu`: the CUDA backend when this build
// has it, a GPU is present and the model is one it runs (auto), always (cuda: an error naming why it cannot),
// or never (cpu). Shared by `nibble run` and `nibble serve`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/model_runner.h"
#include "model/model.h"

namespace nibble::cli {

bool use_cuda_backend(const std::string& device, const Model& model);

// A runner over `model` with a KV cache of n_blocks blocks of block_size tokens: the CUDA runner (weights
// uploaded, bf16 cache, decode steps as CUDA graphs, steps of at most kMaxStepTokens) when `cuda`, else the
// CPU reference runner (f32 cache). A hybrid model's runner keeps one recurrent-state slot: its sequence's
// RunnerSequence::state_slot is 0.
constexpr int64_t kMaxStepTokens = 2048;
std::unique_ptr<ModelRunner> make_runner(Model& model, bool cuda, int64_t n_blocks, int64_t block_size,
                                         int64_t max_model_len);

}  // namespace nibble::cli
