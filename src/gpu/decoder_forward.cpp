#include "gpu/decoder_forward.h"

#include <cmath>

#include "base/error.h"
#include "cuda/device_info.h"
#include "ops/activation/activation_cuda.h"
#include "ops/embed/embed_cuda.h"
#include "ops/embed/gather_rows_cuda.h"
#include "ops/linear/linear_cuda.h"
#include "ops/rmsnorm/rmsnorm_cuda.h"
#include "ops/rope/rope_cuda.h"

namespace nibble::gpu {

DeviceKvCache::DeviceKvCache(const KvCacheShape& shape)
    : shape_(shape),
      k_(static_cast<size_t>(shape.total_bytes() / 2)),
      v_(static_cast<size_t>(shape.total_bytes() / 2)) {
    NIBBLE_CHECK(shape.dtype != KvDtype::F32, "the CUDA backend's KV cache is bf16, fp8 or nvfp4, not f32");
    // Fresh blocks hold zeros: never read before written, but a zeroed cache keeps a bug from reading NaN.
    NIBBLE_CUDA_CHECK(cudaMemset(k_.get(), 0, k_.bytes()));
    NIBBLE_CUDA_CHECK(cudaMemset(v_.get(), 0, v_.bytes()));
}

cuda::PagedKvLayer DeviceKvCache::layer(int64_t l) const {
    const int64_t layer_bytes = shape_.n_blocks * shape_.block_bytes();
    return {.k = k_.as<uint8_t>() + l * layer_bytes,
            .v = v_.as<uint8_t>() + l * layer_bytes,
            .n_blocks = shape_.n_blocks,
            .block_bytes = shape_.block_bytes(),
            .block_size = shape_.block_size,
            .n_kv_heads = shape_.n_kv_heads,
            .head_dim = shape_.head_dim,
            .dtype = shape_.dtype,
            .k_scale = kv_layer_scale(shape_.dtype, shape_.k_kv_scale(l)),
            .v_scale = kv_layer_scale(shape_.dtype, shape_.v_kv_scale(l))};
}

namespace {

cuda::DeviceBuffer activations(int64_t rows, int64_t width, DType dtype) {
    return cuda::DeviceBuffer(static_cast<size_t>(rows * width) * dtype_size(dtype));
}

}  // namespace

DecoderForward::DecoderForward(const DeviceDecoder& w, DType act, int64_t max_tokens, int64_t max_logit_rows)
    : w_(w), act_(act), max_tokens_(max_tokens), max_logit_rows_(max_logit_rows) {
    const ModelConfig& c = w.config;
    NIBBLE_CHECK(act == DType::BF16 || act == DType::F32, "CUDA forward: activations are BF16 or F32, not {}",
                 dtype_name(act));
    NIBBLE_CHECK(max_tokens > 0 && max_logit_rows > 0, "CUDA forward: max_tokens {} and max_logit_rows {} must be positive",
                 max_tokens, max_logit_rows);
    for (const DeviceDecoderLayer& L : w.layers)
        for (const DeviceLinear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
            NIBBLE_CHECK(l->format != WeightFormat::Fp8 || act == DType::BF16,
                         "{}: FP8 weights run with BF16 activations on the CUDA backend", l->name);
    NIBBLE_CHECK(w.lm_head.format != WeightFormat::Fp8, "{}: an FP8 lm_head is not supported by the CUDA backend",
                 w.lm_head.name);
    sm_count_ = cuda::query_device(0).sm_count;
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    x_ = activations(max_tokens, c.n_embd, act);
    h_ = activations(max_tokens, c.n_embd, act);
    proj_ = activations(max_tokens, c.n_embd, act);
    q_ = activations(max_tokens, q_dim, act);
    attn_ = activations(max_tokens, q_dim, act);
    k_ = activations(max_tokens, kv_dim, act);
    v_ = activations(max_tokens, kv_dim, act);
    gate_ = activations(max_tokens, c.n_ff, act);
    up_ = activations(max_tokens, c.n_ff, act);
    selected_ = activations(max_logit_rows, c.n_embd, DType::F32);
    logits_ = activations(max_logit_rows, c.vocab_size, DType::F32);
    if (act == DType::BF16 && max_tokens > kGemvMaxRows) {
        bool fp8 = false, quantized = false;
        for (const DeviceDecoderLayer& L : w.layers)
            for (const DeviceLinear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
                fp8 |= l->format == WeightFormat::Fp8;
                quantized |= l->format != WeightFormat::Dense;
            }
        // Eager prefill dequantizes through the pipeline; steps captured into a graph (and FP8 decode steps)
        // dequantize on the forward's own stream, into GemmContext's scratch.
        gemm_ = std::make_unique<cuda::GemmContext>(fp8 || quantized ? w.max_linear_elems() : 0);
        if (quantized) dequant_ = std::make_unique<DequantPipeline>(w.max_linear_elems());
    }
}

DecoderForward::~DecoderForward() = default;

void DecoderForward::linear(const DeviceLinear& w, const void* x, int64_t m, void* y, cudaStream_t stream) {
    const bool gemm = act_ == DType::BF16 && (m > kGemvMaxRows || w.format == WeightFormat::Fp8);
    if (gemm) {
        NIBBLE_CHECK(gemm_ != nullptr, "CUDA forward: {} rows need the GEMM path, but buffers were sized for {}", m,
                     max_tokens_);
        if (w.format != WeightFormat::Dense && dequant_ && dequant_->active()) {
            const uint16_t* dense = dequant_->acquire(w, stream);
            cuda::gemm_bf16(*gemm_, x, m, dense, w.n_out, w.n_in, w.scale, w.bias_ptr(), y, stream);
            dequant_->release(stream);
            return;
        }
        switch (w.format) {
            case WeightFormat::Nvfp4: return cuda::gemm_nvfp4(*gemm_, x, m, w.nvfp4(), w.bias_ptr(), y, stream);
            case WeightFormat::Dense:
                return cuda::gemm_bf16(*gemm_, x, m, static_cast<const uint16_t*>(w.data), w.n_out, w.n_in, 1.0f,
                                       w.bias_ptr(), y, stream);
            case WeightFormat::Fp8:
                return cuda::gemm_fp8(*gemm_, x, m, static_cast<const uint8_t*>(w.data), w.n_out, w.n_in, w.scale,
                                      w.bias_ptr(), y, stream);
        }
    }
    switch (w.format) {
        case WeightFormat::Nvfp4: return cuda::gemv_nvfp4(x, act_, m, w.nvfp4(), w.bias_ptr(), y, stream);
        case WeightFormat::Dense:
            return cuda::gemv_bf16(x, act_, m, static_cast<const uint16_t*>(w.data), w.n_out, w.n_in, w.bias_ptr(), y,
                                   stream);
        case WeightFormat::Fp8: break;
    }
    fail("{}: no CUDA path for {} weights with {} activations", w.name, weight_format_name(w.format), dtype_name(act_));
}

bool DecoderForward::fusable(const DeviceLinear& a, const DeviceLinear& b, const DeviceLinear& c) const {
    return fuse_ && a.format == WeightFormat::Nvfp4 && b.format == WeightFormat::Nvfp4 &&
           c.format == WeightFormat::Nvfp4 && a.n_in == b.n_in && b.n_in == c.n_in;
}

int DecoderForward::attention_splits(const DeviceBatch& b, const DeviceKvCache& kv) const {
    const cuda::AttentionBatch ab{.n_seqs = b.n_seqs, .n_tokens = b.n_tokens, .max_blocks = b.max_blocks,
                                  .max_q_len = b.max_q_len, .max_kv_len = b.max_kv_len};
    // By bytes: a 4-bit cache gets as many bytes per split as a bf16 one (the decode kernel's rule).
    return cuda::paged_attention_splits(ab, kv.layer(0), w_.config.n_heads, sm_count_);
}

void DecoderForward::reserve_attention(int splits, int64_t n_tokens) {
    const size_t need =
        cuda::paged_attention_workspace_bytes(splits, n_tokens, w_.config.n_heads, w_.config.head_dim);
    if (need > workspace_.bytes()) workspace_ = cuda::DeviceBuffer(need);
}

size_t DecoderForward::attention_workspace_bytes(int splits, int64_t n_tokens) const {
    return cuda::paged_attention_workspace_bytes(splits, n_tokens, w_.config.n_heads, w_.config.head_dim);
}

void DecoderForward::run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream) {
    const int splits = attention_splits(b, kv);
    reserve_attention(splits, b.n_tokens);
    run(b, kv, stream, splits, workspace_.get(), workspace_.bytes());
}

void DecoderForward::run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream, int splits, void* workspace,
                         size_t workspace_bytes) {
    const ModelConfig& c = w_.config;
    const int64_t m = b.n_tokens, d = c.n_embd, hd = c.head_dim;
    NIBBLE_CHECK(m > 0 && m <= max_tokens_, "CUDA forward: {} tokens in a step of at most {}", m, max_tokens_);
    NIBBLE_CHECK(b.n_logit_rows <= max_logit_rows_, "CUDA forward: {} logits rows, at most {}", b.n_logit_rows,
                 max_logit_rows_);
    const cuda::AttentionBatch ab{.n_seqs = b.n_seqs,
                                  .n_tokens = m,
                                  .q_start = b.q_start,
                                  .start_pos = b.start_pos,
                                  .block_tables = b.block_tables,
                                  .max_blocks = b.max_blocks,
                                  .max_q_len = b.max_q_len,
                                  .max_kv_len = b.max_kv_len};
    const cuda::AttentionArgs args{.n_heads = c.n_heads,
                                   .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                                   .sliding_window = c.sliding_window};

    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    NIBBLE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
    if (dequant_ && act_ == DType::BF16 && m > kGemvMaxRows && capturing == cudaStreamCaptureStatusNone) {
        std::vector<const DeviceLinear*> order;
        for (const DeviceDecoderLayer& L : w_.layers)
            for (const DeviceLinear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
                if (l->format != WeightFormat::Dense) order.push_back(l);
        dequant_->begin(std::move(order));
    }
    cuda::embed(static_cast<const uint16_t*>(w_.embed.get()), c.vocab_size, d, b.tokens, m, act_, x_.get(), stream);
    for (size_t il = 0; il < w_.layers.size(); ++il) {
        const DeviceDecoderLayer& L = w_.layers[il];
        if (il == 0)
            cuda::rmsnorm(x_.get(), act_, m, d, L.attn_norm.as<float>(), c.norm_eps, h_.get(), stream);
        else  // x += the previous layer's MLP output; h = norm(x)
            cuda::rmsnorm_residual(proj_.get(), x_.get(), act_, m, d, L.attn_norm.as<float>(), c.norm_eps, h_.get(),
                                   stream);
        const bool gemv = m <= kGemvMaxRows || act_ != DType::BF16;
        if (gemv && fusable(L.q, L.k, L.v)) {  // one launch for q, k and v (the small shapes' tails overlap)
            const cuda::Nvfp4Projection p[3] = {{L.q.nvfp4(), L.q.bias_ptr(), q_.get()},
                                                {L.k.nvfp4(), L.k.bias_ptr(), k_.get()},
                                                {L.v.nvfp4(), L.v.bias_ptr(), v_.get()}};
            cuda::gemv_nvfp4_fused(h_.get(), act_, m, p, 3, stream);
        } else {
            linear(L.q, h_.get(), m, q_.get(), stream);
            linear(L.k, h_.get(), m, k_.get(), stream);
            linear(L.v, h_.get(), m, v_.get(), stream);
        }
        if (L.q_norm.bytes() > 0) {
            cuda::rmsnorm(q_.get(), act_, m * c.n_heads, hd, L.q_norm.as<float>(), c.norm_eps, q_.get(), stream);
            cuda::rmsnorm(k_.get(), act_, m * c.n_kv_heads, hd, L.k_norm.as<float>(), c.norm_eps, k_.get(), stream);
        }
        cuda::rope_apply(q_.get(), act_, m, c.n_heads, hd, b.positions, w_.inv_freq.as<float>(), w_.rotary_dim, stream);
        cuda::rope_apply(k_.get(), act_, m, c.n_kv_heads, hd, b.positions, w_.inv_freq.as<float>(), w_.rotary_dim,
                         stream);
        const cuda::PagedKvLayer layer = kv.layer(static_cast<int64_t>(il));
        cuda::kv_cache_write(k_.get(), v_.get(), act_, m, b.slot_mapping, layer, stream);
        cuda::paged_attention(q_.get(), act_, layer, ab, args, splits, workspace, workspace_bytes, attn_.get(),
                              stream);
        linear(L.o, attn_.get(), m, proj_.get(), stream);
        cuda::rmsnorm_residual(proj_.get(), x_.get(), act_, m, d, L.mlp_norm.as<float>(), c.norm_eps, h_.get(), stream);
        if (gemv && fusable(L.gate, L.up, L.up)) {  // SwiGLU in the GEMV's epilogue: one launch, no h round trip
            cuda::gemv_nvfp4_gate_up_silu(h_.get(), act_, m, L.gate.nvfp4(), L.gate.bias_ptr(), L.up.nvfp4(),
                                          L.up.bias_ptr(), gate_.get(), stream);
        } else {
            linear(L.gate, h_.get(), m, gate_.get(), stream);
            linear(L.up, h_.get(), m, up_.get(), stream);
            cuda::silu_mul(gate_.get(), up_.get(), act_, m * c.n_ff, gate_.get(), stream);
        }
        linear(L.down, gate_.get(), m, proj_.get(), stream);
    }
    if (b.n_logit_rows == 0) return;
    cuda::rmsnorm_residual(proj_.get(), x_.get(), act_, m, d, w_.final_norm.as<float>(), c.norm_eps, h_.get(), stream);
    // The lm_head runs on float32 rows: logits come out in float32 for the sampler and logprobs.
    cuda::gather_rows(h_.get(), act_, d, b.logit_rows, b.n_logit_rows, selected_.get(), DType::F32, stream);
    const DeviceLinear& lm = w_.lm_head;
    if (lm.format == WeightFormat::Nvfp4)
        cuda::gemv_nvfp4(selected_.get(), DType::F32, b.n_logit_rows, lm.nvfp4(), lm.bias_ptr(), logits_.get(), stream);
    else
        cuda::gemv_bf16(selected_.get(), DType::F32, b.n_logit_rows, static_cast<const uint16_t*>(lm.data), lm.n_out,
                        lm.n_in, lm.bias_ptr(), logits_.get(), stream);
}

}  // namespace nibble::gpu
