// The registry table. Numbers were read from the kernels as of this commit:
//   threads        the launch's block size (kThreads / kMmaThreads, matching __launch_bounds__)
//   static smem    the kernel's __shared__ arrays (ptxas -v "bytes smem" agrees)
//   dynamic smem   what the launcher passes (attention: attn_smem_bytes<HD, NJ>, mirrored below)
//   registers      ptxas -v (CUDA 13.0, -O3), the largest of the F32 and BF16 activation instantiations
//                  compiled for sm_90a and for sm_120a (the two differ by a few registers either way)
//   min blocks     __launch_bounds__'s second argument
//   min cc         mma.sync m16n8k16 with bf16/f16 operands and fma.rn.bf16x2 need compute capability 8.0
// When a kernel changes, re-read its numbers: `nvcc -Xptxas -v` on its .cu file prints them per
// instantiation, and tests/tune checks the shared-memory formulas against the kernels' values.
#include "tune/registry.h"

#include <fmt/format.h>

#include <bit>

namespace nibble::tune {

namespace {

// ops/attention/attention_cuda.cu attn_smem_bytes<HD, NJ>: the CUDA-core attention tile in floats,
// sQ [R][HD] + sK [32][HD + 4] + sV [32][HD] + sP [R][32] + sM, sL, sA [R], R = 4 * NJ.
constexpr int64_t attention_tile_smem(int hd, int nj) {
    const int64_t r = 4 * nj, key_tile = 32;
    return 4 * (r * hd + key_tile * (hd + 4) + key_tile * hd + r * key_tile + 3 * r);
}

// decode_mma_kernel<KV, HD>'s static __shared__: s_m[4][8], s_l[4][8] and s_o[4][8][HD], and the merge's s_f[4][8]
// and s_out[8] (merge_decode_warps), floats.
constexpr int64_t decode_mma_smem(int hd) { return 4 * (4 * 8 + 4 * 8 + 4 * 8 * hd + 4 * 8 + 8); }

// gemv_nvfp4_mma_kernel<NT>'s static __shared__ red[8 warps][NT * 8 tokens][16 rows], floats.
constexpr int64_t gemv_mma_smem(int nt) { return 4 * 8 * (nt * 8) * 16; }

// Decode's key-range splits worth trying (paged_attention_splits' heuristic picks within 1..256).
constexpr int kDecodeSplits[] = {1, 2, 4, 8, 16, 32};

// attention_cuda.cu prefill_smem_bytes<HD>: 2 stages x (K, V) x [kPfKeys = 64][HD] 16-bit, dynamic.
constexpr int64_t prefill_mma_smem(int hd) { return 2 * 2 * 64 * hd * 2; }

// attention_cuda.cu prefill_wide_smem_bytes<KV, HD>: Q [128][HD] and K and V [64][HD] 16-bit (BF16: two
// stages of K and V), and two raw stages of a key tile's K and V bytes (FP8: [64][HD] each; NVFP4: [64][HD / 2]
// codes and [64][HD / 16] scales each).
constexpr int64_t prefill_wide_smem(KvDtype kv, int hd) {
    const int64_t raw_row = kv == KvDtype::Bf16 ? 0 : kv == KvDtype::Fp8 ? hd : hd / 2 + hd / 16;
    const int64_t kv_stages = kv == KvDtype::Bf16 ? 2 : 1;
    return (128 + 2 * 64 * kv_stages) * hd * 2 + 2 * 2 * 64 * raw_row;
}

// Prefill's splits (paged_attention_splits picks 1..16 for the tensor-core kernel).
constexpr int kPrefillSplits[] = {1, 2, 4, 8, 16};

// paged_attention's dispatch: a BF16 q with some sequence of >= 16 rows (query tokens x group, kPfMinRows)
// and more than one query token takes prefill_mma_kernel; everything else that is not a tensor-core decode
// (one token, group <= 8) takes paged_attention_kernel.
bool takes_prefill_mma(const OpShape& s) { return s.activation == DType::BF16 && s.q_len > 1 && s.q_len * s.group >= 16; }
bool not_prefill_mma(const OpShape& s) { return !takes_prefill_mma(s); }
// gemm_nvfp4 takes BF16 activations only.
bool bf16_activations(const OpShape& s) { return s.activation == DType::BF16; }
// gemv_nvfp4_fp4mma steps k by the FP4 mma's 64.
bool k_multiple_of_64(const OpShape& s) { return s.k % 64 == 0; }

constexpr std::string_view kLinearSrc = "src/ops/linear/linear_cuda.cu; registers: ptxas -v sm_90a/sm_120a";
constexpr std::string_view kGemmSrc =
    "src/ops/linear/gemm_cuda.cu dequantize_nvfp4_kernel (256 threads); cuBLASLt picks its own kernels for the device";
constexpr std::string_view kFp4MmaSrc =
    "src/ops/linear/gemv_fp4mma_cuda.cu; registers: ptxas -v sm_120a (the sm_90a build holds a trap stub)";
constexpr std::string_view kAttnSrc = "src/ops/attention/attention_cuda.cu; registers: ptxas -v sm_90a/sm_120a";

constexpr VariantApplies gemv_rows(int lo, int hi) { return {.m_min = lo, .m_max = hi}; }
constexpr VariantApplies attn(int hd, int group_lo, int group_hi, KvDtype kv, bool (*also)(const OpShape&) = nullptr) {
    return {.head_dim = hd, .group_min = group_lo, .group_max = group_hi, .any_kv_dtype = false, .kv_dtype = kv,
            .also = also};
}

// gemv_nvfp4 / gemv_bf16 launch m in tiles of up to 16 rows; each tile's size picks one instantiation.
// CUDA-core kernels: 128 threads, rows_per_warp R = 2 for MT <= 8, else 1; no shared memory.
// Attention: prefill with a BF16 q and >= 16 rows runs prefill_wide_kernel or prefill_mma_kernel
// (AttentionArgs::prefill_kernel picks: Wide, Narrow; Auto takes Wide for FP8 / NVFP4 caches, Narrow for
// BF16); decode with group <= 8 runs decode_mma_kernel or, for FP8/NVFP4 caches, decode_pipe_kernel
// (AttentionArgs::decode_kernel picks: Mma, Pipelined, or for NVFP4 Pipelined16; Auto takes Pipelined); decode
// with a larger group and the remaining prefills (F32 q, or fewer rows) run paged_attention_kernel with NJ =
// rows / 4 (rows_per_warp: the group rounded up to a power of two >= 4 for decode, 32 rows for prefill). NJ =
// 1 and 2 are compiled but never dispatched (group <= 8 decodes take the tensor-core kernel), so they are not
// registered.
constexpr KernelVariant kVariants[] = {
    // ---- NVFP4 GEMV ----
    {OpKind::GemvNvfp4, "mma.nt1", "gemv_nvfp4_mma_kernel<1, XT>",
     {.threads_per_block = 256, .static_smem_bytes = gemv_mma_smem(1), .regs_per_thread = 124},
     gemv_rows(1, 8), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvNvfp4, "mma.nt2", "gemv_nvfp4_mma_kernel<2, XT>",
     {.threads_per_block = 256, .static_smem_bytes = gemv_mma_smem(2), .regs_per_thread = 164},
     gemv_rows(9, 16), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvNvfp4, "cuda_core.mt1", "gemv_nvfp4_kernel<1, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 32, .regs_per_thread = 67}, gemv_rows(1, 1), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvNvfp4, "cuda_core.mt2", "gemv_nvfp4_kernel<2, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 64, .regs_per_thread = 80}, gemv_rows(2, 2), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvNvfp4, "cuda_core.mt4", "gemv_nvfp4_kernel<4, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 128, .regs_per_thread = 104}, gemv_rows(3, 4), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvNvfp4, "cuda_core.mt8", "gemv_nvfp4_kernel<8, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 256, .regs_per_thread = 120}, gemv_rows(5, 8), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvNvfp4, "cuda_core.mt16", "gemv_nvfp4_kernel<16, 1, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 256, .regs_per_thread = 96}, gemv_rows(9, 16), {}, Measured::OnHopper, kLinearSrc},
    // W4A4 on Blackwell's FP4 tensor cores (mma.sync kind::mxf4nvf4.block_scale, sm_120a / sm_121a only):
    // the activations are quantized to NVFP4 first (fp4mma_quantize_kernel<XT>: 256 threads, <= 45 registers,
    // 32 bytes smem, which any device here holds), then 4 warps a 16-row tile; static smem partial[4][16][8]
    // floats. k must be a multiple of the mma's 64. Never run on real hardware: see docs/tuning.md.
    {OpKind::GemvNvfp4, "fp4mma.w4a4", "gemv_fp4mma_kernel<XT> + fp4mma_quantize_kernel<XT>",
     {.threads_per_block = 128, .static_smem_bytes = 4 * 4 * 16 * 8, .regs_per_thread = 46, .min_cc = 120,
      .isa = ArchIsa::Fp4MmaSm120a},
     {.m_min = 1, .m_max = 16, .also = k_multiple_of_64}, {}, Measured::NotMeasured, kFp4MmaSrc},
    // ---- BF16 GEMV (CUDA cores only) ----
    // KS = 4 (the CTA's warps split k, partial sums in static smem [4][MT * R] floats) for matrices of few rows.
    {OpKind::GemvBf16, "cuda_core.mt1", "gemv_bf16_kernel<1, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 32, .regs_per_thread = 80}, gemv_rows(1, 1), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvBf16, "cuda_core.mt2", "gemv_bf16_kernel<2, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 64, .regs_per_thread = 87}, gemv_rows(2, 2), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvBf16, "cuda_core.mt4", "gemv_bf16_kernel<4, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 128, .regs_per_thread = 95}, gemv_rows(3, 4), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvBf16, "cuda_core.mt8", "gemv_bf16_kernel<8, 2, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 256, .regs_per_thread = 119}, gemv_rows(5, 8), {}, Measured::OnHopper, kLinearSrc},
    {OpKind::GemvBf16, "cuda_core.mt16", "gemv_bf16_kernel<16, 1, XT, 1 or 4>",
     {.threads_per_block = 128, .static_smem_bytes = 256, .regs_per_thread = 95}, gemv_rows(9, 16), {}, Measured::OnHopper, kLinearSrc},
    // ---- attention decode, tensor cores: group <= 8, __launch_bounds__(128, 3) ----
    {OpKind::AttentionDecode, "decode_mma.bf16.hd64", "decode_mma_kernel<Bf16, 64>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(64), .regs_per_thread = 144, .min_blocks_per_sm = 3},
     attn(64, 1, 8, KvDtype::Bf16), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_mma.bf16.hd128", "decode_mma_kernel<Bf16, 128>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(128), .regs_per_thread = 168, .min_blocks_per_sm = 3},
     attn(128, 1, 8, KvDtype::Bf16), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_mma.fp8.hd64", "decode_mma_kernel<Fp8, 64>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(64), .regs_per_thread = 136, .min_blocks_per_sm = 3},
     attn(64, 1, 8, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_mma.fp8.hd128", "decode_mma_kernel<Fp8, 128>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(128), .regs_per_thread = 160, .min_blocks_per_sm = 3},
     attn(128, 1, 8, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_mma.nvfp4.hd64", "decode_mma_kernel<Nvfp4, 64>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(64), .regs_per_thread = 152, .min_blocks_per_sm = 3},
     attn(64, 1, 8, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_mma.nvfp4.hd128", "decode_mma_kernel<Nvfp4, 128>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(128), .regs_per_thread = 167, .min_blocks_per_sm = 3},
     attn(128, 1, 8, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    // ---- attention decode, tensor cores, pipelined (FP8 / NVFP4 caches; DecodeKernel::Auto takes Pipelined):
    // the same CTA and shared arrays as decode_mma_kernel; decode_pipe_kernel<KV, HD, NSUB, MIN_CTAS> with
    // __launch_bounds__(128, MIN_CTAS). Pipelined16 (NVFP4 only): 16-key steps at 3 CTAs per SM ----
    {OpKind::AttentionDecode, "decode_pipe.fp8.hd64", "decode_pipe_kernel<Fp8, 64, 1, 2>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(64), .regs_per_thread = 136, .min_blocks_per_sm = 2},
     attn(64, 1, 8, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_pipe.fp8.hd128", "decode_pipe_kernel<Fp8, 128, 1, 2>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(128), .regs_per_thread = 208, .min_blocks_per_sm = 2},
     attn(128, 1, 8, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_pipe.nvfp4.hd64", "decode_pipe_kernel<Nvfp4, 64, 2, 2>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(64), .regs_per_thread = 184, .min_blocks_per_sm = 2},
     attn(64, 1, 8, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_pipe.nvfp4.hd128", "decode_pipe_kernel<Nvfp4, 128, 2, 2>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(128), .regs_per_thread = 254, .min_blocks_per_sm = 2},
     attn(128, 1, 8, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_pipe16.nvfp4.hd64", "decode_pipe_kernel<Nvfp4, 64, 1, 3>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(64), .regs_per_thread = 152, .min_blocks_per_sm = 3},
     attn(64, 1, 8, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "decode_pipe16.nvfp4.hd128", "decode_pipe_kernel<Nvfp4, 128, 1, 3>",
     {.threads_per_block = 128, .static_smem_bytes = decode_mma_smem(128), .regs_per_thread = 168, .min_blocks_per_sm = 3},
     attn(128, 1, 8, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    // ---- attention decode, CUDA cores: groups 9..32 (NJ 4: 9..16, NJ 8: 17..32) ----
    {OpKind::AttentionDecode, "cuda_core.bf16.hd64.nj4", "paged_attention_kernel<Bf16, 64, 4>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 4), .regs_per_thread = 64},
     attn(64, 9, 16, KvDtype::Bf16), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.bf16.hd64.nj8", "paged_attention_kernel<Bf16, 64, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 8), .regs_per_thread = 96},
     attn(64, 17, 32, KvDtype::Bf16), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.bf16.hd128.nj4", "paged_attention_kernel<Bf16, 128, 4>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 4), .regs_per_thread = 96},
     attn(128, 9, 16, KvDtype::Bf16), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.bf16.hd128.nj8", "paged_attention_kernel<Bf16, 128, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 8), .regs_per_thread = 144},
     attn(128, 17, 32, KvDtype::Bf16), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.fp8.hd64.nj4", "paged_attention_kernel<Fp8, 64, 4>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 4), .regs_per_thread = 72},
     attn(64, 9, 16, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.fp8.hd64.nj8", "paged_attention_kernel<Fp8, 64, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 8), .regs_per_thread = 86},
     attn(64, 17, 32, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.fp8.hd128.nj4", "paged_attention_kernel<Fp8, 128, 4>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 4), .regs_per_thread = 80},
     attn(128, 9, 16, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.fp8.hd128.nj8", "paged_attention_kernel<Fp8, 128, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 8), .regs_per_thread = 110},
     attn(128, 17, 32, KvDtype::Fp8), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.nvfp4.hd64.nj4", "paged_attention_kernel<Nvfp4, 64, 4>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 4), .regs_per_thread = 72},
     attn(64, 9, 16, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.nvfp4.hd64.nj8", "paged_attention_kernel<Nvfp4, 64, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 8), .regs_per_thread = 88},
     attn(64, 17, 32, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.nvfp4.hd128.nj4", "paged_attention_kernel<Nvfp4, 128, 4>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 4), .regs_per_thread = 72},
     attn(128, 9, 16, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionDecode, "cuda_core.nvfp4.hd128.nj8", "paged_attention_kernel<Nvfp4, 128, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 8), .regs_per_thread = 108},
     attn(128, 17, 32, KvDtype::Nvfp4), kDecodeSplits, Measured::OnHopper, kAttnSrc},
    // ---- attention prefill, tensor cores, wide warps (PrefillKernel::Auto's for FP8 / NVFP4): BF16 q, >= 16 rows;
    // __launch_bounds__(128, 2); registers from ptxas -v sm_90a (HD 128 at the cap of 255 with 52-100 bytes
    // spilled) ----
    {OpKind::AttentionPrefill, "prefill_wide.bf16.hd64", "prefill_wide_kernel<Bf16, 64>",
     {.threads_per_block = 128, .dynamic_smem_bytes = prefill_wide_smem(KvDtype::Bf16, 64), .regs_per_thread = 237, .min_blocks_per_sm = 2},
     attn(64, 1, 32, KvDtype::Bf16, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_wide.bf16.hd128", "prefill_wide_kernel<Bf16, 128>",
     {.threads_per_block = 128, .dynamic_smem_bytes = prefill_wide_smem(KvDtype::Bf16, 128), .regs_per_thread = 255, .min_blocks_per_sm = 2},
     attn(128, 1, 32, KvDtype::Bf16, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_wide.fp8.hd64", "prefill_wide_kernel<Fp8, 64>",
     {.threads_per_block = 128, .dynamic_smem_bytes = prefill_wide_smem(KvDtype::Fp8, 64), .regs_per_thread = 236, .min_blocks_per_sm = 2},
     attn(64, 1, 32, KvDtype::Fp8, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_wide.fp8.hd128", "prefill_wide_kernel<Fp8, 128>",
     {.threads_per_block = 128, .dynamic_smem_bytes = prefill_wide_smem(KvDtype::Fp8, 128), .regs_per_thread = 255, .min_blocks_per_sm = 2},
     attn(128, 1, 32, KvDtype::Fp8, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_wide.nvfp4.hd64", "prefill_wide_kernel<Nvfp4, 64>",
     {.threads_per_block = 128, .dynamic_smem_bytes = prefill_wide_smem(KvDtype::Nvfp4, 64), .regs_per_thread = 240, .min_blocks_per_sm = 2},
     attn(64, 1, 32, KvDtype::Nvfp4, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_wide.nvfp4.hd128", "prefill_wide_kernel<Nvfp4, 128>",
     {.threads_per_block = 128, .dynamic_smem_bytes = prefill_wide_smem(KvDtype::Nvfp4, 128), .regs_per_thread = 255, .min_blocks_per_sm = 2},
     attn(128, 1, 32, KvDtype::Nvfp4, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    // ---- attention prefill, tensor cores, narrow warps (PrefillKernel::Narrow): BF16 q, >= 16 rows;
    // __launch_bounds__(256, 1) ----
    {OpKind::AttentionPrefill, "prefill_mma.bf16.hd64", "prefill_mma_kernel<Bf16, 64>",
     {.threads_per_block = 256, .dynamic_smem_bytes = prefill_mma_smem(64), .regs_per_thread = 174, .min_blocks_per_sm = 1},
     attn(64, 1, 32, KvDtype::Bf16, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_mma.bf16.hd128", "prefill_mma_kernel<Bf16, 128>",
     {.threads_per_block = 256, .dynamic_smem_bytes = prefill_mma_smem(128), .regs_per_thread = 222, .min_blocks_per_sm = 1},
     attn(128, 1, 32, KvDtype::Bf16, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_mma.fp8.hd64", "prefill_mma_kernel<Fp8, 64>",
     {.threads_per_block = 256, .dynamic_smem_bytes = prefill_mma_smem(64), .regs_per_thread = 190, .min_blocks_per_sm = 1},
     attn(64, 1, 32, KvDtype::Fp8, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_mma.fp8.hd128", "prefill_mma_kernel<Fp8, 128>",
     {.threads_per_block = 256, .dynamic_smem_bytes = prefill_mma_smem(128), .regs_per_thread = 252, .min_blocks_per_sm = 1},
     attn(128, 1, 32, KvDtype::Fp8, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_mma.nvfp4.hd64", "prefill_mma_kernel<Nvfp4, 64>",
     {.threads_per_block = 256, .dynamic_smem_bytes = prefill_mma_smem(64), .regs_per_thread = 194, .min_blocks_per_sm = 1},
     attn(64, 1, 32, KvDtype::Nvfp4, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "prefill_mma.nvfp4.hd128", "prefill_mma_kernel<Nvfp4, 128>",
     {.threads_per_block = 256, .dynamic_smem_bytes = prefill_mma_smem(128), .regs_per_thread = 248, .min_blocks_per_sm = 1},
     attn(128, 1, 32, KvDtype::Nvfp4, takes_prefill_mma), kPrefillSplits, Measured::PendingHopper, kAttnSrc},
    // ---- attention prefill, CUDA cores: 32 rows a CTA (32 / group query tokens); F32 q or < 16 rows ----
    {OpKind::AttentionPrefill, "cuda_core.bf16.hd64.nj8", "paged_attention_kernel<Bf16, 64, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 8), .regs_per_thread = 96},
     attn(64, 1, 32, KvDtype::Bf16, not_prefill_mma), kPrefillSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "cuda_core.bf16.hd128.nj8", "paged_attention_kernel<Bf16, 128, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 8), .regs_per_thread = 144},
     attn(128, 1, 32, KvDtype::Bf16, not_prefill_mma), kPrefillSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "cuda_core.fp8.hd64.nj8", "paged_attention_kernel<Fp8, 64, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 8), .regs_per_thread = 86},
     attn(64, 1, 32, KvDtype::Fp8, not_prefill_mma), kPrefillSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "cuda_core.fp8.hd128.nj8", "paged_attention_kernel<Fp8, 128, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 8), .regs_per_thread = 110},
     attn(128, 1, 32, KvDtype::Fp8, not_prefill_mma), kPrefillSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "cuda_core.nvfp4.hd64.nj8", "paged_attention_kernel<Nvfp4, 64, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(64, 8), .regs_per_thread = 88},
     attn(64, 1, 32, KvDtype::Nvfp4, not_prefill_mma), kPrefillSplits, Measured::OnHopper, kAttnSrc},
    {OpKind::AttentionPrefill, "cuda_core.nvfp4.hd128.nj8", "paged_attention_kernel<Nvfp4, 128, 8>",
     {.threads_per_block = 128, .dynamic_smem_bytes = attention_tile_smem(128, 8), .regs_per_thread = 108},
     attn(128, 1, 32, KvDtype::Nvfp4, not_prefill_mma), kPrefillSplits, Measured::OnHopper, kAttnSrc},
    // ---- NVFP4 prefill GEMM: dequantize to BF16, then cuBLASLt (its kernels fit the device by construction) ----
    {OpKind::GemmNvfp4, "dequant_bf16.cublaslt", "dequantize_nvfp4_kernel + cuBLASLt",
     {.threads_per_block = 256, .regs_per_thread = 39}, {.m_min = 17, .m_max = 1 << 30, .also = bf16_activations}, {},
     Measured::PendingHopper, kGemmSrc},
};

int64_t next_pow2(int64_t v) { return v <= 1 ? 1 : static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(v))); }

// The GEMV launch tile that holds m rows (the launchers split m into tiles of 16 and round each up).
int64_t gemv_tile(int64_t m) {
    const int64_t in_tile = m > 16 ? 16 : m;
    return next_pow2(in_tile);
}

}  // namespace

std::string_view op_name(OpKind op) {
    switch (op) {
        case OpKind::GemvNvfp4: return "gemv_nvfp4";
        case OpKind::GemvBf16: return "gemv_bf16";
        case OpKind::GemmNvfp4: return "gemm_nvfp4";
        case OpKind::AttentionDecode: return "attention_decode";
        case OpKind::AttentionPrefill: return "attention_prefill";
    }
    return "unknown";
}

std::string_view isa_name(ArchIsa isa) {
    switch (isa) {
        case ArchIsa::None: return "portable";
        case ArchIsa::WgmmaSm90a: return "sm_90a wgmma";
        case ArchIsa::Tcgen05Sm100a: return "sm_100a tcgen05";
        case ArchIsa::Fp4MmaSm120a: return "sm_120a/sm_121a FP4 mma.sync";
    }
    return "unknown";
}

std::span<const KernelVariant> kernel_registry() { return kVariants; }

const KernelVariant* find_variant(OpKind op, std::string_view name) {
    for (const KernelVariant& v : kVariants)
        if (v.op == op && v.name == name) return &v;
    return nullptr;
}

bool variant_applies(const KernelVariant& v, const OpShape& s) {
    if (v.op != s.op) return false;
    const VariantApplies& a = v.applies;
    if (a.also && !a.also(s)) return false;
    if (s.op == OpKind::GemvNvfp4 || s.op == OpKind::GemvBf16 || s.op == OpKind::GemmNvfp4) {
        // A GEMV launch covers at most 16 rows; a larger m runs as tiles of 16 (the mt16 / nt2 variants).
        const int64_t rows = s.op == OpKind::GemmNvfp4 ? s.m : (s.m > 16 ? 16 : s.m);
        if (a.m_max > 0 && (rows < a.m_min || rows > a.m_max)) return false;
        return true;
    }
    if (a.head_dim > 0 && a.head_dim != s.head_dim) return false;
    if (a.group_max > 0 && (s.group < a.group_min || s.group > a.group_max)) return false;
    if (!a.any_kv_dtype && a.kv_dtype != s.kv_dtype) return false;
    return true;
}

std::string shape_bucket(const OpShape& s) {
    switch (s.op) {
        case OpKind::GemvNvfp4:
        case OpKind::GemvBf16: return fmt::format("m{}.n{}.k{}", gemv_tile(s.m), s.n, s.k);
        case OpKind::GemmNvfp4: return fmt::format("m{}.n{}.k{}", next_pow2(s.m), s.n, s.k);
        case OpKind::AttentionDecode:
            return fmt::format("hd{}.g{}.kvh{}.kv{}.seqs{}", s.head_dim, s.group, s.n_kv_heads, next_pow2(s.kv_len),
                               next_pow2(s.n_seqs));
        case OpKind::AttentionPrefill:
            return fmt::format("hd{}.g{}.kvh{}.q{}.kv{}", s.head_dim, s.group, s.n_kv_heads, next_pow2(s.q_len),
                               next_pow2(s.kv_len));
    }
    return "unknown";
}

std::string shape_dtype(const OpShape& s) {
    std::string act(dtype_name(s.activation));
    for (char& c : act) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    if (s.op == OpKind::AttentionDecode || s.op == OpKind::AttentionPrefill)
        return fmt::format("{}/{}", kv_dtype_name(s.kv_dtype), act);
    return act;
}

}  // namespace nibble::tune
