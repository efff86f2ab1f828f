// The CUDA plan (PlanOptions::cuda_forward) counts what the CUDA backend allocates: weights in the formats
// the upload stores (gpu/weight_upload.cpp, gpu/device_hybrid.cpp: dense matrices BF16, vectors F32), the
// fused q/k/v prefill rows and the dequantization pipeline's stacked-q/k/v scratch (gpu/decoder_forward.cpp,
// gpu/dequant_pipeline.cpp), and the hybrid router's float32 input rows (gpu/hybrid_forward.cpp). Each test
// compares a config that has the allocation with one that does not; the byte counts are worked out by hand.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/quant_config.h"
#include "engine/memory_plan.h"
#include "modelopt_quant_config.h"
#include "model/real_shapes.h"

namespace nibble {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kTokens = 2048;

PlanOptions options(bool cuda_forward, int64_t device_memory = 80 * kGiB) {
    PlanOptions o;
    o.device_memory = device_memory;
    o.max_model_len = 8192;
    o.max_num_batched_tokens = kTokens;
    o.kv_cache_dtype = "bf16";
    o.cuda_forward = cuda_forward;
    return o;
}

int64_t format_bytes(const MemoryPlan& p, const std::string& format) {
    for (const auto& [name, bytes] : p.weights_by_format)
        if (name == format) return bytes;
    return 0;
}

// Llama-3.1-8B: embeddings and lm_head [128256, 4096]; 32 layers of q and o [4096, 4096], k and v [1024,
// 4096], gate/up [14336, 4096], down [4096, 14336] and two norms [4096]; the final norm [4096].
constexpr int64_t kLlama8bNorms = 32 * 2 * 4096 + 4096;  // 266,240
constexpr int64_t kLlama8bMatrices =
    2 * int64_t{128256} * 4096 + 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * int64_t{14336} * 4096);

