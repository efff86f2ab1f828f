// The forward of a pre-norm decoder (llama family; Qwen3-MoE / Qwen2-MoE with their MoE blocks) on the device, over a batch of sequences whose new
// tokens are flattened into rows, with their K/V appended to a paged device KV cache. Activations are BF16
// (serving) or F32 (the exactness mode the device tests compare with the CPU reference in); the logits of the
// rows that need them come out in float32. Every kernel is enqueued on one stream and nothing synchronizes,
// so a decode step can be captured into a CUDA graph (cuda_graphs.h).
// A MoE layer runs, in place of the dense MLP: router logits = h W_router^T in the activation dtype (BF16
// GEMV / GEMM, as transformers runs the router in the model's dtype; float32 in the F32 mode), the softmax
// top-k (moe_route_softmax), then moe_experts_nvfp4 (permute, grouped NVFP4 up/down GEMVs, combine) into
// a fixed workspace sized for max_tokens rows: no host sync, graph-capturable. BF16 activations at prefill
// sizes take the grouped tensor-core GEMM (moe_prefers_gemm); BF16 experts run the same GEMM there and a
// plain GEMV for decode. Qwen2-MoE's shared expert runs as the dense MLP does (its GEMVs / GEMMs through the
// ops' own dispatch, not the autotuner's), is scaled by sigmoid(shared_expert_gate . h) per token
// (shared_expert_gate_cuda.h) and is added to the routed sum in the combine.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/device_buffer.h"
#include "gpu/dequant_pipeline.h"
#include "gpu/device_forward.h"
#include "gpu/device_decoder.h"
#include "ops/attention/attention_cuda.h"
#include "ops/attention/kv_cache.h"
#include "ops/linear/gemm_cuda.h"
#include "parallel/communicator.h"
#include "tensor/dtype.h"
#include "tune/kernel_choices.h"

namespace nibble::gpu {

// The paged KV cache of every layer in one allocation each for K and V (kv_cache.h's layout contract).
class DeviceKvCache {
public:
    explicit DeviceKvCache(const KvCacheShape& shape);
    const KvCacheShape& shape() const { return shape_; }
    cuda::PagedKvLayer layer(int64_t l) const;
    int64_t bytes() const { return shape_.total_bytes(); }

private:
    KvCacheShape shape_;
    cuda::DeviceBuffer k_, v_;  // [n_layers, n_blocks, block_bytes]
};

// One step's batch, in device memory (the runner stages it), with the host-side bounds the launches need.
struct DeviceBatch {
    int64_t n_tokens = 0, n_seqs = 0;
    int64_t max_q_len = 0, max_kv_len = 0, max_blocks = 0;
    int64_t n_logit_rows = 0;
    const int32_t* tokens = nullptr;        // [n_tokens]
    const int64_t* positions = nullptr;     // [n_tokens]
    const int64_t* slot_mapping = nullptr;  // [n_tokens] physical cache slot of each token
    const int32_t* q_start = nullptr;       // [n_seqs + 1]
    const int32_t* start_pos = nullptr;     // [n_seqs]
    const int32_t* block_tables = nullptr;  // [n_seqs, max_blocks]
    const int32_t* logit_rows = nullptr;    // [n_logit_rows] rows whose logits are wanted
    const int32_t* state_slots = nullptr;   // [n_seqs] hybrid models: each sequence's recurrent-state slot (-1: none)
};

class DecoderForward : public DeviceForward {
public:
    // Buffers for up to max_tokens rows per step and max_logit_rows logits rows.
    DecoderForward(const DeviceDecoder& weights, DType act_dtype, int64_t max_tokens, int64_t max_logit_rows);
    ~DecoderForward();

