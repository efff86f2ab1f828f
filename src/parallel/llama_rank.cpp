#include "parallel/llama_rank.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "model/llama.h"
#include "model/weights.h"
#include "ops/embed/embed.h"
#include "ops/rmsnorm/rmsnorm.h"

namespace nibble {

LlamaRankModel::LlamaRankModel(std::shared_ptr<const Checkpoint> ckpt, ModelConfig config, QuantConfig quant,
                               Communicator& comm, ThreadPool& pool)
    : ckpt_(std::move(ckpt)), config_(std::move(config)), quant_(std::move(quant)), comm_(comm), pool_(pool) {
    const ModelConfig& c = config_;
    const Checkpoint& ck = *ckpt_;
    const int64_t rank = comm_.rank();
    check_tensor_parallel_quant(c, quant_, comm_.world_size());
    NIBBLE_CHECK(c.moe.n_experts == 0, "tensor parallelism on the CPU: {} has MoE layers, which only the CUDA "
                                       "backend splits (by expert)", c.arch_name);
    plan_ = llama_shard_plan(c, comm_.world_size(), rank);
    local_ = rank_config(c, plan_.layout);
    const LlamaSpec spec = llama_spec(c);

    const TensorInfo& embed = ck.get(spec.embed);
    NIBBLE_CHECK((embed.dtype == DType::F32 || embed.dtype == DType::F16 || embed.dtype == DType::BF16) &&
                     embed.shape == (Shape{c.vocab_size, c.n_embd}),
                 "tensor {} in {}: expected F32, F16 or BF16 {}, got {} {}", spec.embed, embed.file,
                 Shape{c.vocab_size, c.n_embd}.str(), dtype_name(embed.dtype), embed.shape.str());
    const IndexRange vocab = plan_.embed.range;
    embed_ = embed.view();
    embed_.data = static_cast<uint8_t*>(embed_.data) + vocab.begin * c.n_embd * static_cast<int64_t>(dtype_size(embed.dtype));
    embed_.shape = Shape{vocab.size(), c.n_embd};

    auto shard = [&](const LinearSpec& s, const ShardSpec& how) {
        return shard_linear(load_linear(ck, quant_, s), how, rank, store_);
    };
    layers_.resize(static_cast<size_t>(c.n_layers));
    KvScales kv_scales;
    for (int64_t il = 0; il < c.n_layers; ++il) {
        Layer& L = layers_[static_cast<size_t>(il)];
        const LlamaLayerSpec& S = spec.layers[static_cast<size_t>(il)];
        L.attn.norm = load_vector(ck, S.attn_norm, c.n_embd);
        L.mlp_norm = load_vector(ck, S.mlp_norm, c.n_embd);
        L.attn.q = shard(S.q, plan_.q);
        L.attn.k = shard(S.k, plan_.k);
        L.attn.v = shard(S.v, plan_.v);
        L.attn.o = shard(S.o, plan_.o);
        if (!S.q_norm.empty()) {
            L.attn.q_norm = load_vector(ck, S.q_norm, c.head_dim);
            L.attn.k_norm = load_vector(ck, S.k_norm, c.head_dim);
        }
        L.gate = shard(S.gate, plan_.gate);
        L.up = shard(S.up, plan_.up);
        L.down = shard(S.down, plan_.down);
        kv_scales.add_layer(ck, S.attn_prefix);
    }
    kv_scales.finish();
    k_scales_ = std::move(kv_scales.k);
    v_scales_ = std::move(kv_scales.v);
    final_norm_ = load_vector(ck, spec.final_norm, c.n_embd);
    // Tied: the rank's embedding rows are its lm_head rows.
    lm_head_ = spec.lm_head ? shard(*spec.lm_head, plan_.lm_head) : tied_lm_head(embed_, "model.embed_tokens");
    rope_ = make_rope_table(c.rope, c.head_dim);
}

KvCacheShape LlamaRankModel::kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype) const {
    return attention_kv_cache_shape(local_, local_.n_layers, n_blocks, block_size, dtype, k_scales_, v_scales_);
}

std::vector<const LinearWeight*> LlamaRankModel::linear_weights() const {
    std::vector<const LinearWeight*> all;
    for (const auto& L : layers_)
        for (const LinearWeight* w : {&L.attn.q, &L.attn.k, &L.attn.v, &L.attn.o, &L.gate, &L.up, &L.down}) all.push_back(w);
    if (!config_.tied_embeddings) all.push_back(&lm_head_);
    return all;
}

int64_t LlamaRankModel::weight_bytes() const {
    int64_t total = embed_.numel() * static_cast<int64_t>(dtype_size(embed_.dtype));
    for (const LinearWeight* w : linear_weights()) total += w->stored_bytes();
    return total;
}

