#include "gpu/hybrid_forward.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "base/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "ops/activation/activation_cuda.h"
#include "ops/attention/attention_cuda.h"
#include "ops/attention/qkv_prepare_cuda.h"
#include "ops/embed/embed_cuda.h"
#include "ops/embed/gather_rows_cuda.h"
#include "ops/linear/linear_cuda.h"
#include "ops/moe/moe_cuda.h"
#include "ops/rmsnorm/rmsnorm_cuda.h"
#include "ops/ssm/ssm_cuda.h"

namespace nibble::gpu {

void DeviceForward::save_state_snapshot(int32_t, int32_t, cudaStream_t) {
    fail("this model's CUDA forward keeps no recurrent state to snapshot");
}

void DeviceForward::restore_state_snapshot(int32_t, int32_t, cudaStream_t) {
    fail("this model's CUDA forward keeps no recurrent state to restore");
}

namespace {

cuda::DeviceBuffer activations(int64_t rows, int64_t width, DType dtype) {
    return cuda::DeviceBuffer(static_cast<size_t>(rows * width) * dtype_size(dtype));
}

bool any_layer(const DeviceHybrid& w, LayerKind kind) {
    return std::any_of(w.layers.begin(), w.layers.end(), [&](const DeviceHybridLayer& L) { return L.kind == kind; });
}

}  // namespace

HybridForward::HybridForward(const DeviceHybrid& w, DType act, int64_t max_tokens, int64_t max_seqs,
                             int64_t n_state_slots, SsmStateDtype ssm_dtype, int64_t n_state_snapshots)
    : w_(w), act_(act), max_tokens_(max_tokens), max_seqs_(max_seqs), n_slots_(n_state_slots),
      n_snapshots_(n_state_snapshots) {
    const ModelConfig& c = w.config;
    NIBBLE_CHECK(act == DType::BF16 || act == DType::F32, "CUDA hybrid forward: activations are BF16 or F32, not {}",
                 dtype_name(act));
    NIBBLE_CHECK(max_tokens > 0 && max_seqs > 0 && max_seqs <= 65535,
                 "CUDA hybrid forward: max_tokens {} and max_seqs {} (1..65535) must be positive", max_tokens, max_seqs);
    NIBBLE_CHECK(w.n_mamba == 0 || n_state_slots > 0,
                 "CUDA hybrid forward: {} has Mamba layers and needs state slots (got {})", c.arch_name, n_state_slots);
    NIBBLE_CHECK(n_state_snapshots >= 0, "CUDA hybrid forward: {} state snapshots", n_state_snapshots);
    sm_count_ = cuda::query_device(0).sm_count;
    const int64_t d = c.n_embd;
    x_ = activations(max_tokens, d, act);
    h_ = activations(max_tokens, d, act);
    proj_ = activations(max_tokens, d, act);
    int64_t widest_ff = 0;
    if (any_layer(w, LayerKind::Mamba)) {
        const MambaConfig& mb = c.mamba;
        zxbcdt_ = activations(max_tokens, mb.in_proj_dim(), act);
        xbc_ = activations(max_tokens, mb.conv_dim(), act);
        y_ = activations(max_tokens, mb.d_inner(), act);
        const MambaStateShape shape = w.state_shape(ssm_dtype);
        // One more slot than asked: the scratch slot padding sequences compute into.
        pool_ = cuda::MambaSlotPool{.n_slots = n_state_slots + 1, .n_layers = shape.n_layers,
                                    .conv_elems = shape.conv_elems(), .ssm_elems = shape.ssm_elems(),
                                    .ssm_dtype = ssm_dtype};
        conv_states_ = cuda::DeviceBuffer(static_cast<size_t>(pool_.n_slots * pool_.conv_slot_bytes()));
        ssm_states_ = cuda::DeviceBuffer(static_cast<size_t>(pool_.n_slots * pool_.ssm_slot_bytes()));
        // Zeroed once so that no slot ever holds garbage (each sequence's first step zeroes its own anyway).
        NIBBLE_CUDA_CHECK(cudaMemset(conv_states_.get(), 0, conv_states_.bytes()));
        NIBBLE_CUDA_CHECK(cudaMemset(ssm_states_.get(), 0, ssm_states_.bytes()));
        pool_.conv = conv_states_.as<float>();
        pool_.ssm = ssm_states_.get();
        if (n_state_snapshots > 0) {
            conv_snapshots_ = cuda::DeviceBuffer(static_cast<size_t>(n_state_snapshots * pool_.conv_slot_bytes()));
            ssm_snapshots_ = cuda::DeviceBuffer(static_cast<size_t>(n_state_snapshots * pool_.ssm_slot_bytes()));
        }
        conv_ptrs_ = cuda::DeviceBuffer(static_cast<size_t>(w.n_mamba * max_seqs) * sizeof(float*));
        ssm_ptrs_ = cuda::DeviceBuffer(static_cast<size_t>(w.n_mamba * max_seqs) * sizeof(void*));
    } else {
        n_slots_ = 0;
        n_snapshots_ = 0;
    }
    if (any_layer(w, LayerKind::Attention)) {
        const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
        q_ = activations(max_tokens, q_dim, act);
        attn_ = activations(max_tokens, q_dim, act);
        k_ = activations(max_tokens, kv_dim, act);
        v_ = activations(max_tokens, kv_dim, act);
    }
    if (any_layer(w, LayerKind::Mlp)) widest_ff = std::max(widest_ff, c.n_ff);
    if (any_layer(w, LayerKind::Moe)) {
        const MoeConfig& e = c.moe;
        widest_ff = std::max(widest_ff, e.n_ff_shared);
        shared_ = activations(max_tokens, d, act);
        if (act != DType::F32) {
            router_in_ = activations(max_tokens, d, DType::F32);
            std::vector<int32_t> rows(static_cast<size_t>(max_tokens));
            std::iota(rows.begin(), rows.end(), 0);
            identity_rows_ = cuda::DeviceBuffer(rows.size() * sizeof(int32_t));
            identity_rows_.upload(rows.data(), identity_rows_.bytes());
        }
        router_logits_ = activations(max_tokens, e.n_experts, DType::F32);
        moe_ids_ = activations(max_tokens, e.top_k, DType::I32);
        moe_weights_ = activations(max_tokens, e.top_k, DType::F32);
        moe_workspace_ =
            cuda::DeviceBuffer(cuda::moe_workspace_bytes(max_tokens, e.top_k, e.n_experts, d, e.n_ff));
    }
    if (widest_ff > 0) ff_ = activations(max_tokens, widest_ff, act);
    selected_ = activations(max_seqs, d, DType::F32);
    logits_ = activations(max_seqs, c.vocab_size, DType::F32);
    if (act == DType::BF16 && max_tokens > kGemvMaxRows) {
        bool quantized = false;
        for (const DeviceHybridLayer& L : w.layers)
            for (const DeviceLinear* l : {&L.in_proj, &L.out_proj, &L.q, &L.k, &L.v, &L.o, &L.up, &L.down})
                quantized |= l->n_out > 0 && l->format != WeightFormat::Dense;
        // NVFP4 prefill GEMMs dequantize on the forward's own stream into GemmContext's scratch.
        gemm_ = std::make_unique<cuda::GemmContext>(quantized ? w.max_linear_elems() : 0);
    }
}

HybridForward::~HybridForward() = default;

void HybridForward::linear(const DeviceLinear& w, const void* x, int64_t m, void* y, cudaStream_t stream) {
    if (act_ == DType::BF16 && m > kGemvMaxRows) {
        NIBBLE_CHECK(gemm_ != nullptr, "CUDA hybrid forward: {} rows need the GEMM path, but buffers were sized for {}",
                     m, max_tokens_);
        switch (w.format) {
            case WeightFormat::Nvfp4: return cuda::gemm_nvfp4(*gemm_, x, m, w.nvfp4(), w.bias_ptr(), y, stream);
            case WeightFormat::Dense:
                return cuda::gemm_bf16(*gemm_, x, m, static_cast<const uint16_t*>(w.data), w.n_out, w.n_in, 1.0f,
                                       w.bias_ptr(), y, stream);
            case WeightFormat::Fp8: break;
        }
    }
    gemv(w, x, act_, m, y, stream);
}

void HybridForward::gemv(const DeviceLinear& w, const void* x, DType act, int64_t m, void* y, cudaStream_t stream) {
    switch (w.format) {
        case WeightFormat::Nvfp4: return cuda::gemv_nvfp4(x, act, m, w.nvfp4(), w.bias_ptr(), y, stream);
        case WeightFormat::Dense:
            return cuda::gemv_bf16(x, act, m, static_cast<const uint16_t*>(w.data), w.n_out, w.n_in, w.bias_ptr(), y,
                                   stream);
        case WeightFormat::Fp8: break;
    }
    fail("{}: the CUDA hybrid forward runs NVFP4 or BF16 linear layers, not {}", w.name, weight_format_name(w.format));
}

int HybridForward::attention_splits(const DeviceBatch& b, const DeviceKvCache& kv) const {
    if (w_.n_attention == 0) return 1;
    const cuda::AttentionBatch ab{.n_seqs = b.n_seqs, .n_tokens = b.n_tokens, .max_blocks = b.max_blocks,
                                  .max_q_len = b.max_q_len, .max_kv_len = b.max_kv_len};
    return cuda::paged_attention_splits(ab, kv.layer(0), w_.config.n_heads, sm_count_);
}

void HybridForward::reserve_attention(int splits, int64_t n_tokens) {
    const size_t need = attention_workspace_bytes(splits, n_tokens);
    if (need > workspace_.bytes()) workspace_ = cuda::DeviceBuffer(need);
}

size_t HybridForward::attention_workspace_bytes(int splits, int64_t n_tokens) const {
    if (w_.n_attention == 0) return 0;
    return cuda::paged_attention_workspace_bytes(splits, n_tokens, w_.config.n_heads, w_.config.head_dim);
}

void HybridForward::run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream) {
    const int splits = attention_splits(b, kv);
    reserve_attention(splits, b.n_tokens);
    run(b, kv, stream, splits, workspace_.get(), workspace_.bytes());
}

