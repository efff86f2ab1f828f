// The memory plan from config files alone: weight bytes of real architectures (Llama-3.1-8B against the
// total_size its Hugging Face index publishes; every golden fixture against the sizes of the tensors its
// safetensors file really holds), KV bytes per token per dtype, the KV arithmetic and the refusals.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "base/error.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "checkpoint/safetensors.h"
#include "engine/memory_plan.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

// meta-llama/Llama-3.1-8B-Instruct config.json (shape fields as published).
nlohmann::json llama31_8b_config() {
    return nlohmann::json::parse(R"({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})");
}

// ModelOpt's hf_quant_config.json of an NVFP4 export with an FP8 KV cache (lm_head left in BF16).
nlohmann::json modelopt_nvfp4_quant() {
    return nlohmann::json::parse(R"({"producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                         "exclude_modules": ["lm_head"]}})");
}

constexpr int64_t kGiB = int64_t{1} << 30;

PlanOptions options(int64_t device_memory) {
    PlanOptions o;
    o.device_memory = device_memory;
    o.max_model_len = 8192;
    return o;
}

TEST(MemoryPlan, Llama31_8bBf16WeightsEqualPublishedTotalSize) {
    const ModelConfig c = parse_model_config(llama31_8b_config(), "config.json");
    const MemoryPlan p = plan_memory(c, QuantConfig{}, options(80 * kGiB));
    // model.safetensors.index.json of meta-llama/Llama-3.1-8B-Instruct: "total_size": 16060522496
    // (8,030,261,248 BF16 parameters).
    EXPECT_EQ(p.weights_bytes, 16060522496);
    ASSERT_EQ(p.weights_by_format.size(), 1u);
    EXPECT_EQ(p.weights_by_format[0].first, "bf16");
}

TEST(MemoryPlan, Llama31_8bNvfp4Weights) {
    const ModelConfig c = parse_model_config(llama31_8b_config(), "config.json");
    const QuantConfig q = parse_hf_quant_config(modelopt_nvfp4_quant(), "hf_quant_config.json");
    const MemoryPlan p = plan_memory(c, q, options(80 * kGiB));
    // Per layer, NVFP4 linears q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 14336x4096, down 4096x14336:
    // n*k/2 packed + n*k/16 E4M3 scales + weight_scale_2 + input_scale (F32 scalars); two BF16 norms; the
    // k_proj.k_scale / v_proj.v_scale scalars of the FP8 KV cache. Embeddings, lm_head and final norm BF16.
    const int64_t nk_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096;
    const int64_t nvfp4 = 32 * (nk_layer / 2 + nk_layer / 16 + 7 * 8);
    const int64_t bf16 = 2 * 128256 * 4096 * 2 + (32 * 2 + 1) * 4096 * 2;
    EXPECT_EQ(p.weights_bytes, nvfp4 + bf16 + 32 * 8);
    EXPECT_EQ(p.kv_dtype, KvDtype::Fp8) << "auto takes the checkpoint's KV scheme";
}

TEST(MemoryPlan, KvBytesPerTokenPerDtype) {
    const ModelConfig c = parse_model_config(llama31_8b_config(), "config.json");
    // 32 layers x (K, V) x 8 heads x 128: 4, 2, 1 bytes per value; NVFP4 64 bytes + 8 scales per head row.
    const std::pair<const char*, int64_t> cases[] = {
        {"f32", 262144}, {"bf16", 131072}, {"auto", 131072}, {"fp8", 65536}, {"nvfp4", 36864}};
    for (const auto& [name, bytes] : cases) {
        PlanOptions o = options(80 * kGiB);
        o.kv_cache_dtype = name;
        EXPECT_EQ(plan_memory(c, QuantConfig{}, o).kv_bytes_per_token, bytes) << name;
    }
}

TEST(MemoryPlan, KvTokensFromBudget) {
    const ModelConfig c = parse_model_config(llama31_8b_config(), "config.json");
    PlanOptions o = options(80 * kGiB);
    o.kv_cache_dtype = "bf16";
    o.kv_cache_memory_bytes = 10 * kGiB + 12345;
    const MemoryPlan exact = plan_memory(c, QuantConfig{}, o);
    EXPECT_EQ(exact.kv_block_bytes, 16 * 131072);
    EXPECT_EQ(exact.kv_blocks, (10 * kGiB + 12345) / (16 * 131072));
    EXPECT_EQ(exact.kv_tokens, exact.kv_blocks * 16);
    EXPECT_DOUBLE_EQ(exact.max_concurrency, static_cast<double>(exact.kv_tokens) / 8192);

    o.kv_cache_memory_bytes = 0;
    o.gpu_memory_utilization = 0.5;
    const MemoryPlan util = plan_memory(c, QuantConfig{}, o);
    EXPECT_EQ(util.usable_memory, 40 * kGiB);
    EXPECT_EQ(util.kv_cache_bytes, 40 * kGiB - util.weights_bytes - util.workspace_bytes());
    EXPECT_EQ(util.kv_blocks, util.kv_cache_bytes / util.kv_block_bytes);
    // The workspace follows the formula in memory_plan.h.
    EXPECT_EQ(util.activation_bytes, 2048 * (3 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 14336) * 4);
    EXPECT_EQ(util.logits_bytes, 256 * (128256 + 4096) * 4);  // logits and the lm_head's gathered input rows
}

