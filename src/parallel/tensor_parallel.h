// Tensor parallelism, the sharding half: for a model config and a tensor-parallel size N, which slice of
// each weight rank r holds, and the slicing of a bound LinearWeight (any stored format) into that slice.
//
// The Megatron split of a pre-norm decoder layer, with one all-reduce after each row-parallel layer:
//   q, k, v     column-parallel (output rows), by KV-head groups: rank r holds KV heads
//               [r*kvh/N, (r+1)*kvh/N) and the query heads that read them, [r*H/N, (r+1)*H/N). When N exceeds
//               n_kv_heads (N a multiple of it) each KV head is replicated on N/kvh ranks, as vLLM does.
//   o           row-parallel (input columns): the same query-head columns; outputs are partial sums
//   gate, up    column-parallel over the intermediate size; down row-parallel over it
//   embedding   vocabulary-parallel: rank r holds rows [r*ceil(V/N), ...) (the last rank may hold fewer);
//               a token outside them embeds as zeros, and the all-reduce leaves exactly one row
//   lm_head     vocabulary-parallel the same way, followed by an all-gather of the logits
//   norms       replicated
// Qwen3-MoE adds expert parallelism in its MoE layers (attention and any dense MLP layer, mlp_only_layers, as
// above): the router is replicated, so every rank routes every token alike, and rank r holds whole experts
// [r*E/N, (r+1)*E/N) (E = num_experts, divisible by N). A rank's MoE output is the routed sum over its own
// experts only (the others' pairs are dropped), a partial sum like a row-parallel output: one all-reduce
// after it. Experts are never sliced, so they add no NVFP4 block constraint.
// Biases: a column-parallel layer's bias is sliced with its rows; a row-parallel layer's bias stays on rank
// 0 only, so the all-reduce adds it exactly once.
//
// Formats: a column-parallel slice is whole rows, a view into the original memory for every format (NVFP4's
// packed rows [n_out, n_in/2] and E4M3 scale rows [n_out, n_in/16] alike). A row-parallel slice is a column
// range of every row, copied: for NVFP4 the range must start and end on a 16-value block boundary (the block
// scale covers 16 inputs; 16 also keeps E2M1 nibble pairs whole), otherwise the shard is refused naming the
// tensor and the sizes. FP8 (per-tensor scale) and BF16/F16/F32 slice at any column; scales are replicated.
#pragma once

#include <cstdint>
#include <list>
#include <string_view>
#include <vector>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "model/model.h"
#include "ops/linear/linear.h"

namespace nibble {

// [begin, end) along one dimension.
struct IndexRange {
    int64_t begin = 0, end = 0;
    int64_t size() const { return end - begin; }
    bool operator==(const IndexRange&) const = default;
};

enum class ShardKind {
    Replicated,      // every rank holds the whole tensor
    ColumnParallel,  // W [n_out, n_in]: output rows `range` (bias sliced alike)
    RowParallel,     // W [n_out, n_in]: input columns `range`; output is a partial sum (bias on rank 0 only)
    VocabParallel,   // embedding / lm_head rows `range` of the vocabulary (column-parallel, uneven last rank)
};
std::string_view shard_kind_name(ShardKind kind);

struct ShardSpec {
    ShardKind kind = ShardKind::Replicated;
    IndexRange range;  // rows for Column/VocabParallel, columns for RowParallel; unused for Replicated
};

// Which part of the model one rank of a tensor-parallel group holds.
struct TensorParallelLayout {
    int64_t tp_size = 1, rank = 0;
    IndexRange q_heads;          // query heads of this rank
    IndexRange kv_heads;         // its KV heads (exactly one, shared with other ranks, when tp_size > n_kv_heads)
    int64_t kv_replicas = 1;     // ranks holding each KV head
    IndexRange ff;               // MLP intermediate columns
    IndexRange vocab;            // embedding / lm_head rows
    int64_t vocab_per_rank = 0;  // ceil(vocab / tp_size): each rank's slot in the logits all-gather
    IndexRange experts;          // MoE layers: the routed experts this rank holds (all of them at tp_size 1;
                                 // empty for a model without MoE layers)
};

// Throws nibble::Error naming every size that does not divide (heads, KV heads, intermediate size when some
// layer has a dense MLP, vocabulary, MoE experts) or the architecture when its family has no tensor-parallel
// split yet (the llama family: Llama, Mistral, Qwen2, Qwen3; and Qwen3-MoE, experts split by id).
void check_tensor_parallel(const ModelConfig& config, int64_t tp_size);
// Whether the architecture has a split at all (the families above).
bool has_tensor_parallel_split(Arch arch);
// Whether any layer of the model has a dense MLP (all of the llama family's; Qwen3-MoE's mlp_only_layers and
// the layers decoder_sparse_step skips).
bool has_dense_mlp_layer(const ModelConfig& config);

// What the weight format adds, before any weight is read: an NVFP4 row-parallel layer (o_proj, down_proj not
// excluded from quantization) needs each rank's share of its inputs to be a multiple of 16. Throws naming the
// module and the sizes.
void check_tensor_parallel_quant(const ModelConfig& config, const QuantConfig& quant, int64_t tp_size);

// The layout of `rank` (checks as above, and 0 <= rank < tp_size).
TensorParallelLayout tensor_parallel_layout(const ModelConfig& config, int64_t tp_size, int64_t rank);

// The config one rank's blocks run with: its own query/KV head counts, intermediate size and vocabulary
// share; everything else (hidden size, head_dim, RoPE, norms, sliding window) unchanged. moe.n_experts stays
// the whole model's count: the replicated router scores all of them (the rank's experts are layout.experts).
ModelConfig rank_config(const ModelConfig& config, const TensorParallelLayout& layout);

// The llama family's split of each tensor of one layer (every layer is split alike) and of the vocabulary.
struct LlamaShardPlan {
    TensorParallelLayout layout;
    ShardSpec q, k, v, o, gate, up, down;
    ShardSpec embed, lm_head;
};
LlamaShardPlan llama_shard_plan(const ModelConfig& config, int64_t tp_size, int64_t rank);

// The tensors one rank holds, as llama_expected_weights lists them for the whole model but with sharded
// shapes (linears' n_out / n_in, the embedding's rows; row-parallel biases on rank 0 only). Rank 0 holds the
// most (the largest vocabulary share and the row-parallel biases): the memory plan prices it. A Qwen3-MoE
// layer lists its router (replicated) and the rank's experts whole, named as qwen_moe_expected_weights does.
std::vector<WeightSpec> llama_rank_expected_weights(const ModelConfig& config, int64_t tp_size, int64_t rank);

// A LinearSpec's shape on a rank (bias dropped from row-parallel shards off rank 0).
LinearSpec shard_linear_spec(const LinearSpec& full, const ShardSpec& shard, int64_t rank);

// Bytes that back shards which are not views of the original (row-parallel slices). Pointers it hands out
// stay valid for its lifetime.
class ShardStore {
public:
    const uint8_t* keep(std::vector<uint8_t> bytes);
    int64_t bytes() const { return bytes_; }

private:
    std::list<std::vector<uint8_t>> blobs_;
    int64_t bytes_ = 0;
};

// Rank `rank`'s share of `full`. Column/VocabParallel slices are views into full's memory; RowParallel
// slices are copied into `store`. Throws naming the tensor and the sizes for an out-of-range or empty
// slice, and for an NVFP4 row-parallel slice that would split a 16-value block.
LinearWeight shard_linear(const LinearWeight& full, const ShardSpec& shard, int64_t rank, ShardStore& store);

}  // namespace nibble
