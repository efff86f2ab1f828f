// The forward of a hybrid Mamba2 / attention / MLP / MoE stack (NemotronH) on the device, over a batch of
// sequences whose new tokens are flattened into rows. Each layer: h = RMSNorm(x); x += mixer(h), with
//   Mamba (M):     zxbcdt = h W_in^T; xBC = silu(conv1d(x, B, C)) continuing the slot's conv state; the
//                  selective scan from the slot's SSM state (prefill: every token of a sequence in one
//                  launch; decode: one step); y = gated RMSNorm(y, z); out = y W_out^T
//   attention (*): q, k, v projections, no RoPE; K/V appended to the paged cache (cache layer j = the j-th
//                  attention layer); paged attention; o projection
//   MLP (-):       relu(h W_up^T)^2 W_down^T
//   MoE (E):       router logits in float32 (h widened, BF16 weights), sigmoid top-k with correction bias,
//                  groups and routed_scaling_factor (moe_route_sigmoid); the routed relu^2 NVFP4 (or BF16)
//                  experts (moe_experts_nvfp4) plus the shared expert, added in the combine.
// Final RMSNorm, then the lm_head on the rows that need logits in float32. Activations BF16 (serving) or
// F32 (the exactness mode the device tests compare with the CPU reference in). Everything is enqueued on
// one stream and nothing synchronizes with the host, so a decode step can be captured into a CUDA graph.
//
// Recurrent state: n_state_slots slots of every Mamba layer's conv (float32) and SSM (float32 or bfloat16,
// --mamba-ssm-cache-dtype) state, plus one scratch slot (mamba_slots_cuda.h). DeviceBatch::state_slots names
// each sequence's slot; a slot of -1 (the padding sequences of a graph step) computes into the scratch slot
// and touches no real one; a sequence starting at position 0 has its slot zeroed first (as the CPU model
// resets its MambaState). Snapshots (prefix caching) are device copies of whole slots.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "ops/ssm/ssm_workspace.h"
#include "cuda/device_buffer.h"
#include "gpu/decoder_forward.h"
#include "gpu/device_forward.h"
#include "gpu/device_hybrid.h"
#include "ops/linear/gemm_cuda.h"
#include "ops/ssm/mamba_slots_cuda.h"
#include "tensor/dtype.h"

namespace nibble::gpu {

class HybridForward final : public DeviceForward {
public:
    // Buffers for up to max_tokens rows and max_seqs sequences (and logits rows) per step.
    HybridForward(const DeviceHybrid& weights, DType act_dtype, int64_t max_tokens, int64_t max_seqs,
                  int64_t n_state_slots, SsmStateDtype ssm_dtype, int64_t n_state_snapshots = 0);
    ~HybridForward() override;

    DType act_dtype() const override { return act_; }
    int64_t max_tokens() const override { return max_tokens_; }
    int attention_splits(const DeviceBatch& b, const DeviceKvCache& kv) const override;
    void reserve_attention(int splits, int64_t n_tokens) override;
    size_t attention_workspace_bytes(int splits, int64_t n_tokens) const override;
    void run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream) override;
    void run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream, int splits, void* workspace,
             size_t workspace_bytes) override;
    const float* logits() const override { return logits_.as<float>(); }

    int64_t num_state_slots() const override { return n_slots_; }
    int64_t num_state_snapshots() const override { return n_snapshots_; }
    void save_state_snapshot(int32_t state_slot, int32_t snapshot, cudaStream_t stream) override;
    void restore_state_snapshot(int32_t snapshot, int32_t state_slot, cudaStream_t stream) override;
    const cuda::MambaSlotPool& state_pool() const { return pool_; }

    // Rows above this run the prefill GEMM (BF16 activations), the rest the GEMVs.
    static constexpr int64_t kGemvMaxRows = 32;
    // Batches whose longest sequence has at least this many tokens run the chunked (SSD) scan, the rest
    // the sequential one. The sequential scan's latency is L dependent steps (a few hundred cycles each);
    // the chunked one costs four launches and a 64-token chunk's quadratic work whatever L, so it pays
    // from about two chunks on (nibble-kernel-bench ssd prints both at 128 .. 2048 tokens).
    static constexpr int64_t kChunkedScanMinTokens = 128;
    // Its workspace grows on demand up to this (ops/ssm/ssm_workspace.h, which the memory plan counts); a
    // batch needing more (hundreds of sequences beside a long prompt) takes the sequential scan.
    static constexpr size_t kChunkedScanMaxWorkspaceBytes = static_cast<size_t>(kSsdScanMaxWorkspaceBytes);

