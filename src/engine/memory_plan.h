// The memory plan: where a device's memory goes when serving a model, computed from config.json and the
// quantization config alone, before any weight is read (no safetensors file is opened, not even a header):
//   weights    the architecture's tensor list (model/ expected_weights) priced by the quantization config:
//              dense tensors in config.json's dtype; NVFP4 linears n*k/2 (E2M1) + n*k/16 (E4M3 scales) + 4
//              (global scale) + 4 (activation scale, absent for weight-only); FP8 linears n*k + 4 + 4; biases
//              in the dense dtype; 8 bytes of KV scales per layer when the checkpoint declares a KV scheme.
//              On the CUDA backend (PlanOptions::cuda_forward) as gpu/weight_upload.cpp and
//              gpu/device_hybrid.cpp store them: dense matrices (embeddings, unquantized linears and experts,
//              NemotronH's router) BF16 whatever the checkpoint's dtype; biases, norms and the other dense
//              vectors (the Mamba mixer's conv1d, A_log, D, dt_bias, its norm) F32.
//   workspace  activations of one step, max_num_batched_tokens rows x the forward's buffer widths
//              (3*hidden + 2*q_dim + 2*kv_dim + 2*intermediate) x 4 bytes (float32, the widest any backend
//              uses); MoE models add the router's rows, n_experts x 4 + top_k x 8 (logits, chosen ids and
//              weights), and with a shared expert (Qwen2-MoE's, NemotronH's) hidden more (its output rows,
//              held until the combine adds them) and intermediate = max(intermediate, the shared expert's
//              width) (it runs through the MLP's hidden rows); logits, min(max_num_seqs,
//              max_num_batched_tokens) rows x (vocab + hidden) x 4 (the lm_head's gathered input rows too);
//              attention scratch, split-K decode partials for the same rows: n_heads x kAttentionSplits x
//              (head_dim + 2) x 4.
//              The CUDA backend's forward (PlanOptions::cuda_forward) adds two more named lines:
//                MoE workspace  the expert permutation and per-(token, expert) hidden and output rows of
//                               max_num_batched_tokens tokens (ops/moe/moe_workspace.h, the layout the CUDA
//                               MoE forward carves its workspace by);
//                GEMM scratch   when steps may exceed kCudaGemvMaxRows rows (they then run cuBLASLt GEMMs):
//                               cuBLASLt's 32 MiB workspace and, with quantized linears, a BF16 copy of the
//                               largest decoder linear (the GEMM's own scratch); the decoder (not the hybrid
//                               forward) adds the two buffers its prefill dequantization pipeline alternates
//                               between, each max(largest linear, a layer's stacked q/k/v) BF16 values, and
//                               when q/k/v are quantized the fused q/k/v GEMM's output rows [t, q_dim +
//                               2 kv_dim] BF16 (and, with q/k/v biases, their rows [n_layers, q_dim + 2
//                               kv_dim] F32).
//              Its activations of a hybrid MoE model also count the router's float32 copy of its input rows
//              [t, hidden] and their row indices [t] int32.
//   KV cache   kv_cache_memory_bytes when given, else gpu_memory_utilization x device memory - weights -
//              workspace; cut into blocks of block_size tokens (KvCacheShape::block_bytes() per layer for K
//              and for V), kv_tokens = blocks x block_size, max_concurrency = kv_tokens / max_model_len.
//   Mamba state hybrid models (NemotronH): max_num_seqs x (Mamba layers x ((conv_kernel-1) x conv_dim x 4 +
//              heads x head_dim x state x 4 or 2 per --mamba-ssm-cache-dtype)), counted with the fixed
//              part (it is taken before the KV budget); KV covers the attention layers only. With prefix
//              caching, mamba_prefix_snapshots more states of the same size (the snapshots cached blocks keep,
//              engine/block_pool.h): a given count is fixed memory too; -1 (auto) takes whole states from the
//              KV budget, at most an eighth of it and at most max_num_seqs of them; 0 none.
//   tensor parallel (tensor_parallel_size N > 1, llama family): everything above is per GPU, for rank 0 (the
//              largest: parallel/tensor_parallel.h): weights are rank 0's shards (query/KV heads, intermediate
//              columns and vocabulary rows divided by N, row-parallel biases, norms and global scales whole);
//              activations use the rank's head and intermediate widths, logits add the all-gather buffer
//              (rows x N x ceil(vocab/N) x 4 beside rows x vocab x 4), attention scratch the rank's heads, and
//              the KV cache holds the rank's KV heads (one per rank when N exceeds n_kv_heads: replicated).
// A plan that does not fit (weights and workspace beyond the usable memory, or less KV than one
// max_model_len sequence) is a nibble::Error that says by how much.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "model/model.h"
#include "ops/attention/kv_cache.h"
#include "ops/ssm/ssm_state.h"

