// CUDA launchers of the MoE op (ops/moe/moe.h holds the semantics and the CPU references): routing, the
// token permutation by expert, the grouped NVFP4 expert GEMVs for decode, and the weighted combine. Plain
// C++ plus cuda_runtime.h types: includable from host code.
//
// A step runs, on one stream:
//   moe_route_softmax or moe_route_sigmoid   logits -> ids, weights        [m, top_k] each
//   moe_permute                              ids -> counts, offsets, sorted pairs, active experts
//   moe_experts_up_nvfp4                     x -> h  = act(x W_up^T [, x W_gate^T])   in sorted order
//   moe_experts_down_nvfp4                   h -> o  = h W_down^T                     in sorted order
//   moe_combine                              o, weights -> y (+ the shared expert's output)
// A "pair" is (token t, choice j), index t * top_k + j. Sorted order groups the pairs by expert id
// ascending and keeps token order inside an expert (what moe_experts_cpu gathers).
//
// Routing ties (both routers): candidates are ranked by their score, equal scores by the lower expert
// (group) id, as the CPU references do. The softmax router ranks by logit (softmax is monotone, so this
// is the CPU's order by probability, except that two different logits whose float32 probabilities round
// equal are ordered by logit here and by id on the CPU: a difference below one ulp of p). The sigmoid
// router ranks by sigmoid(logit) + bias computed with CUDA's expf (max 2 ulp): choices whose scores lie
// within a few ulps of each other may order differently than the CPU's libm; equal logits and bias give
// equal scores on both and so the same (lower-id) choice. Weights are float32, within a few ulps.
//
// Expert weights are NVFP4 (ops/linear/linear_cuda.h's layout), one Nvfp4DeviceWeight per expert in
// device arrays; all experts share n_embd and n_ff (their n / k fields are not read). The grouped GEMV
// reads only the active experts' weights: one CTA row tile per (active expert, 4 warps of rows), all tokens
// routed to that expert in tiles of 8 (a tile past the first re-reads the rows, from L1/L2, which decode
// rarely needs: at m = 64, top_k = 8 over 128 experts an expert gets 4 tokens on average).
// Prefill (MoeExpertKernel below) runs a grouped GEMM instead: tensor cores (mma.sync m16n8k16 BF16,
// float32 accumulation) over CTA tiles of (expert, 64 sorted positions, 128 weight rows), the weights
// dequantized to BF16 in shared memory (exact: an E2M1 code times an E4M3 scale has at most 6 significant
// bits; the per-expert global scale is applied in float32 in the epilogue). Its A operands are rounded to
// BF16: x when it is F32, and h (stored float32 as for the GEMV) when the down GEMM reads it.
// Intermediates h and o are float32; activations x and y F32 or BF16 (one dtype).
// Expert weights may also be BF16 (MoeDeviceExperts' bf16_* arrays): with widths that are multiples of 32 they
// run the same grouped GEMM for prefill (the BF16 rows copied to shared memory as they are, no scale) and a
// plain per-row GEMV for decode; n_embd / n_ff multiples of 16 only (either format) run the plain GEMV always
// (moe_uses_plain_kernel).
// Preconditions (std::invalid_argument): n_embd and n_ff multiples of 16, 16-byte aligned x, h, o;
// 1 <= n_experts <= 1024, 1 <= top_k <= 32 (routers: top_k <= n_experts too). Not checked (the tables
// live on the device): each expert's packed weights 16-byte aligned and scales 2-byte aligned (true of
// cudaMalloc'd tensors and of any row-aligned slice of them).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

// Softmax router (moe_route_softmax_cpu): logits [m, n_experts] F32 or BF16 -> ids [m, top_k] int32,
// weights [m, top_k] float32, best first.
void moe_route_softmax(const void* logits, DType dtype, int64_t m, int64_t n_experts, int64_t top_k,
                       bool norm_topk_prob, int32_t* ids, float* weights, cudaStream_t stream);

// Sigmoid router with correction bias and grouped top-k (moe_route_sigmoid_cpu). correction_bias
// [n_experts] float32 or null.
void moe_route_sigmoid(const void* logits, DType dtype, int64_t m, int64_t n_experts, int64_t top_k,
                       const float* correction_bias, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                       float routed_scaling_factor, int32_t* ids, float* weights, cudaStream_t stream);

// The permutation of m * top_k pairs by expert; caller-allocated device buffers.
struct MoePermutation {
    int32_t* counts = nullptr;          // [n_experts] pairs routed to each expert
    int32_t* offsets = nullptr;         // [n_experts + 1] exclusive prefix sum of counts
    int32_t* sorted_pairs = nullptr;    // [m * top_k] pair index at each sorted position
    int32_t* pair_position = nullptr;   // [m * top_k] sorted position of each pair (the inverse)
    int32_t* active_experts = nullptr;  // [n_experts] experts with count > 0, ascending (first n_active)
    int32_t* n_active = nullptr;        // [1]
};

