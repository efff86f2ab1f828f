// CUDA launchers for attention over the paged KV cache (ops/attention/kv_cache.h holds the layout contract)
// and for the KV write that fills it. Cache dtypes: BF16, FP8 (E4M3 x per-layer scale) and NVFP4 (E2M1 x
// E4M3 per 16 along head_dim x per-layer scale); the F32 cache is the CPU reference's alone. The cache is
// read in its stored format and dequantized on chip (registers, then the tile in shared memory); no
// dequantized copy is ever written to device memory. Plain C++ plus cuda_runtime.h types.
//
// Every kernel has a CTA own one sequence, one KV head, a tile of query rows (query tokens x the query
// heads of that KV head: GQA reads each K/V row once for the whole group) and one split of the key range
// (flash-decoding). Online softmax in float32 (base 2), float32 accumulation. With more than one split every
// CTA writes a partial (unnormalized output, running max, running sum) to the workspace and a combine
// kernel merges the splits. Which kernel runs:
//   prefill with BF16 q (some sequence with >= 16 rows of query tokens x group, and scale > 0): the
//     tensor-core prefill kernels (flash-attention-2 style, mma.sync m16n8k16, 128 rows x 64-key tiles;
//     PrefillKernel);
//   decode (one query token a sequence) with at most 8 query heads per KV head: a tensor-core decode
//     kernel (AttentionArgs::decode_kernel; by default the pipelined one for FP8/NVFP4, Mma for BF16);
//   otherwise (F32 q, larger decode groups, a few rows): the CUDA-core kernel, float32 throughout.
//
// Layouts (device pointers):
//   q, out        [n_tokens, n_heads, head_dim] F32 or BF16 (the same dtype); the tokens of sequence s are
//                 rows q_start[s] .. q_start[s + 1] - 1, at positions start_pos[s] + i
//   block_tables  [n_seqs, max_blocks] int32 physical block of each logical block
//   k, v (write)  [n_tokens, n_kv_heads, head_dim] F32 or BF16
//   slot_mapping  [n_tokens] int64 physical slot block * block_size + offset; negative: skipped
// Causality as paged_attention_cpu: token i of a sequence attends to positions 0 .. start_pos + i (only
// the last sliding_window of them when sliding_window > 0); the K/V of the new tokens must have been
// written to the cache first. Preconditions (std::invalid_argument): head_dim 16, 32, 64, 128 or 256 (the
// tensor-core kernels take 64 and 128; other sizes run the CUDA-core kernel on every path), n_heads a
// multiple of n_kv_heads with at most 32 query heads per KV head, a cache dtype other than F32.
// Tensor-core decode takes q as hi + lo 16-bit parts: BF16 parts for the BF16 cache, fp16 parts for
// FP8/NVFP4. Tensor-core prefill takes q as is (BF16) for the BF16 cache and converted to fp16 for
// FP8/NVFP4, and P rounded to BF16 / fp16 in the P.V product (the dequantized K/V are exact in either). On
// the FP8/NVFP4 paths |q| must stay below 65504 (fp16's range; beyond it the output is NaN).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/attention/kv_cache.h"
#include "tensor/dtype.h"