TEST(MemoryPlan, RefusesPlansThatDoNotFit) {
    const ModelConfig c = parse_model_config(llama31_8b_config(), "config.json");
    try {  // 16 GB of BF16 weights on an 8 GiB device
        plan_memory(c, QuantConfig{}, options(8 * kGiB));
        FAIL() << "expected an error";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("exceed the usable 7.20 GiB"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(" by "), std::string::npos) << e.what();
    }
    try {  // fits the weights, not one 131072-token sequence of BF16 KV (16 GiB)
        PlanOptions o = options(24 * kGiB);
        o.max_model_len = 131072;
        o.kv_cache_dtype = "bf16";
        plan_memory(c, QuantConfig{}, o);
        FAIL() << "expected an error";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("fewer than one --max-model-len 131072 sequence"), std::string::npos)
            << e.what();
    }
    PlanOptions bad = options(80 * kGiB);
    bad.kv_cache_dtype = "fp8_e5m2";
    EXPECT_THROW(plan_memory(c, QuantConfig{}, bad), std::exception);
    bad = options(80 * kGiB);
    bad.max_model_len = 131073;
    EXPECT_THROW(plan_memory(c, QuantConfig{}, bad), std::exception);
}

// Every golden fixture: the plan's weight bytes, from config files alone, equal the bytes of the tensors
// the fixture's model.safetensors really holds.
TEST(MemoryPlan, GoldenFixtureWeightsEqualSafetensorsSizes) {
    const fs::path root = fs::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures";
    int n = 0;
    for (const auto& entry : fs::directory_iterator(root)) {
        const fs::path dir = entry.path() / "model";
        if (!fs::is_regular_file(dir / "config.json")) continue;
        std::ifstream in(dir / "config.json");
        const nlohmann::json json = nlohmann::json::parse(in);
        const ModelConfig c = parse_model_config(json, (dir / "config.json").string());
        const QuantConfig q = load_quant_config(dir.string(), json);
        int64_t plan = 0;
        for (const auto& [name, bytes] : weight_bytes_by_format(c, q)) plan += bytes;
        const Checkpoint ckpt(dir.string());
        int64_t real = 0;
        for (const auto& name : ckpt.names()) real += static_cast<int64_t>(ckpt.get(name).nbytes);
        EXPECT_EQ(plan, real) << entry.path().filename();
        ++n;
    }
    EXPECT_GE(n, 9);
}

TEST(MemoryPlan, AutoKvDtypeFollowsCheckpoint) {
    QuantConfig q;
    EXPECT_EQ(resolve_kv_cache_dtype("auto", q, KvDtype::F32), KvDtype::F32);
    EXPECT_EQ(resolve_kv_cache_dtype("auto", q, KvDtype::Bf16), KvDtype::Bf16);
    q.kv_cache = KvCacheQuant::Nvfp4;
    EXPECT_EQ(resolve_kv_cache_dtype("auto", q, KvDtype::Bf16), KvDtype::Nvfp4);
    EXPECT_EQ(resolve_kv_cache_dtype("bf16", q, KvDtype::F32), KvDtype::Bf16);
    EXPECT_THROW(resolve_kv_cache_dtype("int8", q, KvDtype::F32), std::exception);
}

