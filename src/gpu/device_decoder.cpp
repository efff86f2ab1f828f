#include "gpu/device_decoder.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "cuda/fill_random.h"
#include "model/real_shapes.h"
#include "ops/attention/attention_cuda.h"
#include "ops/rope/rope.h"

namespace nibble::gpu {

int64_t DeviceLinear::stored_bytes() const {
    switch (format) {
        case WeightFormat::Dense: return n_out * n_in * 2;
        case WeightFormat::Fp8: return n_out * n_in;
        case WeightFormat::Nvfp4: return n_out * n_in / 2 + n_out * n_in / 16;
    }
    return 0;
}

cuda::MoeDeviceExperts DeviceMoeExperts::device() const {
    if (bf16.bytes() != 0) {
        const auto* b = bf16.as<const uint16_t>();
        const int64_t per_kind = n_experts * n_ff * n_embd;  // elements of one matrix kind, all experts
        const uint16_t* up = b + (n_mats - 2) * per_kind;
        return {.n_experts = n_experts, .n_embd = n_embd, .n_ff = n_ff, .bf16_gate = n_mats == 3 ? b : nullptr,
                .bf16_up = up, .bf16_down = up + per_kind};
    }
    const auto* t = tables.as<const cuda::Nvfp4DeviceWeight>();
    const auto* up = t + (n_mats - 2) * n_experts;  // after the gates, when there are
    return {.gate = n_mats == 3 ? t : nullptr, .up = up, .down = up + n_experts, .n_experts = n_experts,
            .n_embd = n_embd, .n_ff = n_ff};
}

void allocate_experts(DeviceMoeExperts& e, int64_t n_experts, int64_t n_embd, int64_t n_ff, bool gated) {
    e.n_experts = n_experts;
    e.n_embd = n_embd;
    e.n_ff = n_ff;
    e.n_mats = gated ? 3 : 2;
    e.packed = cuda::DeviceBuffer(static_cast<size_t>(e.n_mats * n_experts * n_ff * n_embd / 2));
    e.scales = cuda::DeviceBuffer(static_cast<size_t>(e.n_mats * n_experts * n_ff * n_embd / 16));
}

void allocate_bf16_experts(DeviceMoeExperts& e, int64_t n_experts, int64_t n_embd, int64_t n_ff, bool gated) {
    e.n_experts = n_experts;
    e.n_embd = n_embd;
    e.n_ff = n_ff;
    e.n_mats = gated ? 3 : 2;
    e.bf16 = cuda::DeviceBuffer(static_cast<size_t>(e.n_mats * n_experts * n_ff * n_embd * 2));
}

void set_expert_tables(DeviceMoeExperts& e, const std::vector<float>& global_scales) {
    NIBBLE_CHECK(static_cast<int64_t>(global_scales.size()) == e.n_mats * e.n_experts,
                 "MoE expert tables: {} global scales for {} x {} experts", global_scales.size(), e.n_mats,
                 e.n_experts);
    const int64_t elems = e.n_ff * e.n_embd;
    std::vector<cuda::Nvfp4DeviceWeight> host(static_cast<size_t>(e.n_mats * e.n_experts));
    for (int64_t i = 0; i < e.n_mats * e.n_experts; ++i) {
        const bool down = i >= (e.n_mats - 1) * e.n_experts;
        host[static_cast<size_t>(i)] = {.packed = e.packed.as<uint8_t>() + i * (elems / 2),
                                        .scales = e.scales.as<uint8_t>() + i * (elems / 16),
                                        .global_scale = global_scales[static_cast<size_t>(i)],
                                        .n = down ? e.n_embd : e.n_ff,
                                        .k = down ? e.n_ff : e.n_embd};
    }
    e.tables = cuda::DeviceBuffer(host.size() * sizeof(cuda::Nvfp4DeviceWeight));
    e.tables.upload(host.data(), e.tables.bytes());
}

namespace {

// Every linear layer a token passes through densely: attention, the dense MLP (empty in MoE layers), the
// router; not the experts (top_k of them per token) nor the lm_head.
std::vector<const DeviceLinear*> linears(const DeviceDecoder& d) {
    std::vector<const DeviceLinear*> all;
    for (const DeviceDecoderLayer& L : d.layers)
        for (const DeviceLinear* w : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down, &L.router, &L.shared_gate,
                                      &L.shared_up, &L.shared_down, &L.shared_expert_gate})
            all.push_back(w);
    return all;
}

// per_expert times the experts a token runs here: top_k, or on a rank holding E_r of the E experts
// top_k E_r / E (uniform routing's average; exactly top_k when it holds them all).
int64_t routed_share(const ModelConfig& c, const DeviceMoeExperts& e, int64_t per_expert) {
    if (e.n_experts >= c.moe.n_experts) return std::min(c.moe.top_k, e.n_experts) * per_expert;
    return c.moe.top_k * e.n_experts * per_expert / std::max<int64_t>(c.moe.n_experts, 1);
}

}  // namespace

