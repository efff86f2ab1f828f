#include "tune/model_shapes.h"

#include <fmt/format.h>

#include <algorithm>
#include <set>
#include <utility>

#include "model/model.h"

namespace nibble::tune {

namespace {

bool is_nvfp4(QuantMethod m) { return m == QuantMethod::ModelOptNvfp4 || m == QuantMethod::CompressedTensorsNvfp4; }

bool is_expert(const std::string& module) { return module.find(".experts.") != std::string::npos; }

struct Collector {
    ModelShapes out;
    std::set<std::string> seen;
    std::set<std::string> skipped_seen;
    void add(const OpShape& s) {
        const std::string id = fmt::format("{}|{}|{}", op_name(s.op), shape_bucket(s), shape_dtype(s));
        if (seen.insert(id).second) out.shapes.push_back(s);
    }
    void skip(const std::string& why) {
        if (skipped_seen.insert(why).second) out.skipped.push_back(why);
    }
};

}  // namespace

ModelShapes model_op_shapes(const ModelConfig& c, const QuantConfig& quant, const ShapeOptions& o) {
    Collector col;
    std::vector<int64_t> tiles;
    for (int64_t m : {1, 2, 4, 8, 16})
        if (m == 1 || m / 2 < o.max_num_seqs) tiles.push_back(m);  // a tile of m serves up to m rows
    auto add_gemv = [&](OpKind op, int64_t n, int64_t k) {
        for (int64_t m : tiles)
            col.add(OpShape{.op = op, .activation = o.activation, .m = m, .n = n, .k = k});
    };
    const bool dense_bf16 = c.dtype == DType::BF16;
    bool expert_noted = false;
    for (const WeightSpec& w : expected_weights(c)) {
        if (w.kind != WeightSpec::Kind::Linear) continue;
        const LinearSpec& l = w.linear;
        if (is_expert(l.module)) {
            if (!expert_noted) col.skip("MoE experts: no CUDA kernel yet");
            expert_noted = true;
            continue;
        }
        const bool quantized = quant.method != QuantMethod::None && !quant.is_excluded(l.module);
        if (quantized && is_nvfp4(quant.method)) {
            if (l.n_in % 32 == 0) add_gemv(OpKind::GemvNvfp4, l.n_out, l.n_in);
            else col.skip(fmt::format("{}: NVFP4 with k = {} not a multiple of 32", l.module, l.n_in));
        } else if (quantized) {
            col.skip(fmt::format("{} linears: no tunable CUDA kernel yet", quant_method_name(quant.method)));
        } else if (dense_bf16) {
            if (l.n_in % 16 == 0) add_gemv(OpKind::GemvBf16, l.n_out, l.n_in);
            else col.skip(fmt::format("{}: BF16 with k = {} not a multiple of 16", l.module, l.n_in));
        } else {
            col.skip(fmt::format("{} linears: no CUDA GEMV", dtype_name(c.dtype)));
        }
    }
    if (c.tied_embeddings) {
        if (dense_bf16) add_gemv(OpKind::GemvBf16, c.vocab_size, c.n_embd);
        else col.skip(fmt::format("tied lm_head in {}: no CUDA GEMV", dtype_name(c.dtype)));
    }

    const bool attention = c.layer_kinds.empty() || c.has_layer(LayerKind::Attention);
    if (attention && c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0) {
        const int64_t max_len = o.max_model_len > 0 ? o.max_model_len : c.max_position_embeddings;
        const int group = static_cast<int>(c.n_heads / c.n_kv_heads);
        std::vector<int64_t> lens;
        for (int64_t len : {512, 4096, 32768})
            if (len <= max_len) lens.push_back(len);
        if (lens.empty()) lens.push_back(max_len);
        std::vector<int64_t> seqs = {1};
        if (o.max_num_seqs >= 16) seqs.push_back(16);
        for (int64_t len : lens)
            for (int64_t n : seqs)
                col.add(OpShape{.op = OpKind::AttentionDecode, .activation = o.activation,
                                .head_dim = static_cast<int>(c.head_dim), .group = group, .kv_dtype = o.kv_dtype,
                                .n_seqs = n, .n_kv_heads = c.n_kv_heads, .q_len = 1, .kv_len = len});
        const int64_t chunk = std::min<int64_t>({o.max_num_batched_tokens, 2048, max_len});
        col.add(OpShape{.op = OpKind::AttentionPrefill, .activation = o.activation,
                        .head_dim = static_cast<int>(c.head_dim), .group = group, .kv_dtype = o.kv_dtype, .n_seqs = 1,
                        .n_kv_heads = c.n_kv_heads, .q_len = chunk, .kv_len = chunk});
    }
    return std::move(col.out);
}

}  // namespace nibble::tune