// ids [m, top_k] int32 (each in 0..n_experts-1; out-of-range ids are dropped, not routed: their
// pair_position is left unwritten) -> perm.
void moe_permute(const int32_t* ids, int64_t m, int64_t top_k, int64_t n_experts, const MoePermutation& perm,
                 cudaStream_t stream);

// The expert kernel: the decode GEMV (CUDA cores, float32 arithmetic on the activations; weights re-read
// from L1/L2 for each further 8 tokens of an expert) or the prefill grouped GEMM (tensor cores, BF16 A
// operands, 64-position tiles: at few tokens per expert most of its rows are padding). Auto takes the GEMM
// when moe_prefers_gemm: BF16 activations (F32 is the exactness mode, as for the dense GEMM) and the
// experts averaging at least kMoeGemmMinTokensPerExpert routed tokens (m * top_k >= 8 n_experts: at 8 the
// GEMV starts re-reading weights for a second token tile, while decode batches, ~1-4 tokens an expert, keep
// the GEMV; Qwen3-30B-A3B switches at m = 128, Nemotron-3-Nano at m = 171).
enum class MoeExpertKernel { Auto, Gemv, Gemm };
constexpr int64_t kMoeGemmMinTokensPerExpert = 8;
bool moe_prefers_gemm(int64_t m, int64_t top_k, int64_t n_experts, DType activations);

// NVFP4 experts (gate / up / down) or BF16 experts (bf16_gate / bf16_up / bf16_down), one of the two sets.
struct MoeDeviceExperts {
    const Nvfp4DeviceWeight* gate = nullptr;  // device array [n_experts], each [n_ff, n_embd]; SwiGlu only
    const Nvfp4DeviceWeight* up = nullptr;    // device array [n_experts], each [n_ff, n_embd]
    const Nvfp4DeviceWeight* down = nullptr;  // device array [n_experts], each [n_embd, n_ff]
    int64_t n_experts = 0, n_embd = 0, n_ff = 0;
    const uint16_t* bf16_gate = nullptr;      // [n_experts, n_ff, n_embd] BF16, 16-byte aligned; SwiGlu only
    const uint16_t* bf16_up = nullptr;        // [n_experts, n_ff, n_embd]
    const uint16_t* bf16_down = nullptr;      // [n_experts, n_embd, n_ff]
    bool bf16_weights() const { return bf16_up != nullptr; }
};

// Whether moe_experts_up_nvfp4 / moe_experts_down_nvfp4 run the plain expert GEMV: n_embd or n_ff not a
// multiple of 32 (whole 16-element NVFP4 blocks only; small test models) whatever MoeExpertKernel asks, or
// BF16 experts when the grouped GEMM is not chosen (gemm_chosen: the kernel argument and moe_prefers_gemm
// picked it; BF16 experts have no NVFP4 GEMV). One warp per (sorted position, output row), float32
// arithmetic on the activations as the GEMV's. NVFP4 experts whose widths are multiples of 32 (every real
// model's) keep the GEMV / GEMM dispatch below.
bool moe_uses_plain_kernel(const MoeDeviceExperts& experts, bool gemm_chosen = false);

// h[p] = act(x[token of sorted pair p]) for the m * top_k sorted positions p:
//   SwiGlu: silu(x W_gate^T) * (x W_up^T);  Relu2: relu(x W_up^T)^2
//   x [m, n_embd] F32 or BF16; h [m * top_k, n_ff] float32
void moe_experts_up_nvfp4(const void* x, DType dtype, int64_t m, int64_t top_k,
                          const MoeDeviceExperts& experts, MoeActivation act, const MoePermutation& perm,
                          float* h, cudaStream_t stream, MoeExpertKernel kernel = MoeExpertKernel::Auto);

// o[p] = h[p] W_down^T of the expert of sorted position p.  h [m * top_k, n_ff]; o [m * top_k, n_embd]
// h carries no activation dtype: Auto decides as for BF16 activations (pass Gemv in the F32 exactness mode;
// moe_experts_nvfp4 does).
void moe_experts_down_nvfp4(const float* h, int64_t m, int64_t top_k, const MoeDeviceExperts& experts,
                            const MoePermutation& perm, float* o, cudaStream_t stream,
                            MoeExpertKernel kernel = MoeExpertKernel::Auto);

// y[t] = sum over the token's choices in ascending expert id of weights[t, j] * o[pair_position[t, j]],
// from zero (moe_experts_cpu's order), then + shared[t] when shared is not null. A choice with a negative
// id (dropped: moe_localize_ids' other ranks' experts) contributes nothing, its pair_position unused; a
// token with none left gets zero (+ shared).
//   o [m * top_k, n_embd] float32; ids, weights [m, top_k]; shared, y [m, n_embd] in dtype (F32 or BF16)
void moe_combine(const float* o, const int32_t* ids, const float* weights, const int32_t* pair_position,
                 int64_t m, int64_t top_k, int64_t n_embd, const void* shared, DType dtype, void* y,
                 cudaStream_t stream);