double DeviceMoeExperts::expected_active(int64_t total, int64_t top_k, int64_t tokens) const {
    const double pick =
        total > 0 ? std::min(1.0, static_cast<double>(top_k) / static_cast<double>(total)) : 1.0;
    return static_cast<double>(n_experts) * (1.0 - std::pow(1.0 - pick, static_cast<double>(tokens)));
}

double DeviceDecoder::streamed_bytes_per_step(int64_t tokens) const {
    double total = static_cast<double>(lm_head.stored_bytes());
    for (const DeviceLinear* w : linears(*this)) total += static_cast<double>(w->stored_bytes());
    for (const DeviceDecoderLayer& L : layers)
        if (L.moe)
            total += L.experts.expected_active(config.moe.n_experts, config.moe.top_k, tokens) *
                     static_cast<double>(L.experts.expert_bytes());
    return total;
}

int64_t DeviceDecoder::active_linear_params() const {
    int64_t total = 0;
    for (const DeviceLinear* w : linears(*this)) total += w->n_out * w->n_in;
    for (const DeviceDecoderLayer& L : layers)
        if (L.moe) total += routed_share(config, L.experts, L.experts.n_mats * L.experts.n_ff * L.experts.n_embd);
    return total;
}

int64_t DeviceDecoder::device_bytes() const {
    int64_t total = static_cast<int64_t>(embed.bytes()) + (config.tied_embeddings ? 0 : lm_head.stored_bytes());
    for (const DeviceLinear* w : linears(*this)) total += w->stored_bytes();
    for (const DeviceDecoderLayer& L : layers) total += L.experts.bytes();
    return total;
}

bool DeviceDecoder::has_moe() const {
    return std::any_of(layers.begin(), layers.end(), [](const DeviceDecoderLayer& L) { return L.moe; });
}

bool DeviceDecoder::has_dense_mlp() const {
    return std::any_of(layers.begin(), layers.end(), [](const DeviceDecoderLayer& L) { return !L.moe; });
}

int64_t DeviceDecoder::max_linear_elems() const {
    int64_t most = 0;
    for (const DeviceLinear* w : linears(*this)) most = std::max(most, w->n_out * w->n_in);
    return most;
}

void check_decoder_supported(const ModelConfig& c) {
    const bool dense_family = c.arch == Arch::Llama || c.arch == Arch::Mistral || c.arch == Arch::Qwen2 ||
                              c.arch == Arch::Qwen3;
    const bool moe = c.arch == Arch::Qwen3Moe || c.arch == Arch::Qwen2Moe;
    NIBBLE_CHECK(dense_family || moe,
                 "the CUDA backend runs the llama family (Llama, Mistral, Qwen2, Qwen3), Qwen3-MoE and Qwen2-MoE so "
                 "far; {} is served by the CPU backend (--device cpu)", c.arch_name);
    bool any_dense_mlp = !moe;
    if (moe) {
        const MoeConfig& e = c.moe;
        NIBBLE_CHECK(e.n_shared_experts <= 1 && e.scoring == MoeScoring::Softmax && e.gated_experts,
                     "the CUDA MoE runs a softmax router over SwiGLU experts with at most one shared expert ({})",
                     c.arch_name);
        NIBBLE_CHECK(e.n_shared_experts == 0 || (e.n_ff_shared > 0 && e.n_ff_shared % 32 == 0),
                     "the CUDA matmuls need shared_expert_intermediate_size a multiple of 32, not {}", e.n_ff_shared);
        NIBBLE_CHECK(e.n_experts >= 1 && e.n_experts <= 1024 && e.top_k >= 1 && e.top_k <= 32 && e.top_k <= e.n_experts,
                     "the CUDA MoE takes 1..1024 experts and top_k 1..32 (at most the experts); this model has {} "
                     "experts, top_k {}", e.n_experts, e.top_k);
        NIBBLE_CHECK(e.n_ff % 32 == 0, "the CUDA MoE needs moe_intermediate_size a multiple of 32, not {}", e.n_ff);
        for (int64_t il = 0; il < c.n_layers; ++il) any_dense_mlp |= !c.is_moe_layer(il);
    }
    NIBBLE_CHECK(cuda::paged_attention_head_dim_supported(c.head_dim),
                 "the CUDA attention kernels take head_dim 16, 32, 64, 128 or 256; this model has {}", c.head_dim);
    NIBBLE_CHECK(c.n_heads % c.n_kv_heads == 0 && c.n_heads / c.n_kv_heads <= 32,
                 "the CUDA attention kernels take at most 32 query heads per KV head ({} / {})", c.n_heads,
                 c.n_kv_heads);
    NIBBLE_CHECK(c.n_embd % 32 == 0 && (!any_dense_mlp || c.n_ff % 32 == 0) && (c.n_heads * c.head_dim) % 32 == 0,
                 "the CUDA matmuls need widths that are multiples of 32 (hidden {}, intermediate {}, q {})", c.n_embd,
                 c.n_ff, c.n_heads * c.head_dim);
    NIBBLE_CHECK(c.rope.partial_rotary_factor == 1.0f, "the CUDA backend rotates the whole head (partial_rotary_factor {})",
                 c.rope.partial_rotary_factor);
}

