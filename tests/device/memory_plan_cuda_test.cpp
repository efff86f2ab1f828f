// The memory plan's copies of CUDA-side sizes agree with the CUDA code they describe: the MoE workspace
// layout (ops/moe/moe_workspace.h) with cuda::moe_workspace_bytes, kCudaGemvMaxRows with the forward's
// GEMV/GEMM threshold, and cuda_qkv_prepare_supported with cuda::qkv_prepare_supported. Host-only checks in
// the CUDA build (no kernel runs).
#include <gtest/gtest.h>

#include "engine/memory_plan.h"
#include "gpu/decoder_forward.h"
#include "ops/attention/qkv_prepare_cuda.h"
#include "ops/moe/moe_cuda.h"
#include "ops/moe/moe_workspace.h"

namespace nibble {
namespace {

static_assert(kCudaGemvMaxRows == gpu::DecoderForward::kGemvMaxRows,
              "engine/memory_plan.h's kCudaGemvMaxRows must follow DecoderForward::kGemvMaxRows");

TEST(MemoryPlanCuda, MoeWorkspaceBytesFollowThePlansLayout) {
    struct Shape {
        int64_t m, top_k, n_experts, n_embd, n_ff;
    };
    // Qwen3-30B-A3B at 1 and 8192 tokens, the device tests' tiny MoE, and odd sizes that need padding.
    for (const Shape s : {Shape{1, 8, 128, 2048, 768}, Shape{8192, 8, 128, 2048, 768}, Shape{37, 2, 8, 256, 128},
                          Shape{3, 3, 5, 7, 9}, Shape{0, 1, 1, 1, 1}}) {
        EXPECT_EQ(cuda::moe_workspace_bytes(s.m, s.top_k, s.n_experts, s.n_embd, s.n_ff),
                  moe_workspace_layout(s.m, s.top_k, s.n_experts, s.n_embd, s.n_ff).total)
            << s.m << " " << s.top_k << " " << s.n_experts << " " << s.n_embd << " " << s.n_ff;
    }
    EXPECT_EQ(cuda::moe_workspace_bytes(8192, 8, 128, 2048, 768), 738723360u);  // memory_plan_cuda_forward_test
}

// The plan counts the fused q/k/v prefill rows for exactly the heads the fused q/k norm + RoPE kernel takes.
TEST(MemoryPlanCuda, QkvPrepareSupportFollowsTheKernel) {
    int checked = 0;
    for (int64_t head_dim = -16; head_dim <= 2 * cuda::kQkvPrepareMaxHeadDim + 16; head_dim += 4)
        for (int64_t rotary_dim = -8; rotary_dim <= head_dim + 8; rotary_dim += 2) {
            EXPECT_EQ(cuda_qkv_prepare_supported(head_dim, rotary_dim),
                      cuda::qkv_prepare_supported(head_dim, rotary_dim))
                << head_dim << " " << rotary_dim;
            checked += cuda_qkv_prepare_supported(head_dim, rotary_dim) ? 1 : 0;
        }
    EXPECT_GT(checked, 0);
}

}  // namespace
}  // namespace nibble