void HybridForward::mamba(const DeviceHybridLayer& L, const DeviceBatch& b, cudaStream_t stream) {
    const ModelConfig& c = w_.config;
    const MambaConfig& mb = c.mamba;
    const int64_t m = b.n_tokens, in_dim = mb.in_proj_dim(), conv_dim = mb.conv_dim(), d_inner = mb.d_inner();
    const size_t es = dtype_size(act_);
    auto* zx = static_cast<uint8_t*>(zxbcdt_.get());  // [m, in_dim]: z, then x B C (conv input), then dt
    linear(L.in_proj, h_.get(), m, zx, stream);
    const int64_t table = L.cache_index * b.n_seqs;  // this layer's row of the step's state pointer tables
    cuda::mamba_conv1d(zx + static_cast<size_t>(d_inner) * es, act_, in_dim, m, conv_dim, b.q_start, b.n_seqs,
                       L.conv_w.as<float>(), L.conv_b.bytes() ? L.conv_b.as<float>() : nullptr, mb.conv_kernel,
                       conv_ptrs_.as<float*>() + table, xbc_.get(), stream);
    const SsmScanParams sp{.n_heads = mb.n_heads,
                           .head_dim = mb.head_dim,
                           .state_size = mb.state_size,
                           .n_groups = mb.n_groups,
                           .A = L.A.as<float>(),
                           .D = L.D.as<float>(),
                           .dt_bias = L.dt_bias.as<float>(),
                           .dt_min = mb.dt_min,
                           .dt_max = mb.dt_max};
    const void* dt = zx + static_cast<size_t>(d_inner + conv_dim) * es;
    // The chunked scan where run() could give it its workspace (not while capturing a graph).
    if (b.max_q_len >= kChunkedScanMinTokens &&
        scan_workspace_.bytes() >= cuda::ssm_scan_chunked_workspace_bytes(sp, m, b.n_seqs))
        cuda::ssm_scan_chunked(sp, m, b.q_start, b.n_seqs, xbc_.get(), conv_dim, dt, in_dim, act_,
                               ssm_ptrs_.as<void*>() + table, pool_.ssm_dtype, y_.get(), scan_workspace_.get(),
                               scan_workspace_.bytes(), stream);
    else
        cuda::ssm_scan(sp, m, b.q_start, b.n_seqs, xbc_.get(), conv_dim, dt, in_dim, act_,
                       ssm_ptrs_.as<void*>() + table, pool_.ssm_dtype, y_.get(), stream);
    cuda::gated_rmsnorm(y_.get(), zx, in_dim, act_, m, d_inner, d_inner / mb.n_groups, L.gated_norm.as<float>(),
                        c.norm_eps, y_.get(), stream);
    linear(L.out_proj, y_.get(), m, proj_.get(), stream);
}