void check_decoder_supported(const ModelConfig& c, const DecoderView& view, int64_t experts_held) {
    const int64_t held = experts_held > 0 ? experts_held : c.moe.n_experts;
    check_decoder_supported(c);
    NIBBLE_CHECK(static_cast<int64_t>(view.layers.size()) == c.n_layers, "decoder view has {} layers, config {}",
                 view.layers.size(), c.n_layers);
    for (size_t il = 0; il < view.layers.size(); ++il) {
        const DecoderLayerView& L = view.layers[il];
        NIBBLE_CHECK(L.moe() == c.is_moe_layer(static_cast<int64_t>(il)),
                     "decoder view: layer {} is {} but the config makes it {}", il, L.moe() ? "MoE" : "dense",
                     L.moe() ? "dense" : "MoE");
        if (!L.moe()) continue;
        // The router runs as a BF16 GEMV / GEMM (as transformers runs it in the model's dtype).
        NIBBLE_CHECK(L.router->format == WeightFormat::Dense,
                     "{}: the CUDA backend runs the MoE router unquantized (BF16), this one is {}", L.router->name,
                     weight_format_name(L.router->format));
        // NVFP4 experts, or dense ones (rounded to BF16 on upload); one format for all of a layer's experts.
        const WeightFormat experts_format =
            L.expert_up.empty() ? WeightFormat::Nvfp4 : L.expert_up.front()->format;
        for (const auto* list : {&L.expert_gate, &L.expert_up, &L.expert_down}) {
            NIBBLE_CHECK(static_cast<int64_t>(list->size()) == held,
                         "{}: the view holds {} experts, expected {} (of the config's {})", L.router->name,
                         list->size(), held, c.moe.n_experts);
            for (const LinearWeight* w : *list) {
                NIBBLE_CHECK(w->format == WeightFormat::Nvfp4 || w->format == WeightFormat::Dense,
                             "{}: the CUDA backend runs MoE experts in NVFP4 or BF16, this one is {} (quantize the "
                             "checkpoint to NVFP4, or serve it with --device cpu)",
                             w->name, weight_format_name(w->format));
                NIBBLE_CHECK(w->format == experts_format,
                             "{}: the CUDA backend needs one format for a layer's experts, this one is {}, the "
                             "first {}", w->name, weight_format_name(w->format), weight_format_name(experts_format));
            }
        }
        const bool want_shared = c.moe.n_shared_experts > 0;
        NIBBLE_CHECK(L.has_shared_expert() == want_shared, "{}: the view {} a shared expert, the config {}",
                     L.router->name, L.has_shared_expert() ? "has" : "lacks", want_shared ? "has one" : "none");
        if (!want_shared) continue;
        NIBBLE_CHECK(L.shared_gate != nullptr && L.shared_down != nullptr,
                     "{}: the shared expert lacks its gate_proj or down_proj", L.router->name);
        NIBBLE_CHECK((L.shared_expert_gate != nullptr) == c.moe.shared_expert_gate,
                     "{}: the view {} a shared_expert_gate, the config {}", L.router->name,
                     L.shared_expert_gate != nullptr ? "has" : "lacks", c.moe.shared_expert_gate ? "has one" : "none");
        if (const LinearWeight* g = L.shared_expert_gate) {
            NIBBLE_CHECK(g->format == WeightFormat::Dense && g->n_out == 1 && g->n_in == c.n_embd && g->bias.empty(),
                         "{}: the CUDA backend runs the shared expert's gate as an unquantized [1, {}] vector without "
                         "bias, this one is {} [{}, {}]{}", g->name, c.n_embd, weight_format_name(g->format),
                         g->n_out, g->n_in, g->bias.empty() ? "" : " with bias");
        }
    }
}

