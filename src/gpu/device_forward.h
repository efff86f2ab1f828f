// What the CUDA ModelRunner drives: a model's forward on the device over a staged batch (DeviceBatch,
// decoder_forward.h) with the paged KV cache, enqueued on one stream without host syncs so decode steps can
// be captured into CUDA graphs. DecoderForward (llama family, Qwen3-MoE) and HybridForward (NemotronH)
// implement it; a hybrid forward also owns per-sequence recurrent-state slots and their snapshots.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"

namespace nibble::gpu {

struct DeviceBatch;
class DeviceKvCache;

class DeviceForward {
public:
    virtual ~DeviceForward() = default;

    virtual DType act_dtype() const = 0;
    virtual int64_t max_tokens() const = 0;
    // Splits of the key range the attention uses for this batch (flash-decoding), and room for them.
    virtual int attention_splits(const DeviceBatch& b, const DeviceKvCache& kv) const = 0;
    virtual void reserve_attention(int splits, int64_t n_tokens) = 0;
    virtual size_t attention_workspace_bytes(int splits, int64_t n_tokens) const = 0;
    // Enqueues the forward on `stream` with the batch's own splits and the forward's workspace, or with
    // fixed splits and a caller's workspace (a captured graph must keep both).
    virtual void run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream) = 0;
    virtual void run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream, int splits, void* workspace,
                     size_t workspace_bytes) = 0;
    // [max logits rows, vocab] float32; rows 0 .. n_logit_rows - 1 hold the last run's logits.
    virtual const float* logits() const = 0;

    // Recurrent state (hybrid models): slots a batch's DeviceBatch::state_slots index, and snapshots of
    // them (prefix caching), copied on `stream` in order with the runs. 0 / unsupported for other models.
    virtual int64_t num_state_slots() const { return 0; }
    virtual int64_t num_state_snapshots() const { return 0; }
    virtual void save_state_snapshot(int32_t state_slot, int32_t snapshot, cudaStream_t stream);
    virtual void restore_state_snapshot(int32_t snapshot, int32_t state_slot, cudaStream_t stream);
};

}  // namespace nibble::gpu