    DType act_dtype() const { return act_; }
    int64_t max_tokens() const { return max_tokens_; }
    // Splits of the key range the attention uses for this batch (flash-decoding), and room for them in the
    // workspace; the graph runner fixes it per bucket so replays never reallocate.
    int attention_splits(const DeviceBatch& b, const DeviceKvCache& kv) const;
    void reserve_attention(int splits, int64_t n_tokens);
    // Enqueues the forward on `stream`, with the batch's own attention_splits() and this object's workspace.
    void run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream);
    // The same with fixed splits and a caller's workspace (a captured graph must keep both).
    void run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream, int splits, void* workspace,
             size_t workspace_bytes);
    // Workspace bytes `splits` need for a batch of n_tokens rows.
    size_t attention_workspace_bytes(int splits, int64_t n_tokens) const;
    // [max_logit_rows, vocab] float32; rows 0 .. n_logit_rows - 1 hold the last run's logits (the whole
    // vocabulary, also on a tensor-parallel rank).
    const float* logits() const { return logits_.as<float>(); }

    // Tensor parallelism: the group this rank's shard (weights.sharded()) runs in; required before the first
    // run of a shard. Collectives (all-reduce after the vocabulary-parallel embedding and after each
    // row-parallel layer, o_proj and down_proj; all-gather of the vocabulary-parallel logits) are enqueued
    // on the communicator's own stream, which must be the stream run() is given.
    void set_communicator(Communicator* comm);

    // Rows above this run the prefill GEMM (BF16 activations), the rest the GEMVs.
    static constexpr int64_t kGemvMaxRows = 32;

    // Decode GEMVs of NVFP4 weights fused per input (q/k/v in one launch, gate/up with SwiGLU in another), and
    // eager prefill steps' q/k/v GEMMs fused into one where qkv_prefill_gemm_fusable; on by default, off to
    // compare or to test the separate launches.
    void set_fused_gemv(bool on) { fuse_ = on; }

    // The autotuner's choices (tune/kernel_choices.h); null (the default) leaves every launch to the ops'
    // own dispatch. Resolves every shape this forward can run once, here: each linear's GEMV per m tile,
    // attention per (sequences, cache length) bucket for decode and (query rows, cache length) for
    // prefill, into small arrays; a launch then indexes them and walks a few candidates (fallback: the
    // next candidate when one fails to launch; under graph capture only variants already launched eagerly
    // or the heuristic one). The fused decode GEMVs (q/k/v, gate/up) are not registry variants and keep
    // their kernels. Logs at info how many shapes use a cached choice.
    void set_kernel_choices(std::shared_ptr<tune::KernelChoices> choices, KvDtype kv_dtype, int64_t max_num_seqs,
                            int64_t max_model_len);
    const tune::KernelChoices* kernel_choices() const { return choices_.get(); }