void HybridForward::relu2_mlp(const DeviceLinear& up, const DeviceLinear& down, int64_t m, void* out,
                              cudaStream_t stream) {
    linear(up, h_.get(), m, ff_.get(), stream);
    cuda::relu2(ff_.get(), act_, m * up.n_out, ff_.get(), stream);
    linear(down, ff_.get(), m, out, stream);
}

void HybridForward::moe(const DeviceHybridLayer& L, int64_t m, const float* next_norm, cudaStream_t stream) {
    const ModelConfig& c = w_.config;
    // Router logits in float32 (transformers computes NemotronH's router in float32). Prefill-sized steps with
    // BF16 activations: one cuBLASLt GEMM of the BF16 operands with float32 output (the same float32 linear;
    // the GEMV in 16-row launches took 5.6 ms a layer at 2048 tokens, 63% of the step, on H100). Otherwise
    // h widened when BF16, the BF16 router weights through the float32 GEMV.
    if (act_ == DType::BF16 && m > kGemvMaxRows && gemm_ != nullptr && L.router.format == WeightFormat::Dense &&
        L.router.bias_ptr() == nullptr) {
        cuda::gemm_bf16_f32(*gemm_, h_.get(), m, static_cast<const uint16_t*>(L.router.data), L.router.n_out,
                            L.router.n_in, router_logits_.as<float>(), stream);
        route_and_run_experts(L, m, next_norm, stream);
        return;
    }
    const void* router_in = h_.get();
    if (act_ != DType::F32) {
        cuda::gather_rows(h_.get(), act_, c.n_embd, identity_rows_.as<int32_t>(), m, router_in_.get(), DType::F32,
                          stream);
        router_in = router_in_.get();
    }
    gemv(L.router, router_in, DType::F32, m, router_logits_.get(), stream);
    route_and_run_experts(L, m, next_norm, stream);
}