cuda::DeviceBuffer random_buffer(size_t bytes, uint64_t seed, uint32_t and_mask, uint32_t or_mask) {
    cuda::DeviceBuffer b((bytes + 3) / 4 * 4);
    cuda::fill_random_u32(b.as<uint32_t>(), b.bytes() / 4, seed, and_mask, or_mask, nullptr);
    return b;
}

DeviceLinear random_linear(const std::string& name, int64_t n_out, int64_t n_in, bool nvfp4, uint64_t& seed) {
    DeviceLinear w;
    w.name = name;
    w.n_out = n_out;
    w.n_in = n_in;
    if (nvfp4) {
        w.format = WeightFormat::Nvfp4;
        w.storage = random_buffer(static_cast<size_t>(n_out * n_in / 2), ++seed, 0xffffffffu, 0u);
        w.scale_storage = random_buffer(static_cast<size_t>(n_out * n_in / 16), ++seed, kE4m3And, kE4m3Or);
        w.scale = 0.25f;
    } else {
        w.format = WeightFormat::Dense;
        w.storage = random_buffer(static_cast<size_t>(n_out * n_in * 2), ++seed, kBf16And, kBf16Or);
    }
    w.data = w.storage.get();
    return w;
}

cuda::DeviceBuffer ones(int64_t n) {
    return random_buffer(static_cast<size_t>(n) * 4, 0, 0u, 0x3f800000u);  // float 1.0
}

