// The all-reduce of a row-parallel layer's output fused with the residual add and the next RMSNorm, for the
// small row counts of decode, through NCCL's device API (2.28+): every rank's partial sums sit in an NCCL
// symmetric window; one CTA a 256-value slice of the rows meets the peers at an LSA barrier (load/store-
// accessible ranks: NVLink or P2P), loads its slice from every peer's window, sums it and adds the residual;
// the CTAs then combine the rows' sums of squares and normalize. One launch instead of NCCL's all-reduce
// kernel followed by the norm kernel (docs/perf.md, session 6). NCCL still owns the transport: the barrier,
// the peer mappings and the window are its.
//
// Stores, per row (the contract of Communicator::all_reduce_residual_rmsnorm):
//   s        = round(sum over LSA ranks 0, 1, ... of rows[r])  (float32 sum in rank order, rounded to dtype
//              once: what all_reduce_sum stores, with the same order on every rank so every rank gets the
//              same bits)
//   residual = round(s + residual); out = rmsnorm(residual) * weight   (rmsnorm_residual's arithmetic)
// rows itself is only read. Reuse rule: a rank may write the window rows again only after every peer has
// finished reading them, i.e. after the next call's barrier: callers alternate two buffers (DecoderForward).
//
// Layouts: rows at byte `offset` of the window, [m, d] of dtype (F32 or BF16) on every rank; residual, out
// [m, d] device memory of this rank; weight [d] float32; scratch kLsaReduceNormScratchBytes of device memory,
// zeroed once, for this stream's calls only. m <= kLsaReduceNormMaxRows, d a positive multiple of 8 up to 256 x
// kLsaReduceNormMaxSlices (one CTA and one LSA barrier a slice). For .cu code and host code of CUDA builds.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"

struct ncclDevComm;        // nccl_device/core.h
struct ncclWindow_vidmem;  // nccl.h: ncclWindow_t is a pointer to it

namespace nibble::cuda {

// Rows a call takes (the partial sums of squares are kept for this many).
constexpr int64_t kLsaReduceNormMaxRows = 64;
// 256-value slices of a row: one CTA and one LSA barrier each (the device communicator is made with this many).
constexpr int64_t kLsaReduceNormMaxSlices = 64;
// Partial sums of squares [rows, slices] float32 and the grid barrier's two counters.
constexpr size_t kLsaReduceNormScratchBytes = kLsaReduceNormMaxRows * kLsaReduceNormMaxSlices * 4 + 8;

bool lsa_reduce_norm_supported(int64_t m, int64_t d, DType dtype);

// Enqueues the fused reduce on `stream`; std::invalid_argument when !lsa_reduce_norm_supported(m, d, dtype).
void lsa_all_reduce_residual_rmsnorm(const ncclDevComm& comm, ncclWindow_vidmem* window, size_t offset, int64_t m,
                                     int64_t d, DType dtype, void* residual, const float* weight, float eps,
                                     void* out, void* scratch, cudaStream_t stream);

}  // namespace nibble::cuda