private:
    void linear(const DeviceLinear& w, const void* x, int64_t m, void* y, cudaStream_t stream);
    void gemv(const DeviceLinear& w, const void* x, DType act, int64_t m, void* y, cudaStream_t stream);
    void mamba(const DeviceHybridLayer& L, const DeviceBatch& b, cudaStream_t stream);
    void relu2_mlp(const DeviceLinear& up, const DeviceLinear& down, int64_t m, void* out, cudaStream_t stream);
    // A MoE layer; its combine adds the output to x and writes h = norm(x) with next_norm (the next layer's
    // input norm, or the final norm), so the next layer starts from h.
    void moe(const DeviceHybridLayer& L, int64_t m, const float* next_norm, cudaStream_t stream);
    // From the router logits on: sigmoid top-k routing, the shared expert and the routed experts.
    void route_and_run_experts(const DeviceHybridLayer& L, int64_t m, const float* next_norm,
                               cudaStream_t stream);
    // Copies one slot's conv and SSM state between the slot pool and a snapshot buffer.
    void copy_slot(bool to_snapshot, int32_t state_slot, int32_t snapshot, cudaStream_t stream);

    const DeviceHybrid& w_;
    DType act_;
    int64_t max_tokens_, max_seqs_;
    int64_t n_slots_, n_snapshots_;
    int sm_count_ = 0;
    std::unique_ptr<cuda::GemmContext> gemm_;
    cuda::DeviceBuffer x_, h_, proj_;                 // [max_tokens, n_embd] act
    cuda::DeviceBuffer zxbcdt_, xbc_, y_;             // Mamba: [max_tokens, in_proj_dim / conv_dim / d_inner]
    cuda::DeviceBuffer q_, k_, v_, attn_;             // attention: [max_tokens, q or kv width]
    cuda::DeviceBuffer ff_;                           // relu^2 MLPs: [max_tokens, widest intermediate]
    cuda::DeviceBuffer shared_;                       // MoE: [max_tokens, n_embd] act, the shared expert's output
    cuda::DeviceBuffer router_in_;                    // MoE, BF16 activations: [max_tokens, n_embd] float32
    cuda::DeviceBuffer identity_rows_;                // [max_tokens] int32 0, 1, ... (widening h for the router)
    cuda::DeviceBuffer router_logits_;                // MoE: [max_tokens, n_experts] float32
    cuda::DeviceBuffer moe_ids_, moe_weights_;        // MoE: [max_tokens, top_k] int32 / float32
    cuda::DeviceBuffer moe_workspace_;
    cuda::DeviceBuffer selected_;                     // [max_seqs, n_embd] float32
    cuda::DeviceBuffer logits_;                       // [max_seqs, vocab] float32
    cuda::DeviceBuffer workspace_;                    // attention splits' partials
    cuda::DeviceBuffer scan_workspace_;               // ssm_scan_chunked's chunk states, grown on demand
    cuda::DeviceBuffer conv_states_, ssm_states_;     // the slot pool (mamba_slots_cuda.h layout)
    cuda::DeviceBuffer conv_snapshots_, ssm_snapshots_;  // [n_snapshots, one slot]
    cuda::DeviceBuffer conv_ptrs_, ssm_ptrs_;         // [n_mamba, max_seqs] this step's state pointers
    cuda::MambaSlotPool pool_;
};

}  // namespace nibble::gpu