namespace {

// synthetic_decoder with each MoE layer holding experts_held experts (a tensor-parallel rank's share); the
// routers drawn from router_seed, the same on every rank.
DeviceDecoder synthetic_decoder_holding(const ModelConfig& c, const SyntheticOptions& o, int64_t experts_held,
                                        uint64_t router_seed) {
    check_decoder_supported(c);
    NIBBLE_CHECK(!c.qkv_bias && !c.o_bias && !c.mlp_bias, "synthetic models have no biases ({})", c.arch_name);
    DeviceDecoder d;
    d.config = c;
    uint64_t seed = o.seed * 1000003u;
    d.embed = random_buffer(static_cast<size_t>(c.vocab_size * c.n_embd * 2), ++seed, kBf16And, kBf16Or);
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    for (int64_t il = 0; il < c.n_layers; ++il) {
        DeviceDecoderLayer L;
        const std::string p = fmt::format("model.layers.{}.", il);
        L.attn_norm = ones(c.n_embd);
        L.mlp_norm = ones(c.n_embd);
        if (c.qk_norm) {
            L.q_norm = ones(c.head_dim);
            L.k_norm = ones(c.head_dim);
        }
        L.q = random_linear(p + "self_attn.q_proj", q_dim, c.n_embd, o.nvfp4, seed);
        L.k = random_linear(p + "self_attn.k_proj", kv_dim, c.n_embd, o.nvfp4, seed);
        L.v = random_linear(p + "self_attn.v_proj", kv_dim, c.n_embd, o.nvfp4, seed);
        L.o = random_linear(p + "self_attn.o_proj", c.n_embd, q_dim, o.nvfp4, seed);
        if (c.is_moe_layer(il)) {
            L.moe = true;
            // Apart from the per-rank stream above: a tensor-parallel rank's router equals every other's.
            uint64_t shared_seed = (router_seed + 0x5bd1e995u) * 2654435761u + static_cast<uint64_t>(il) * 2;
            L.router = random_linear(p + "mlp.gate", c.moe.n_experts, c.n_embd, false, shared_seed);
            DeviceMoeExperts& e = L.experts;
            if (o.nvfp4) {
                allocate_experts(e, experts_held, c.n_embd, c.moe.n_ff);
                cuda::fill_random_u32(e.packed.as<uint32_t>(), e.packed.bytes() / 4, ++seed, 0xffffffffu, 0u, nullptr);
                cuda::fill_random_u32(e.scales.as<uint32_t>(), e.scales.bytes() / 4, ++seed, kE4m3And, kE4m3Or,
                                      nullptr);
                set_expert_tables(e, std::vector<float>(static_cast<size_t>(3 * experts_held), 0.25f));
            } else {  // a BF16 checkpoint's experts
                allocate_bf16_experts(e, experts_held, c.n_embd, c.moe.n_ff, /*gated=*/true);
                cuda::fill_random_u32(e.bf16.as<uint32_t>(), e.bf16.bytes() / 4, ++seed, kBf16And, kBf16Or, nullptr);
            }
            if (c.moe.n_shared_experts > 0) {  // Qwen2-MoE's shared expert, quantized as the other linears
                L.shared_gate = random_linear(p + "mlp.shared_expert.gate_proj", c.moe.n_ff_shared, c.n_embd, o.nvfp4,
                                              seed);
                L.shared_up = random_linear(p + "mlp.shared_expert.up_proj", c.moe.n_ff_shared, c.n_embd, o.nvfp4, seed);
                L.shared_down = random_linear(p + "mlp.shared_expert.down_proj", c.n_embd, c.moe.n_ff_shared, o.nvfp4,
                                              seed);
                if (c.moe.shared_expert_gate)
                    L.shared_expert_gate = random_linear(p + "mlp.shared_expert_gate", 1, c.n_embd, false, seed);
            }
        } else {
            L.gate = random_linear(p + "mlp.gate_proj", c.n_ff, c.n_embd, o.nvfp4, seed);
            L.up = random_linear(p + "mlp.up_proj", c.n_ff, c.n_embd, o.nvfp4, seed);
            L.down = random_linear(p + "mlp.down_proj", c.n_embd, c.n_ff, o.nvfp4, seed);
        }
        d.layers.push_back(std::move(L));
    }
    d.final_norm = ones(c.n_embd);
    if (c.tied_embeddings) {
        d.lm_head.name = "lm_head (tied)";
        d.lm_head.format = WeightFormat::Dense;
        d.lm_head.n_out = c.vocab_size;
        d.lm_head.n_in = c.n_embd;
        d.lm_head.data = d.embed.get();
    } else {
        d.lm_head = random_linear("lm_head", c.vocab_size, c.n_embd, o.nvfp4 && o.lm_head_nvfp4, seed);
    }
    const RopeTable rope = make_rope_table(c.rope, c.head_dim);
    d.rotary_dim = rope.rotary_dim;
    d.inv_freq = cuda::DeviceBuffer(rope.inv_freq.size() * sizeof(float));
    d.inv_freq.upload(rope.inv_freq.data(), d.inv_freq.bytes());
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    return d;
}

}  // namespace

DeviceDecoder synthetic_decoder(const ModelConfig& c, const SyntheticOptions& o) {
    return synthetic_decoder_holding(c, o, c.moe.n_experts, o.seed);
}

DeviceDecoder synthetic_decoder_rank(const ModelConfig& c, const SyntheticOptions& o, int64_t tp_size, int64_t rank) {
    check_tensor_parallel(c, tp_size);
    const TensorParallelLayout layout = tensor_parallel_layout(c, tp_size, rank);
    SyntheticOptions ro = o;
    ro.seed = o.seed + static_cast<uint64_t>(rank) * 7919;
    DeviceDecoder d = synthetic_decoder_holding(rank_config(c, layout), ro, layout.experts.size(), o.seed);
    d.tp = layout;
    d.full_vocab = c.vocab_size;
    return d;
}

std::vector<std::string> synthetic_config_names() {
    // The published shapes (model/real_shapes.h) this backend runs: all of them (Nemotron-3-Nano through
    // synthetic_hybrid).
    return real_shape_names();
}

ModelConfig synthetic_config(const std::string& name) {
    const std::vector<std::string> names = synthetic_config_names();
    if (std::find(names.begin(), names.end(), name) == names.end()) {
        std::string known;
        for (const std::string& n : names) known += (known.empty() ? "" : ", ") + n;
        fail("--synthetic {}: not a shape the CUDA backend runs (known: {})", name, known);
    }
    return real_shape_config(name);
}

}  // namespace nibble::gpu
