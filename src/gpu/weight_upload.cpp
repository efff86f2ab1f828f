#include "gpu/weight_upload.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "base/log.h"
#include "base/progress.h"
#include "cuda/cuda_check.h"
#include "parallel/decoder_view_shard.h"
#include "tensor/convert.h"

namespace nibble::gpu {

struct PinnedUploader::Slot {
    void* host = nullptr;  // pinned, chunk_bytes
    cudaStream_t stream = nullptr;
    cudaEvent_t done = nullptr;
    bool pending = false;
};

PinnedUploader::PinnedUploader(size_t chunk_bytes, int n_buffers, ProgressBar* progress)
    : chunk_bytes_(chunk_bytes), progress_(progress) {
    for (int i = 0; i < n_buffers; ++i) {
        auto s = std::make_unique<Slot>();
        NIBBLE_CUDA_CHECK(cudaHostAlloc(&s->host, chunk_bytes, cudaHostAllocDefault));
        NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking));
        NIBBLE_CUDA_CHECK(cudaEventCreateWithFlags(&s->done, cudaEventDisableTiming));
        slots_.push_back(std::move(s));
    }
}

PinnedUploader::~PinnedUploader() {
    for (auto& s : slots_) {
        if (s->pending) (void)cudaEventSynchronize(s->done);
        (void)cudaEventDestroy(s->done);
        (void)cudaStreamDestroy(s->stream);
        (void)cudaFreeHost(s->host);
    }
}

PinnedUploader::Slot& PinnedUploader::next_slot() {
    Slot& s = *slots_[next_++ % slots_.size()];
    if (s.pending) NIBBLE_CUDA_CHECK(cudaEventSynchronize(s.done));  // its last copy has left the buffer
    s.pending = false;
    return s;
}

void PinnedUploader::copy(void* dst, const void* src, size_t bytes) {
    for (size_t off = 0; off < bytes; off += chunk_bytes_) {
        const size_t n = std::min(chunk_bytes_, bytes - off);
        Slot& s = next_slot();
        std::memcpy(s.host, static_cast<const uint8_t*>(src) + off, n);
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + off, s.host, n, cudaMemcpyHostToDevice, s.stream));
        NIBBLE_CUDA_CHECK(cudaEventRecord(s.done, s.stream));
        s.pending = true;
        if (progress_) progress_->advance(n);
    }
}

void PinnedUploader::copy_as_bf16(void* dst, const void* src, DType dtype, int64_t n) {
    if (dtype == DType::BF16) return copy(dst, src, static_cast<size_t>(n) * 2);
    NIBBLE_CHECK(dtype == DType::F32 || dtype == DType::F16, "weight upload: cannot convert {} to BF16",
                 dtype_name(dtype));
    const int64_t per_chunk = static_cast<int64_t>(chunk_bytes_ / sizeof(float));
    std::vector<float> widened(static_cast<size_t>(std::min(per_chunk, n)));
    const size_t in_size = dtype_size(dtype);
    for (int64_t i = 0; i < n; i += per_chunk) {
        const int64_t len = std::min(per_chunk, n - i);
        Slot& s = next_slot();
        decode_to_float(static_cast<const uint8_t*>(src) + static_cast<size_t>(i) * in_size, dtype, len, widened.data());
        encode_from_float(widened.data(), len, DType::BF16, s.host);
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + i * 2, s.host, static_cast<size_t>(len) * 2,
                                          cudaMemcpyHostToDevice, s.stream));
        NIBBLE_CUDA_CHECK(cudaEventRecord(s.done, s.stream));
        s.pending = true;
        if (progress_) progress_->advance(static_cast<uint64_t>(len) * in_size);
    }
}

void PinnedUploader::finish() {
    for (auto& s : slots_)
        if (s->pending) {
            NIBBLE_CUDA_CHECK(cudaEventSynchronize(s->done));
            s->pending = false;
        }
}

cuda::DeviceBuffer upload_floats(PinnedUploader& up, const std::vector<float>& v) {
    cuda::DeviceBuffer b(v.size() * sizeof(float));
    if (!v.empty()) up.copy(b.get(), v.data(), b.bytes());
    return b;
}

int64_t linear_host_bytes(const LinearWeight& w) {
    return w.stored_bytes() + static_cast<int64_t>(w.bias.size() * sizeof(float));
}

DeviceLinear upload_linear(PinnedUploader& up, const LinearWeight& w, bool& converted) {
    DeviceLinear d;
    d.name = w.name;
    d.format = w.format;
    d.n_out = w.n_out;
    d.n_in = w.n_in;
    d.scale = w.scale;
    const int64_t elems = w.n_out * w.n_in;
    switch (w.format) {
        case WeightFormat::Dense:
            d.storage = cuda::DeviceBuffer(static_cast<size_t>(elems) * 2);
            converted |= w.dtype != DType::BF16;
            up.copy_as_bf16(d.storage.get(), w.data, w.dtype, elems);
            break;
        case WeightFormat::Fp8:
            d.storage = cuda::DeviceBuffer(static_cast<size_t>(elems));
            up.copy(d.storage.get(), w.data, static_cast<size_t>(elems));
            break;
        case WeightFormat::Nvfp4:
            d.storage = cuda::DeviceBuffer(static_cast<size_t>(elems / 2));
            d.scale_storage = cuda::DeviceBuffer(static_cast<size_t>(elems / 16));
            up.copy(d.storage.get(), w.data, d.storage.bytes());
            up.copy(d.scale_storage.get(), w.block_scales, d.scale_storage.bytes());
            break;
    }
    d.data = d.storage.get();
    d.bias = upload_floats(up, w.bias);
    return d;
}