void LlamaRankModel::linear(const LinearWeight& w, const float* x, int64_t m, float* y) {
    if (observer_ != nullptr) observer_->observe(w, x, m);
    linear_cpu(pool_, x, m, w, y);
}

void LlamaRankModel::embed(const std::vector<int32_t>& tokens, float* x) {
    const int64_t d = config_.n_embd, m = static_cast<int64_t>(tokens.size());
    const IndexRange vocab = plan_.embed.range;
    for (int64_t i = 0; i < m; ++i) {
        const int32_t t = tokens[static_cast<size_t>(i)];
        NIBBLE_CHECK(t >= 0 && t < config_.vocab_size, "forward: token {} (row {}) is outside the vocabulary [0, {})", t,
                     i, config_.vocab_size);
        if (t >= vocab.begin && t < vocab.end) {
            const int32_t local = static_cast<int32_t>(t - vocab.begin);
            embed_cpu(embed_, &local, 1, x + i * d);
        } else {
            std::fill_n(x + i * d, d, 0.0f);  // another rank's row; the all-reduce brings it, adding exact zeros
        }
    }
    comm_.all_reduce_sum(x, m * d, DType::F32);
}

void LlamaRankModel::forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) {
    const int64_t d = config_.n_embd;
    const TokenBatch batch = flatten_batch(seqs);
    const int64_t m = batch.m;
    const ModelLinearFn lin = [this](const LinearWeight& w, const float* x, int64_t rows, float* y) { linear(w, x, rows, y); };

    // Activations, [m, n_embd] row-major; whole on every rank.
    std::vector<float> x(static_cast<size_t>(m * d)), h(static_cast<size_t>(m * d)), proj(static_cast<size_t>(m * d));
    embed(batch.tokens, x.data());
    for (int64_t il = 0; il < local_.n_layers; ++il) {
        const Layer& L = layers_[static_cast<size_t>(il)];
        attention_cpu(pool_, local_, L.attn, rope_, seqs, batch, cache, il, lin, x.data(), proj.data());
        comm_.all_reduce_sum(proj.data(), m * d, DType::F32);
        for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
        rmsnorm_cpu(x.data(), m, d, L.mlp_norm.data(), config_.norm_eps, h.data());
        swiglu_mlp_cpu(L.gate, L.up, L.down, h.data(), m, lin, proj.data());
        comm_.all_reduce_sum(proj.data(), m * d, DType::F32);
        for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    }
    // This rank's vocabulary columns [rows, vocab share], then everyone's: each rank sends a slot of
    // vocab_per_rank columns per row (the last rank's zero-padded) and the slots are put back side by side.
    std::vector<float> local_logits;
    final_logits_cpu(local_, seqs, batch, x.data(), final_norm_, lm_head_, lin, local_logits);
    const int64_t n_local = local_.vocab_size, slot = plan_.layout.vocab_per_rank, n_ranks = comm_.world_size();
    const int64_t rows = n_local > 0 ? static_cast<int64_t>(local_logits.size()) / n_local : 0;
    std::vector<float> send(static_cast<size_t>(rows * slot), 0.0f);  // [rows, vocab_per_rank]
    for (int64_t r = 0; r < rows; ++r)
        std::copy_n(local_logits.data() + r * n_local, n_local, send.data() + r * slot);
    std::vector<float> gathered(static_cast<size_t>(n_ranks * rows * slot));  // [ranks, rows, vocab_per_rank]
    comm_.all_gather(send.data(), rows * slot, DType::F32, gathered.data());
    const int64_t vocab = config_.vocab_size;
    logits.assign(static_cast<size_t>(rows * vocab), 0.0f);
    for (int64_t q = 0; q < n_ranks; ++q) {
        const int64_t begin = std::min(q * slot, vocab), end = std::min((q + 1) * slot, vocab);
        for (int64_t r = 0; r < rows; ++r)
            std::copy_n(gathered.data() + (q * rows + r) * slot, end - begin, logits.data() + r * vocab + begin);
    }
}

std::unique_ptr<LlamaRankModel> load_llama_rank(const std::string& dir, std::shared_ptr<const Checkpoint> ckpt,
                                                Communicator& comm, ThreadPool& pool) {
    const std::string path = dir + "/config.json";
    std::ifstream in(path);
    NIBBLE_CHECK(in.good(), "{}: cannot open (is {} a Hugging Face model folder?)", path, dir);
    nlohmann::json json;
    try {
        json = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", path, e.what());
    }
    ModelConfig config = parse_model_config(json, path);
    QuantConfig quant = load_quant_config(dir, json);
    check_tensor_parallel_quant(config, quant, comm.world_size());
    if (!ckpt) ckpt = std::make_shared<const Checkpoint>(dir);
    return std::make_unique<LlamaRankModel>(std::move(ckpt), std::move(config), std::move(quant), comm, pool);
}

}  // namespace nibble