namespace nibble::cuda {

// One layer of the paged cache on the device: K and V of n_blocks blocks of block_bytes each
// (KvCacheShape::block_bytes()), and the layer's multipliers (kv_layer_scale(dtype, kv_scale)).
struct PagedKvLayer {
    uint8_t* k = nullptr;
    uint8_t* v = nullptr;
    int64_t n_blocks = 0;
    int64_t block_bytes = 0;
    int64_t block_size = 16;
    int64_t n_kv_heads = 0;
    int64_t head_dim = 0;
    KvDtype dtype = KvDtype::Bf16;
    float k_scale = 1.0f, v_scale = 1.0f;
};

// A batch of sequences for one attention call. Pointers are device memory; the bounds are host values.
struct AttentionBatch {
    int64_t n_seqs = 0;
    int64_t n_tokens = 0;                   // q_start[n_seqs]: rows of q and out
    const int32_t* q_start = nullptr;       // [n_seqs + 1], q_start[0] = 0
    const int32_t* start_pos = nullptr;     // [n_seqs] tokens cached before the sequence's first new token
    const int32_t* block_tables = nullptr;  // [n_seqs, max_blocks]
    int64_t max_blocks = 0;
    int64_t max_q_len = 0;   // >= every q_start[s + 1] - q_start[s] (the grid is sized by it)
    int64_t max_kv_len = 0;  // >= every start_pos[s] + its query count (splits divide this range)
};

// Which tensor-core decode kernel runs (decode with at most 8 query heads per KV head; kept selectable to
// compare them): Auto takes Pipelined for the FP8/NVFP4 caches and Mma for BF16. Pipelined: raw K/V and
// block-table entries loaded one warp step ahead of the math (32 keys a warp step for NVFP4, 16 for FP8),
// cheaper NVFP4 unpacking; BF16 has no pipelined variant (its step is 4x the registers) and runs Mma.
// Pipelined16: NVFP4 with 16-key warp steps and more warps per SM (FP8 / BF16 as Pipelined).
enum class DecodeKernel { Auto, Mma, Pipelined, Pipelined16 };

// Which tensor-core prefill kernel runs (kept selectable to compare them): Auto takes Wide for FP8 / NVFP4
// caches and Narrow for BF16 (measured: docs/perf.md, session 8). Wide: 4 warps of 32 query rows a CTA, two
// CTAs an SM, Q read from shared memory per key tile (flash-attention-2's tiling), the quantized K/V
// dequantized once a tile into shared memory for the CTA. Narrow: 8 warps of 16 rows, Q in registers, one
// CTA an SM (twice the K/V shared-memory reads per mma).
enum class PrefillKernel { Auto, Narrow, Wide };

struct AttentionArgs {
    int64_t n_heads = 0;
    float scale = 1.0f;          // applied to q.k, usually 1/sqrt(head_dim)
    int64_t sliding_window = 0;  // 0: every earlier position
    DecodeKernel decode_kernel = DecodeKernel::Auto;
    PrefillKernel prefill_kernel = PrefillKernel::Auto;
};

// How many key-range splits to use so the grid fills `sm_count` SMs (1 when it already does, or the
// context is short), and the workspace those splits need (0 for one split). Tensor-core prefill counts two
// resident CTAs an SM (the wide kernel's) here, and what the cache dtype's kernel holds in the overload
// below.
int paged_attention_splits(const AttentionBatch& batch, int64_t n_kv_heads, int64_t n_heads, int sm_count);
// The same, with decode splits sized by the bytes a split reads rather than its keys (a 4-bit cache's split
// covers ~3.5x the keys of a BF16 one for the same bytes), so each CTA moves enough bytes to hide its start.
int paged_attention_splits(const AttentionBatch& batch, const PagedKvLayer& kv, int64_t n_heads, int sm_count);
size_t paged_attention_workspace_bytes(int n_splits, int64_t n_tokens, int64_t n_heads, int64_t head_dim);

// Whether paged_attention takes this head_dim (16, 32, 64, 128, 256).
bool paged_attention_head_dim_supported(int64_t head_dim);

void paged_attention(const void* q, DType dtype, const PagedKvLayer& kv, const AttentionBatch& batch,
                     const AttentionArgs& args, int n_splits, void* workspace, size_t workspace_bytes, void* out,
                     cudaStream_t stream);

// Quantizes and stores K and V of n_tokens tokens (head_dim a multiple of 16), bit for bit as kv_encode_head does on the host (same
// roundings: cuda_fp8.h's conversions for E4M3, E2M1 rounded to nearest even in software). A non-finite
// input is not detected here (the host path throws for it): it stores what the conversions make of it.
void kv_cache_write(const void* k, const void* v, DType dtype, int64_t n_tokens, const int64_t* slot_mapping,
                    const PagedKvLayer& kv, cudaStream_t stream);

}  // namespace nibble::cuda
