#include "gpu/decoder_forward.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "base/error.h"
#include "base/log.h"
#include "cuda/device_info.h"
#include "ops/activation/activation_cuda.h"
#include "ops/attention/qkv_prepare_cuda.h"
#include "ops/embed/embed_cuda.h"
#include "ops/embed/gather_rows_cuda.h"
#include "ops/linear/gemv_stream_cuda.h"
#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe_cuda.h"
#include "ops/moe/shared_expert_gate_cuda.h"
#include "ops/rmsnorm/rmsnorm_cuda.h"
#include "ops/rope/rope_cuda.h"
#include "tune/attention_variant_cuda.h"
#include "tune/launch_guard_cuda.h"

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

// A layer's linears that run through DecoderForward::linear (the GEMM at prefill sizes), in the order a step
// calls them: attention, then the dense MLP or the MoE layer's shared expert (the other's are empty, BF16).
std::array<const DeviceLinear*, 10> gemm_path_linears(const DeviceDecoderLayer& L) {
    return {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down, &L.shared_gate, &L.shared_up, &L.shared_down};
}

}  // namespace

DecoderForward::DecoderForward(const DeviceDecoder& w, DType act, int64_t max_tokens, int64_t max_logit_rows)
    : w_(w), act_(act), max_tokens_(max_tokens), max_logit_rows_(max_logit_rows) {
    const ModelConfig& c = w.config;
    NIBBLE_CHECK(act == DType::BF16 || act == DType::F32, "CUDA forward: activations are BF16 or F32, not {}",
                 dtype_name(act));
    NIBBLE_CHECK(max_tokens > 0 && max_logit_rows > 0, "CUDA forward: max_tokens {} and max_logit_rows {} must be positive",
                 max_tokens, max_logit_rows);
    int device = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
    sm_count_ = cuda::query_device(device).sm_count;
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    x_ = activations(max_tokens, c.n_embd, act);
    h_ = activations(max_tokens, c.n_embd, act);
    proj_ = activations(max_tokens, c.n_embd, act);
    q_ = activations(max_tokens, q_dim, act);
    attn_ = activations(max_tokens, q_dim, act);
    k_ = activations(max_tokens, kv_dim, act);
    v_ = activations(max_tokens, kv_dim, act);
    // The dense MLP's and the shared expert's hidden rows (an all-MoE model without one needs neither).
    int64_t mlp_ff = w.has_dense_mlp() ? c.n_ff : 0;
    for (const DeviceDecoderLayer& L : w.layers) mlp_ff = std::max(mlp_ff, L.shared_up.n_out);
    gate_ = activations(max_tokens, mlp_ff, act);
    up_ = activations(max_tokens, mlp_ff, act);
    if (w.has_moe()) {
        const MoeConfig& e = c.moe;
        router_logits_ = activations(max_tokens, e.n_experts, act);
        moe_ids_ = activations(max_tokens, e.top_k, DType::I32);
        moe_weights_ = activations(max_tokens, e.top_k, DType::F32);
        if (w.sharded()) {
            moe_local_ids_ = activations(max_tokens, e.top_k, DType::I32);
            for (const DeviceDecoderLayer& L : w.layers)
                NIBBLE_CHECK(!L.moe || L.experts.n_experts == w.tp.experts.size(),
                             "CUDA forward: rank {} holds experts [{}, {}) but a MoE layer uploaded {}", w.tp.rank,
                             w.tp.experts.begin, w.tp.experts.end, L.experts.n_experts);
        }
        moe_workspace_ = cuda::DeviceBuffer(cuda::moe_workspace_bytes(max_tokens, e.top_k, e.n_experts, c.n_embd, e.n_ff));
        if (e.n_shared_experts > 0) shared_ = activations(max_tokens, c.n_embd, act);
    }
    selected_ = activations(max_logit_rows, c.n_embd, DType::F32);
    logits_ = activations(max_logit_rows, w.vocab_size(), DType::F32);
    if (w.sharded()) {
        rank_logits_ = activations(max_logit_rows, w.tp.vocab_per_rank, DType::F32);
        gathered_logits_ = activations(max_logit_rows * w.tp.tp_size, w.tp.vocab_per_rank, DType::F32);
    }
    if (act == DType::BF16 && max_tokens > kGemvMaxRows) {
        bool fp8 = false, quantized = false;
        for (const DeviceDecoderLayer& L : w.layers)
            for (const DeviceLinear* l : gemm_path_linears(L)) {
                fp8 |= l->format == WeightFormat::Fp8;
                quantized |= l->format != WeightFormat::Dense;
            }
        // Eager prefill dequantizes through the pipeline; prefill steps captured into a graph dequantize on
        // the forward's own stream, into GemmContext's scratch.
        gemm_ = std::make_unique<cuda::GemmContext>(fp8 || quantized ? w.max_linear_elems() : 0);
        const int64_t stacked_qkv = plan_fused_qkv();  // the scratch must hold a fused layer's q, k and v together
        if (quantized) dequant_ = std::make_unique<DequantPipeline>(std::max(w.max_linear_elems(), stacked_qkv));
    }
}

