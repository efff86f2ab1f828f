// One rank of a tensor-parallel llama-family model (Llama, Mistral, Qwen2, Qwen3) on the CPU: the rank's
// shards of every weight (tensor_parallel.h says which), and the forward of model/llama.cpp over them with the
// collectives in between: an all-reduce after the vocabulary-parallel embedding and after each row-parallel
// layer (o_proj, down_proj), an all-gather of the vocabulary-parallel logits. The blocks are
// transformer_blocks' own, run with the rank's config (its head counts, intermediate size, vocabulary share).
//
// It is a Model: the engine can drive one per rank (each with its own KV cache of the rank's KV heads), every
// rank seeing the same batches. Every rank returns the full logits [rows, vocab].
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "model/transformer_blocks.h"
#include "ops/rope/rope.h"
#include "parallel/communicator.h"
#include "parallel/tensor_parallel.h"

namespace nibble {

class LlamaRankModel final : public Model {
public:
    // comm: this rank's communicator (its rank and world size give the shard); it must outlive the model.
    LlamaRankModel(std::shared_ptr<const Checkpoint> ckpt, ModelConfig config, QuantConfig quant, Communicator& comm,
                   ThreadPool& pool);

    const ModelConfig& config() const override { return config_; }
    const QuantConfig& quant_config() const override { return quant_; }
    const LlamaShardPlan& shard_plan() const { return plan_; }
    // The rank's KV heads only.
    KvCacheShape kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype = KvDtype::F32) const override;
    void forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) override;
    // The rank's shards as stored.
    int64_t weight_bytes() const override;
    std::vector<const LinearWeight*> linear_weights() const override;
    void set_linear_input_observer(LinearInputObserver* observer) override { observer_ = observer; }

private:
    struct Layer {
        AttentionWeights attn;        // q/k/v column shards, o row shard; norms whole
        std::vector<float> mlp_norm;  // [n_embd]
        LinearWeight gate, up, down;  // gate/up [n_ff/N, n_embd], down [n_embd, n_ff/N]
    };

    void linear(const LinearWeight& w, const float* x, int64_t m, float* y);
    // x [m, n_embd] = the embedding rows of `tokens`, summed over ranks (each holds a vocabulary range).
    void embed(const std::vector<int32_t>& tokens, float* x);

    std::shared_ptr<const Checkpoint> ckpt_;  // every unsliced view points into its mmap
    ModelConfig config_;                      // the whole model's
    ModelConfig local_;                       // this rank's share (rank_config)
    QuantConfig quant_;
    Communicator& comm_;
    ThreadPool& pool_;
    LlamaShardPlan plan_;
    ShardStore store_;                        // row-parallel slices
    Tensor embed_;                            // [vocab share, n_embd] rows plan_.embed.range of the table
    std::vector<Layer> layers_;
    std::vector<float> final_norm_;           // [n_embd]
    LinearWeight lm_head_;                    // [vocab share, n_embd]
    std::vector<float> k_scales_, v_scales_;  // [n_layers] or empty
    RopeTable rope_;
    LinearInputObserver* observer_ = nullptr;
};

// Reads DIR's config.json and quantization config and binds rank comm.rank()'s shards of a llama-family
// checkpoint (the NVFP4 row-parallel check runs first). The checkpoint may be shared by ranks of one process.
std::unique_ptr<LlamaRankModel> load_llama_rank(const std::string& dir, std::shared_ptr<const Checkpoint> ckpt,
                                                Communicator& comm, ThreadPool& pool);

}  // namespace nibble
