// Weight prefetch into L2 ahead of a decode GEMV (CUDA). A decode layer spends ~15-20% of its time in small
// latency-bound kernels (norms, RoPE + KV write, attention at short context) during which DRAM is nearly idle
// (kernel trace, docs/perf.md session 4). Bringing the next GEMVs' weights into L2 in that window moves their
// bytes off the critical path. The prefetch (cp.async.bulk.prefetch.L2, sm_90+) is a hint: it changes no
// memory, and a GEMV reading a line that has not arrived or was evicted just reads DRAM.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nibble::cuda {

// A row-major matrix of `rows` rows of `row_bytes`, of which the first `prefix_bytes` of every row are wanted in
// L2 (prefix_bytes == row_bytes: all of it). base and row_bytes 16-byte aligned; prefix_bytes is rounded down
// to a multiple of 16.
struct L2PrefetchRange {
    const void* base = nullptr;
    int64_t rows = 0, row_bytes = 0, prefix_bytes = 0;
};

inline constexpr int kMaxL2PrefetchRanges = 8;

struct L2PrefetchJob {
    L2PrefetchRange ranges[kMaxL2PrefetchRanges];
    int n_ranges = 0;
    // The step's attention reads keys = sum over its sequences of start_pos + q_len, kv_bytes_per_key each (K and
    // V of one token in one layer). Above max_kv_bytes those reads would evict the prefetched lines before the
    // GEMV uses them, and the prefetch would only add DRAM traffic: the kernel then issues nothing. Decided on
    // the device, since a captured decode graph replays at every context length. start_pos null: always.
    const int32_t* start_pos = nullptr;  // [n_seqs]
    const int32_t* q_start = nullptr;    // [n_seqs + 1]
    int n_seqs = 0;
    int64_t kv_bytes_per_key = 0;
    int64_t max_kv_bytes = 0;
    // Tests: when set, the kernel adds the bytes it asked for (after rounding) to *issued_bytes.
    unsigned long long* issued_bytes = nullptr;
};

// Enqueues the prefetch (programmatic launch, cuda/pdl.cuh); it completes once the requests are issued, not when
// the data has arrived. Bad ranges throw std::invalid_argument naming the range and field.
void l2_prefetch(const L2PrefetchJob& job, cudaStream_t stream);

// Bytes the job's ranges ask for (prefixes rounded down to 16 bytes): the DRAM traffic a prefetch adds.
int64_t l2_prefetch_bytes(const L2PrefetchJob& job);

}  // namespace nibble::cuda