DecoderForward::~DecoderForward() = default;

void DecoderForward::set_communicator(Communicator* comm) {
    NIBBLE_CHECK(comm == nullptr || comm->world_size() == w_.tp.tp_size,
                 "CUDA forward: a communicator of {} ranks for weights split {} ways", comm ? comm->world_size() : 0,
                 w_.tp.tp_size);
    NIBBLE_CHECK(comm == nullptr || comm->rank() == w_.tp.rank, "CUDA forward: communicator rank {} holds rank {}'s weights",
                 comm ? comm->rank() : 0, w_.tp.rank);
    comm_ = comm;
    reduce_rows_ = nullptr;
    // Every rank calls this at the same point with the same sizes (the fast buffer is collective). Two halves:
    // the fused reduce + norm alternates between them (Communicator::all_reduce_residual_rmsnorm).
    if (comm_ == nullptr || !w_.sharded()) return;
    const size_t rows_bytes = static_cast<size_t>(max_tokens_ * w_.config.n_embd) * dtype_size(act_);
    reduce_rows_ = comm_->fast_buffer(2 * rows_bytes);
    const bool fused = comm_->can_all_reduce_residual_rmsnorm(1, w_.config.n_embd, act_);
    log::info("tensor parallelism: all-reduces on {}; decode steps {}",
              reduce_rows_ ? "the communicator's symmetric buffer" : "the forward's own buffer",
              fused ? "fuse each all-reduce with the residual add and the next norm (NCCL device API)"
                    : "all-reduce, then norm");
}

void DecoderForward::linear(const DeviceLinear& w, const void* x, int64_t m, void* y, cudaStream_t stream,
                            const GemvChoice* choice, bool capturing) {
    const bool gemm = act_ == DType::BF16 && m > kGemvMaxRows;
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
    gemv(w, x, act_, m, y, stream, choice, capturing);
}

void DecoderForward::swiglu_mlp(const DeviceLinear& gate, const DeviceLinear& up, const DeviceLinear& down, int64_t m,
                                void* out, cudaStream_t stream, const std::array<const GemvChoice*, 3>& choices,
                                bool capturing) {
    const bool gemv = m <= kGemvMaxRows || act_ != DType::BF16;
    if (gemv && fusable(gate, up, up)) {  // SwiGLU in the GEMV's epilogue: one launch, no h round trip
        // One token: the CUDA-core streaming GEMV measured 32.2 against the tensor-core kernel's 35.0 us at
        // 2 x 14336 x 4096 on H100 (nibble-kernel-bench stream, docs/perf.md); from 2 tokens on it loses.
        if (m == 1)
            cuda::gemv_nvfp4_stream_gate_up_silu(h_.get(), act_, m, gate.nvfp4(), gate.bias_ptr(), up.nvfp4(),
                                                 up.bias_ptr(), gate_.get(), stream);
        else
            cuda::gemv_nvfp4_gate_up_silu(h_.get(), act_, m, gate.nvfp4(), gate.bias_ptr(), up.nvfp4(), up.bias_ptr(),
                                          gate_.get(), stream);
    } else {
        linear(gate, h_.get(), m, gate_.get(), stream, choices[0], capturing);
        linear(up, h_.get(), m, up_.get(), stream, choices[1], capturing);
        cuda::silu_mul(gate_.get(), up_.get(), act_, m * gate.n_out, gate_.get(), stream);
    }
    linear(down, gate_.get(), m, out, stream, choices[2], capturing);
}