// Hybrid models: the Mamba state per sequence slot (fixed memory) and, with prefix caching, the state
// snapshots cached blocks keep: a given count is fixed memory too; auto takes whole states from the KV budget
// (at most an eighth of it, at most max_num_seqs), so a plan that fits without snapshots fits with them. Shape of Nemotron-3-Nano-30B-A3B (52 layers:
// 23 Mamba2, 23 MoE, 6 attention; mamba_num_heads 64, mamba_head_dim 64, ssm_state_size 128, n_groups 8,
// conv_kernel 4; 2 KV heads of 128) on the tiny fixture's config. One state, by hand:
//   conv  23 x (4 - 1) x (64*64 + 2*8*128 = 6144) x 4 B             =  1,695,744
//   SSM   23 x 64 x 64 x 128 x 4 B (float32) or 2 B (bfloat16)     = 48,234,496 or 24,117,248
//   total 49,930,240 B (47.6 MiB) float32, 25,812,992 B (24.6 MiB) bfloat16
// against 6 x 2 x 2 x 128 x 2 = 6,144 B of bf16 KV per token: one snapshot weighs as much as the KV of
// 8,127 tokens (4,201 with a bfloat16 SSM state).
TEST(MemoryPlan, HybridStateSnapshotsAreFixedMemory) {
    std::ifstream in(fs::path(NIBBLE_SOURCE_DIR) / "tests/golden/fixtures/nemotron_h/model/config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j.erase("layers_block_type");
    j.erase("mtp_layers_block_type");
    j["hybrid_override_pattern"] = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME";
    j["num_hidden_layers"] = 52;
    j["hidden_size"] = 2688;
    j["mamba_num_heads"] = 64;
    j["mamba_head_dim"] = 64;
    j["ssm_state_size"] = 128;
    j["n_groups"] = 8;
    j["conv_kernel"] = 4;
    j["num_attention_heads"] = 32;
    j["num_key_value_heads"] = 2;
    j["head_dim"] = 128;
    j["max_position_embeddings"] = 262144;
    const ModelConfig c = parse_model_config(j, "nano-shape");
    ASSERT_EQ(c.count_layers(LayerKind::Mamba), 23);
    ASSERT_EQ(c.count_layers(LayerKind::Attention), 6);
    PlanOptions o = options(80 * kGiB);
    o.kv_cache_dtype = "bf16";
    o.max_num_seqs = 64;
    const MemoryPlan with = plan_memory(c, QuantConfig{}, o);
    EXPECT_EQ(with.kv_bytes_per_token, 6144);
    EXPECT_EQ(with.mamba_state_bytes_per_seq, 49930240);
    EXPECT_EQ(with.mamba_state_bytes, 64 * int64_t{49930240});
    o.mamba_prefix_snapshots = 0;
    const MemoryPlan without = plan_memory(c, QuantConfig{}, o);
    EXPECT_EQ(without.mamba_snapshots, 0);
    EXPECT_EQ(without.mamba_snapshot_bytes, 0);
    // Auto (-1): whole states from an eighth of the KV budget, at most max_num_seqs.
    const int64_t eighth_in_states = without.kv_cache_bytes / 8 / 49930240;
    EXPECT_GT(eighth_in_states, 0);
    EXPECT_EQ(with.mamba_snapshots, std::min<int64_t>(64, eighth_in_states));
    EXPECT_EQ(with.mamba_snapshot_bytes, with.mamba_snapshots * int64_t{49930240});
    EXPECT_EQ(without.kv_cache_bytes - with.kv_cache_bytes, with.mamba_snapshot_bytes);
    // A given count is fixed memory: the same KV budget shrinks by exactly its bytes.
    o.mamba_prefix_snapshots = 3;
    const MemoryPlan three = plan_memory(c, QuantConfig{}, o);
    EXPECT_EQ(three.mamba_snapshot_bytes, 3 * int64_t{49930240});
    EXPECT_EQ(without.kv_cache_bytes - three.kv_cache_bytes, three.mamba_snapshot_bytes);
    // Auto with --max-num-seqs 2: capped at one snapshot per sequence slot.
    o.mamba_prefix_snapshots = -1;
    o.max_num_seqs = 2;
    EXPECT_EQ(plan_memory(c, QuantConfig{}, o).mamba_snapshots, 2);
    o.max_num_seqs = 64;
    o.mamba_prefix_snapshots = 10;
    o.mamba_ssm_cache_dtype = SsmStateDtype::Bf16;
    const MemoryPlan bf16 = plan_memory(c, QuantConfig{}, o);
    EXPECT_EQ(bf16.mamba_state_bytes_per_seq, 25812992);
    EXPECT_EQ(bf16.mamba_snapshot_bytes, 10 * int64_t{25812992});
    o.mamba_prefix_snapshots = -2;
    EXPECT_THROW(plan_memory(c, QuantConfig{}, o), Error);
    // A refusal names the snapshots among the fixed memory.
    o.mamba_prefix_snapshots = 4000;
    try {
        plan_memory(c, QuantConfig{}, o);
        ADD_FAILURE() << "4000 bfloat16 snapshots (96 GiB) cannot fit in 80 GiB";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("Mamba state snapshots"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace nibble
