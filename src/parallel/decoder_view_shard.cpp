#include "parallel/decoder_view_shard.h"

#include "base/error.h"

namespace nibble {

std::unique_ptr<DecoderViewShard> shard_decoder_view(const ModelConfig& config, const QuantConfig& quant,
                                                     const DecoderView& view, int64_t tp_size, int64_t rank) {
    check_tensor_parallel_quant(config, quant, tp_size);
    const LlamaShardPlan plan = llama_shard_plan(config, tp_size, rank);
    NIBBLE_CHECK(static_cast<int64_t>(view.layers.size()) == config.n_layers,
                 "tensor parallelism: the model's view has {} layers, its config {}", view.layers.size(), config.n_layers);
    NIBBLE_CHECK(view.embed.shape == (Shape{config.vocab_size, config.n_embd}),
                 "tensor parallelism: embedding {}, expected [{}, {}]", view.embed.shape.str(), config.vocab_size,
                 config.n_embd);
    auto out = std::make_unique<DecoderViewShard>();
    out->config = rank_config(config, plan.layout);
    out->layout = plan.layout;
    DecoderView& v = out->view;
    auto shard = [&](const LinearWeight* w, const ShardSpec& how) -> const LinearWeight* {
        NIBBLE_CHECK(w != nullptr, "tensor parallelism: a linear layer is missing from the model's view");
        return &out->linears.emplace_back(shard_linear(*w, how, rank, out->store));
    };
    // The embedding's vocabulary rows: a view of the model's table.
    const IndexRange rows = plan.embed.range;
    v.embed = view.embed;
    v.embed.data = static_cast<uint8_t*>(view.embed.data) +
                   rows.begin * config.n_embd * static_cast<int64_t>(dtype_size(view.embed.dtype));
    v.embed.shape = Shape{rows.size(), config.n_embd};
    for (const DecoderLayerView& L : view.layers) {
        DecoderLayerView S = L;
        S.q = shard(L.q, plan.q);
        S.k = shard(L.k, plan.k);
        S.v = shard(L.v, plan.v);
        S.o = shard(L.o, plan.o);
        if (L.moe()) {  // expert parallelism: the router as it is, the rank's experts (pointers, no copies)
            NIBBLE_CHECK(!L.has_shared_expert(),
                         "tensor parallelism: {} has a shared expert, which has no tensor-parallel split yet "
                         "(serve the model on one GPU)", L.router->name);
            const IndexRange e = plan.layout.experts;
            for (const auto* list : {&L.expert_gate, &L.expert_up, &L.expert_down})
                NIBBLE_CHECK(static_cast<int64_t>(list->size()) == config.moe.n_experts,
                             "tensor parallelism: {} has {} experts in the model's view, its config {}",
                             L.router->name, list->size(), config.moe.n_experts);
            auto range = [&](const std::vector<const LinearWeight*>& all) {
                return std::vector<const LinearWeight*>(all.begin() + e.begin, all.begin() + e.end);
            };
            S.expert_gate = range(L.expert_gate);
            S.expert_up = range(L.expert_up);
            S.expert_down = range(L.expert_down);
            v.layers.push_back(S);
            continue;
        }
        S.gate = shard(L.gate, plan.gate);
        S.up = shard(L.up, plan.up);
        S.down = shard(L.down, plan.down);
        v.layers.push_back(S);
    }
    v.final_norm = view.final_norm;
    v.tied_lm_head = view.tied_lm_head;
    v.lm_head = shard(view.lm_head, plan.lm_head);
    v.rope = view.rope;
    v.k_scales = view.k_scales;
    v.v_scales = view.v_scales;
    return out;
}

}  // namespace nibble