void DecoderForward::gemv(const DeviceLinear& w, const void* x, DType act, int64_t m, void* y, cudaStream_t stream,
                          const GemvChoice* choice, bool capturing) {
    if (w.format == WeightFormat::Fp8) {  // no registry variant
        // nibble-kernel-bench fp8 (H100, docs/perf.md session 4): the tensor-core kernel wins every shape from
        // m = 4 (1.2-2.3x at m = 4-32), the CUDA-core one at m = 1 and splits m = 2; m = 3 goes with 4.
        const auto* w8 = static_cast<const uint8_t*>(w.data);
        if (act == DType::BF16 && m >= 3 && w.n_in % 64 == 0)
            return cuda::gemv_fp8_mma(x, act, m, w8, w.n_out, w.n_in, w.scale, w.bias_ptr(), y, stream);
        return cuda::gemv_fp8(x, act, m, w8, w.n_out, w.n_in, w.scale, w.bias_ptr(), y, stream);
    }
    const bool nvfp4 = w.format == WeightFormat::Nvfp4;
    auto launch = [&](const tune::KernelVariant* v) {
        if (!nvfp4)  // every BF16 GEMV variant is gemv_bf16's instantiation for the tile
            return cuda::gemv_bf16(x, act, m, static_cast<const uint16_t*>(w.data), w.n_out, w.n_in, w.bias_ptr(), y,
                                   stream);
        if (v != nullptr && v->name.starts_with("mma."))
            return cuda::gemv_nvfp4_mma(x, act, m, w.nvfp4(), w.bias_ptr(), y, stream);
        if (v != nullptr && v->name.starts_with("cuda_core."))
            return cuda::gemv_nvfp4_cuda_core(x, act, m, w.nvfp4(), w.bias_ptr(), y, stream);
        // No variant, or one this weight-only forward does not launch (the W4A4 fp4mma variant quantizes the
        // activations, a different numerics path): the op's own dispatch.
        cuda::gemv_nvfp4(x, act, m, w.nvfp4(), w.bias_ptr(), y, stream);
    };
    if (choice == nullptr) return launch(nullptr);
    launch_chosen(choice->tiles[tune::gemv_tile_index(m)], capturing, stream, launch, w.name);
}

template <class Launch>
void DecoderForward::launch_chosen(const tune::ResolvedChoice& c, bool capturing, cudaStream_t stream,
                                   const Launch& launch, const std::string& what) {
    if (c.n_candidates == 0) return launch(nullptr);  // no registered variant serves this shape
    tune::KernelChoices& kc = *choices_;
    for (;;) {
        const tune::KernelVariant* v = kc.pick(c, capturing);
        if (v == nullptr)
            fail("{}: no kernel variant is left to launch{} (failed: {} variants in this process)", what,
                 capturing ? " during CUDA graph capture" : "", kc.failed_variants().size());
        // One pointer captured: std::function keeps it without allocating.
        struct Call {
            const Launch* launch;
            const tune::KernelVariant* variant;
            const tune::KernelChoices* choices;
        } call{&launch, v, &kc};
        const tune::LaunchOutcome out = tune::guarded_launch(
            [&call] {
                if (call.choices->injected_failure(*call.variant))
                    throw std::runtime_error("launch failure injected by a test");
                (*call.launch)(call.variant);
            },
            stream);
        if (out.ok) {
            kc.note_launched(*v, capturing);
            return;
        }
        kc.mark_failed(*v, out.error);
        // A failed launch has invalidated the capture: the caller discards it (the runner runs the step
        // eagerly and captures again, without this variant, next time).
        if (capturing) fail("{}: {} failed to launch during CUDA graph capture: {}", what, v->name, out.error);
    }
}

