#include "parallel/tensor_parallel.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/error.h"
#include "model/llama.h"
#include "tensor/nvfp4.h"

namespace nibble {

std::string_view shard_kind_name(ShardKind kind) {
    switch (kind) {
        case ShardKind::Replicated: return "replicated";
        case ShardKind::ColumnParallel: return "column-parallel";
        case ShardKind::RowParallel: return "row-parallel";
        case ShardKind::VocabParallel: return "vocabulary-parallel";
    }
    return "?";
}

namespace {


// Rank r's equal share of n items split N ways (N divides n).
IndexRange even_share(int64_t n, int64_t tp_size, int64_t rank) {
    return {rank * n / tp_size, (rank + 1) * n / tp_size};
}

// Bytes of one stored row of a weight with `n_in` inputs (the packed data; NVFP4's scales are separate).
int64_t row_bytes(const LinearWeight& w, int64_t n_in) {
    switch (w.format) {
        case WeightFormat::Dense: return n_in * static_cast<int64_t>(dtype_size(w.dtype));
        case WeightFormat::Fp8: return n_in;
        case WeightFormat::Nvfp4: return n_in / 2;
    }
    return 0;
}

}  // namespace

bool has_tensor_parallel_split(Arch arch) {
    return arch == Arch::Llama || arch == Arch::Mistral || arch == Arch::Qwen2 || arch == Arch::Qwen3 ||
           arch == Arch::Qwen3Moe;
}

bool has_dense_mlp_layer(const ModelConfig& c) {
    for (int64_t il = 0; il < c.n_layers; ++il)
        if (!c.is_moe_layer(il)) return true;
    return false;
}

void check_tensor_parallel(const ModelConfig& c, int64_t tp_size) {
    NIBBLE_CHECK(tp_size >= 1, "--tensor-parallel-size must be at least 1, got {}", tp_size);
    if (tp_size == 1) return;
    NIBBLE_CHECK(has_tensor_parallel_split(c.arch),
                 "--tensor-parallel-size {}: {} has no tensor-parallel split yet (supported: the llama family, "
                 "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM; and "
                 "Qwen3MoeForCausalLM, its experts split by id)",
                 tp_size, c.arch_name);
    std::vector<std::string> problems;
    if (c.n_heads % tp_size != 0)
        problems.push_back(fmt::format("num_attention_heads {} is not divisible by it", c.n_heads));
    if (c.n_kv_heads > 0 && c.n_kv_heads % tp_size != 0 && tp_size % c.n_kv_heads != 0)
        problems.push_back(fmt::format("num_key_value_heads {} neither divides by it nor divides it (KV heads are "
                                       "split, or replicated when the size is a multiple of their count)",
                                       c.n_kv_heads));
    if (has_dense_mlp_layer(c) && c.n_ff % tp_size != 0)
        problems.push_back(fmt::format("intermediate_size {} is not divisible by it", c.n_ff));
    if (c.arch == Arch::Qwen3Moe && c.moe.n_experts % tp_size != 0)
        problems.push_back(fmt::format("num_experts {} is not divisible by it (each rank holds an equal range of "
                                       "whole experts)", c.moe.n_experts));
    const int64_t per_rank = (c.vocab_size + tp_size - 1) / tp_size;
    if ((tp_size - 1) * per_rank >= c.vocab_size)
        problems.push_back(fmt::format("vocab_size {} leaves the last rank no rows ({} per rank)", c.vocab_size,
                                       per_rank));
    NIBBLE_CHECK(problems.empty(), "--tensor-parallel-size {} cannot split {}: {}", tp_size, c.arch_name,
                 fmt::join(problems, "; "));
}

void check_tensor_parallel_quant(const ModelConfig& c, const QuantConfig& quant, int64_t tp_size) {
    check_tensor_parallel(c, tp_size);
    const bool nvfp4 = quant.method == QuantMethod::ModelOptNvfp4 || quant.method == QuantMethod::CompressedTensorsNvfp4;
    if (tp_size == 1 || !nvfp4) return;
    const LlamaSpec spec = llama_spec(c);
    for (int64_t il = 0; il < c.n_layers; ++il) {
        const LlamaLayerSpec& L = spec.layers[static_cast<size_t>(il)];
        for (const LinearSpec* l : {&L.o, &L.down}) {
            // A MoE layer has no down_proj of its own; its experts are held whole.
            if (quant.is_excluded(l->module) || (l == &L.down && c.is_moe_layer(il))) continue;
            NIBBLE_CHECK(l->n_in % (tp_size * kNvfp4BlockSize) == 0,
                         "--tensor-parallel-size {}: {} is NVFP4 [{}, {}] and row-parallel; each rank's share of its "
                         "{} inputs, {}, must be a multiple of the {}-value block (one E4M3 scale per {} inputs)",
                         tp_size, l->module, l->n_out, l->n_in, l->n_in, static_cast<double>(l->n_in) / tp_size,
                         kNvfp4BlockSize, kNvfp4BlockSize);
        }
    }
}

TensorParallelLayout tensor_parallel_layout(const ModelConfig& c, int64_t tp_size, int64_t rank) {
    check_tensor_parallel(c, tp_size);
    NIBBLE_CHECK(rank >= 0 && rank < tp_size, "tensor-parallel rank {} is outside [0, {})", rank, tp_size);
    TensorParallelLayout l;
    l.tp_size = tp_size;
    l.rank = rank;
    l.q_heads = even_share(c.n_heads, tp_size, rank);
    if (tp_size <= c.n_kv_heads) {
        l.kv_heads = even_share(c.n_kv_heads, tp_size, rank);
    } else {
        // Each KV head on tp_size / n_kv_heads ranks; rank r's query heads all read head r / replicas
        // (n_heads divisible by tp_size keeps a rank's query heads inside one KV group).
        l.kv_replicas = tp_size / c.n_kv_heads;
        l.kv_heads = {rank / l.kv_replicas, rank / l.kv_replicas + 1};
    }
    // Without a dense MLP layer the intermediate size is never used: the rank keeps it whole.
    l.ff = has_dense_mlp_layer(c) ? even_share(c.n_ff, tp_size, rank) : IndexRange{0, c.n_ff};
    if (c.moe.n_experts > 0) l.experts = even_share(c.moe.n_experts, tp_size, rank);
    l.vocab_per_rank = (c.vocab_size + tp_size - 1) / tp_size;
    l.vocab = {std::min(rank * l.vocab_per_rank, c.vocab_size), std::min((rank + 1) * l.vocab_per_rank, c.vocab_size)};
    return l;
}

ModelConfig rank_config(const ModelConfig& config, const TensorParallelLayout& l) {
    ModelConfig c = config;
    c.n_heads = l.q_heads.size();
    c.n_kv_heads = l.kv_heads.size();
    c.n_ff = l.ff.size();
    c.vocab_size = l.vocab.size();
    return c;
}

LlamaShardPlan llama_shard_plan(const ModelConfig& c, int64_t tp_size, int64_t rank) {
    LlamaShardPlan p;
    p.layout = tensor_parallel_layout(c, tp_size, rank);
    const TensorParallelLayout& l = p.layout;
    const int64_t hd = c.head_dim;
    const IndexRange q_rows{l.q_heads.begin * hd, l.q_heads.end * hd}, kv_rows{l.kv_heads.begin * hd, l.kv_heads.end * hd};
    p.q = {ShardKind::ColumnParallel, q_rows};
    p.k = {ShardKind::ColumnParallel, kv_rows};
    p.v = {ShardKind::ColumnParallel, kv_rows};
    p.o = {ShardKind::RowParallel, q_rows};
    p.gate = {ShardKind::ColumnParallel, l.ff};
    p.up = {ShardKind::ColumnParallel, l.ff};
    p.down = {ShardKind::RowParallel, l.ff};
    p.embed = {ShardKind::VocabParallel, l.vocab};
    p.lm_head = {ShardKind::VocabParallel, l.vocab};
    return p;
}

LinearSpec shard_linear_spec(const LinearSpec& full, const ShardSpec& shard, int64_t rank) {
    LinearSpec s = full;
    switch (shard.kind) {
        case ShardKind::Replicated: break;
        case ShardKind::ColumnParallel:
        case ShardKind::VocabParallel: s.n_out = shard.range.size(); break;
        case ShardKind::RowParallel:
            s.n_in = shard.range.size();
            s.bias = full.bias && rank == 0;
            break;
    }
    return s;
}

std::vector<WeightSpec> llama_rank_expected_weights(const ModelConfig& c, int64_t tp_size, int64_t rank) {
    const LlamaShardPlan plan = llama_shard_plan(c, tp_size, rank);
    const LlamaSpec spec = llama_spec(c);
    std::vector<WeightSpec> out;
    auto dense = [&](const std::string& name, Shape shape) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Dense;
        w.name = name;
        w.shape = shape;
    };
    auto linear = [&](const LinearSpec& l, const ShardSpec& shard) {
        WeightSpec& w = out.emplace_back();
        w.kind = WeightSpec::Kind::Linear;
        w.linear = shard_linear_spec(l, shard, rank);
    };
    dense(spec.embed, Shape{plan.embed.range.size(), c.n_embd});
    for (const LlamaLayerSpec& L : spec.layers) {
        dense(L.attn_norm, Shape{c.n_embd});
        linear(L.q, plan.q);
        linear(L.k, plan.k);
        linear(L.v, plan.v);
        linear(L.o, plan.o);
        if (!L.q_norm.empty()) {
            dense(L.q_norm, Shape{c.head_dim});
            dense(L.k_norm, Shape{c.head_dim});
        }
        dense(L.mlp_norm, Shape{c.n_embd});
        const int64_t il = static_cast<int64_t>(&L - spec.layers.data());
        if (c.is_moe_layer(il)) {  // the router replicated, the rank's experts whole
            const std::string p = fmt::format("model.layers.{}.mlp.", il);
            linear({p + "gate", c.moe.n_experts, c.n_embd, false}, ShardSpec{});
            for (int64_t e = plan.layout.experts.begin; e < plan.layout.experts.end; ++e) {
                const std::string x = fmt::format("{}experts.{}.", p, e);
                linear({x + "gate_proj", c.moe.n_ff, c.n_embd, false}, ShardSpec{});
                linear({x + "up_proj", c.moe.n_ff, c.n_embd, false}, ShardSpec{});
                linear({x + "down_proj", c.n_embd, c.moe.n_ff, false}, ShardSpec{});
            }
            continue;
        }
        linear(L.gate, plan.gate);
        linear(L.up, plan.up);
        linear(L.down, plan.down);
    }
    dense(spec.final_norm, Shape{c.n_embd});
    if (spec.lm_head) linear(*spec.lm_head, plan.lm_head);
    return out;
}

