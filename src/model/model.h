// The interface every architecture implements: one batched forward over sequences of different lengths,
// each with its own block table into the shared paged KV cache. The engine's ModelRunner drives it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "ops/attention/attention.h"
#include "ops/attention/kv_cache.h"
#include "model/decoder_view.h"
#include "model/hybrid_view.h"
#include "model/weights.h"
#include "ops/linear/linear.h"
#include "ops/ssm/ssm_state.h"
#include "tensor/tensor.h"

namespace nibble {

struct ForwardSequence {
    std::span<const int32_t> tokens;  // the new tokens of this step, at positions kv.start_pos ...
    SequenceKv kv;                    // block table covering start_pos + tokens.size() positions
    bool all_logits = false;          // logits for every new token; otherwise only for the last one
    // Hybrid models: this sequence's Mamba conv/SSM state (owned by the caller, shaped by
    // mamba_state_shape), continued from kv.start_pos and reset by the model when kv.start_pos is 0.
    MambaState* state = nullptr;
};

// Sees the input of every linear layer during forward; calibration records activation ranges with it.
class LinearInputObserver {
public:
    virtual ~LinearInputObserver() = default;
    //   x [m, w.n_in]
    virtual void observe(const LinearWeight& w, const float* x, int64_t m) = 0;
};

class Model {
public:
    virtual ~Model() = default;
    virtual const ModelConfig& config() const = 0;
    virtual const QuantConfig& quant_config() const = 0;
    // KV cache shape for n_blocks blocks of block_size tokens stored as `dtype`, with the checkpoint's
    // per-layer k/v scales (kv_cache.h) when it has them.
    virtual KvCacheShape kv_cache_shape(int64_t n_blocks, int64_t block_size, KvDtype dtype = KvDtype::F32) const = 0;
    // Per-sequence recurrent state the model needs beside the KV cache (Mamba layers); empty for models
    // without one. Every ForwardSequence of such a model must carry a MambaState of this shape.
    virtual MambaStateShape mamba_state_shape(SsmStateDtype /*dtype*/) const { return {}; }
    // Runs the new tokens of every sequence through the model, appending their K/V to the cache.
    // logits: [rows, vocab], rows in sequence order (all new tokens or only the last, per sequence).
    virtual void forward(std::span<const ForwardSequence> seqs, KvCache& cache, std::vector<float>& logits) = 0;
    // Bytes of weights as stored (what the forward streams per step).
    virtual int64_t weight_bytes() const = 0;
    // Every linear layer bound from the checkpoint, in forward order (a tied lm_head is not listed: it is
    // the embedding table).
    virtual std::vector<const LinearWeight*> linear_weights() const = 0;
    // fnmatch patterns of linear modules the architecture's published NVFP4 recipe keeps unquantized besides
    // lm_head (NemotronH: attention layers and the Mamba layer feeding each); `nibble quantize` adds them.
    virtual std::vector<std::string> default_quant_exclusions() const { return {}; }
    // nullptr to stop observing. The observer must outlive the forwards it sees.
    virtual void set_linear_input_observer(LinearInputObserver* observer) = 0;
    // The weights as a dense pre-norm decoder (decoder_view.h), for backends that run that shape of model;
    // false for architectures that are not one (MoE, hybrids).
    virtual bool decoder_view(DecoderView& /*out*/) const { return false; }
    // The weights as a hybrid Mamba2 / attention / MLP / MoE stack (hybrid_view.h, NemotronH); false for
    // the others.
    virtual bool hybrid_view(HybridView& /*out*/) const { return false; }
};

// One entry of an architecture's tensor list: a linear layer, stored as the quantization config says (dense,
// FP8 or NVFP4 with its scales), or a dense float tensor (embedding, norm weight) in the checkpoint's dtype.
// Each architecture builds its model from its own list, and `nibble plan` counts bytes from the same list.
struct WeightSpec {
    enum class Kind { Linear, Dense };
    Kind kind = Kind::Dense;
    LinearSpec linear;  // Linear: module name, n_out, n_in, bias
    std::string name;   // Dense: tensor name
    Shape shape;        // Dense
    // Dense tensors some checkpoints store as F32 whatever config.json's dtype (a MoE router's correction
    // bias always; the router itself in quantized exports such as ModelOpt's NVFP4 Nemotron-H).
    bool f32 = false, f32_when_quantized = false;
};

// The tensors a checkpoint of `config`'s architecture holds (without quantization scales, which follow from
// the quantization config), in forward order.
std::vector<WeightSpec> expected_weights(const ModelConfig& config);

// Reads DIR's config.json and quantization config, maps architectures[0] to its implementation and binds
// the weights (views into the checkpoint's mmap). The model keeps `pool` for its CPU work.
std::unique_ptr<Model> load_model(const std::string& dir, ThreadPool& pool);

}  // namespace nibble