private:
    // One linear's resolved GEMV candidates per m tile (tune::gemv_tile_index).
    struct GemvChoice {
        tune::ResolvedChoice tiles[tune::kGemvTiles];
    };
    static constexpr int kLinearsPerLayer = 7;  // q, k, v, o, gate (MoE layers: router), up, down
    const GemvChoice* gemv_choice(size_t layer, int slot) const {
        return choices_ ? &layer_gemv_[layer * kLinearsPerLayer + static_cast<size_t>(slot)] : nullptr;
    }
    // The attention candidates of a step's batch (decode: one query token per sequence), or null.
    const tune::ResolvedChoice* attention_choice(const DeviceBatch& b) const;
    // Launches the first launchable candidate of `c` through launch(variant) (launch(nullptr): the op's own
    // dispatch, when no registered variant serves the shape), falling back on launch failure.
    template <class Launch>
    void launch_chosen(const tune::ResolvedChoice& c, bool capturing, cudaStream_t stream, const Launch& launch,
                       const std::string& what);
    void linear(const DeviceLinear& w, const void* x, int64_t m, void* y, cudaStream_t stream,
                const GemvChoice* choice = nullptr, bool capturing = false);
    // out [m, n_embd] = down(silu(gate h) * up h) of h_ (the dense MLP, or a MoE layer's shared expert), through
    // gate_ / up_; choices: the three GEMVs' (null: the ops' dispatch).
    void swiglu_mlp(const DeviceLinear& gate, const DeviceLinear& up, const DeviceLinear& down, int64_t m, void* out,
                    cudaStream_t stream, const std::array<const GemvChoice*, 3>& choices, bool capturing);
    // A GEMV of `w` (NVFP4 or BF16) on x [m, w.n_in] in `act`, through `choice` (null: the ops' dispatch).
    void gemv(const DeviceLinear& w, const void* x, DType act, int64_t m, void* y, cudaStream_t stream,
              const GemvChoice* choice, bool capturing);
    bool fusable(const DeviceLinear& a, const DeviceLinear& b, const DeviceLinear& c) const;
    bool fuse_ = true;
    // Eager prefill steps of a layer whose q, k and v fuse: one GEMM over their stacked dequantized copies into
    // qkv_ [m, q | k | v], which qk_norm_rope_kv_write then reads with that row stride.
    struct FusedQkv {
        bool on = false;
        const float* bias = nullptr;  // [qkv_width_] float32 into qkv_bias_: the three biases side by side, or null
    };
    std::vector<FusedQkv> fused_qkv_;  // [n_layers]
    int64_t qkv_width_ = 0;            // n_heads * head_dim + 2 n_kv_heads * head_dim
    cuda::DeviceBuffer qkv_;           // [max_tokens, qkv_width_] act, when a layer fuses
    cuda::DeviceBuffer qkv_bias_;      // [n_layers, qkv_width_] float32, when a fused layer has a bias
    // Plans fused_qkv_, qkv_ and qkv_bias_ (BF16 prefill sizes); returns the largest stacked q/k/v (the
    // dequantization scratch must hold it).
    int64_t plan_fused_qkv();
    // The pipeline's order for this step's linears (in call order): a fused layer's q, k, v as one group.
    std::vector<DequantGroup> dequant_groups(const std::vector<const DeviceLinear*>& order) const;
    void fused_qkv_gemm(const DeviceDecoderLayer& L, size_t il, int64_t m, cudaStream_t stream);

    const DeviceDecoder& w_;
    DType act_;
    int64_t max_tokens_, max_logit_rows_;
    int sm_count_ = 0;
    std::unique_ptr<cuda::GemmContext> gemm_;
    std::unique_ptr<DequantPipeline> dequant_;  // quantized weights of prefill GEMMs, dequantized one ahead
    cuda::DeviceBuffer x_, h_, q_, k_, v_, attn_, gate_, up_, proj_;  // activations, [max_tokens, width]
    cuda::DeviceBuffer selected_;                                    // [max_logit_rows, n_embd] float32
    cuda::DeviceBuffer logits_;                                      // [max_logit_rows, vocab] float32
    Communicator* comm_ = nullptr;                                   // tensor parallelism: this rank's group
    // Tensor parallelism: where the row-parallel outputs (and the embedding's shares) are summed: the group's
    // fast buffer [max_tokens, n_embd] when it has one (NCCL: a symmetric window), else proj_.
    void* reduce_rows_ = nullptr;
    cuda::DeviceBuffer rank_logits_;     // sharded: [max_logit_rows, vocab_per_rank] this rank's vocabulary rows
    cuda::DeviceBuffer gathered_logits_;  // sharded: [tp_size, max_logit_rows * vocab_per_rank]
    cuda::DeviceBuffer workspace_;                                   // attention splits' partials
    cuda::DeviceBuffer router_logits_;  // MoE: [max_tokens, n_experts] act
    cuda::DeviceBuffer moe_ids_;        // MoE: [max_tokens, top_k] int32
    cuda::DeviceBuffer moe_weights_;    // MoE: [max_tokens, top_k] float32
    cuda::DeviceBuffer moe_local_ids_;  // MoE under tensor parallelism: [max_tokens, top_k] int32, the ids
                                        // minus tp.experts.begin, -1 for another rank's expert
    cuda::DeviceBuffer moe_workspace_;  // MoE: moe_workspace_bytes(max_tokens, ...)
    cuda::DeviceBuffer shared_;         // Qwen2-MoE: [max_tokens, n_embd] act, the gated shared expert's rows

    std::shared_ptr<tune::KernelChoices> choices_;  // null: the ops' own dispatch
    std::vector<GemvChoice> layer_gemv_;            // [n_layers * kLinearsPerLayer]
    GemvChoice lm_head_gemv_;
    int seq_buckets_ = 0, q_buckets_ = 0, kv_buckets_ = 0;
    std::vector<tune::ResolvedChoice> decode_attention_;   // [seq_buckets_, kv_buckets_] by log2 bucket
    std::vector<tune::ResolvedChoice> prefill_attention_;  // [q_buckets_, kv_buckets_]
};

// Whether an eager prefill step with BF16 activations runs layer L's q, k and v as one GEMM (DecoderForward,
// unless set_fused_gemv(false)): all three NVFP4 or all FP8 with one global scale (the GEMM's alpha; ModelOpt
// exports share it across q/k/v), one n_in, and a head the fused q/k norm + RoPE + KV write takes (it reads
// the GEMM's rows with their stride). Biases may be present on any of them. Otherwise three GEMMs.
bool qkv_prefill_gemm_fusable(const DeviceDecoder& w, const DeviceDecoderLayer& L);

}  // namespace nibble::gpu