void HybridForward::route_and_run_experts(const DeviceHybridLayer& L, int64_t m, const float* next_norm,
                                          cudaStream_t stream) {
    const MoeConfig& e = w_.config.moe;
    // Router and permutation in one launch at decode sizes.
    cuda::moe_route_sigmoid_permute(router_logits_.get(), DType::F32, m, e.top_k,
                                    L.correction_bias.as<float>(), e.n_group, e.topk_group, e.norm_topk_prob,
                                    e.routed_scaling_factor, L.experts.device(), moe_ids_.as<int32_t>(),
                                    moe_weights_.as<float>(), moe_workspace_.get(), stream);
    relu2_mlp(L.up, L.down, m, shared_.get(), stream);  // the shared expert, added in the combine
    // The combine adds to the residual and makes the next layer's h itself (one launch fewer, the same bits).
    const cuda::MoeResidualNorm then_norm{
        .residual = x_.get(), .weight = next_norm, .eps = w_.config.norm_eps, .out = h_.get()};
    cuda::moe_experts_nvfp4_permuted(
        h_.get(), act_, m, moe_ids_.as<int32_t>(), moe_weights_.as<float>(), e.top_k, L.experts.device(),
        MoeActivation::Relu2, shared_.get(), moe_workspace_.get(), nullptr, stream,
        // F32 is the exactness mode: the grouped GEMM would round its operands to BF16.
        act_ == DType::F32 ? cuda::MoeExpertKernel::Gemv : cuda::MoeExpertKernel::Auto, &then_norm);
}

