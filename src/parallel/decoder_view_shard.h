// One tensor-parallel rank's share of a DecoderView (model/decoder_view.h): the split of tensor_parallel.h
// (the llama family's; Qwen3-MoE's experts by id) applied to a whole model's view, for backends that upload
// a rank's weights (the CUDA backend under --tensor-parallel-size). Column-parallel slices, the experts and
// the vocabulary rows are views into the model's memory; row-parallel slices are copies this object owns. Norms and RoPE are shared as they are.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "model/decoder_view.h"
#include "parallel/tensor_parallel.h"

namespace nibble {

struct DecoderViewShard {
    ModelConfig config;           // the rank's (rank_config)
    TensorParallelLayout layout;
    DecoderView view;             // pointers into `linears`, `store` and the model

    DecoderViewShard() = default;
    DecoderViewShard(const DecoderViewShard&) = delete;  // the view points into this object
    DecoderViewShard& operator=(const DecoderViewShard&) = delete;

    std::deque<LinearWeight> linears;  // the rank's linears (a deque: pointers stay valid as it grows)
    ShardStore store;                  // row-parallel slices' bytes
};

// Rank `rank` of a tp_size-way split of `view` (a model of `config`, quantized as `quant`). Throws naming
// what does not divide or which architecture has no split (check_tensor_parallel, check_tensor_parallel_quant).
// A MoE layer keeps its router and the rank's experts layout.experts (expert_* lists of that many pointers
// into the model's; the config keeps the whole model's moe.n_experts for the router).
std::unique_ptr<DecoderViewShard> shard_decoder_view(const ModelConfig& config, const QuantConfig& quant,
                                                     const DecoderView& view, int64_t tp_size, int64_t rank);

}  // namespace nibble
