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

DeviceMoeExperts upload_moe_experts(PinnedUploader& up, const std::vector<const LinearWeight*>* gate,
                                    const std::vector<const LinearWeight*>& up_proj,
                                    const std::vector<const LinearWeight*>& down_proj, int64_t d, int64_t ff) {
    const auto n = static_cast<int64_t>(up_proj.size());
    NIBBLE_CHECK(n > 0 && static_cast<int64_t>(down_proj.size()) == n &&
                     (gate == nullptr || static_cast<int64_t>(gate->size()) == n),
                 "MoE experts: {} gate, {} up and {} down matrices", gate ? gate->size() : 0, up_proj.size(),
                 down_proj.size());
    const bool bf16 = up_proj.front()->format == WeightFormat::Dense;
    DeviceMoeExperts e;
    if (bf16)
        allocate_bf16_experts(e, n, d, ff, gate != nullptr);
    else
        allocate_experts(e, n, d, ff, gate != nullptr);
    const int64_t elems = ff * d;
    std::vector<float> global_scales;
    int64_t slot = 0;  // [gate,] up, down: the order DeviceMoeExperts holds them in
    for (const auto* list : {gate, &up_proj, &down_proj}) {
        if (list == nullptr) continue;
        const bool down = list == &down_proj;
        for (const LinearWeight* w : *list) {
            NIBBLE_CHECK(w->n_out == (down ? d : ff) && w->n_in == (down ? ff : d) && w->bias.empty(),
                         "{}: expert shape [{}, {}]{}, expected [{}, {}] without bias", w->name, w->n_out, w->n_in,
                         w->bias.empty() ? "" : " with bias", down ? d : ff, down ? ff : d);
            NIBBLE_CHECK((w->format == WeightFormat::Dense) == bf16 && (bf16 || w->format == WeightFormat::Nvfp4),
                         "{}: MoE experts are NVFP4 or dense, one format a layer; this one is {}", w->name,
                         weight_format_name(w->format));
            if (bf16) {
                up.copy_as_bf16(e.bf16.as<uint16_t>() + slot * elems, w->data, w->dtype, elems);
            } else {
                up.copy(e.packed.as<uint8_t>() + slot * (elems / 2), w->data, static_cast<size_t>(elems / 2));
                up.copy(e.scales.as<uint8_t>() + slot * (elems / 16), w->block_scales, static_cast<size_t>(elems / 16));
                global_scales.push_back(w->scale);
            }
            ++slot;
        }
    }
    if (!bf16) set_expert_tables(e, global_scales);
    return e;
}

namespace {

// upload_decoder of a view whose MoE layers hold experts_held experts each (0: all).
DeviceDecoder upload_decoder_holding(const ModelConfig& c, const DecoderView& view, int64_t experts_held) {
    check_decoder_supported(c, view, experts_held);
    uint64_t total = view.embed.nbytes();
    for (const DecoderLayerView& L : view.layers) {
        for (const LinearWeight* w : {L.q, L.k, L.v, L.o, L.gate, L.up, L.down, L.router, L.shared_gate, L.shared_up,
                                      L.shared_down, L.shared_expert_gate})
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
                D.experts = upload_moe_experts(up, &L.expert_gate, L.expert_up, L.expert_down, c.n_embd, c.moe.n_ff);
                if (L.has_shared_expert()) {
                    D.shared_gate = upload_linear(up, *L.shared_gate, converted);
                    D.shared_up = upload_linear(up, *L.shared_up, converted);
                    D.shared_down = upload_linear(up, *L.shared_down, converted);
                    if (L.shared_expert_gate != nullptr)
                        D.shared_expert_gate = upload_linear(up, *L.shared_expert_gate, converted);
                }
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
    const bool bf16_experts = std::any_of(d.layers.begin(), d.layers.end(),
                                          [](const DeviceDecoderLayer& L) { return L.experts.bf16.bytes() != 0; });
    if (bf16_experts)
        log::info("CUDA backend: the routed experts are BF16: prefill runs them on the grouped tensor-core GEMM, "
                  "decode on a plain GEMV (NVFP4 experts, nibble quantize, stream 3.6x fewer bytes a token)");
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
