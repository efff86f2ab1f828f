#include "engine/memory_plan.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>

#include <fmt/format.h>

#include "base/error.h"
#include "model/model.h"
#include "ops/moe/moe_workspace.h"
#include "ops/ssm/ssm_workspace.h"
#include "parallel/tensor_parallel.h"
#include "tensor/nvfp4.h"

namespace nibble {

namespace {

// "7.20 GiB", "512.00 KiB", "100 B": messages must say by how much at any scale.
std::string bytes_text(int64_t bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double b = static_cast<double>(bytes);
    int u = 0;
    while (std::fabs(b) >= 1024.0 && u < 4) {
        b /= 1024.0;
        ++u;
    }
    return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.2f} {}", b, units[u]);
}

std::string lower(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

}  // namespace

bool cuda_qkv_prepare_supported(int64_t head_dim, int64_t rotary_dim) {
    constexpr int64_t kQkvPrepareMaxHeadDim = 256;  // cuda::kQkvPrepareMaxHeadDim
    return head_dim > 0 && head_dim % 16 == 0 && head_dim <= kQkvPrepareMaxHeadDim && rotary_dim >= 0 &&
           rotary_dim % 8 == 0 && rotary_dim <= head_dim;
}

KvDtype resolve_kv_cache_dtype(std::string_view requested, const QuantConfig& quant, KvDtype unquantized) {
    if (requested == "auto") {
        switch (quant.kv_cache) {
            case KvCacheQuant::Fp8: return KvDtype::Fp8;
            case KvCacheQuant::Nvfp4: return KvDtype::Nvfp4;
            case KvCacheQuant::None: return unquantized;
        }
    }
    if (auto d = kv_dtype_from_name(requested)) return *d;
    fail("--kv-cache-dtype '{}' is not supported (supported: auto, bf16, fp8, nvfp4, f32; aliases bfloat16, "
         "fp8_e4m3, float32)",
         requested);
}

std::vector<std::pair<std::string, int64_t>> weight_bytes_by_format(const ModelConfig& config,
                                                                    const QuantConfig& quant,
                                                                    bool cuda_upload) {
    return weight_bytes_by_format(expected_weights(config), config, quant, cuda_upload);
}

std::vector<std::pair<std::string, int64_t>> weight_bytes_by_format(const std::vector<WeightSpec>& weights,
                                                                    const ModelConfig& config,
                                                                    const QuantConfig& quant,
                                                                    bool cuda_upload) {
    // The CUDA upload converts dense matrices to BF16 (PinnedUploader::copy_as_bf16) whatever the
    // checkpoint's dtype, and keeps vectors F32 (upload_floats).
    const int64_t dense_size = cuda_upload ? 2 : static_cast<int64_t>(dtype_size(config.dtype));
    const std::string dense_name = cuda_upload ? "bf16" : lower(dtype_name(config.dtype));
    std::map<std::string, int64_t> by;
    for (const WeightSpec& w : weights) {
        if (w.kind == WeightSpec::Kind::Dense) {
            if (cuda_upload) {
                // 2-D: the embeddings (d.embed) and NemotronH's router (upload_linear, BF16 even from an F32
                // checkpoint); the rest (norms, the Mamba mixer's conv1d, A_log, D, dt_bias, correction bias)
                // upload_floats.
                if (w.shape.ndim == 2)
                    by["bf16"] += w.shape.numel() * 2;
                else
                    by["f32"] += w.shape.numel() * 4;
            } else if (w.f32 || (w.f32_when_quantized && quant.method != QuantMethod::None)) {
                by["f32"] += w.shape.numel() * 4;
            } else {
                by[dense_name] += w.shape.numel() * dense_size;
            }
            continue;
        }
        const LinearSpec& l = w.linear;
        const int64_t nk = l.n_out * l.n_in;
        if (l.bias) {
            if (cuda_upload)
                by["f32"] += l.n_out * 4;  // DeviceLinear::bias, upload_floats
            else
                by[dense_name] += l.n_out * dense_size;
        }
        const bool quantized = quant.method != QuantMethod::None && !quant.is_excluded(l.module);
        const int64_t activation_scale = quant.weight_only ? 0 : 4;
        if (!quantized) {
            by[dense_name] += nk * dense_size;
            continue;
        }
        switch (quant.method) {
            case QuantMethod::ModelOptNvfp4:
            case QuantMethod::CompressedTensorsNvfp4:
                NIBBLE_CHECK(l.n_in % kNvfp4BlockSize == 0, "{}: input dimension {} is not a multiple of 16",
                             l.module, l.n_in);
                by["nvfp4"] += nk / 2 + nk / kNvfp4BlockSize + 4 + activation_scale;
                break;
            case QuantMethod::ModelOptFp8: by["fp8"] += nk + 4 + activation_scale; break;
            case QuantMethod::None: break;
        }
    }
    if (quant.kv_cache != KvCacheQuant::None) by["kv_scales"] += 8 * config.count_layers(LayerKind::Attention);
    std::vector<std::pair<std::string, int64_t>> out;
    for (const auto& [name, bytes] : by)
        if (bytes > 0) out.emplace_back(name, bytes);
    return out;
}

MemoryPlan plan_memory(const ModelConfig& c, const QuantConfig& quant, const PlanOptions& o) {
    MemoryPlan p;
    p.max_model_len = o.max_model_len == 0 ? c.max_position_embeddings : o.max_model_len;
    p.max_num_seqs = o.max_num_seqs;
    p.max_num_batched_tokens = o.max_num_batched_tokens;
    p.block_size = o.block_size;
    p.device_memory = o.device_memory;
    NIBBLE_CHECK(p.max_model_len > 0, "--max-model-len must be positive, got {}", p.max_model_len);
    NIBBLE_CHECK(p.max_model_len <= c.max_position_embeddings,
                 "--max-model-len {} exceeds the model's max_position_embeddings {}", p.max_model_len,
                 c.max_position_embeddings);
    NIBBLE_CHECK(o.max_num_seqs > 0, "--max-num-seqs must be positive, got {}", o.max_num_seqs);
    NIBBLE_CHECK(o.max_num_batched_tokens > 0, "--max-num-batched-tokens must be positive, got {}",
                 o.max_num_batched_tokens);
    NIBBLE_CHECK(o.block_size > 0, "--block-size must be positive, got {}", o.block_size);
    NIBBLE_CHECK(o.gpu_memory_utilization > 0 && o.gpu_memory_utilization <= 1,
                 "--gpu-memory-utilization must be in (0, 1], got {}", o.gpu_memory_utilization);
    NIBBLE_CHECK(o.kv_cache_memory_bytes >= 0, "--kv-cache-memory-bytes must not be negative");
    NIBBLE_CHECK(o.device_memory > 0, "device memory must be positive, got {}", o.device_memory);
    check_tensor_parallel(c, o.tensor_parallel_size);

    const int64_t tp = o.tensor_parallel_size;
    p.tensor_parallel_size = tp;
    for (const auto& [name, bytes] : weight_bytes_by_format(c, quant, o.cuda_forward))
        p.model_weights_bytes += bytes;
    // Per GPU: rank 0's share (the largest) and the widths its blocks run with.
    ModelConfig rank = c;
    if (tp == 1) {
        p.weights_by_format = weight_bytes_by_format(c, quant, o.cuda_forward);
    } else {
        check_tensor_parallel_quant(c, quant, tp);
        rank = rank_config(c, tensor_parallel_layout(c, tp, 0));
        p.weights_by_format =
            weight_bytes_by_format(llama_rank_expected_weights(c, tp, 0), c, quant, o.cuda_forward);
    }
    for (const auto& [name, bytes] : p.weights_by_format) p.weights_bytes += bytes;
    bool any_moe = c.has_layer(LayerKind::Moe);
    for (int64_t il = 0; il < c.n_layers && !any_moe; ++il) any_moe = c.is_moe_layer(il);

    const int64_t t = o.max_num_batched_tokens;
    const int64_t q_dim = rank.n_heads * rank.head_dim, kv_dim = rank.n_kv_heads * rank.head_dim;
    const int64_t logit_rows = std::min(o.max_num_seqs, t);
    // A MoE layer's shared expert (Qwen2-MoE's; NemotronH's too) runs through the MLP's hidden rows,
    // widening them when it is the wider, and keeps its output rows [t, n_embd] beside the routed sum until
    // the combine adds them: the rule gpu/decoder_forward.cpp allocates by (gpu/hybrid_forward.cpp holds
    // one hidden buffer).
    const bool shared_expert = any_moe && c.moe.n_shared_experts > 0;
    const int64_t mlp_ff = shared_expert ? std::max(rank.n_ff, c.moe.n_ff_shared) : rank.n_ff;
    const int64_t shared_rows = shared_expert ? rank.n_embd : 0;
    p.activation_bytes = t * (3 * rank.n_embd + 2 * q_dim + 2 * kv_dim + 2 * mlp_ff + shared_rows) * 4;
    // With tp > 1 the all-gather's [tp, rows, ceil(vocab / tp)] buffer sits beside the assembled logits.
    const int64_t gather_width = tp == 1 ? 0 : tp * ((c.vocab_size + tp - 1) / tp);
    p.logits_bytes = logit_rows * (c.vocab_size + gather_width + c.n_embd) * 4;
    p.attention_scratch_bytes = logit_rows * rank.n_heads * kAttentionSplits * (rank.head_dim + 2) * 4;
    if (any_moe) {  // router logits [t, n_experts], chosen experts [t, top_k] int32 and their weights float32
        const MoeConfig& e = c.moe;
        p.activation_bytes += t * (e.n_experts + 2 * e.top_k) * 4;
        if (o.cuda_forward)
            p.moe_workspace_bytes =
                static_cast<int64_t>(moe_workspace_layout(t, e.top_k, e.n_experts, rank.n_embd, e.n_ff).total);
    }
    // The CUDA hybrid forward (NemotronH) has no dequantization pipeline nor fused q/k/v GEMM, and copies the
    // router's input rows to float32 (gpu/hybrid_forward.cpp router_in_ [t, hidden] F32, and identity_rows_
    // [t] int32 that gather them).
    const bool hybrid = c.arch == Arch::NemotronH;
    if (o.cuda_forward && hybrid && c.has_layer(LayerKind::Moe))
        p.activation_bytes += t * (rank.n_embd + 1) * 4;
    if (o.cuda_forward && t > kCudaGemvMaxRows) {
        // The decoder linears the GEMMs run (not the experts, not the lm_head, which always runs the GEMV):
        // DeviceDecoder::max_linear_elems / DeviceHybrid::max_linear_elems (which counts NemotronH's router).
        const std::vector<WeightSpec> specs =
            tp == 1 ? expected_weights(c) : llama_rank_expected_weights(c, tp, 0);
        std::map<std::string, const LinearSpec*> by_module;
        int64_t largest = 0;
        bool quantized = false;
        for (const WeightSpec& w : specs) {
            if (hybrid && w.kind == WeightSpec::Kind::Dense && w.name.ends_with(".mixer.gate.weight"))
                largest = std::max(largest, w.shape.numel());
            const LinearSpec& l = w.linear;
            if (w.kind != WeightSpec::Kind::Linear || l.module == "lm_head" ||
                l.module.find(".experts.") != std::string::npos)
                continue;
            by_module[l.module] = &l;
            largest = std::max(largest, l.n_out * l.n_in);
            quantized |= quant.method != QuantMethod::None && !quant.is_excluded(l.module);
        }
        // DecoderForward::plan_fused_qkv: layers whose q, k and v are all quantized run one GEMM over their
        // stacked BF16 copies when the fused q/k norm + RoPE kernel takes the head. Their global scales must
        // match too, which only the checkpoint tells: the plan assumes they do (the larger count).
        int64_t qkv_width = 0, stacked_qkv = 0;
        bool qkv_biased = false;
        const int64_t rotary_dim =
            static_cast<int64_t>(static_cast<float>(rank.head_dim) * c.rope.partial_rotary_factor);
        if (!hybrid && quant.method != QuantMethod::None &&
            cuda_qkv_prepare_supported(rank.head_dim, rotary_dim)) {
            const std::string q_suffix = "self_attn.q_proj";
            for (const auto& [module, q] : by_module) {
                if (!module.ends_with(q_suffix)) continue;
                const std::string prefix =
                    module.substr(0, module.size() - std::string_view("q_proj").size());
                const auto k = by_module.find(prefix + "k_proj"), v = by_module.find(prefix + "v_proj");
                if (k == by_module.end() || v == by_module.end() || quant.is_excluded(module) ||
                    quant.is_excluded(k->first) || quant.is_excluded(v->first))
                    continue;
                qkv_width = q->n_out + k->second->n_out + v->second->n_out;
                stacked_qkv = std::max(stacked_qkv, qkv_width * q->n_in);
                qkv_biased |= q->bias || k->second->bias || v->second->bias;
            }
        }
        int64_t bytes = kCublasLtWorkspaceBytes;
        if (quantized) bytes += largest * 2;  // GemmContext's dequantization scratch, [largest] BF16
        // DequantPipeline's two buffers, [max(largest, stacked q/k/v)] BF16 each.
        if (quantized && !hybrid) bytes += 2 * std::max(largest, stacked_qkv) * 2;
        if (stacked_qkv > 0) {
            // DecoderForward::qkv_ [t, q_dim + 2 kv_dim] BF16 (the GEMM path runs BF16 activations only), and
            // with biases DecoderForward::qkv_bias_ [n_layers, q_dim + 2 kv_dim] F32.
            bytes += t * qkv_width * 2;
            if (qkv_biased) bytes += c.n_layers * qkv_width * 4;
        }
        p.gemm_scratch_bytes = bytes;
    }
    // Hybrid models: the Mamba mixer's rows (in_proj output, conv output, scan output), and one recurrent
    // state per sequence that may run (conv float32 + SSM in --mamba-ssm-cache-dtype), held beside the KV.
    const int64_t kv_layers = c.count_layers(LayerKind::Attention);
    if (c.has_layer(LayerKind::Mamba)) {
        const MambaConfig& mb = c.mamba;
        p.activation_bytes += t * (mb.in_proj_dim() + mb.conv_dim() + mb.d_inner()) * 4;
        const MambaStateShape st{.n_layers = c.count_layers(LayerKind::Mamba),
                                 .conv_rows = mb.conv_kernel - 1,
                                 .conv_dim = mb.conv_dim(),
                                 .n_heads = mb.n_heads,
                                 .head_dim = mb.head_dim,
                                 .state_size = mb.state_size,
                                 .ssm_dtype = o.mamba_ssm_cache_dtype};
        p.mamba_state_bytes_per_seq = st.bytes();
        p.mamba_state_bytes = o.max_num_seqs * st.bytes();
        if (o.cuda_forward) p.ssm_scratch_bytes = kSsdScanMaxWorkspaceBytes + st.bytes();
        NIBBLE_CHECK(o.mamba_prefix_snapshots >= -1, "--mamba-prefix-snapshots must be -1 (auto) or more, got {}",
                     o.mamba_prefix_snapshots);
        if (o.mamba_prefix_snapshots >= 0) {  // a given count is fixed memory; auto is taken from the KV below
            p.mamba_snapshots = o.mamba_prefix_snapshots;
            p.mamba_snapshot_bytes = p.mamba_snapshots * st.bytes();
        }
    }

    p.kv_dtype = resolve_kv_cache_dtype(o.kv_cache_dtype, quant, o.auto_kv_dtype);
    const KvCacheShape shape{.n_layers = kv_layers,
                             .n_blocks = 0,
                             .block_size = o.block_size,
                             .n_kv_heads = rank.n_kv_heads,
                             .head_dim = c.head_dim,
                             .dtype = p.kv_dtype,
                             .k_scales = {},
                             .v_scales = {}};
    NIBBLE_CHECK(p.kv_dtype != KvDtype::Nvfp4 || c.head_dim % kNvfp4BlockSize == 0,
                 "--kv-cache-dtype nvfp4 needs head_dim to be a multiple of {}, the model's is {}", kNvfp4BlockSize,
                 c.head_dim);
    p.kv_bytes_per_token = shape.bytes_per_token();
    p.kv_block_bytes = 2 * kv_layers * shape.block_bytes();

    p.usable_memory = static_cast<int64_t>(std::floor(o.gpu_memory_utilization * static_cast<double>(o.device_memory)));
    const int64_t fixed = p.weights_bytes + p.workspace_bytes() + p.mamba_state_bytes + p.mamba_snapshot_bytes;
    // "weights W + workspace X [+ Mamba state Y [+ Mamba state snapshots Z]]" for the messages below.
    const std::string fixed_text =
        fmt::format("weights {} + workspace {}{}{}", bytes_text(p.weights_bytes), bytes_text(p.workspace_bytes()),
                    p.mamba_state_bytes > 0 ? " + Mamba state " + bytes_text(p.mamba_state_bytes) : std::string(),
                    p.mamba_snapshot_bytes > 0 ? " + Mamba state snapshots " + bytes_text(p.mamba_snapshot_bytes)
                                               : std::string());
    if (o.kv_cache_memory_bytes > 0) {
        p.kv_cache_bytes = o.kv_cache_memory_bytes;
        NIBBLE_CHECK(fixed + p.kv_cache_bytes <= o.device_memory,
                     "the plan does not fit: {} + --kv-cache-memory-bytes {} exceed the device's {} by {}", fixed_text,
                     bytes_text(p.kv_cache_bytes), bytes_text(o.device_memory),
                     bytes_text(fixed + p.kv_cache_bytes - o.device_memory));
    } else {
        NIBBLE_CHECK(fixed < p.usable_memory, "the plan does not fit: {} exceed the usable {} ({} x {}) by {}",
                     fixed_text, bytes_text(p.usable_memory), o.gpu_memory_utilization, bytes_text(o.device_memory),
                     bytes_text(fixed - p.usable_memory));
        p.kv_cache_bytes = p.usable_memory - fixed;
    }
    if (p.mamba_state_bytes_per_seq > 0 && o.mamba_prefix_snapshots < 0) {
        // Auto: at most an eighth of the KV budget in whole states, at most one per sequence slot, so that a
        // plan that fits without prefix caching still fits with it (a snapshot weighs thousands of tokens' KV).
        p.mamba_snapshots = std::min(o.max_num_seqs, p.kv_cache_bytes / 8 / p.mamba_state_bytes_per_seq);
        p.mamba_snapshot_bytes = p.mamba_snapshots * p.mamba_state_bytes_per_seq;
        p.kv_cache_bytes -= p.mamba_snapshot_bytes;
    }
    p.kv_blocks = p.kv_cache_bytes / p.kv_block_bytes;
    p.kv_tokens = p.kv_blocks * o.block_size;
    p.max_concurrency = static_cast<double>(p.kv_tokens) / static_cast<double>(p.max_model_len);
    if (p.kv_tokens < p.max_model_len) {
        const int64_t short_tokens = p.max_model_len - p.kv_tokens;
        fail("the plan does not fit: the KV cache ({} {}) holds {} tokens, {} fewer than one --max-model-len {} "
             "sequence (about {} more KV memory needed; lower --max-model-len, use a smaller --kv-cache-dtype or "
             "raise --gpu-memory-utilization)",
             bytes_text(p.kv_cache_bytes), kv_dtype_name(p.kv_dtype), p.kv_tokens, short_tokens, p.max_model_len,
             bytes_text(short_tokens * p.kv_bytes_per_token));
    }
    return p;
}

}  // namespace nibble