const uint8_t* ShardStore::keep(std::vector<uint8_t> bytes) {
    bytes_ += static_cast<int64_t>(bytes.size());
    return blobs_.emplace_back(std::move(bytes)).data();
}

LinearWeight shard_linear(const LinearWeight& full, const ShardSpec& shard, int64_t rank, ShardStore& store) {
    const IndexRange r = shard.range;
    LinearWeight w = full;
    switch (shard.kind) {
        case ShardKind::Replicated: return w;
        case ShardKind::ColumnParallel:
        case ShardKind::VocabParallel: {
            NIBBLE_CHECK(r.begin >= 0 && r.begin < r.end && r.end <= full.n_out,
                         "{}: {} shard of rows [{}, {}) is empty or outside the weight's {} output rows", full.name,
                         shard_kind_name(shard.kind), r.begin, r.end, full.n_out);
            w.n_out = r.size();
            w.data = static_cast<const uint8_t*>(full.data) + r.begin * row_bytes(full, full.n_in);
            if (full.format == WeightFormat::Nvfp4) w.block_scales = full.block_scales + r.begin * (full.n_in / kNvfp4BlockSize);
            if (!full.bias.empty())
                w.bias.assign(full.bias.begin() + r.begin, full.bias.begin() + r.end);
            return w;
        }
        case ShardKind::RowParallel: break;
    }
    NIBBLE_CHECK(r.begin >= 0 && r.begin < r.end && r.end <= full.n_in,
                 "{}: row-parallel shard of input columns [{}, {}) is empty or outside the weight's {} inputs",
                 full.name, r.begin, r.end, full.n_in);
    if (full.format == WeightFormat::Nvfp4)
        NIBBLE_CHECK(r.begin % kNvfp4BlockSize == 0 && r.end % kNvfp4BlockSize == 0,
                     "{}: cannot shard the NVFP4 weight [{}, {}] row-parallel at input columns [{}, {}): a shard "
                     "boundary must fall on a {}-value block (one E4M3 scale per {} inputs, two E2M1 values per "
                     "byte), so each rank's share of the {} inputs must be a multiple of {}",
                     full.name, full.n_out, full.n_in, r.begin, r.end, kNvfp4BlockSize, kNvfp4BlockSize, full.n_in,
                     kNvfp4BlockSize);
    w.n_in = r.size();
    // Every row's column range, copied row after row: [n_out, n_in_shard] in the stored format.
    const int64_t full_row = row_bytes(full, full.n_in), shard_row = row_bytes(full, w.n_in);
    const int64_t offset = row_bytes(full, r.begin);
    std::vector<uint8_t> data(static_cast<size_t>(full.n_out * shard_row));
    const auto* src = static_cast<const uint8_t*>(full.data);
    for (int64_t row = 0; row < full.n_out; ++row)
        std::memcpy(data.data() + row * shard_row, src + row * full_row + offset, static_cast<size_t>(shard_row));
    w.data = store.keep(std::move(data));
    if (full.format == WeightFormat::Nvfp4) {
        // [n_out, n_in_shard / 16] E4M3 block scales.
        const int64_t full_blocks = full.n_in / kNvfp4BlockSize, shard_blocks = w.n_in / kNvfp4BlockSize;
        const int64_t first_block = r.begin / kNvfp4BlockSize;
        std::vector<uint8_t> scales(static_cast<size_t>(full.n_out * shard_blocks));
        for (int64_t row = 0; row < full.n_out; ++row)
            std::memcpy(scales.data() + row * shard_blocks, full.block_scales + row * full_blocks + first_block,
                        static_cast<size_t>(shard_blocks));
        w.block_scales = store.keep(std::move(scales));
    }
    if (rank != 0) w.bias.clear();
    return w;
}

}  // namespace nibble
