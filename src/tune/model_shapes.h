// The op shapes a model runs when served with given flags: what `nibble tune MODEL_DIR` tunes and
// `--list` reports. Read from config.json and the quantization config alone (model/ expected_weights), like
// `nibble plan`; no weight is read.
//   GEMV       every distinct linear (n_out, n_in) in the format it is stored: NVFP4 -> gemv_nvfp4, BF16 ->
//              gemv_bf16 (lm_head included; a tied lm_head is the BF16 embedding), at each launch tile
//              m = 1, 2, 4, 8, 16 up to max_num_seqs. FP8 and F16/F32 linears and MoE experts have no
//              tunable CUDA kernel yet and are counted in `skipped`.
//   attention  decode at context lengths 512, 4096 and 32768 (up to max_model_len) for 1 and 16 sequences
//              (up to max_num_seqs), and one prefill chunk of min(max_num_batched_tokens, 2048) tokens, with
//              the resolved KV cache dtype; only when the model has attention layers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "tune/registry.h"

namespace nibble::tune {

struct ShapeOptions {
    int64_t max_num_seqs = 256;
    int64_t max_num_batched_tokens = 2048;
    int64_t max_model_len = 0;  // 0: config's max_position_embeddings
    KvDtype kv_dtype = KvDtype::Bf16;
    DType activation = DType::BF16;
};

struct ModelShapes {
    std::vector<OpShape> shapes;        // distinct by (op, bucket, dtype), in model order
    std::vector<std::string> skipped;   // "model.layers.0.mlp.experts.*: MoE experts (no CUDA kernel yet)", ...
};

ModelShapes model_op_shapes(const ModelConfig& config, const QuantConfig& quant, const ShapeOptions& options);

}  // namespace nibble::tune
