// The CUDA forward's own lines of the memory plan (PlanOptions::cuda_forward): the MoE workspace, the GEMM
// scratch and a hybrid model's scan scratch, checked against byte counts worked out by hand from their
// layouts (memory_plan.h), and the MoE router rows every plan adds to the activations.
#include <gtest/gtest.h>

#include "engine/memory_plan.h"
#include "model/real_shapes.h"
#include "ops/moe/moe_workspace.h"

namespace nibble {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;

PlanOptions options(int64_t batched_tokens, bool cuda_forward) {
    PlanOptions o;
    o.device_memory = 80 * kGiB;
    o.max_model_len = 8192;
    o.max_num_batched_tokens = batched_tokens;
    o.kv_cache_dtype = "bf16";
    o.cuda_forward = cuda_forward;
    return o;
}

// Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8) at 8192 batched tokens: 65536 (token, expert) pairs.
// counts 128 x 4 = 512; offsets 129 x 4 = 516 -> 528 (16-byte aligned); sorted and position 65536 x 4 =
// 262144 each; active 512; n_active 4 -> 16; h 65536 x 768 x 4 = 201326592; o 65536 x 2048 x 4 = 536870912.
constexpr int64_t kQwen3MoeWorkspace8192 = 512 + 528 + 262144 + 262144 + 512 + 16 + 201326592 + 536870912;

TEST(MemoryPlanCudaForward, MoeWorkspaceOfQwen3_30bA3b) {
    static_assert(kQwen3MoeWorkspace8192 == 738723360);  // ~0.74 GB
    const RealShape s = real_shape("qwen3-30b-a3b", {.nvfp4 = true});
    EXPECT_EQ(moe_workspace_layout(8192, 8, 128, 2048, 768).total, static_cast<size_t>(kQwen3MoeWorkspace8192));
    const MemoryPlan cuda = plan_memory(s.config, s.quant, options(8192, true));
    const MemoryPlan host = plan_memory(s.config, s.quant, options(8192, false));
    EXPECT_EQ(cuda.moe_workspace_bytes, kQwen3MoeWorkspace8192);
    EXPECT_EQ(host.moe_workspace_bytes, 0);
    // Both count the router's rows: logits [t, 128] (at most 4 bytes each), ids and weights [t, 8] 4 bytes each.
    const int64_t t = 8192, dense = 3 * 2048 + 2 * 4096 + 2 * 512 + 2 * 6144;
    EXPECT_EQ(host.activation_bytes, t * (dense + 128 + 2 * 8) * 4);
    EXPECT_EQ(cuda.activation_bytes, host.activation_bytes);
    // The CUDA plan's extra workspace comes out of the KV budget, byte for byte, with the 2 extra bytes of
    // each norm weight the CUDA upload keeps F32 (48 x (2 x 128 + 2 x 2048) + 2048).
    EXPECT_EQ(cuda.workspace_bytes() - host.workspace_bytes(), cuda.moe_workspace_bytes + cuda.gemm_scratch_bytes);
    EXPECT_EQ(cuda.weights_bytes - host.weights_bytes, (48 * (2 * 128 + 2 * 2048) + 2048) * 2);
    EXPECT_EQ(host.kv_cache_bytes - cuda.kv_cache_bytes,
              cuda.moe_workspace_bytes + cuda.gemm_scratch_bytes + cuda.weights_bytes - host.weights_bytes);
    // The workspace scales with the batched tokens: pairs-sized parts linearly, the rest fixed.
    const MemoryPlan small = plan_memory(s.config, s.quant, options(16, true));
    EXPECT_EQ(small.moe_workspace_bytes, static_cast<int64_t>(moe_workspace_layout(16, 8, 128, 2048, 768).total));
    EXPECT_EQ(small.moe_workspace_bytes, 512 + 528 + 512 + 512 + 512 + 16 + 128 * 768 * 4 + 128 * 2048 * 4);
}

TEST(MemoryPlanCudaForward, DenseModelsHaveNoMoeWorkspace) {
    const RealShape s = real_shape("llama3-8b", {.nvfp4 = true});
    const MemoryPlan p = plan_memory(s.config, s.quant, options(2048, true));
    EXPECT_EQ(p.moe_workspace_bytes, 0);
    EXPECT_EQ(p.activation_bytes, 2048 * (3 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 14336) * 4);  // no router rows
}

// Steps above kCudaGemvMaxRows rows run cuBLASLt GEMMs: its 32 MiB workspace, and for quantized linears three
// BF16 copies of the largest decoder linear (Llama-3.1-8B: gate/up, 14336 x 4096; lm_head excluded; the
// stacked q/k/v, 6144 x 4096, is smaller) and the fused q/k/v GEMM's rows [2048, 6144] BF16.
TEST(MemoryPlanCudaForward, GemmScratch) {
    const RealShape nvfp4 = real_shape("llama3-8b", {.nvfp4 = true});
    const RealShape bf16 = real_shape("llama3-8b", {.nvfp4 = false});
    const int64_t largest = 14336 * 4096;
    EXPECT_EQ(plan_memory(nvfp4.config, nvfp4.quant, options(2048, true)).gemm_scratch_bytes,
              (int64_t{32} << 20) + 3 * largest * 2 + 2048 * 6144 * 2);
    EXPECT_EQ(plan_memory(bf16.config, bf16.quant, options(2048, true)).gemm_scratch_bytes, int64_t{32} << 20);
    // At most kCudaGemvMaxRows rows a step: GEMVs only, no scratch.
    EXPECT_EQ(plan_memory(nvfp4.config, nvfp4.quant, options(kCudaGemvMaxRows, true)).gemm_scratch_bytes, 0);
    EXPECT_GT(plan_memory(nvfp4.config, nvfp4.quant, options(kCudaGemvMaxRows + 1, true)).gemm_scratch_bytes, 0);
    EXPECT_EQ(plan_memory(nvfp4.config, nvfp4.quant, options(2048, false)).gemm_scratch_bytes, 0);
    // Qwen3-30B-A3B: the experts and lm_head are not GEMM weights; the largest is q_proj / o_proj (4096 x
    // 2048), GemmContext's copy; the pipeline's two buffers hold a layer's stacked q/k/v (4096 + 2 x 512) x
    // 2048; the fused GEMM writes [8192, 5120] BF16.
    const RealShape moe = real_shape("qwen3-30b-a3b", {.nvfp4 = true});
    EXPECT_EQ(plan_memory(moe.config, moe.quant, options(8192, true)).gemm_scratch_bytes,
              (int64_t{32} << 20) + (4096 * 2048) * 2 + 2 * (5120 * 2048) * 2 + 8192 * 5120 * 2);
}

// Hybrid models on the CUDA forward: the chunked scan's workspace at its 512 MiB cap and one more recurrent
// state (the scratch slot padding sequences compute into), both beside the per-sequence states.
TEST(MemoryPlanCudaForward, HybridScanScratch) {
    const RealShape s = real_shape("nemotron-3-nano-30b-a3b", {.nvfp4 = true});
    const MemoryPlan cuda = plan_memory(s.config, s.quant, options(2048, true));
    const MemoryPlan host = plan_memory(s.config, s.quant, options(2048, false));
    ASSERT_GT(cuda.mamba_state_bytes_per_seq, 0);
    EXPECT_EQ(cuda.ssm_scratch_bytes, (int64_t{512} << 20) + cuda.mamba_state_bytes_per_seq);
    EXPECT_EQ(host.ssm_scratch_bytes, 0);
    EXPECT_EQ(cuda.mamba_state_bytes, host.mamba_state_bytes);  // the per-sequence states are the same
    // and the router's float32 input rows [2048, 2688] with their int32 indices [2048] (router_in_).
    EXPECT_EQ(
        cuda.workspace_bytes() - host.workspace_bytes(),
        cuda.moe_workspace_bytes + cuda.gemm_scratch_bytes + cuda.ssm_scratch_bytes + 2048 * (2688 + 1) * 4);
    // Attention-only models have none.
    const RealShape dense = real_shape("llama3-8b", {.nvfp4 = true});
    EXPECT_EQ(plan_memory(dense.config, dense.quant, options(2048, true)).ssm_scratch_bytes, 0);
}

}  // namespace
}  // namespace nibble
