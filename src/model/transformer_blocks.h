// Pieces of a pre-norm transformer decoder that several architecture files share (llama.cpp, qwen_moe.cpp):
// the flattened token batch, the attention block (GQA, optional q/k/v/o biases and per-head QK RMSNorm, RoPE,
// paged KV cache), the dense SwiGLU MLP block and the final norm + lm_head over the rows that need logits.
// Activations are float32 row-major [m, width], m = the new tokens of all sequences, one sequence after another.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "model/weights.h"
#include "ops/linear/linear.h"
#include "ops/rope/rope.h"

namespace nibble {

// y = x W^T as the model computes it (its backend, shown to its calibration observer first).
//   x [rows, w.n_in], y [rows, w.n_out]
using ModelLinearFn = std::function<void(const LinearWeight& w, const float* x, int64_t rows, float* y)>;

// The new tokens of a batch, flattened.
struct TokenBatch {
    std::vector<int32_t> tokens;     // [m]
    std::vector<int64_t> positions;  // [m]
    std::vector<int64_t> seq_begin;  // [n_seqs] first row of each sequence
    int64_t m = 0;
};
TokenBatch flatten_batch(std::span<const ForwardSequence> seqs);

// Pre-norm self-attention of one layer (Llama/Mistral/Qwen2/Qwen3 and their MoE variants share it).
struct AttentionWeights {
    std::vector<float> norm;            // [n_embd] input_layernorm
    LinearWeight q, k, v, o;            // q [n_heads*head_dim, n_embd], k/v [n_kv_heads*head_dim, n_embd], o [n_embd, n_heads*head_dim]
    std::vector<float> q_norm, k_norm;  // [head_dim], QK-norm models only (else empty)
};

// Binds `prefix`self_attn.{q,k,v,o}_proj, input_layernorm and (config.qk_norm) q_norm/k_norm.
AttentionWeights load_attention(const Checkpoint& ckpt, const QuantConfig& quant, const ModelConfig& config,
                                const std::string& prefix);

// out = o_proj(attention(rope(qk_norm(q, k)), v)) of rmsnorm(x), writing this step's K/V into the cache; x is
// only read. The attention block without its residual add: a tensor-parallel rank (config with its own head
// counts, w its shards) all-reduces `out`, a partial sum, before adding it.
//   x, out [batch.m, n_embd]
void attention_cpu(ThreadPool& pool, const ModelConfig& config, const AttentionWeights& w, const RopeTable& rope,
                   std::span<const ForwardSequence> seqs, const TokenBatch& batch, KvCache& cache, int64_t layer,
                   const ModelLinearFn& linear, const float* x, float* out);

// x += o_proj(attention(rope(qk_norm(q, k)), v)) of rmsnorm(x), writing this step's K/V into the cache.
//   x [batch.m, n_embd]
void attention_block_cpu(ThreadPool& pool, const ModelConfig& config, const AttentionWeights& w, const RopeTable& rope,
                         std::span<const ForwardSequence> seqs, const TokenBatch& batch, KvCache& cache,
                         int64_t layer, const ModelLinearFn& linear, float* x);

// out = down(silu(gate h) * up h), the dense SwiGLU MLP. h, out [m, n_embd] (out may alias h).
void swiglu_mlp_cpu(const LinearWeight& gate, const LinearWeight& up, const LinearWeight& down, const float* h,
                    int64_t m, const ModelLinearFn& linear, float* out);

// logits [rows, vocab] = lm_head(rmsnorm(x[row])) for every new token of sequences with all_logits, else
// each sequence's last token, in sequence order.
void final_logits_cpu(const ModelConfig& config, std::span<const ForwardSequence> seqs, const TokenBatch& batch,
                      const float* x, const std::vector<float>& final_norm, const LinearWeight& lm_head,
                      const ModelLinearFn& linear, std::vector<float>& logits);

// The checkpoint's per-layer KV cache scales (amax / 448; ops/attention/kv_cache.h says how each cache dtype
// uses them): ModelOpt's `<attn>k_proj.k_scale` / `<attn>v_proj.v_scale` or compressed-tensors'
// `<attn>k_scale` / `<attn>v_scale`. A layer without one gets vLLM's default 1.0.
struct KvScales {
    std::vector<float> k, v;  // [attention layers]
    bool any = false;         // the checkpoint has at least one
    // attn_prefix: the attention module with its dot, e.g. "model.layers.3.self_attn."
    void add_layer(const Checkpoint& ckpt, const std::string& attn_prefix);
    // Empties both lists when the checkpoint has none at all (the cache then uses 1.0 everywhere).
    void finish();
};

// lm_head as the embedding table itself (tie_word_embeddings): a dense view, no copy.
//   embed [vocab, n_embd]
LinearWeight tied_lm_head(const Tensor& embed, const std::string& embed_name);

// The paged KV cache of a model whose attention layers (n_kv_layers of them) share n_kv_heads x head_dim.
KvCacheShape attention_kv_cache_shape(const ModelConfig& config, int64_t n_kv_layers, int64_t n_blocks,
                                      int64_t block_size, KvDtype dtype, const std::vector<float>& k_scales,
                                      const std::vector<float>& v_scales);

}  // namespace nibble