void DecoderForward::set_kernel_choices(std::shared_ptr<tune::KernelChoices> choices, KvDtype kv_dtype,
                                        int64_t max_num_seqs, int64_t max_model_len) {
    choices_ = std::move(choices);
    layer_gemv_.clear();
    decode_attention_.clear();
    prefill_attention_.clear();
    if (!choices_) return;
    const ModelConfig& c = w_.config;
    struct Count {
        int resolved = 0, cached = 0;
    };
    std::map<tune::OpKind, Count> counts;
    auto note = [&](tune::OpKind op, const tune::ResolvedChoice& r) {
        ++counts[op].resolved;
        counts[op].cached += r.from_cache ? 1 : 0;
    };
    // GEMVs: one resolution per distinct (format, n, k, activation) and m tile, shared by the layers.
    std::map<std::tuple<int, int64_t, int64_t, int>, GemvChoice> by_shape;
    auto gemv_of = [&](const DeviceLinear& l, DType act) -> GemvChoice {
        GemvChoice g;
        if (l.format == WeightFormat::Fp8) return g;  // gemv_fp8 is not a registry op
        const auto key = std::make_tuple(static_cast<int>(l.format), l.n_out, l.n_in, static_cast<int>(act));
        if (auto it = by_shape.find(key); it != by_shape.end()) return it->second;
        const tune::OpKind op = l.format == WeightFormat::Nvfp4 ? tune::OpKind::GemvNvfp4 : tune::OpKind::GemvBf16;
        for (int t = 0; t < tune::kGemvTiles; ++t) {
            g.tiles[t] = choices_->resolve(
                tune::OpShape{.op = op, .activation = act, .m = tune::gemv_tile_rows(t), .n = l.n_out, .k = l.n_in});
            note(op, g.tiles[t]);
        }
        by_shape.emplace(key, g);
        return g;
    };
    for (const DeviceDecoderLayer& L : w_.layers) {
        for (const DeviceLinear* l : {&L.q, &L.k, &L.v, &L.o}) layer_gemv_.push_back(gemv_of(*l, act_));
        if (L.moe) {  // the router in the gate slot; no GEMV in the others (the experts are not registry variants)
            layer_gemv_.push_back(gemv_of(L.router, act_));
            layer_gemv_.push_back(GemvChoice{});
            layer_gemv_.push_back(GemvChoice{});
            continue;
        }
        for (const DeviceLinear* l : {&L.gate, &L.up, &L.down}) layer_gemv_.push_back(gemv_of(*l, act_));
    }
    lm_head_gemv_ = gemv_of(w_.lm_head, DType::F32);  // the lm_head runs on float32 rows
    // Attention: by power-of-two buckets of the batch's sequences (decode) or query rows (prefill) and of
    // its longest cache, as tune::shape_bucket keys them.
    seq_buckets_ = tune::log2_bucket(std::max<int64_t>(max_num_seqs, 1)) + 1;
    q_buckets_ = tune::log2_bucket(std::max<int64_t>(max_tokens_, 1)) + 1;
    kv_buckets_ = tune::log2_bucket(std::max<int64_t>(max_model_len, 1)) + 1;
    const int group = static_cast<int>(c.n_heads / std::max<int64_t>(c.n_kv_heads, 1));
    auto attention_shape = [&](tune::OpKind op, int64_t seqs, int64_t q_len, int64_t kv_len) {
        return tune::OpShape{.op = op, .activation = act_, .head_dim = static_cast<int>(c.head_dim), .group = group,
                             .kv_dtype = kv_dtype, .n_seqs = seqs, .n_kv_heads = c.n_kv_heads, .q_len = q_len,
                             .kv_len = kv_len};
    };
    for (int si = 0; si < seq_buckets_; ++si)
        for (int ki = 0; ki < kv_buckets_; ++ki) {
            decode_attention_.push_back(choices_->resolve(
                attention_shape(tune::OpKind::AttentionDecode, int64_t{1} << si, 1, int64_t{1} << ki)));
            note(tune::OpKind::AttentionDecode, decode_attention_.back());
        }
    for (int qi = 0; qi < q_buckets_; ++qi)
        for (int ki = 0; ki < kv_buckets_; ++ki) {
            const int64_t q = int64_t{1} << qi;
            prefill_attention_.push_back(choices_->resolve(
                attention_shape(tune::OpKind::AttentionPrefill, 1, q, std::max(q, int64_t{1} << ki))));
            note(tune::OpKind::AttentionPrefill, prefill_attention_.back());
        }
    std::string summary;
    int cached = 0;
    for (const auto& [op, n] : counts) {
        summary += fmt::format("{}{} {}/{}", summary.empty() ? "" : ", ", tune::op_name(op), n.cached, n.resolved);
        cached += n.cached;
    }
    log::info("tune: {} kernel choices from the tune cache, the rest built-in ({}; shapes from the cache / resolved){}",
              cached, summary, choices_->has_cache() ? "" : " (no tune cache)");
}

const tune::ResolvedChoice* DecoderForward::attention_choice(const DeviceBatch& b) const {
    if (!choices_) return nullptr;
    const int ki = std::min(tune::log2_bucket(b.max_kv_len), kv_buckets_ - 1);
    if (b.max_q_len <= 1) {
        const int si = std::min(tune::log2_bucket(b.n_seqs), seq_buckets_ - 1);
        return &decode_attention_[static_cast<size_t>(si * kv_buckets_ + ki)];
    }
    const int qi = std::min(tune::log2_bucket(b.max_q_len), q_buckets_ - 1);
    return &prefill_attention_[static_cast<size_t>(qi * kv_buckets_ + ki)];
}

bool DecoderForward::fusable(const DeviceLinear& a, const DeviceLinear& b, const DeviceLinear& c) const {
    return fuse_ && a.format == WeightFormat::Nvfp4 && b.format == WeightFormat::Nvfp4 &&
           c.format == WeightFormat::Nvfp4 && a.n_in == b.n_in && b.n_in == c.n_in;
}

bool qkv_prefill_gemm_fusable(const DeviceDecoder& w, const DeviceDecoderLayer& L) {
    const ModelConfig& c = w.config;
    const DeviceLinear &q = L.q, &k = L.k, &v = L.v;
    const bool quantized = q.format == WeightFormat::Nvfp4 || q.format == WeightFormat::Fp8;
    return quantized && k.format == q.format && v.format == q.format && k.scale == q.scale && v.scale == q.scale &&
           k.n_in == q.n_in && v.n_in == q.n_in && q.n_out == c.n_heads * c.head_dim &&
           k.n_out == c.n_kv_heads * c.head_dim && v.n_out == k.n_out &&
           cuda::qkv_prepare_supported(c.head_dim, w.rotary_dim);
}

