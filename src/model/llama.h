// The llama-like family: Llama, Mistral, Qwen2, Qwen3. One decoder: pre-RMSNorm attention with GQA and
// RoPE (optional q/k/v/o biases, optional per-head QK RMSNorm), pre-RMSNorm SwiGLU MLP, final norm, lm_head
// (optionally tied to the embeddings). Differences between the four are ModelConfig fields.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "model/transformer_blocks.h"
#include "model/weights.h"
#include "ops/linear/linear.h"
#include "ops/rope/rope.h"

namespace nibble {

// The llama family's tensor list for a config: what LlamaModel binds, and (flattened) expected_weights().
struct LlamaLayerSpec {
    std::string attn_norm, mlp_norm;    // [n_embd]
    std::string q_norm, k_norm;         // [head_dim], Qwen3 only (empty otherwise)
    LinearSpec q, k, v, o, gate, up, down;
    std::string attn_prefix;            // "model.layers.{il}.self_attn.": where the optional KV cache scales live
};
struct LlamaSpec {
    std::string embed;                  // [vocab, n_embd]
    std::vector<LlamaLayerSpec> layers;
    std::string final_norm;             // [n_embd]
    std::optional<LinearSpec> lm_head;  // absent when tied to the embeddings
};
LlamaSpec llama_spec(const ModelConfig& config);
std::vector<WeightSpec> llama_expected_weights(const ModelConfig& config);

class LlamaModel final : public Model {
public:
    LlamaModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant, ThreadPool& pool);

    const ModelConfig& config() const override { return config_; }
    const QuantConfig& quant_config() const override { return quant_; }
    KvCacheShape kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype = KvDtype::F32) const override;
    void forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) override;
    int64_t weight_bytes() const override;
    std::vector<const LinearWeight*> linear_weights() const override;
    void set_linear_input_observer(LinearInputObserver* observer) override { observer_ = observer; }
    bool decoder_view(DecoderView& out) const override;

private:
    struct Layer {
        AttentionWeights attn;               // input_layernorm, q/k/v/o, Qwen3's q_norm/k_norm
        std::vector<float> mlp_norm;         // [n_embd]
        LinearWeight gate, up, down;         // gate/up [n_ff, n_embd], down [n_embd, n_ff]
    };

    // y = x W^T through the CPU backend, shown to the observer first.
    void linear(const LinearWeight& w, const float* x, int64_t m, float* y);

    std::unique_ptr<Checkpoint> ckpt_;  // owns the mmap every weight view points into
    ModelConfig config_;
    QuantConfig quant_;
    ThreadPool& pool_;
    Tensor embed_;                      // [vocab, n_embd]
    std::vector<Layer> layers_;
    std::vector<float> final_norm_;     // [n_embd]
    LinearWeight lm_head_;              // [vocab, n_embd]
    std::vector<float> k_scales_, v_scales_;  // [n_layers] the checkpoint's KV cache scales, or empty
    RopeTable rope_;
    LinearInputObserver* observer_ = nullptr;
};

}  // namespace nibble
