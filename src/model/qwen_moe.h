// Qwen2-MoE and Qwen3-MoE (Qwen2MoeForCausalLM, Qwen3MoeForCausalLM): the Qwen2 / Qwen3 attention block
// (transformer_blocks.h) and, per layer, either the dense SwiGLU MLP or the sparse MoE block: a softmax router
// `mlp.gate` [n_experts, n_embd], the top-k of `mlp.experts.{e}.{gate,up,down}_proj` (SwiGLU, moe_intermediate
// _size wide) weighted by the router, and for Qwen2-MoE a shared expert `mlp.shared_expert.*` scaled by
// sigmoid(`mlp.shared_expert_gate` x). Which layers are MoE: ModelConfig::is_moe_layer.
// Experts are stored per expert as published checkpoints and ModelOpt / llm-compressor exports hold them;
// each is a LinearWeight in any format (dense, FP8, NVFP4), the router and shared_expert_gate likewise (the
// exporters keep them unquantized).
#pragma once

#include <memory>
#include <vector>

#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "model/transformer_blocks.h"
#include "ops/moe/moe.h"
#include "ops/rope/rope.h"

namespace nibble {

// The checkpoint tensors of a Qwen2-MoE / Qwen3-MoE config, in forward order.
std::vector<WeightSpec> qwen_moe_expected_weights(const ModelConfig& config);

class QwenMoeModel final : public Model {
public:
    QwenMoeModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant, ThreadPool& pool);

    const ModelConfig& config() const override { return config_; }
    const QuantConfig& quant_config() const override { return quant_; }
    KvCacheShape kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype = KvDtype::F32) const override;
    void forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) override;
    int64_t weight_bytes() const override;
    std::vector<const LinearWeight*> linear_weights() const override;
    void set_linear_input_observer(LinearInputObserver* observer) override { observer_ = observer; }
    // Both architectures; Qwen2-MoE's shared expert and its gate in the MoE layers' shared_* fields.
    bool decoder_view(DecoderView& out) const override;

private:
    struct Layer {
        AttentionWeights attn;
        std::vector<float> mlp_norm;             // [n_embd] post_attention_layernorm
        bool moe = false;
        LinearWeight gate, up, down;             // dense MLP: gate/up [n_ff, n_embd], down [n_embd, n_ff]
        LinearWeight router;                     // MoE: [n_experts, n_embd]
        std::vector<MoeExpertWeights> experts;   // MoE: [n_experts], each gate/up [n_ff_expert, n_embd]
        bool has_shared = false;
        MoeExpertWeights shared;                 // Qwen2-MoE: gate/up [n_ff_shared, n_embd]
        LinearWeight shared_gate;                // Qwen2-MoE: [1, n_embd]
    };

    void linear(const LinearWeight& w, const float* x, int64_t m, float* y);
    // out [m, n_embd] = the layer's MoE block of h [m, n_embd].
    void moe_block(const Layer& L, const float* h, int64_t m, float* out);

    std::unique_ptr<Checkpoint> ckpt_;
    ModelConfig config_;
    QuantConfig quant_;
    ThreadPool& pool_;
    Tensor embed_;                       // [vocab, n_embd]
    std::vector<Layer> layers_;
    std::vector<float> final_norm_;      // [n_embd]
    LinearWeight lm_head_;               // [vocab, n_embd]
    std::vector<float> k_scales_, v_scales_;  // [n_layers] the checkpoint's KV cache scales, or empty
    RopeTable rope_;
    LinearInputObserver* observer_ = nullptr;
};

}  // namespace nibble