namespace {

DequantGroup qkv_group(const DeviceDecoderLayer& L) { return {{&L.q, &L.k, &L.v}, 3}; }

}  // namespace

int64_t DecoderForward::plan_fused_qkv() {
    const ModelConfig& c = w_.config;
    qkv_width_ = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
    fused_qkv_.assign(w_.layers.size(), {});
    int64_t most = 0;
    bool biased = false;
    for (size_t il = 0; il < w_.layers.size(); ++il) {
        const DeviceDecoderLayer& L = w_.layers[il];
        if (!qkv_prefill_gemm_fusable(w_, L)) continue;
        fused_qkv_[il].on = true;
        most = std::max(most, qkv_width_ * L.q.n_in);
        biased |= L.q.bias_ptr() != nullptr || L.k.bias_ptr() != nullptr || L.v.bias_ptr() != nullptr;
    }
    if (most == 0) return 0;
    qkv_ = activations(max_tokens_, qkv_width_, act_);
    if (!biased) return most;
    // One bias row per layer; a missing bias adds zeros (the GEMM's bias epilogue then changes nothing but the
    // sign of a zero).
    qkv_bias_ = activations(static_cast<int64_t>(w_.layers.size()), qkv_width_, DType::F32);
    NIBBLE_CUDA_CHECK(cudaMemset(qkv_bias_.get(), 0, qkv_bias_.bytes()));
    for (size_t il = 0; il < w_.layers.size(); ++il) {
        const DeviceDecoderLayer& L = w_.layers[il];
        if (!fused_qkv_[il].on || (!L.q.bias_ptr() && !L.k.bias_ptr() && !L.v.bias_ptr())) continue;
        float* row = qkv_bias_.as<float>() + static_cast<int64_t>(il) * qkv_width_;
        fused_qkv_[il].bias = row;
        for (const DeviceLinear* l : {&L.q, &L.k, &L.v}) {
            if (l->bias_ptr() != nullptr)
                NIBBLE_CUDA_CHECK(cudaMemcpy(row, l->bias_ptr(), static_cast<size_t>(l->n_out) * sizeof(float),
                                             cudaMemcpyDeviceToDevice));
            row += l->n_out;
        }
    }
    return most;
}

std::vector<DequantGroup> DecoderForward::dequant_groups(const std::vector<const DeviceLinear*>& order) const {
    std::vector<DequantGroup> groups;
    groups.reserve(order.size());
    // The order follows the layers, so the next fused layer's q is the only one to look for; its k and v follow.
    size_t next = 0;
    for (size_t i = 0; i < order.size(); ++i) {
        while (next < fused_qkv_.size() && !(fuse_ && fused_qkv_[next].on)) ++next;
        if (next == fused_qkv_.size() || order[i] != &w_.layers[next].q) {
            groups.push_back(DequantGroup::one(*order[i]));
            continue;
        }
        const DeviceDecoderLayer& L = w_.layers[next++];
        NIBBLE_CHECK(i + 2 < order.size() && order[i + 1] == &L.k && order[i + 2] == &L.v,
                     "CUDA forward: {} is not followed by its layer's k and v in the prefill order", L.q.name);
        groups.push_back(qkv_group(L));
        i += 2;
    }
    return groups;
}

void DecoderForward::fused_qkv_gemm(const DeviceDecoderLayer& L, size_t il, int64_t m, cudaStream_t stream) {
    const uint16_t* stacked = dequant_->acquire(qkv_group(L), stream);  // [qkv_width_, n_in] BF16
    cuda::gemm_bf16(*gemm_, h_.get(), m, stacked, qkv_width_, L.q.n_in, L.q.scale, fused_qkv_[il].bias, qkv_.get(),
                    stream);
    dequant_->release(stream);
}