namespace nibble {

// Split-K partitions a decode row's attention may use (flash-decoding); the scratch above is sized for it.
inline constexpr int64_t kAttentionSplits = 32;
// The CUDA forward's rows per step up to which linears run as GEMVs (gpu::DecoderForward::kGemvMaxRows; a
// device test checks they agree), and the cuBLASLt workspace of its GEMM context.
inline constexpr int64_t kCudaGemvMaxRows = 32;
inline constexpr int64_t kCublasLtWorkspaceBytes = int64_t{32} << 20;

// --kv-cache-dtype: "auto" is the checkpoint's KV scheme when it declares one (ModelOpt kv_cache_quant_algo
// or kv_cache_scheme: fp8 or nvfp4, as vLLM resolves it), else `unquantized` (the backend's activation
// dtype: f32 on the CPU reference, bf16 on CUDA). Other names: kv_dtype_from_name; anything else (fp8_e5m2
// included) is an error naming the value and the accepted ones.
KvDtype resolve_kv_cache_dtype(std::string_view requested, const QuantConfig& quant, KvDtype unquantized);

struct PlanOptions {
    int64_t max_model_len = 0;             // tokens per sequence; 0: config's max_position_embeddings
    int64_t max_num_seqs = 256;
    int64_t max_num_batched_tokens = 2048;
    int64_t block_size = 16;
    std::string kv_cache_dtype = "auto";
    KvDtype auto_kv_dtype = KvDtype::Bf16;  // what "auto" means without a checkpoint KV scheme
    double gpu_memory_utilization = 0.9;    // fraction of device_memory the plan may use
    int64_t kv_cache_memory_bytes = 0;      // > 0: exactly this much KV cache (utilization then unused)
    int64_t device_memory = 0;              // bytes of the device; must be > 0
    SsmStateDtype mamba_ssm_cache_dtype = SsmStateDtype::F32;  // hybrid models' SSM state
    int64_t mamba_prefix_snapshots = -1;    // hybrid prefix caching: -1 auto (from the KV budget), 0 none
    int64_t tensor_parallel_size = 1;       // GPUs one model is split over; the plan is per GPU
    bool cuda_forward = false;  // for the CUDA backend: its weight formats, MoE workspace and GEMM scratch
};

struct MemoryPlan {
    int64_t tensor_parallel_size = 1;  // every byte count below is per GPU (rank 0's)
    // weights
    int64_t weights_bytes = 0;
    int64_t model_weights_bytes = 0;   // the whole model's, unsharded (= weights_bytes at tensor_parallel_size 1)
    std::vector<std::pair<std::string, int64_t>> weights_by_format;  // "nvfp4", "fp8", "bf16", ... > 0 only
    // workspace
    int64_t activation_bytes = 0, logits_bytes = 0, attention_scratch_bytes = 0;
    int64_t moe_workspace_bytes = 0, gemm_scratch_bytes = 0;  // CUDA forward only (PlanOptions::cuda_forward)
    // CUDA forward of a hybrid model: the chunked scan's workspace at its cap (ops/ssm/ssm_workspace.h) and
    // the scratch state padding sequences of a graph step compute into.
    int64_t ssm_scratch_bytes = 0;
    int64_t workspace_bytes() const {
        return activation_bytes + logits_bytes + attention_scratch_bytes + moe_workspace_bytes + gemm_scratch_bytes +
               ssm_scratch_bytes;
    }
    // hybrid models: recurrent state, one per sequence slot (max_num_seqs), beside the KV cache
    int64_t mamba_state_bytes_per_seq = 0, mamba_state_bytes = 0;
    // hybrid models with prefix caching: state snapshots kept by cached blocks, mamba_state_bytes_per_seq each
    int64_t mamba_snapshots = 0, mamba_snapshot_bytes = 0;
    // KV cache
    KvDtype kv_dtype = KvDtype::Bf16;
    int64_t kv_bytes_per_token = 0;   // K and V, all layers, with NVFP4's scales
    int64_t kv_block_bytes = 0;       // one block of K and V in every layer
    int64_t kv_cache_bytes = 0;       // the KV budget (blocks x kv_block_bytes <= it)
    int64_t kv_blocks = 0;
    int64_t kv_tokens = 0;
    // limits
    int64_t device_memory = 0;
    int64_t usable_memory = 0;        // gpu_memory_utilization x device_memory
    int64_t max_model_len = 0, max_num_seqs = 0, max_num_batched_tokens = 0, block_size = 0;
    double max_concurrency = 0;       // kv_tokens / max_model_len
};

// Bytes of the model's weights as stored, by format (the "weights" line above); cuda_upload: as the CUDA
// backend's upload stores them.
std::vector<std::pair<std::string, int64_t>> weight_bytes_by_format(const ModelConfig& config,
                                                                    const QuantConfig& quant,
                                                                    bool cuda_upload = false);
// The same over a given tensor list (a tensor-parallel rank's shards: llama_rank_expected_weights).
std::vector<std::pair<std::string, int64_t>> weight_bytes_by_format(const std::vector<WeightSpec>& weights,
                                                                    const ModelConfig& config,
                                                                    const QuantConfig& quant,
                                                                    bool cuda_upload = false);

// The plan's copy of cuda::qkv_prepare_supported (ops/attention/qkv_prepare_cuda.h, which CPU builds cannot
// include): whether the decoder's fused q/k/v prefill GEMM may run for this head and rotary width.
bool cuda_qkv_prepare_supported(int64_t head_dim, int64_t rotary_dim);

// Throws nibble::Error for bad options or a plan that does not fit.
MemoryPlan plan_memory(const ModelConfig& config, const QuantConfig& quant, const PlanOptions& options);

}  // namespace nibble
