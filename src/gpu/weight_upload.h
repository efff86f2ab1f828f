// Weight upload to the device: host memory (the checkpoint's mmap) is copied through a few large pinned
// buffers, each with its own stream, so the copy of one chunk over PCIe overlaps the host read of the next,
// with a progress bar. F32/F16 dense weights become BF16 on the way (the CUDA kernels read BF16).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "gpu/device_decoder.h"
#include "checkpoint/quant_config.h"
#include "model/decoder_view.h"
#include "tensor/dtype.h"

namespace nibble {
class ProgressBar;
}

namespace nibble::gpu {

class PinnedUploader {
public:
    // n_buffers pinned buffers of chunk_bytes each; progress (may be null) advances by bytes read.
    PinnedUploader(size_t chunk_bytes, int n_buffers, ProgressBar* progress);
    ~PinnedUploader();
    PinnedUploader(const PinnedUploader&) = delete;
    PinnedUploader& operator=(const PinnedUploader&) = delete;

    // dst[0 .. bytes) = src[0 .. bytes) (dst device, src host). Returns before the copy has landed.
    void copy(void* dst, const void* src, size_t bytes);
    // dst [n] BF16 = src [n] of dtype F32, F16 or BF16, rounded to nearest even.
    void copy_as_bf16(void* dst, const void* src, DType dtype, int64_t n);
    // Waits for every copy issued so far.
    void finish();

private:
    struct Slot;
    Slot& next_slot();
    std::vector<std::unique_ptr<Slot>> slots_;
    size_t chunk_bytes_;
    size_t next_ = 0;
    ProgressBar* progress_;
};

// Pieces of an upload, shared with upload_hybrid (device_hybrid.h): a float32 vector as is (empty stays
// empty), a linear layer in its stored format (F32/F16 dense ones become BF16 and set `converted`), and
// the host bytes a linear layer reads (for the progress bar).
cuda::DeviceBuffer upload_floats(PinnedUploader& up, const std::vector<float>& v);
DeviceLinear upload_linear(PinnedUploader& up, const LinearWeight& w, bool& converted);
int64_t linear_host_bytes(const LinearWeight& w);
// A MoE layer's routed experts into one DeviceMoeExperts: gate (null: ungated experts, up and down only), up
// and down lists of equal length, each expert [n_ff, n_embd] (down [n_embd, n_ff]) without bias (checked,
// naming the tensor). All NVFP4: as stored; all dense (F32/F16/BF16): as BF16 (the caller checked one format).
DeviceMoeExperts upload_moe_experts(PinnedUploader& up, const std::vector<const LinearWeight*>* gate,
                                    const std::vector<const LinearWeight*>& up_proj,
                                    const std::vector<const LinearWeight*>& down_proj, int64_t n_embd, int64_t n_ff);

// Uploads a Model's dense-decoder weights (model.h decoder_view) with a progress bar on stderr.
DeviceDecoder upload_decoder(const ModelConfig& config, const DecoderView& view);

// Uploads rank `rank`'s shard of a tp_size-way tensor-parallel split (parallel/decoder_view_shard.h) of a
// model of full_config; tp_size 1 uploads the whole model. The result's `tp` names the shard.
DeviceDecoder upload_decoder_rank(const ModelConfig& full_config, const QuantConfig& quant, const DecoderView& view,
                                  int64_t tp_size, int64_t rank);

}  // namespace nibble::gpu
