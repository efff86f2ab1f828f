#include "gpu/device_hybrid.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/error.h"
#include "base/log.h"
#include "base/progress.h"
#include "cuda/cuda_check.h"
#include "cuda/fill_random.h"
#include "gpu/weight_upload.h"
#include "ops/attention/attention_cuda.h"

namespace nibble::gpu {

MambaStateShape DeviceHybrid::state_shape(SsmStateDtype dtype) const {
    const MambaConfig& mb = config.mamba;
    return MambaStateShape{.n_layers = n_mamba,
                           .conv_rows = mb.conv_kernel - 1,
                           .conv_dim = mb.conv_dim(),
                           .n_heads = mb.n_heads,
                           .head_dim = mb.head_dim,
                           .state_size = mb.state_size,
                           .ssm_dtype = dtype};
}

namespace {

// Every linear layer a token passes through densely (the routed experts and the lm_head aside).
std::vector<const DeviceLinear*> linears(const DeviceHybrid& h) {
    std::vector<const DeviceLinear*> all;
    for (const DeviceHybridLayer& L : h.layers) {
        switch (L.kind) {
            case LayerKind::Mamba: all.insert(all.end(), {&L.in_proj, &L.out_proj}); break;
            case LayerKind::Attention: all.insert(all.end(), {&L.q, &L.k, &L.v, &L.o}); break;
            case LayerKind::Mlp: all.insert(all.end(), {&L.up, &L.down}); break;
            case LayerKind::Moe: all.insert(all.end(), {&L.router, &L.up, &L.down}); break;
        }
    }
    return all;
}

}  // namespace

double DeviceHybrid::streamed_bytes_per_step(int64_t tokens) const {
    double total = static_cast<double>(lm_head.stored_bytes());
    for (const DeviceLinear* w : linears(*this)) total += static_cast<double>(w->stored_bytes());
    for (const DeviceHybridLayer& L : layers)
        if (L.kind == LayerKind::Moe)
            total += L.experts.expected_active(config.moe.n_experts, config.moe.top_k, tokens) *
                     static_cast<double>(L.experts.expert_bytes());
    return total;
}

int64_t DeviceHybrid::active_linear_params() const {
    int64_t total = 0;
    for (const DeviceLinear* w : linears(*this)) total += w->n_out * w->n_in;
    for (const DeviceHybridLayer& L : layers)
        if (L.kind == LayerKind::Moe)
            total += std::min(config.moe.top_k, L.experts.n_experts) * L.experts.n_mats * L.experts.n_ff *
                     L.experts.n_embd;
    return total;
}

int64_t DeviceHybrid::device_bytes() const {
    int64_t total = static_cast<int64_t>(embed.bytes()) + (config.tied_embeddings ? 0 : lm_head.stored_bytes());
    for (const DeviceLinear* w : linears(*this)) total += w->stored_bytes();
    for (const DeviceHybridLayer& L : layers) {
        total += L.experts.bytes();
        for (const cuda::DeviceBuffer* b : {&L.norm, &L.conv_w, &L.conv_b, &L.A, &L.D, &L.dt_bias, &L.gated_norm,
                                            &L.correction_bias})
            total += static_cast<int64_t>(b->bytes());
    }
    return total;
}

int64_t DeviceHybrid::max_linear_elems() const {
    int64_t most = 0;
    for (const DeviceLinear* w : linears(*this)) most = std::max(most, w->n_out * w->n_in);
    return most;
}

void check_hybrid_supported(const ModelConfig& c) {
    NIBBLE_CHECK(c.arch == Arch::NemotronH, "the CUDA hybrid forward runs NemotronH, not {}", c.arch_name);
    NIBBLE_CHECK(static_cast<int64_t>(c.layer_kinds.size()) == c.n_layers, "{}: {} layer kinds for {} layers",
                 c.arch_name, c.layer_kinds.size(), c.n_layers);
    const auto has = [&](LayerKind k) { return std::count(c.layer_kinds.begin(), c.layer_kinds.end(), k) > 0; };
    NIBBLE_CHECK(c.n_embd % 32 == 0, "the CUDA matmuls need a hidden size that is a multiple of 32, not {}", c.n_embd);
    if (has(LayerKind::Attention)) {
        NIBBLE_CHECK(cuda::paged_attention_head_dim_supported(c.head_dim),
                     "the CUDA attention kernels take head_dim 16, 32, 64, 128 or 256; this model has {}", c.head_dim);
        NIBBLE_CHECK(c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0 && c.n_heads / c.n_kv_heads <= 32,
                     "the CUDA attention kernels take at most 32 query heads per KV head ({} / {})", c.n_heads,
                     c.n_kv_heads);
        NIBBLE_CHECK((c.n_heads * c.head_dim) % 32 == 0, "the CUDA matmuls need q width a multiple of 32, not {}",
                     c.n_heads * c.head_dim);
    }
    // Widths of 16 (mod 32) run the CUDA matmuls' plain kernels (gemv_nvfp4's 16-element blocks, the MoE's
    // plain GEMV): small test models only, real ones have multiples of 32.
    if (has(LayerKind::Mlp))
        NIBBLE_CHECK(c.n_ff % 16 == 0, "the CUDA matmuls need intermediate_size a multiple of 16, not {}", c.n_ff);
    if (has(LayerKind::Mamba)) {
        const MambaConfig& mb = c.mamba;
        NIBBLE_CHECK(mb.conv_kernel >= 1 && mb.conv_kernel <= 8, "the CUDA Mamba conv takes conv_kernel 1..8, not {}",
                     mb.conv_kernel);
        NIBBLE_CHECK(mb.state_size >= 1 && mb.state_size <= 256, "the CUDA scan takes ssm_state_size 1..256, not {}",
                     mb.state_size);
        NIBBLE_CHECK(mb.n_groups >= 1 && mb.n_heads % mb.n_groups == 0,
                     "mamba_num_heads {} is not a multiple of n_groups {}", mb.n_heads, mb.n_groups);
        NIBBLE_CHECK(mb.d_inner() % 32 == 0 && mb.conv_dim() % 8 == 0,
                     "the CUDA Mamba mixer needs d_inner a multiple of 32 (not {}) and conv_dim of 8 (not {})",
                     mb.d_inner(), mb.conv_dim());
    }
    if (has(LayerKind::Moe)) {
        const MoeConfig& e = c.moe;
        NIBBLE_CHECK(e.scoring == MoeScoring::Sigmoid && !e.gated_experts && e.n_shared_experts <= 1,
                     "the CUDA hybrid MoE runs a sigmoid router over relu^2 experts with at most one shared expert ({})",
                     c.arch_name);
        NIBBLE_CHECK(e.n_experts >= 1 && e.n_experts <= 1024 && e.top_k >= 1 && e.top_k <= 32 && e.top_k <= e.n_experts,
                     "the CUDA MoE takes 1..1024 experts and top_k 1..32 (at most the experts); this model has {} "
                     "experts, top_k {}", e.n_experts, e.top_k);
        NIBBLE_CHECK(e.n_ff % 16 == 0 && (e.n_shared_experts == 0 || e.n_ff_shared % 16 == 0),
                     "the CUDA MoE needs moe_intermediate_size ({}) and the shared expert's ({}) multiples of 16",
                     e.n_ff, e.n_ff_shared);
    }
}

void check_hybrid_supported(const ModelConfig& c, const HybridView& view) {
    check_hybrid_supported(c);
    NIBBLE_CHECK(static_cast<int64_t>(view.layers.size()) == c.n_layers, "hybrid view has {} layers, config {}",
                 view.layers.size(), c.n_layers);
    auto no_fp8 = [](const LinearWeight* w) {
        NIBBLE_CHECK(w == nullptr || w->format != WeightFormat::Fp8,
                     "{}: the CUDA hybrid forward runs NVFP4 or BF16 linear layers, not FP8", w->name);
    };
    no_fp8(view.lm_head);
    for (size_t il = 0; il < view.layers.size(); ++il) {
        const HybridLayerView& L = view.layers[il];
        NIBBLE_CHECK(L.kind == c.layer_kinds[il], "hybrid view: layer {} differs in kind from the config", il);
        for (const LinearWeight* w : {L.in_proj, L.out_proj, L.q, L.k, L.v, L.o, L.up, L.down}) no_fp8(w);
        if (L.kind != LayerKind::Moe) continue;
        NIBBLE_CHECK(L.router->format == WeightFormat::Dense,
                     "{}: the CUDA backend runs the MoE router unquantized, this one is {}", L.router->name,
                     weight_format_name(L.router->format));
        NIBBLE_CHECK(L.up != nullptr && L.down != nullptr, "{}: the CUDA hybrid MoE needs the shared expert",
                     L.router->name);
        // NVFP4 experts, or (small models: the MoE's plain GEMV) dense ones, rounded to BF16 on upload; one
        // format for all of a layer's experts.
        const WeightFormat experts_format =
            L.expert_up.empty() ? WeightFormat::Nvfp4 : L.expert_up.front()->format;
        for (const auto* list : {&L.expert_up, &L.expert_down}) {
            NIBBLE_CHECK(static_cast<int64_t>(list->size()) == c.moe.n_experts,
                         "{}: the view holds {} experts, the config {}", L.router->name, list->size(), c.moe.n_experts);
            for (const LinearWeight* w : *list) {
                NIBBLE_CHECK(w->format == WeightFormat::Nvfp4 || w->format == WeightFormat::Dense,
                             "{}: the CUDA backend runs MoE experts in NVFP4 (or BF16), this one is {} (quantize "
                             "the checkpoint to NVFP4, or serve it with --device cpu)",
                             w->name, weight_format_name(w->format));
                NIBBLE_CHECK(w->format == experts_format, "{}: the CUDA backend needs one format for a layer's "
                             "experts, this one is {}, the first {}", w->name, weight_format_name(w->format),
                             weight_format_name(experts_format));
            }
        }
    }
}

namespace {

DeviceLinear tied_head(const ModelConfig& c, const std::string& name, const cuda::DeviceBuffer& embed) {
    DeviceLinear h;
    h.name = name;
    h.format = WeightFormat::Dense;
    h.n_out = c.vocab_size;
    h.n_in = c.n_embd;
    h.data = embed.get();
    return h;
}

}  // namespace

DeviceHybrid upload_hybrid(const ModelConfig& c, const HybridView& view) {
    check_hybrid_supported(c, view);
    uint64_t total = view.embed.nbytes();
    for (const HybridLayerView& L : view.layers) {
        for (const LinearWeight* w : {L.in_proj, L.out_proj, L.q, L.k, L.v, L.o, L.up, L.down, L.router})
            if (w != nullptr) total += static_cast<uint64_t>(linear_host_bytes(*w));
        for (const auto* list : {&L.expert_up, &L.expert_down})
            for (const LinearWeight* w : *list) total += static_cast<uint64_t>(linear_host_bytes(*w));
    }
    if (!view.tied_lm_head) total += static_cast<uint64_t>(linear_host_bytes(*view.lm_head));

    ProgressBar progress("uploading weights", total);
    DeviceHybrid d;
    d.config = c;
    d.n_attention = view.n_attention;
    d.n_mamba = view.n_mamba;
    bool converted = view.embed.dtype != DType::BF16;
    {
        PinnedUploader up(size_t{64} << 20, 4, &progress);
        d.embed = cuda::DeviceBuffer(static_cast<size_t>(view.embed.numel()) * 2);
        up.copy_as_bf16(d.embed.get(), view.embed.data, view.embed.dtype, view.embed.numel());
        for (const HybridLayerView& L : view.layers) {
            DeviceHybridLayer D;
            D.kind = L.kind;
            D.cache_index = L.cache_index;
            D.norm = upload_floats(up, *L.norm);
            switch (L.kind) {
                case LayerKind::Mamba:
                    D.in_proj = upload_linear(up, *L.in_proj, converted);
                    D.out_proj = upload_linear(up, *L.out_proj, converted);
                    D.conv_w = upload_floats(up, *L.conv_w);
                    D.conv_b = upload_floats(up, *L.conv_b);
                    D.A = upload_floats(up, *L.A);
                    D.D = upload_floats(up, *L.D);
                    D.dt_bias = upload_floats(up, *L.dt_bias);
                    D.gated_norm = upload_floats(up, *L.gated_norm);
                    break;
                case LayerKind::Attention:
                    D.q = upload_linear(up, *L.q, converted);
                    D.k = upload_linear(up, *L.k, converted);
                    D.v = upload_linear(up, *L.v, converted);
                    D.o = upload_linear(up, *L.o, converted);
                    break;
                case LayerKind::Mlp:
                    D.up = upload_linear(up, *L.up, converted);
                    D.down = upload_linear(up, *L.down, converted);
                    break;
                case LayerKind::Moe:
                    D.up = upload_linear(up, *L.up, converted);
                    D.down = upload_linear(up, *L.down, converted);
                    D.router = upload_linear(up, *L.router, converted);
                    D.correction_bias = upload_floats(up, *L.correction_bias);
                    D.experts = upload_moe_experts(up, nullptr, L.expert_up, L.expert_down, c.n_embd, c.moe.n_ff);
                    break;
            }
            d.layers.push_back(std::move(D));
        }
        d.final_norm = upload_floats(up, *view.final_norm);
        d.lm_head = view.tied_lm_head ? tied_head(c, view.lm_head->name, d.embed)
                                      : upload_linear(up, *view.lm_head, converted);
        up.finish();
    }
    progress.finish();
    d.k_scales = view.k_scales;
    d.v_scales = view.v_scales;
    if (converted)
        log::info("CUDA backend: F32/F16 dense weights were converted to BF16 on upload (its kernels read BF16)");
    const bool bf16_experts = std::any_of(d.layers.begin(), d.layers.end(),
                                          [](const DeviceHybridLayer& L) { return L.experts.bf16.bytes() != 0; });
    if (bf16_experts)
        log::warn("CUDA backend: the routed experts are BF16: a plain GEMV runs them for decode (the grouped GEMM "
                  "for prefill); quantize the checkpoint to NVFP4 (nibble quantize) for the fast MoE kernels");
    return d;
}

namespace {

// float32 words: sign and exponent from or_mask, random mantissa (and the bits and_mask lets through).
cuda::DeviceBuffer random_floats(int64_t n, uint64_t seed, uint32_t and_mask, uint32_t or_mask) {
    return random_buffer(static_cast<size_t>(n) * 4, seed, and_mask, or_mask);
}

}  // namespace

DeviceHybrid synthetic_hybrid(const ModelConfig& c, const SyntheticOptions& o) {
    check_hybrid_supported(c);
    NIBBLE_CHECK(!c.mlp_bias && !c.mamba.proj_bias, "synthetic models have no biases ({})", c.arch_name);
    NIBBLE_CHECK(o.nvfp4 || std::count(c.layer_kinds.begin(), c.layer_kinds.end(), LayerKind::Moe) == 0,
                 "synthetic {}: the CUDA MoE runs NVFP4 experts only (BF16 synthetic weights are not supported for "
                 "MoE models)", c.arch_name);
    DeviceHybrid d;
    d.config = c;
    uint64_t seed = o.seed * 1000003u;
    d.embed = random_buffer(static_cast<size_t>(c.vocab_size * c.n_embd * 2), ++seed, kBf16And, kBf16Or);
    const MambaConfig& mb = c.mamba;
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const LayerKind kind = c.layer_kinds[static_cast<size_t>(il)];
        const bool feeds_attention = il + 1 < c.n_layers && c.layer_kinds[static_cast<size_t>(il + 1)] == LayerKind::Attention;
        // ModelOpt's recipe: attention layers and the Mamba layer before each stay BF16.
        const bool nvfp4 = o.nvfp4 && kind != LayerKind::Attention && !(kind == LayerKind::Mamba && feeds_attention);
        DeviceHybridLayer L;
        L.kind = kind;
        const std::string p = fmt::format("backbone.layers.{}.mixer.", il);
        L.norm = ones(c.n_embd);
        switch (kind) {
            case LayerKind::Mamba:
                L.cache_index = d.n_mamba++;
                L.in_proj = random_linear(p + "in_proj", mb.in_proj_dim(), c.n_embd, nvfp4, seed);
                L.out_proj = random_linear(p + "out_proj", c.n_embd, mb.d_inner(), nvfp4, seed);
                // conv taps and bias +-(0.125..0.5); A -(1..2); D 1..2; dt_bias -(2..4): softplus 0.02..0.13.
                L.conv_w = random_floats(mb.conv_dim() * mb.conv_kernel, ++seed, 0x80ffffffu, 0x3e000000u);
                if (mb.conv_bias) L.conv_b = random_floats(mb.conv_dim(), ++seed, 0x80ffffffu, 0x3e000000u);
                L.A = random_floats(mb.n_heads, ++seed, 0x007fffffu, 0xbf800000u);
                L.D = random_floats(mb.n_heads, ++seed, 0x007fffffu, 0x3f800000u);
                L.dt_bias = random_floats(mb.n_heads, ++seed, 0x007fffffu, 0xc0000000u);
                L.gated_norm = ones(mb.d_inner());
                break;
            case LayerKind::Attention:
                L.cache_index = d.n_attention++;
                L.q = random_linear(p + "q_proj", q_dim, c.n_embd, nvfp4, seed);
                L.k = random_linear(p + "k_proj", kv_dim, c.n_embd, nvfp4, seed);
                L.v = random_linear(p + "v_proj", kv_dim, c.n_embd, nvfp4, seed);
                L.o = random_linear(p + "o_proj", c.n_embd, q_dim, nvfp4, seed);
                break;
            case LayerKind::Mlp:
                L.up = random_linear(p + "up_proj", c.n_ff, c.n_embd, nvfp4, seed);
                L.down = random_linear(p + "down_proj", c.n_embd, c.n_ff, nvfp4, seed);
                break;
            case LayerKind::Moe: {
                L.up = random_linear(p + "shared_experts.up_proj", c.moe.n_ff_shared, c.n_embd, nvfp4, seed);
                L.down = random_linear(p + "shared_experts.down_proj", c.n_embd, c.moe.n_ff_shared, nvfp4, seed);
                L.router = random_linear(p + "gate", c.moe.n_experts, c.n_embd, false, seed);
                L.correction_bias = random_floats(c.moe.n_experts, ++seed, 0x80ffffffu, 0x3c000000u);
                DeviceMoeExperts& e = L.experts;
                allocate_experts(e, c.moe.n_experts, c.n_embd, c.moe.n_ff, /*gated=*/false);
                cuda::fill_random_u32(e.packed.as<uint32_t>(), e.packed.bytes() / 4, ++seed, 0xffffffffu, 0u, nullptr);
                cuda::fill_random_u32(e.scales.as<uint32_t>(), e.scales.bytes() / 4, ++seed, kE4m3And, kE4m3Or, nullptr);
                set_expert_tables(e, std::vector<float>(static_cast<size_t>(2 * c.moe.n_experts), 0.25f));
                break;
            }
        }
        d.layers.push_back(std::move(L));
    }
    d.final_norm = ones(c.n_embd);
    d.lm_head = c.tied_embeddings ? tied_head(c, "lm_head (tied)", d.embed)
                                  : random_linear("lm_head", c.vocab_size, c.n_embd, o.nvfp4 && o.lm_head_nvfp4, seed);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    return d;
}

}  // namespace nibble::gpu