int DecoderForward::attention_splits(const DeviceBatch& b, const DeviceKvCache& kv) const {
    const cuda::AttentionBatch ab{.n_seqs = b.n_seqs, .n_tokens = b.n_tokens, .max_blocks = b.max_blocks,
                                  .max_q_len = b.max_q_len, .max_kv_len = b.max_kv_len};
    // The tuned split count of the batch's bucket, when the tune cache chose this bucket's kernel.
    if (const tune::ResolvedChoice* c = attention_choice(b); c && c->from_cache && c->splits > 0) return c->splits;
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
            for (const DeviceLinear* l : gemm_path_linears(L))
                if (l->format != WeightFormat::Dense) order.push_back(l);
        dequant_->begin(dequant_groups(order));
    }
    const bool capture = capturing != cudaStreamCaptureStatusNone;
    const tune::ResolvedChoice* attention = attention_choice(b);
    const bool sharded = w_.sharded();
    // The row-parallel layers' outputs: summed over the ranks in place, then added to the residual stream.
    void* const proj = reduce_rows_ != nullptr ? reduce_rows_ : proj_.get();
    // An expert-parallel MoE layer's partial sums go to the forward's own buffer and are all-reduced there, not
    // in the symmetric window: with them in the window, CudaExpertParallel failed on 2 x H200 (logits off by up
    // to 1.1 from the prefill on, 2 to 4 of 4 cases, timing-dependent) and passed with NIBBLE_NCCL_WINDOWS=0,
    // while every dense row-parallel output passes in it; the cause inside NCCL's symmetric kernels is not
    // found (docs/perf.md, session 5). layer_out: where the last layer's output (the residual's addend) is.
    void* const moe_out = sharded ? proj_.get() : proj;
    void* layer_out = proj;
    NIBBLE_CHECK(!sharded || comm_ != nullptr, "CUDA forward: rank {} of {} runs without a communicator", w_.tp.rank,
                 w_.tp.tp_size);
    // Sums the row-parallel partial outputs (and the embedding's shares) over the ranks.
    auto all_reduce = [&](void* rows) {
        if (sharded) comm_->all_reduce_sum(rows, m * d, act_);
    };
    // Decode steps of a group whose communicator fuses the sum with the residual add and the next norm: each
    // row-parallel output goes to the other half of the fast buffer than the one before (a peer may still be
    // reading the last one), and h_ready says the fused step already made the next layer's h.
    const bool fuse_norm = sharded && reduce_rows_ != nullptr && comm_->can_all_reduce_residual_rmsnorm(m, d, act_);
    int half = 1;  // the embedding's NCCL all-reduce just used half 0
    auto fused_out = [&]() -> void* {
        return static_cast<char*>(reduce_rows_) + static_cast<size_t>(half) * max_tokens_ * d * dtype_size(act_);
    };
    auto reduce_norm = [&](void* rows, const float* weight) {
        comm_->all_reduce_residual_rmsnorm(rows, m, d, act_, x_.get(), weight, c.norm_eps, h_.get());
        half ^= 1;
    };
    bool h_ready = false;
    // The norm that follows layer il: the next layer's input norm, or the final norm after the last layer.
    auto next_norm_weight = [&](size_t il) {
        return il + 1 < w_.layers.size() ? w_.layers[il + 1].attn_norm.as<float>()
                                         : w_.final_norm.as<float>();
    };
    if (sharded) {  // each rank's vocabulary rows, summed into the residual stream
        cuda::embed_shard(static_cast<const uint16_t*>(w_.embed.get()), w_.tp.vocab.begin, c.vocab_size, d, b.tokens,
                          m, act_, proj, stream);
        all_reduce(proj);
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(x_.get(), proj, static_cast<size_t>(m * d) * dtype_size(act_),
                                          cudaMemcpyDeviceToDevice, stream));
    } else {
        cuda::embed(static_cast<const uint16_t*>(w_.embed.get()), c.vocab_size, d, b.tokens, m, act_, x_.get(),
                    stream);
    }
    for (size_t il = 0; il < w_.layers.size(); ++il) {
        const DeviceDecoderLayer& L = w_.layers[il];
        if (il == 0)
            cuda::rmsnorm(x_.get(), act_, m, d, L.attn_norm.as<float>(), c.norm_eps, h_.get(), stream);
        else if (!h_ready)  // x += the previous layer's MLP output; h = norm(x)
            cuda::rmsnorm_residual(layer_out, x_.get(), act_, m, d, L.attn_norm.as<float>(), c.norm_eps, h_.get(),
                                   stream);
        h_ready = false;
        const bool gemv = m <= kGemvMaxRows || act_ != DType::BF16;
        // Eager prefill steps only: the fused GEMM's stacked weights come from the dequantization pipeline.
        const bool qkv_gemm = !gemv && !capture && dequant_ && fuse_ && fused_qkv_[il].on;
        if (gemv && fusable(L.q, L.k, L.v)) {  // one launch for q, k and v (the small shapes' tails overlap)
            const cuda::Nvfp4Projection p[3] = {{L.q.nvfp4(), L.q.bias_ptr(), q_.get()},
                                                {L.k.nvfp4(), L.k.bias_ptr(), k_.get()},
                                                {L.v.nvfp4(), L.v.bias_ptr(), v_.get()}};
            cuda::gemv_nvfp4_fused(h_.get(), act_, m, p, 3, stream);
        } else if (qkv_gemm) {  // one GEMM into [m, q | k | v]
            fused_qkv_gemm(L, il, m, stream);
        } else {
            linear(L.q, h_.get(), m, q_.get(), stream, gemv_choice(il, 0), capture);
            linear(L.k, h_.get(), m, k_.get(), stream, gemv_choice(il, 1), capture);
            linear(L.v, h_.get(), m, v_.get(), stream, gemv_choice(il, 2), capture);
        }
        const cuda::PagedKvLayer layer = kv.layer(static_cast<int64_t>(il));
        const bool qk_norm = L.q_norm.bytes() > 0;
        // q, k and v rows: their own buffers, or side by side in the fused GEMM's output (q then goes to q_).
        char* const qkv = qkv_gemm ? qkv_.as<char>() : nullptr;
        const size_t act_size = dtype_size(act_);
        if (cuda::qkv_prepare_supported(hd, w_.rotary_dim)) {  // q/k norm, RoPE and the KV write in one launch
            cuda::qk_norm_rope_kv_write({.q = qkv_gemm ? qkv : q_.get(),
                                         .k = qkv_gemm ? qkv + c.n_heads * hd * act_size : k_.get(),
                                         .v = qkv_gemm ? qkv + (c.n_heads + c.n_kv_heads) * hd * act_size : v_.get(),
                                         .dtype = act_,
                                         .m = m,
                                         .n_heads = c.n_heads,
                                         .q_norm_weight = qk_norm ? L.q_norm.as<float>() : nullptr,
                                         .k_norm_weight = qk_norm ? L.k_norm.as<float>() : nullptr,
                                         .norm_eps = c.norm_eps,
                                         .positions = b.positions,
                                         .inv_freq = w_.inv_freq.as<float>(),
                                         .rotary_dim = w_.rotary_dim,
                                         .interleaved = c.rope.interleaved,
                                         .slot_mapping = b.slot_mapping,
                                         .kv = layer,
                                         .q_stride = qkv_gemm ? qkv_width_ : 0,
                                         .k_stride = qkv_gemm ? qkv_width_ : 0,
                                         .v_stride = qkv_gemm ? qkv_width_ : 0,
                                         .q_out = q_.get()},
                                        stream);
        } else {  // a head the fused kernel does not take (the same stores, in five launches)
            if (qk_norm) {
                cuda::rmsnorm(q_.get(), act_, m * c.n_heads, hd, L.q_norm.as<float>(), c.norm_eps, q_.get(), stream);
                cuda::rmsnorm(k_.get(), act_, m * c.n_kv_heads, hd, L.k_norm.as<float>(), c.norm_eps, k_.get(),
                              stream);
            }
            cuda::rope_apply(q_.get(), act_, m, c.n_heads, hd, b.positions, w_.inv_freq.as<float>(), w_.rotary_dim,
                             stream, c.rope.interleaved);
            cuda::rope_apply(k_.get(), act_, m, c.n_kv_heads, hd, b.positions, w_.inv_freq.as<float>(),
                             w_.rotary_dim, stream, c.rope.interleaved);
            cuda::kv_cache_write(k_.get(), v_.get(), act_, m, b.slot_mapping, layer, stream);
        }
        if (attention == nullptr) {
            cuda::paged_attention(q_.get(), act_, layer, ab, args, splits, workspace, workspace_bytes, attn_.get(),
                                  stream);
        } else {
            launch_chosen(*attention, capture, stream, [&](const tune::KernelVariant* v) {
                cuda::AttentionArgs chosen = args;
                if (v != nullptr) tune::select_attention_kernels(v->name, chosen);  // the chosen kernel
                cuda::paged_attention(q_.get(), act_, layer, ab, chosen, splits, workspace, workspace_bytes,
                                      attn_.get(), stream);
            }, "attention");
        }
        void* const o_out = fuse_norm ? fused_out() : proj;
        linear(L.o, attn_.get(), m, o_out, stream, gemv_choice(il, 3), capture);
        if (fuse_norm) {
            reduce_norm(o_out, L.mlp_norm.as<float>());
        } else {
            all_reduce(proj);
            cuda::rmsnorm_residual(proj, x_.get(), act_, m, d, L.mlp_norm.as<float>(), c.norm_eps, h_.get(), stream);
        }
        if (L.moe) {  // proj = sum over the top_k experts of weight * expert(h)
            const MoeConfig& e = c.moe;
            // Few experts (the tests' 4 or 8) make a GEMM too narrow to trust cuBLASLt with: the GEMV then.
            if (e.n_experts % 16 == 0)
                linear(L.router, h_.get(), m, router_logits_.get(), stream, gemv_choice(il, 4), capture);
            else
                this->gemv(L.router, h_.get(), act_, m, router_logits_.get(), stream, gemv_choice(il, 4), capture);
            // Expert parallelism: every rank routed every token alike (the router is replicated); each runs
            // its own experts tp.experts only, the others' pairs dropped, and the all-reduce adds the partial
            // sums (the combine's order over a token's experts becomes: per rank, then across ranks).
            const int32_t* ids = moe_ids_.as<int32_t>();
            // Qwen2-MoE: the shared expert of h, times sigmoid(shared_expert_gate . h) per token, added to the
            // routed sum by the combine (the CPU reference's order: routed sum, then + the scaled shared row).
            void* shared = nullptr;
            if (L.has_shared_expert()) {
                shared = shared_.get();
                swiglu_mlp(L.shared_gate, L.shared_up, L.shared_down, m, shared, stream, {}, capture);
                if (L.shared_expert_gate.n_out > 0)
                    cuda::shared_expert_gate(h_.get(), act_, m, d,
                                             static_cast<const uint16_t*>(L.shared_expert_gate.data), shared, stream);
            }
            if (sharded) {
                cuda::moe_route_softmax(router_logits_.get(), act_, m, e.n_experts, e.top_k, e.norm_topk_prob,
                                        moe_ids_.as<int32_t>(), moe_weights_.as<float>(), stream);
                cuda::moe_localize_ids(ids, m * e.top_k, w_.tp.experts.begin, w_.tp.experts.end,
                                       moe_local_ids_.as<int32_t>(), stream);
                ids = moe_local_ids_.as<int32_t>();
                cuda::moe_experts_nvfp4(h_.get(), act_, m, ids, moe_weights_.as<float>(), e.top_k,
                                        L.experts.device(), MoeActivation::SwiGlu, shared, moe_workspace_.get(),
                                        moe_out, stream);
            } else {  // router and permutation in one launch at decode sizes
                cuda::moe_route_softmax_permute(router_logits_.get(), act_, m, e.top_k, e.norm_topk_prob,
                                                L.experts.device(), moe_ids_.as<int32_t>(), moe_weights_.as<float>(),
                                                moe_workspace_.get(), stream);
                // The combine adds to the residual and makes the next layer's h (the final norm's after the
                // last layer) itself: one launch fewer a layer, the same bits.
                const cuda::MoeResidualNorm then_norm{
                    .residual = x_.get(), .weight = next_norm_weight(il), .eps = c.norm_eps, .out = h_.get()};
                cuda::moe_experts_nvfp4_permuted(h_.get(), act_, m, ids, moe_weights_.as<float>(), e.top_k,
                                                 L.experts.device(), MoeActivation::SwiGlu, shared,
                                                 moe_workspace_.get(), nullptr, stream,
                                                 cuda::MoeExpertKernel::Auto, &then_norm);
                h_ready = true;
                continue;
            }
            all_reduce(moe_out);
            layer_out = moe_out;
            continue;
        }
        void* const down_out = fuse_norm ? fused_out() : proj;
        swiglu_mlp(L.gate, L.up, L.down, m, down_out, stream,
                   {gemv_choice(il, 4), gemv_choice(il, 5), gemv_choice(il, 6)}, capture);
        if (fuse_norm) {  // with the next layer's input norm, or the final norm after the last layer
            reduce_norm(down_out, next_norm_weight(il));
            h_ready = true;
        } else {
            all_reduce(proj);
            layer_out = proj;
        }
    }
    if (b.n_logit_rows == 0) return;
    if (!h_ready)
        cuda::rmsnorm_residual(layer_out, x_.get(), act_, m, d, w_.final_norm.as<float>(), c.norm_eps, h_.get(),
                               stream);
    // The lm_head runs on float32 rows: logits come out in float32 for the sampler and logprobs.
    cuda::gather_rows(h_.get(), act_, d, b.logit_rows, b.n_logit_rows, selected_.get(), DType::F32, stream);
    if (!sharded)
        return gemv(w_.lm_head, selected_.get(), DType::F32, b.n_logit_rows, logits_.get(), stream,
                    choices_ ? &lm_head_gemv_ : nullptr, capture);
    // Vocabulary-parallel lm_head: each rank's rows [n_logit_rows, its share], gathered in slots of
    // vocab_per_rank, then laid side by side into [n_logit_rows, vocab].
    const int64_t rows = b.n_logit_rows, slot = w_.tp.vocab_per_rank;
    gemv(w_.lm_head, selected_.get(), DType::F32, rows, rank_logits_.get(), stream, choices_ ? &lm_head_gemv_ : nullptr,
         capture);
    comm_->all_gather(rank_logits_.get(), rows * slot, DType::F32, gathered_logits_.get());
    const int64_t vocab = w_.vocab_size();
    for (int64_t r = 0; r < w_.tp.tp_size; ++r) {
        const int64_t share = std::min(slot, vocab - r * slot);  // the last rank may hold fewer rows
        if (share <= 0) continue;
        NIBBLE_CUDA_CHECK(cudaMemcpy2DAsync(logits_.as<float>() + r * slot, static_cast<size_t>(vocab) * 4,
                                            gathered_logits_.as<float>() + r * rows * slot,
                                            static_cast<size_t>(share) * 4, static_cast<size_t>(share) * 4,
                                            static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream));
    }
}

}  // namespace nibble::gpu
