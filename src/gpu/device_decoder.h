// A pre-norm decoder's weights in device memory (the llama family: Llama, Mistral, Qwen2, Qwen3; and
// Qwen3-MoE / Qwen2-MoE, whose MoE layers hold a router and NVFP4 or BF16 experts in place of the dense MLP,
// plus Qwen2-MoE's gated shared expert), as the CUDA
// forward reads them: linear layers in their stored format (NVFP4 packed + E4M3 block scales, FP8, or
// BF16), norms in float32, the embedding table in BF16. Made by uploading a Model's DecoderView
// (weight_upload.h) or by filling random values of a real architecture's shape (synthetic_decoder).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/model_config.h"
#include "model/decoder_view.h"
#include "cuda/device_buffer.h"
#include "ops/linear/linear.h"
#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe_cuda.h"
#include "parallel/tensor_parallel.h"

namespace nibble::gpu {

struct DeviceLinear {
    std::string name;                          // module name, for messages
    WeightFormat format = WeightFormat::Dense;  // Dense means BF16 here
    int64_t n_out = 0, n_in = 0;
    cuda::DeviceBuffer storage;                 // Dense [n_out, n_in] BF16; Fp8 [n_out, n_in]; Nvfp4 packed [n_out, n_in / 2]
    cuda::DeviceBuffer scale_storage;           // Nvfp4: [n_out, n_in / 16] E4M3
    const void* data = nullptr;                 // storage, or another weight's (a tied lm_head reads the embedding)
    float scale = 1.0f;                         // Fp8: per-tensor scale; Nvfp4: global scale
    cuda::DeviceBuffer bias;                    // [n_out] float32, or empty

    const float* bias_ptr() const { return bias.bytes() ? bias.as<float>() : nullptr; }
    cuda::Nvfp4DeviceWeight nvfp4() const {
        return {static_cast<const uint8_t*>(data), scale_storage.as<uint8_t>(), scale, n_out, n_in};
    }
    // Bytes one pass over the weight reads (data and scales; what a decode step streams).
    int64_t stored_bytes() const;
};

// A MoE layer's experts, NVFP4 only (the grouped expert kernels of ops/moe/moe_cuda.h read nothing else),
// every expert's gate, up and down (ungated experts, NemotronH's relu^2: up and down only) in one allocation
// each for the packed values and the block scales, and the per-expert tables those kernels index on the device.
struct DeviceMoeExperts {
    int64_t n_experts = 0, n_embd = 0, n_ff = 0;  // n_ff: moe_intermediate_size
    int64_t n_mats = 3;         // 3: gate, up, down; 2: up, down (ungated)
    cuda::DeviceBuffer packed;  // [n_mats, n_experts, n_ff * n_embd / 2] [gate,] up, down (down is [n_embd, n_ff])
    cuda::DeviceBuffer scales;  // [n_mats, n_experts, n_ff * n_embd / 16] E4M3
    cuda::DeviceBuffer tables;  // [n_mats, n_experts] cuda::Nvfp4DeviceWeight into packed / scales
    // BF16 experts instead (packed, scales and tables empty): [n_mats, n_experts, n_ff * n_embd] in the same
    // order. The CUDA MoE runs them on its grouped tensor-core GEMM for prefill and its plain GEMV for decode
    // (moe_cuda.h moe_uses_plain_kernel).
    cuda::DeviceBuffer bf16;
    // One expert's [gate +] up + down bytes (what a token routed to it streams).
    int64_t expert_bytes() const {
        return bf16.bytes() != 0 ? n_mats * n_ff * n_embd * 2 : n_mats * (n_ff * n_embd / 2 + n_ff * n_embd / 16);
    }
    int64_t bytes() const { return n_experts * expert_bytes(); }
    // Of the n_experts held here (out of `total`, each token choosing top_k of them), how many a decode step
    // of `tokens` tokens runs on average under uniform routing: n_experts (1 - (1 - top_k / total)^tokens);
    // for one token top_k n_experts / total (top_k on a rank holding all).
    double expected_active(int64_t total, int64_t top_k, int64_t tokens) const;
    cuda::MoeDeviceExperts device() const;
};

// Allocates e's packed / scales for n_experts experts (contents unset); gated false: no gate matrices.
void allocate_experts(DeviceMoeExperts& e, int64_t n_experts, int64_t n_embd, int64_t n_ff, bool gated = true);
// Builds and uploads e.tables over e.packed / e.scales; global_scales [n_mats, n_experts] ([gate,] up, down).
void set_expert_tables(DeviceMoeExperts& e, const std::vector<float>& global_scales);
// Allocates e.bf16 for n_experts BF16 experts (contents unset); packed / scales / tables stay empty.
void allocate_bf16_experts(DeviceMoeExperts& e, int64_t n_experts, int64_t n_embd, int64_t n_ff, bool gated);

struct DeviceDecoderLayer {
    cuda::DeviceBuffer attn_norm, mlp_norm;  // [n_embd] float32
    cuda::DeviceBuffer q_norm, k_norm;       // [head_dim] float32, empty without QK-norm
    DeviceLinear q, k, v, o;
    DeviceLinear gate, up, down;             // dense MLP; empty (n_out 0) in a MoE layer
    bool moe = false;
    DeviceLinear router;                     // MoE: [n_experts, n_embd] BF16
    DeviceMoeExperts experts;                // MoE
    // Qwen2-MoE: the shared expert (SwiGLU, gate/up [n_ff_shared, n_embd], down [n_embd, n_ff_shared]) and its
    // gate [1, n_embd] BF16 (the output times sigmoid(gate . h) per token); empty (n_out 0) without one.
    DeviceLinear shared_gate, shared_up, shared_down, shared_expert_gate;
    bool has_shared_expert() const { return shared_up.n_out > 0; }
};

struct DeviceDecoder {
    ModelConfig config;
    cuda::DeviceBuffer embed;           // [vocab, n_embd] BF16
    std::vector<DeviceDecoderLayer> layers;
    cuda::DeviceBuffer final_norm;      // [n_embd] float32
    DeviceLinear lm_head;               // [vocab, n_embd]; data points at `embed` when tied
    cuda::DeviceBuffer inv_freq;        // [rotary_dim / 2] float32
    int64_t rotary_dim = 0;
    std::vector<float> k_scales, v_scales;  // [n_layers] FP8-convention KV scales, or empty (1.0)
    // Tensor parallelism (tensor_parallel.h): the share of the model this rank holds. With tp.tp_size > 1,
    // `config` is the rank's own (rank_config: its heads, intermediate size, vocabulary rows tp.vocab) and
    // the forward needs a Communicator; full_vocab is the whole model's vocabulary.
    TensorParallelLayout tp;
    int64_t full_vocab = 0;
    bool sharded() const { return tp.tp_size > 1; }
    int64_t vocab_size() const { return sharded() ? full_vocab : config.vocab_size; }