namespace {

// A MoE layer's experts into one DeviceMoeExperts: each expert's gate, up and down NVFP4 (checked before)
// of the config's expert shape; as many as the view holds (a tensor-parallel rank's share, or all).
DeviceMoeExperts upload_experts(PinnedUploader& up, const ModelConfig& c, const DecoderLayerView& L) {
    const int64_t n = static_cast<int64_t>(L.expert_gate.size()), d = c.n_embd, ff = c.moe.n_ff;
    DeviceMoeExperts e;
    allocate_experts(e, n, d, ff);
    const int64_t elems = ff * d;
    std::vector<float> global_scales;
    global_scales.reserve(static_cast<size_t>(3 * n));
    int64_t slot = 0;
    for (const auto* list : {&L.expert_gate, &L.expert_up, &L.expert_down}) {
        const bool down = list == &L.expert_down;
        for (const LinearWeight* w : *list) {
            // Formats were checked by check_decoder_supported(config, view).
            NIBBLE_CHECK(w->n_out == (down ? d : ff) && w->n_in == (down ? ff : d) && w->bias.empty(),
                         "{}: expert shape [{}, {}]{}, expected [{}, {}] without bias", w->name, w->n_out, w->n_in,
                         w->bias.empty() ? "" : " with bias", down ? d : ff, down ? ff : d);
            up.copy(e.packed.as<uint8_t>() + slot * (elems / 2), w->data, static_cast<size_t>(elems / 2));
            up.copy(e.scales.as<uint8_t>() + slot * (elems / 16), w->block_scales, static_cast<size_t>(elems / 16));
            global_scales.push_back(w->scale);
            ++slot;
        }
    }
    set_expert_tables(e, global_scales);
    return e;
}

// upload_decoder of a view whose MoE layers hold experts_held experts each (0: all).
DeviceDecoder upload_decoder_holding(const ModelConfig& c, const DecoderView& view, int64_t experts_held) {
    check_decoder_supported(c, view, experts_held);
    uint64_t total = view.embed.nbytes();
    for (const DecoderLayerView& L : view.layers) {
        for (const LinearWeight* w : {L.q, L.k, L.v, L.o, L.gate, L.up, L.down, L.router})
            if (w != nullptr) total += static_cast<uint64_t>(linear_host_bytes(*w));
        for (const auto* list : {&L.expert_gate, &L.expert_up, &L.expert_down})
            for (const LinearWeight* w : *list) total += static_cast<uint64_t>(linear_host_bytes(*w));
    }
    if (!view.tied_lm_head) total += static_cast<uint64_t>(linear_host_bytes(*view.lm_head));

    ProgressBar progress("uploading weights", total);
    DeviceDecoder d;
    d.config = c;
    bool converted = view.embed.dtype != DType::BF16;
    {
        PinnedUploader up(size_t{64} << 20, 4, &progress);
        d.embed = cuda::DeviceBuffer(static_cast<size_t>(view.embed.numel()) * 2);
        up.copy_as_bf16(d.embed.get(), view.embed.data, view.embed.dtype, view.embed.numel());
        for (const DecoderLayerView& L : view.layers) {
            DeviceDecoderLayer D;
            D.attn_norm = upload_floats(up, *L.attn_norm);
            D.mlp_norm = upload_floats(up, *L.mlp_norm);
            D.q_norm = upload_floats(up, *L.q_norm);
            D.k_norm = upload_floats(up, *L.k_norm);
            D.q = upload_linear(up, *L.q, converted);
            D.k = upload_linear(up, *L.k, converted);
            D.v = upload_linear(up, *L.v, converted);
            D.o = upload_linear(up, *L.o, converted);
            if (L.moe()) {
                D.moe = true;
                D.router = upload_linear(up, *L.router, converted);
                D.experts = upload_experts(up, c, L);
            } else {
                D.gate = upload_linear(up, *L.gate, converted);
                D.up = upload_linear(up, *L.up, converted);
                D.down = upload_linear(up, *L.down, converted);
            }
            d.layers.push_back(std::move(D));
        }
        d.final_norm = upload_floats(up, *view.final_norm);
        if (view.tied_lm_head) {
            d.lm_head.name = view.lm_head->name;
            d.lm_head.format = WeightFormat::Dense;
            d.lm_head.n_out = c.vocab_size;
            d.lm_head.n_in = c.n_embd;
            d.lm_head.data = d.embed.get();
        } else {
            d.lm_head = upload_linear(up, *view.lm_head, converted);
        }
        d.rotary_dim = view.rope.rotary_dim;
        d.inv_freq = upload_floats(up, view.rope.inv_freq);
        up.finish();
    }
    progress.finish();
    d.k_scales = view.k_scales;
    d.v_scales = view.v_scales;
    if (converted)
        log::info("CUDA backend: F32/F16 dense weights were converted to BF16 on upload (its kernels read BF16)");
    return d;
}

}  // namespace

DeviceDecoder upload_decoder(const ModelConfig& c, const DecoderView& view) {
    return upload_decoder_holding(c, view, 0);
}

DeviceDecoder upload_decoder_rank(const ModelConfig& full, const QuantConfig& quant, const DecoderView& view,
                                  int64_t tp_size, int64_t rank) {
    if (tp_size == 1) return upload_decoder(full, view);
    const std::unique_ptr<DecoderViewShard> shard = shard_decoder_view(full, quant, view, tp_size, rank);
    DeviceDecoder d = upload_decoder_holding(shard->config, shard->view, shard->layout.experts.size());
    d.tp = shard->layout;
    d.full_vocab = full.vocab_size;
    return d;
}

}  // namespace nibble::gpu