void HybridForward::run(const DeviceBatch& b, DeviceKvCache& kv, cudaStream_t stream, int splits, void* workspace,
                        size_t workspace_bytes) {
    const ModelConfig& c = w_.config;
    const int64_t m = b.n_tokens, d = c.n_embd;
    NIBBLE_CHECK(m > 0 && m <= max_tokens_, "CUDA hybrid forward: {} tokens in a step of at most {}", m, max_tokens_);
    NIBBLE_CHECK(b.n_seqs > 0 && b.n_seqs <= max_seqs_ && b.n_logit_rows <= max_seqs_,
                 "CUDA hybrid forward: {} sequences and {} logits rows in a step of at most {}", b.n_seqs,
                 b.n_logit_rows, max_seqs_);
    NIBBLE_CHECK(w_.n_attention == 0 || kv.shape().n_layers >= w_.n_attention,
                 "CUDA hybrid forward: a KV cache of {} layers for {} attention layers", kv.shape().n_layers,
                 w_.n_attention);
    if (w_.n_mamba > 0) {
        NIBBLE_CHECK(b.state_slots != nullptr, "CUDA hybrid forward: {} needs a state slot per sequence", c.arch_name);
        cuda::mamba_slot_tables(pool_, b.state_slots, b.start_pos, b.n_seqs, conv_ptrs_.as<float*>(),
                                ssm_ptrs_.as<void*>(), stream);
        if (b.max_q_len >= kChunkedScanMinTokens) {  // the chunked scan's workspace: grown outside graph capture
            const MambaConfig& mb = c.mamba;
            const SsmScanParams shape{.n_heads = mb.n_heads, .head_dim = mb.head_dim, .state_size = mb.state_size,
                                      .n_groups = mb.n_groups};
            const size_t need = cuda::ssm_scan_chunked_workspace_bytes(shape, m, b.n_seqs);
            cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
            NIBBLE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
            if (need > scan_workspace_.bytes() && need <= kChunkedScanMaxWorkspaceBytes &&
                capture == cudaStreamCaptureStatusNone) {
                scan_workspace_ = cuda::DeviceBuffer();  // free first: the two need not fit together
                scan_workspace_ = cuda::DeviceBuffer(need);
            }
        }
    }
    const cuda::AttentionBatch ab{.n_seqs = b.n_seqs,
                                  .n_tokens = m,
                                  .q_start = b.q_start,
                                  .start_pos = b.start_pos,
                                  .block_tables = b.block_tables,
                                  .max_blocks = b.max_blocks,
                                  .max_q_len = b.max_q_len,
                                  .max_kv_len = b.max_kv_len};
    const cuda::AttentionArgs args{.n_heads = c.n_heads,
                                   .scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim)),
                                   .sliding_window = c.sliding_window};
    cuda::embed(static_cast<const uint16_t*>(w_.embed.get()), c.vocab_size, d, b.tokens, m, act_, x_.get(), stream);
    bool h_ready = false;  // a MoE layer's combine already made this layer's h (and added to x)
    for (size_t il = 0; il < w_.layers.size(); ++il) {
        const DeviceHybridLayer& L = w_.layers[il];
        if (il == 0)
            cuda::rmsnorm(x_.get(), act_, m, d, L.norm.as<float>(), c.norm_eps, h_.get(), stream);
        else if (!h_ready)  // x += the previous layer's mixer output; h = norm(x)
            cuda::rmsnorm_residual(proj_.get(), x_.get(), act_, m, d, L.norm.as<float>(), c.norm_eps, h_.get(), stream);
        h_ready = false;
        switch (L.kind) {
            case LayerKind::Mamba: mamba(L, b, stream); break;
            case LayerKind::Attention: {
                linear(L.q, h_.get(), m, q_.get(), stream);
                linear(L.k, h_.get(), m, k_.get(), stream);
                linear(L.v, h_.get(), m, v_.get(), stream);
                const cuda::PagedKvLayer layer = kv.layer(L.cache_index);
                // No q/k norm and no RoPE here: the fused launch is the KV write alone (with PDL).
                cuda::qk_norm_rope_kv_write({.q = q_.get(),
                                             .k = k_.get(),
                                             .v = v_.get(),
                                             .dtype = act_,
                                             .m = m,
                                             .n_heads = c.n_heads,
                                             .slot_mapping = b.slot_mapping,
                                             .kv = layer},
                                            stream);
                cuda::paged_attention(q_.get(), act_, layer, ab, args, splits, workspace, workspace_bytes, attn_.get(),
                                      stream);
                linear(L.o, attn_.get(), m, proj_.get(), stream);
                break;
            }
            case LayerKind::Mlp: relu2_mlp(L.up, L.down, m, proj_.get(), stream); break;
            case LayerKind::Moe:
                moe(L, m,
                    il + 1 < w_.layers.size() ? w_.layers[il + 1].norm.as<float>()
                                              : w_.final_norm.as<float>(),
                    stream);
                h_ready = true;
                break;
        }
    }
    if (b.n_logit_rows == 0) return;
    if (!h_ready)
        cuda::rmsnorm_residual(proj_.get(), x_.get(), act_, m, d, w_.final_norm.as<float>(), c.norm_eps,
                               h_.get(), stream);
    // The lm_head runs on float32 rows: logits come out in float32 for the sampler and logprobs.
    cuda::gather_rows(h_.get(), act_, d, b.logit_rows, b.n_logit_rows, selected_.get(), DType::F32, stream);
    gemv(w_.lm_head, selected_.get(), DType::F32, b.n_logit_rows, logits_.get(), stream);
}

