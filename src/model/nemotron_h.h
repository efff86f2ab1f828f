// NemotronHForCausalLM (Nemotron-H, Nemotron-3-Nano): a hybrid stack where each layer is ONE mixer after
// a pre-RMSNorm, added to the residual stream: Mamba2 (M), attention without RoPE (*), a relu^2 MLP (-) or
// an MoE of relu^2 experts plus a shared expert (E). Tensor names as published checkpoints store them
// (ModelOpt NVFP4 exports included); transformers 5's own save ("model." prefix, experts stacked as
// [n_experts, out, in]) is read too, unquantized:
//   backbone.embeddings.weight [vocab, d]          backbone.norm_f.weight [d]       lm_head.weight [vocab, d]
//   backbone.layers.{i}.norm.weight [d]
//   M: mixer.in_proj [z, x, B, C, dt = 2*d_inner + 2*groups*state + heads, d], mixer.conv1d.weight
//      [conv_dim, 1, K], mixer.conv1d.bias [conv_dim], mixer.dt_bias / A_log / D [heads],
//      mixer.norm.weight [d_inner], mixer.out_proj [d, d_inner]
//   *: mixer.q_proj / k_proj / v_proj / o_proj (no bias)      -: mixer.up_proj / down_proj
//   E: mixer.gate.weight [experts, d] (router), mixer.gate.e_score_correction_bias [experts],
//      mixer.experts.{e}.up_proj / down_proj, mixer.shared_experts.up_proj / down_proj
// The KV cache holds the attention layers only (cache layer j = the j-th attention layer); the Mamba
// layers' state travels per sequence in ForwardSequence::state.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "model/weights.h"
#include "ops/moe/moe.h"

namespace nibble {

// The tensor list of a NemotronH checkpoint (published naming), for `nibble plan`.
std::vector<WeightSpec> nemotron_h_expected_weights(const ModelConfig& config);

class NemotronHModel final : public Model {
public:
    NemotronHModel(std::unique_ptr<Checkpoint> ckpt, ModelConfig config, QuantConfig quant, ThreadPool& pool);

    const ModelConfig& config() const override { return config_; }
    const QuantConfig& quant_config() const override { return quant_; }
    KvCacheShape kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype = KvDtype::F32) const override;
    MambaStateShape mamba_state_shape(SsmStateDtype dtype) const override;
    void forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) override;
    int64_t weight_bytes() const override;
    std::vector<const LinearWeight*> linear_weights() const override;
    std::vector<std::string> default_quant_exclusions() const override;
    void set_linear_input_observer(LinearInputObserver* observer) override { observer_ = observer; }
    bool hybrid_view(HybridView& out) const override;

private:
    struct Layer {
        LayerKind kind = LayerKind::Mamba;
        int64_t cache_index = -1;        // attention: KV cache layer; Mamba: state layer
        std::vector<float> norm;         // [d]
        // Mamba
        LinearWeight in_proj, out_proj;
        std::vector<float> conv_w, conv_b;       // [conv_dim, K], [conv_dim] (empty without conv bias)
        std::vector<float> A, D, dt_bias;        // [heads]; A = -exp(A_log)
        std::vector<float> gated_norm;           // [d_inner]
        // attention
        LinearWeight q, k, v, o;
        // MLP, shared expert
        LinearWeight up, down;
        // MoE
        LinearWeight router;                     // [experts, d], computed in float32
        std::vector<float> correction_bias;      // [experts]
        std::vector<MoeExpertWeights> experts;
    };

    void linear(const LinearWeight& w, const float* x, int64_t m, float* y);
    void relu2_mlp(const LinearWeight& up, const LinearWeight& down, const float* x, int64_t m, float* y);

    std::unique_ptr<Checkpoint> ckpt_;
    ModelConfig config_;
    QuantConfig quant_;
    ThreadPool& pool_;
    Tensor embed_;                       // [vocab, d]
    std::vector<Layer> layers_;
    std::vector<float> final_norm_;      // [d]
    LinearWeight lm_head_;               // [vocab, d]
    int64_t n_attention_ = 0, n_mamba_ = 0;
    std::vector<float> k_scales_, v_scales_;  // [attention layers] KV cache scales, or empty
    LinearInputObserver* observer_ = nullptr;
};

}  // namespace nibble
