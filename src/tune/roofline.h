// The roofline of a model on a device profile, for `nibble plan --device-profile NAME`: upper bounds, not
// predictions of what nibble achieves.
//   decode   batch 1: every weight byte a token reads (the embedding only as the one row it gathers; a tied
//            lm_head as the whole embedding matrix; MoE experts as top_k / n_experts of them) plus the KV
//            cache of one sequence at `context_depth` and, for hybrid models, its recurrent (conv + SSM) state read
//            and written once, over the profile's memory bandwidth.
//   prefill  FLOPs per prompt token: 2 n k per linear (lm_head left out: prefill computes logits for one
//            row per chunk; MoE experts top_k / n_experts), NVFP4 linears at the FP4 tensor-core rate (the
//            BF16 rate on devices without FP4 tensor cores, where NVFP4 is dequantized first) and everything
//            else at the BF16 rate, plus attention's 4 x n_heads x head_dim x (prefill_tokens / 2) per
//            attention layer (QK^T and PV at the causal average depth) at the BF16 rate.
// Weight bytes are priced as engine/memory_plan.h prices them (tests/cli checks the totals agree).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "tune/device_profile.h"

namespace nibble::tune {

struct RooflineOptions {
    int64_t context_depth = 4096;       // tokens already in the sequence's KV cache at decode
    int64_t kv_bytes_per_token = 0;     // K and V of all layers (MemoryPlan::kv_bytes_per_token)
    int64_t recurrent_state_bytes = 0;  // hybrid models: one sequence's Mamba state (MemoryPlan::mamba_state_bytes_per_seq),
                                        // read and written back once per decoded token
    int64_t prefill_tokens = 2048;      // one prefill chunk
};

struct ByteShare {
    std::string what;   // "lm_head", "attention projections", "MLP", "Mamba mixers", "MoE experts (active)",
                        // "MoE shared experts", "MoE routers", "KV cache at 4096 tokens", ...
    int64_t bytes = 0;  // read per decoded token
};

struct Roofline {
    std::vector<ByteShare> decode_bytes;  // non-zero shares, largest first
    int64_t decode_bytes_total = 0;
    double decode_tokens_per_s = 0;       // 0 when the profile has no bandwidth
    double prefill_fp4_flops = 0;         // per prompt token, at the FP4 rate
    double prefill_bf16_flops = 0;        // per prompt token, at the BF16 rate
    double prefill_tokens_per_s = 0;      // 0 when the profile has no rates
    bool fp4_on_bf16 = false;             // the profile has no FP4 tensor cores
};

Roofline compute_roofline(const ModelConfig& config, const QuantConfig& quant, const DeviceProfile& device,
                          const RooflineOptions& options);

}  // namespace nibble::tune