void HybridForward::copy_slot(bool to_snapshot, int32_t state_slot, int32_t snapshot, cudaStream_t stream) {
    NIBBLE_CHECK(state_slot >= 0 && state_slot < n_slots_, "CUDA hybrid forward: state slot {} outside 0..{}",
                 state_slot, n_slots_ - 1);
    NIBBLE_CHECK(snapshot >= 0 && snapshot < n_snapshots_, "CUDA hybrid forward: state snapshot {} outside 0..{}",
                 snapshot, n_snapshots_ - 1);
    const size_t conv = static_cast<size_t>(pool_.conv_slot_bytes()), ssm = static_cast<size_t>(pool_.ssm_slot_bytes());
    uint8_t* slot_conv = conv_states_.as<uint8_t>() + static_cast<size_t>(state_slot) * conv;
    uint8_t* slot_ssm = ssm_states_.as<uint8_t>() + static_cast<size_t>(state_slot) * ssm;
    uint8_t* snap_conv = conv_snapshots_.as<uint8_t>() + static_cast<size_t>(snapshot) * conv;
    uint8_t* snap_ssm = ssm_snapshots_.as<uint8_t>() + static_cast<size_t>(snapshot) * ssm;
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(to_snapshot ? snap_conv : slot_conv, to_snapshot ? slot_conv : snap_conv, conv,
                                      cudaMemcpyDeviceToDevice, stream));
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(to_snapshot ? snap_ssm : slot_ssm, to_snapshot ? slot_ssm : snap_ssm, ssm,
                                      cudaMemcpyDeviceToDevice, stream));
}

void HybridForward::save_state_snapshot(int32_t state_slot, int32_t snapshot, cudaStream_t stream) {
    copy_slot(true, state_slot, snapshot, stream);
}

void HybridForward::restore_state_snapshot(int32_t snapshot, int32_t state_slot, cudaStream_t stream) {
    copy_slot(false, state_slot, snapshot, stream);
}

}  // namespace nibble::gpu