// What follows a combine in a pre-norm decoder, fused into it: residual += y, then out = rmsnorm(residual) *
// weight (the next layer's input norm). moe_combine_residual_rmsnorm leaves residual and out bit for bit as
// moe_combine into y and then rmsnorm_residual(y, residual, ...) would (y rounded to dtype first), without
// storing y or launching the norm: one CTA a token (the norm needs the whole row). n_embd a multiple of 8;
// residual and out [m, n_embd] in dtype, 16-byte aligned; weight [n_embd] float32.
struct MoeResidualNorm {
    void* residual = nullptr;
    const float* weight = nullptr;
    float eps = 0.0f;
    void* out = nullptr;
};
void moe_combine_residual_rmsnorm(const float* o, const int32_t* ids, const float* weights,
                                  const int32_t* pair_position, int64_t m, int64_t top_k, int64_t n_embd,
                                  const void* shared, DType dtype, const MoeResidualNorm& norm,
                                  cudaStream_t stream);

// Expert parallelism (a rank holding experts [begin, end) of the model's, the router replicated): for the
// n_pairs routed ids, local_ids[i] = ids[i] - begin inside the range, else -1 (moe_localize_ids_cpu). Fed to
// moe_experts_nvfp4 with the rank's experts, the output is the routed sum over this rank's experts only
// (a partial sum for an all-reduce); top_k may then exceed the rank's expert count.
//   ids, local_ids [n_pairs] int32 (may alias); 0 <= begin < end <= 1024
void moe_localize_ids(const int32_t* ids, int64_t n_pairs, int64_t begin, int64_t end, int32_t* local_ids,
                      cudaStream_t stream);

// The whole expert part of a step in one call: moe_permute, moe_experts_up_nvfp4, moe_experts_down_nvfp4
// and moe_combine, with the permutation and h / o carved from `workspace` (device, 16-byte aligned, at
// least moe_workspace_bytes(...) bytes). With `then_norm` the combine is moe_combine_residual_rmsnorm
// instead: y is not written (may be null).
//   x, shared, y [m, n_embd] in dtype; ids, weights [m, top_k] (from a router above)
size_t moe_workspace_bytes(int64_t m, int64_t top_k, int64_t n_experts, int64_t n_embd, int64_t n_ff);
void moe_experts_nvfp4(const void* x, DType dtype, int64_t m, const int32_t* ids, const float* weights,
                       int64_t top_k, const MoeDeviceExperts& experts, MoeActivation act, const void* shared,
                       void* workspace, void* y, cudaStream_t stream,
                       MoeExpertKernel kernel = MoeExpertKernel::Auto,
                       const MoeResidualNorm* then_norm = nullptr);

// Decode's router and permutation in one launch: moe_route_softmax (n_experts = experts.n_experts) into ids,
// weights, then moe_permute of those ids into the permutation of moe_experts_nvfp4's `workspace` (same
// outputs as the two); one kernel when n_experts <= 256 and m top_k <= 1024, else the two launchers. Follow
// it with moe_experts_nvfp4_permuted on the same workspace, ids and weights (not for localized ids).
void moe_route_softmax_permute(const void* logits, DType dtype, int64_t m, int64_t top_k, bool norm_topk_prob,
                               const MoeDeviceExperts& experts, int32_t* ids, float* weights, void* workspace,
                               cudaStream_t stream);
// The same for the sigmoid router: moe_route_sigmoid (n_experts = experts.n_experts) then moe_permute, in
// one kernel when n_experts <= 256 and m top_k <= 1024.
void moe_route_sigmoid_permute(const void* logits, DType dtype, int64_t m, int64_t top_k,
                               const float* correction_bias, int64_t n_group, int64_t topk_group,
                               bool norm_topk_prob, float routed_scaling_factor,
                               const MoeDeviceExperts& experts, int32_t* ids, float* weights, void* workspace,
                               cudaStream_t stream);
// moe_experts_nvfp4 minus its moe_permute: the workspace already holds the permutation of ids.
void moe_experts_nvfp4_permuted(const void* x, DType dtype, int64_t m, const int32_t* ids,
                                const float* weights, int64_t top_k, const MoeDeviceExperts& experts,
                                MoeActivation act, const void* shared, void* workspace, void* y,
                                cudaStream_t stream, MoeExpertKernel kernel = MoeExpertKernel::Auto,
                                const MoeResidualNorm* then_norm = nullptr);

}  // namespace nibble::cuda