// Item 1: an F32 checkpoint's dense weights are uploaded as BF16, so on CUDA it plans exactly like the BF16
// checkpoint; the CPU plan keeps them at 4 bytes.
TEST(MemoryPlanCudaUpload, F32CheckpointDenseWeightsAreBf16OnTheDevice) {
    static_assert(kLlama8bMatrices + kLlama8bNorms == 8'030'261'248);
    const RealShape s = real_shape("llama3-8b", {.nvfp4 = false});
    ModelConfig f32 = s.config;
    f32.dtype = DType::F32;
    ASSERT_EQ(s.config.dtype, DType::BF16);
    const MemoryPlan cuda_bf16 = plan_memory(s.config, s.quant, options(true));
    const MemoryPlan cuda_f32 = plan_memory(f32, s.quant, options(true));
    EXPECT_EQ(cuda_f32.weights_bytes, kLlama8bMatrices * 2 + kLlama8bNorms * 4);
    EXPECT_EQ(cuda_f32.weights_bytes, cuda_bf16.weights_bytes);
    EXPECT_EQ(format_bytes(cuda_f32, "bf16"), kLlama8bMatrices * 2);
    EXPECT_EQ(format_bytes(cuda_f32, "f32"), kLlama8bNorms * 4);
    EXPECT_EQ(cuda_f32.kv_cache_bytes, cuda_bf16.kv_cache_bytes);
    // The CPU plan reads the checkpoint in place: every F32 weight costs 2 bytes more than a BF16 one.
    const MemoryPlan host_bf16 = plan_memory(s.config, s.quant, options(false, 256 * kGiB));
    const MemoryPlan host_f32 = plan_memory(f32, s.quant, options(false, 256 * kGiB));
    EXPECT_EQ(host_f32.weights_bytes - host_bf16.weights_bytes, (kLlama8bMatrices + kLlama8bNorms) * 2);
    EXPECT_EQ(format_bytes(host_f32, "f32"), (kLlama8bMatrices + kLlama8bNorms) * 4);
}

// Item 2: norms and biases are uploaded F32 (upload_floats, DeviceLinear::bias) whatever the checkpoint's
// dtype.
TEST(MemoryPlanCudaUpload, BiasesAndNormsAreF32OnTheDevice) {
    const RealShape s = real_shape("llama3-8b", {.nvfp4 = false});
    // The norms: the CUDA plan exceeds the CPU plan by 2 bytes a norm weight, nothing else.
    const MemoryPlan cuda = plan_memory(s.config, s.quant, options(true));
    const MemoryPlan host = plan_memory(s.config, s.quant, options(false));
    EXPECT_EQ(cuda.weights_bytes - host.weights_bytes, kLlama8bNorms * 2);
    // q/k/v biases (Qwen2-style attention_bias): 32 layers x (4096 + 1024 + 1024) values, 4 bytes on CUDA,
    // 2 (the checkpoint's BF16) on the CPU.
    ModelConfig biased = s.config;
    biased.qkv_bias = true;
    const int64_t bias_values = 32 * (4096 + 1024 + 1024);
    EXPECT_EQ(plan_memory(biased, s.quant, options(true)).weights_bytes - cuda.weights_bytes,
              bias_values * 4);
    EXPECT_EQ(format_bytes(plan_memory(biased, s.quant, options(true)), "f32") - format_bytes(cuda, "f32"),
              bias_values * 4);
    EXPECT_EQ(plan_memory(biased, s.quant, options(false)).weights_bytes - host.weights_bytes,
              bias_values * 2);
    // Qwen3's q/k norms: 36 layers x 2 x [128] more F32 vectors, beside 36 x 2 x [4096] and the final [4096].
    const RealShape qwen3 = real_shape("qwen3-8b", {.nvfp4 = false});
    ASSERT_TRUE(qwen3.config.qk_norm);
    const int64_t qwen3_norms = 36 * (2 * 128 + 2 * 4096) + 4096;
    const MemoryPlan qwen3_cuda = plan_memory(qwen3.config, qwen3.quant, options(true));
    EXPECT_EQ(qwen3_cuda.weights_bytes - plan_memory(qwen3.config, qwen3.quant, options(false)).weights_bytes,
              qwen3_norms * 2);
    EXPECT_EQ(format_bytes(qwen3_cuda, "f32"), qwen3_norms * 4);
}

// NemotronH's dense tensors on CUDA: the Mamba mixer's vectors and the norms F32 (upload_floats), the router
// [128, 2688] BF16 (upload_linear) although the NVFP4 export stores it F32, which the CPU plan keeps.
TEST(MemoryPlanCudaUpload, NemotronHDenseTensors) {
    const RealShape s = real_shape("nemotron-3-nano-30b-a3b", {.nvfp4 = true});
    const ModelConfig& c = s.config;
    ASSERT_EQ(c.count_layers(LayerKind::Mamba), 23);
    ASSERT_EQ(c.count_layers(LayerKind::Moe), 23);
    ASSERT_EQ(c.n_layers, 52);
    // Per Mamba layer: conv1d [6144, 1, 4] (conv_dim = 4096 + 2 x 8 x 128) and its bias [6144], dt_bias,
    // A_log and D [64] each, the gated norm [4096]: BF16 in the checkpoint, F32 on the device, 2 bytes more
    // each.
    const int64_t mamba_vectors = 23 * (6144 * 4 + 6144 + 3 * 64 + 4096);
    const int64_t norms = 52 * 2688 + 2688;
    const int64_t router = 23 * 128 * 2688;  // 4 bytes on the CPU plan, 2 on CUDA
    const MemoryPlan cuda = plan_memory(c, s.quant, options(true));
    const MemoryPlan host = plan_memory(c, s.quant, options(false));
    EXPECT_EQ(cuda.weights_bytes - host.weights_bytes, (mamba_vectors + norms) * 2 - router * 2);
    EXPECT_EQ(cuda.weights_bytes - host.weights_bytes, -13'931'648);
}

// Item 3: layers whose q, k and v are all NVFP4 run one prefill GEMM over their stacked BF16 copies into
// DecoderForward::qkv_ [t, q_dim + 2 kv_dim] BF16. Llama-3.1-8B with k_proj left BF16 cannot fuse; with it
// NVFP4 the plan adds exactly those rows, [2048, 4096 + 2 x 1024] x 2 bytes (the largest linear, gate/up
// [14336, 4096], is larger than the stacked q/k/v [6144, 4096], so the scratch buffers do not move).
TEST(MemoryPlanCudaUpload, FusedQkvRows) {
    const ModelConfig c = real_shape("llama3-8b").config;
    const QuantConfig fused = test::modelopt_nvfp4_config({"lm_head"});
    const QuantConfig unfused = test::modelopt_nvfp4_config({"lm_head", "model.layers.*.self_attn.k_proj"});
    const MemoryPlan with = plan_memory(c, fused, options(true));
    const MemoryPlan without = plan_memory(c, unfused, options(true));
    EXPECT_EQ(with.gemm_scratch_bytes - without.gemm_scratch_bytes, kTokens * 6144 * 2);
    EXPECT_EQ(with.activation_bytes, without.activation_bytes);
    // Up to kCudaGemvMaxRows rows a step there is no GEMM path, so no fused rows either.
    PlanOptions gemv = options(true);
    gemv.max_num_batched_tokens = kCudaGemvMaxRows;
    EXPECT_EQ(plan_memory(c, fused, gemv).gemm_scratch_bytes, 0);
    // A head the fused q/k norm + RoPE kernel does not take (rotary_dim 4 is not a multiple of 8): no fusion.
    ModelConfig partial = c;
    partial.rope.partial_rotary_factor = 4.0f / 128.0f;
    EXPECT_EQ(plan_memory(partial, fused, options(true)).gemm_scratch_bytes, without.gemm_scratch_bytes);
}

// Item 3, the scratch: when a layer's stacked q/k/v is the largest GEMM weight, DequantPipeline's two
// buffers hold it, not the largest single linear. Qwen3-8B with intermediate_size 4096, so that no single
// linear exceeds [4096, 4096]: the stacked q/k/v [4096 + 2 x 1024, 4096] sets both buffers, 2 x (6144 - 4096)
// x 4096 BF16 values more than the largest linear would, beside the fused rows [2048, 6144] BF16.
TEST(MemoryPlanCudaUpload, DequantScratchHoldsTheStackedQkv) {
    ModelConfig c = real_shape("qwen3-8b").config;
    c.n_ff = 4096;  // every single linear is at most [4096, 4096]
    const QuantConfig fused = test::modelopt_nvfp4_config({"lm_head"});
    const QuantConfig unfused = test::modelopt_nvfp4_config({"lm_head", "model.layers.*.self_attn.k_proj"});
    const int64_t with = plan_memory(c, fused, options(true)).gemm_scratch_bytes;
    const int64_t without = plan_memory(c, unfused, options(true)).gemm_scratch_bytes;
    EXPECT_EQ(with - without, 2 * (6144 - 4096) * int64_t{4096} * 2 + kTokens * 6144 * 2);
    EXPECT_EQ(without, (int64_t{32} << 20) + 3 * (4096 * int64_t{4096}) * 2);
}

// Item 3, the bias rows: fused layers with q/k/v biases copy them into DecoderForward::qkv_bias_ [n_layers,
// q_dim + 2 kv_dim] F32. Llama-3.1-8B NVFP4 with attention_bias: 32 x 6144 x 4 bytes.
TEST(MemoryPlanCudaUpload, FusedQkvBiasRows) {
    const ModelConfig c = real_shape("llama3-8b").config;
    ModelConfig biased = c;
    biased.qkv_bias = true;
    const QuantConfig q = test::modelopt_nvfp4_config({"lm_head"});
    EXPECT_EQ(plan_memory(biased, q, options(true)).gemm_scratch_bytes -
                  plan_memory(c, q, options(true)).gemm_scratch_bytes,
              32 * 6144 * 4);
}

// The hybrid forward has no dequantization pipeline: its GEMM scratch is cuBLASLt's workspace and
// GemmContext's one copy of its largest linear, in_proj [10304, 2688] (10304 = 2 x 4096 + 2 x 8 x 128 + 64).
TEST(MemoryPlanCudaUpload, HybridGemmScratchHasOneCopy) {
    const RealShape s = real_shape("nemotron-3-nano-30b-a3b", {.nvfp4 = true});
    EXPECT_EQ(plan_memory(s.config, s.quant, options(true)).gemm_scratch_bytes,
              (int64_t{32} << 20) + 10304 * 2688 * 2);
}

// Item 4: the CUDA hybrid forward copies a MoE router's input rows to float32, router_in_ [t, 2688] F32,
// gathered by identity_rows_ [t] int32: the CUDA plan's activations exceed the CPU plan's by exactly that.
TEST(MemoryPlanCudaUpload, HybridRouterInputRows) {
    const RealShape s = real_shape("nemotron-3-nano-30b-a3b", {.nvfp4 = true});
    ASSERT_EQ(s.config.n_embd, 2688);
    EXPECT_EQ(plan_memory(s.config, s.quant, options(true)).activation_bytes -
                  plan_memory(s.config, s.quant, options(false)).activation_bytes,
              kTokens * (2688 + 1) * 4);
    // A dense decoder has no such rows.
    const RealShape llama = real_shape("llama3-8b", {.nvfp4 = true});
    EXPECT_EQ(plan_memory(llama.config, llama.quant, options(true)).activation_bytes,
              plan_memory(llama.config, llama.quant, options(false)).activation_bytes);
}

}  // namespace
}  // namespace nibble
