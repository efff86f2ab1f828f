// One launch that takes a step's freshly projected q, k and v to what attention reads: the optional per-head
// RMSNorm of q and k (Qwen3's q_norm / k_norm), RoPE of q and k, q stored back in place (or into q_out), and k
// and v quantized into the paged KV cache. It stores exactly what the unfused sequence stores, bit for bit:
//   rmsnorm(q), rmsnorm(k)  (ops/rmsnorm/rmsnorm_cuda.h, in place, rows of head_dim)
//   rope_apply(q), rope_apply(k)  (ops/rope/rope_cuda.h)
//   kv_cache_write(k, v)  (ops/attention/attention_cuda.h)
// with the same roundings: the normed values are rounded to the activations dtype before RoPE (the unfused
// path stores them), the roped ones again before the cache quantization, and the sums of squares, the
// angles, sincosf and the quantization recipe are the same operations in the same order. k itself is left
// as it was (only the cache receives the normed, roped k). Launched with programmatic dependent launch
// (cuda/pdl.cuh): it waits for its predecessor before reading anything the step produced.
// Plain C++ plus cuda_runtime.h types.
//
// Layouts (device pointers, 16-byte aligned; a token's row is its heads side by side, and rows are q_stride,
// k_stride, v_stride elements apart: 0 means contiguous rows, e.g. one fused q/k/v GEMM's [m, q | k | v]
// output gives all three its width):
//   q             [m, q_stride >= n_heads * head_dim] F32 or BF16 (dtype), normed + roped in place, or read
//                 only when q_out is set
//   q_out         null, or [m, n_heads, head_dim] contiguous: where the normed + roped q goes instead; every
//                 q value is written there, also when neither a norm nor RoPE touches q (then copied)
//   k, v          [m, k_stride (v_stride) >= kv.n_kv_heads * head_dim] the same dtype; read only
//   q_norm_weight [head_dim] float32 or null (no q norm); k_norm_weight likewise for k
//   positions     [m] int64, read only when rotary_dim > 0
//   inv_freq      [rotary_dim / 2] float32 (RopeTable::inv_freq uploaded)
//   slot_mapping  [m] int64 physical slot block * block_size + offset; negative: the token is not cached
// Preconditions (std::invalid_argument): dtype F32 or BF16; a cache dtype other than F32; head_dim =
// kv.head_dim a multiple of 16 (whole NVFP4 groups: lane pairs) and at most 256; rotary_dim 0 (no RoPE, e.g. NemotronH's attention layers) or
// a multiple of 8 up to head_dim; n_heads > 0, kv.n_kv_heads > 0; strides 0 or at least their row's width and
// multiples of 8 elements; q, k, v and q_out 16-byte aligned.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/attention/attention_cuda.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

struct QkvPrepareArgs {
    void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;
    DType dtype = DType::BF16;
    int64_t m = 0;        // tokens of the step
    int64_t n_heads = 0;  // query heads (KV heads and head_dim come from kv)
    const float* q_norm_weight = nullptr;
    const float* k_norm_weight = nullptr;
    float norm_eps = 1e-6f;
    const int64_t* positions = nullptr;
    const float* inv_freq = nullptr;
    int64_t rotary_dim = 0;    // 0: no RoPE
    bool interleaved = false;  // RoPE pairs (2i, 2i + 1) instead of (i, i + rotary_dim / 2)
    const int64_t* slot_mapping = nullptr;
    PagedKvLayer kv;
    int64_t q_stride = 0, k_stride = 0, v_stride = 0;  // elements from one token's row to the next; 0: contiguous
    void* q_out = nullptr;                             // null: q in place
};

// The largest head_dim the fused kernel takes (one warp a head, 8 values a lane).
constexpr int64_t kQkvPrepareMaxHeadDim = 256;

// Whether qk_norm_rope_kv_write takes this shape (otherwise run the unfused sequence).
bool qkv_prepare_supported(int64_t head_dim, int64_t rotary_dim);

void qk_norm_rope_kv_write(const QkvPrepareArgs& args, cudaStream_t stream);

}  // namespace nibble::cuda