    // Weights a decode step of `tokens` sequences streams: every linear layer once (MoE layers: the router,
    // the shared expert and the experts those tokens pick on average under uniform routing,
    // DeviceMoeExperts::expected_active: top_k for one token, top_k E_r / E on a tensor-parallel rank holding
    // E_r of the E experts), the embedding rows aside.
    double streamed_bytes_per_step(int64_t tokens) const;
    // Multiply-accumulates per token in the linear layers (MoE layers: the router, the shared expert and
    // top_k experts), the lm_head and attention aside.
    int64_t active_linear_params() const;
    int64_t device_bytes() const;
    // The largest n_out * n_in among the layers' dense-path linears (the prefill GEMM's dequantization scratch).
    int64_t max_linear_elems() const;
    bool has_moe() const;
    bool has_dense_mlp() const;
};

// Checks that the CUDA forward supports this architecture and shape; throws naming what does not fit.
// Qwen3-MoE and Qwen2-MoE are accepted here by their shape; their weights must also fit (the overload below).
void check_decoder_supported(const ModelConfig& config);
// The same plus the weights' formats: MoE experts NVFP4 or BF16 (F32/F16 ones become BF16 on upload), one
// format a layer (an FP8 expert is refused, naming it), the router and the shared expert's gate unquantized.
// upload_decoder checks this; serve uses it
// to choose the backend. experts_held: how many experts each MoE layer of the view holds (a tensor-parallel
// rank's share, tensor_parallel.h layout.experts); 0: all of config.moe.n_experts.
void check_decoder_supported(const ModelConfig& config, const DecoderView& view, int64_t experts_held = 0);

// Random weights of `config`'s shape on the device: NVFP4 linear layers (valid E4M3 block scales around
// 2^-6..2^-3 so activations stay O(1)) or BF16 ones; lm_head NVFP4 only when lm_head_nvfp4 (ModelOpt's
// exports keep it BF16). MoE layers get a BF16 router and NVFP4 experts (BF16 ones when nvfp4 is off), and a
// shared expert with its BF16 gate when the config has one. For benchmarks: no checkpoint, no host copy.
struct SyntheticOptions {
    bool nvfp4 = true;
    bool lm_head_nvfp4 = false;
    uint64_t seed = 1;
};
DeviceDecoder synthetic_decoder(const ModelConfig& config, const SyntheticOptions& options);
// Rank `rank`'s shard of a tensor_parallel_size-way split of the same (the llama family; Qwen3-MoE with the
// rank's experts, tensor_parallel.h), made directly on this rank's device: random weights of the shard's
// shapes (seeded per rank; the replicated router's seed is the same on every rank, so they route alike).
DeviceDecoder synthetic_decoder_rank(const ModelConfig& config, const SyntheticOptions& options, int64_t tp_size,
                                     int64_t rank);

// Synthetic-weight pieces (shared with synthetic_hybrid): random words shaped by masks (cuda/fill_random.h):
// BF16 pairs with exponents 2^-7..2^-4 and random signs; E4M3 block scales with exponents 2^-5..2^-4
// (codes 0x10..0x1f: finite, never NaN).
constexpr uint32_t kBf16And = 0x81ff81ffu, kBf16Or = 0x3c003c00u;
constexpr uint32_t kE4m3And = 0x0f0f0f0fu, kE4m3Or = 0x10101010u;
cuda::DeviceBuffer random_buffer(size_t bytes, uint64_t seed, uint32_t and_mask, uint32_t or_mask);
// A random NVFP4 (global scale 0.25) or BF16 linear; each call advances seed.
DeviceLinear random_linear(const std::string& name, int64_t n_out, int64_t n_in, bool nvfp4, uint64_t& seed);
cuda::DeviceBuffer ones(int64_t n);  // [n] float32 1.0

// Real architectures' shapes for --synthetic: "llama3-8b", "llama3-70b", "qwen3-8b", "mistral-7b",
// "qwen3-30b-a3b".
// Throws listing the known names for any other.
ModelConfig synthetic_config(const std::string& name);
std::vector<std::string> synthetic_config_names();

}  // namespace nibble::gpu
