// config.json parsing against real files and transformers' defaults. The classic-spelling configs are the
// published config.json files (relevant fields pasted verbatim) of meta-llama/Llama-3.1-8B-Instruct,
// mistralai/Mistral-7B-Instruct-v0.3, Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen3-8B; the transformers-5
// spellings rewrite the same files the way transformers 5 saves them (rope_parameters holding rope_theta,
// dtype instead of torch_dtype, layer_types for Qwen). Expected defaults are those of the transformers
// config classes (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config) and modeling_rope_utils.py.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "base/error.h"
#include "checkpoint/model_config.h"

namespace nibble {
namespace {

ModelConfig parse(const std::string& text) { return parse_model_config(nlohmann::json::parse(text), "config.json"); }

// The message of the nibble::Error parsing `text` throws ("" when it does not throw).
std::string error_of(const std::string& text) {
    try {
        parse(text);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

#define EXPECT_ERROR(text, fragment)                                                      \
    do {                                                                                  \
        std::string message_ = error_of(text);                                            \
        EXPECT_NE(message_.find(fragment), std::string::npos)                             \
            << "expected an error containing \"" << (fragment) << "\", got \"" << message_ << "\""; \
    } while (0)

// Replaces `key`'s value (or adds the key) in a JSON text; removes it when `value` is empty.
std::string with(const std::string& text, const std::string& key, const std::string& value) {
    auto j = nlohmann::json::parse(text);
    if (value.empty())
        j.erase(key);
    else
        j[key] = nlohmann::json::parse(value);
    return j.dump();
}

void expect_same(const ModelConfig& a, const ModelConfig& b) {
    EXPECT_EQ(a.arch, b.arch);
    EXPECT_EQ(a.arch_name, b.arch_name);
    EXPECT_EQ(a.n_embd, b.n_embd);
    EXPECT_EQ(a.n_layers, b.n_layers);
    EXPECT_EQ(a.n_heads, b.n_heads);
    EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
    EXPECT_EQ(a.head_dim, b.head_dim);
    EXPECT_EQ(a.n_ff, b.n_ff);
    EXPECT_EQ(a.vocab_size, b.vocab_size);
    EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
    EXPECT_EQ(a.norm_eps, b.norm_eps);
    EXPECT_EQ(a.rope.theta, b.rope.theta);
    EXPECT_EQ(a.rope.type, b.rope.type);
    EXPECT_EQ(a.rope.factor, b.rope.factor);
    EXPECT_EQ(a.rope.low_freq_factor, b.rope.low_freq_factor);
    EXPECT_EQ(a.rope.high_freq_factor, b.rope.high_freq_factor);
    EXPECT_EQ(a.rope.original_max_position, b.rope.original_max_position);
    EXPECT_EQ(a.rope.partial_rotary_factor, b.rope.partial_rotary_factor);
    EXPECT_EQ(a.qkv_bias, b.qkv_bias);
    EXPECT_EQ(a.o_bias, b.o_bias);
    EXPECT_EQ(a.mlp_bias, b.mlp_bias);
    EXPECT_EQ(a.qk_norm, b.qk_norm);
    EXPECT_EQ(a.tied_embeddings, b.tied_embeddings);
    EXPECT_EQ(a.sliding_window, b.sliding_window);
    EXPECT_EQ(a.hidden_act, b.hidden_act);
    EXPECT_EQ(a.dtype, b.dtype);
    EXPECT_EQ(a.bos_token_ids, b.bos_token_ids);
    EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
}

// ---- real configs --------------------------------------------------------------------------------------

const char* kLlama31_8B = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 128256
})";

const char* kLlama31_8B_v5 = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "dtype": "bfloat16",
  "eos_token_id": [128001, 128008, 128009],
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "vocab_size": 128256
})";

TEST(ModelConfig, Llama31_8B) {
    ModelConfig m = parse(kLlama31_8B);
    EXPECT_EQ(m.arch, Arch::Llama);
    EXPECT_EQ(m.arch_name, "LlamaForCausalLM");
    EXPECT_EQ(m.n_embd, 4096);
    EXPECT_EQ(m.n_layers, 32);
    EXPECT_EQ(m.n_heads, 32);
    EXPECT_EQ(m.n_kv_heads, 8);
    EXPECT_EQ(m.head_dim, 128);
    EXPECT_EQ(m.n_ff, 14336);
    EXPECT_EQ(m.vocab_size, 128256);
    EXPECT_EQ(m.max_position_embeddings, 131072);
    EXPECT_FLOAT_EQ(m.norm_eps, 1e-5f);
    EXPECT_EQ(m.rope.theta, 500000.0f);
    EXPECT_EQ(m.rope.type, RopeType::Llama3);
    EXPECT_EQ(m.rope.factor, 8.0f);
    EXPECT_EQ(m.rope.low_freq_factor, 1.0f);
    EXPECT_EQ(m.rope.high_freq_factor, 4.0f);
    EXPECT_EQ(m.rope.original_max_position, 8192);
    EXPECT_EQ(m.rope.partial_rotary_factor, 1.0f);
    EXPECT_FALSE(m.qkv_bias);
    EXPECT_FALSE(m.o_bias);
    EXPECT_FALSE(m.mlp_bias);
    EXPECT_FALSE(m.qk_norm);
    EXPECT_FALSE(m.tied_embeddings);
    EXPECT_EQ(m.sliding_window, 0);
    EXPECT_EQ(m.hidden_act, "silu");
    EXPECT_EQ(m.dtype, DType::BF16);
    EXPECT_EQ(m.bos_token_ids, std::vector<int64_t>{128000});
    EXPECT_EQ(m.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
    expect_same(m, parse(kLlama31_8B_v5));
}

const char* kMistral7B_v03 = R"({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 32768
})";

const char* kMistral7B_v03_v5 = R"({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "dtype": "bfloat16",
  "eos_token_id": 2,
  "head_dim": null,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "vocab_size": 32768
})";

TEST(ModelConfig, Mistral7B_v03) {
    ModelConfig m = parse(kMistral7B_v03);
    EXPECT_EQ(m.arch, Arch::Mistral);
    EXPECT_EQ(m.n_embd, 4096);
    EXPECT_EQ(m.n_kv_heads, 8);
    EXPECT_EQ(m.head_dim, 128);
    EXPECT_EQ(m.n_ff, 14336);
    EXPECT_EQ(m.vocab_size, 32768);
    EXPECT_EQ(m.max_position_embeddings, 32768);
    EXPECT_EQ(m.rope.theta, 1000000.0f);
    EXPECT_EQ(m.rope.type, RopeType::Default);
    EXPECT_EQ(m.sliding_window, 0);  // null: full attention
    EXPECT_FALSE(m.qkv_bias);
    EXPECT_FALSE(m.o_bias);
    EXPECT_FALSE(m.qk_norm);
    EXPECT_EQ(m.dtype, DType::BF16);
    EXPECT_EQ(m.bos_token_ids, std::vector<int64_t>{1});
    EXPECT_EQ(m.eos_token_ids, std::vector<int64_t>{2});
    expect_same(m, parse(kMistral7B_v03_v5));
}

TEST(ModelConfig, Mistral7B_v01SlidingWindowIsStored) {
    // Mistral-7B-v0.1 ships "sliding_window": 4096 with "rope_theta": 10000.0.
    ModelConfig m = parse(with(with(kMistral7B_v03, "sliding_window", "4096"), "rope_theta", "10000.0"));
    EXPECT_EQ(m.sliding_window, 4096);
    EXPECT_EQ(m.rope.theta, 10000.0f);
}

const char* kQwen25_7B = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "max_position_embeddings": 32768,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 152064
})";

const char* kQwen25_7B_v5 = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "dtype": "bfloat16",
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention"],
  "max_position_embeddings": 32768,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 152064
})";

TEST(ModelConfig, Qwen25_7B) {
    ModelConfig m = parse(kQwen25_7B);
    EXPECT_EQ(m.arch, Arch::Qwen2);
    EXPECT_EQ(m.n_embd, 3584);
    EXPECT_EQ(m.n_layers, 28);
    EXPECT_EQ(m.n_heads, 28);
    EXPECT_EQ(m.n_kv_heads, 4);
    EXPECT_EQ(m.head_dim, 128);
    EXPECT_EQ(m.n_ff, 18944);
    EXPECT_EQ(m.vocab_size, 152064);
    EXPECT_FLOAT_EQ(m.norm_eps, 1e-6f);
    EXPECT_EQ(m.rope.theta, 1000000.0f);
    EXPECT_TRUE(m.qkv_bias);   // Qwen2Attention: q/k/v bias=True
    EXPECT_FALSE(m.o_bias);    // o_proj bias=False
    EXPECT_FALSE(m.mlp_bias);
    EXPECT_FALSE(m.qk_norm);
    EXPECT_EQ(m.sliding_window, 0);  // use_sliding_window false
    EXPECT_EQ(m.bos_token_ids, std::vector<int64_t>{151643});
    EXPECT_EQ(m.eos_token_ids, std::vector<int64_t>{151645});
    expect_same(m, parse(kQwen25_7B_v5));
}

const char* kQwen3_8B = R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 12288,
  "max_position_embeddings": 40960,
  "max_window_layers": 36,
  "model_type": "qwen3",
  "num_attention_heads": 32,
  "num_hidden_layers": 36,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

const char* kQwen3_8B_v5 = R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "dtype": "bfloat16",
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 12288,
  "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
                  "full_attention"],
  "max_position_embeddings": 40960,
  "max_window_layers": 36,
  "model_type": "qwen3",
  "num_attention_heads": 32,
  "num_hidden_layers": 36,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

TEST(ModelConfig, Qwen3_8B) {
    ModelConfig m = parse(kQwen3_8B);
    EXPECT_EQ(m.arch, Arch::Qwen3);
    EXPECT_EQ(m.n_embd, 4096);
    EXPECT_EQ(m.n_layers, 36);
    EXPECT_EQ(m.n_kv_heads, 8);
    EXPECT_EQ(m.head_dim, 128);
    EXPECT_EQ(m.n_ff, 12288);
    EXPECT_EQ(m.vocab_size, 151936);
    EXPECT_EQ(m.max_position_embeddings, 40960);
    EXPECT_EQ(m.rope.theta, 1000000.0f);  // an integer in the file
    EXPECT_EQ(m.rope.type, RopeType::Default);
    EXPECT_TRUE(m.qk_norm);
    EXPECT_FALSE(m.qkv_bias);
    EXPECT_FALSE(m.o_bias);
    EXPECT_EQ(m.sliding_window, 0);
    EXPECT_EQ(m.dtype, DType::BF16);
    expect_same(m, parse(kQwen3_8B_v5));
}

TEST(ModelConfig, Qwen3_4BTiesEmbeddings) {
    // Qwen3-4B: hidden 2560, 36 layers, 32 heads, 8 kv heads, head_dim 128 (not 2560/32), tied.
    ModelConfig m = parse(with(with(with(with(kQwen3_8B, "hidden_size", "2560"), "intermediate_size", "9728"),
                                    "tie_word_embeddings", "true"),
                               "max_position_embeddings", "40960"));
    EXPECT_TRUE(m.tied_embeddings);
    EXPECT_EQ(m.head_dim, 128);
}

// ---- defaults when keys are absent --------------------------------------------------------------------

std::string minimal(const std::string& arch, int hidden, int heads) {
    return nlohmann::json{{"architectures", {arch}},
                          {"hidden_size", hidden},
                          {"num_hidden_layers", 2},
                          {"num_attention_heads", heads},
                          {"intermediate_size", 3 * hidden},
                          {"vocab_size", 1000}}
        .dump();
}

TEST(ModelConfig, LlamaDefaults) {
    ModelConfig m = parse(minimal("LlamaForCausalLM", 512, 8));
    EXPECT_EQ(m.n_kv_heads, 8);     // num_key_value_heads None -> num_attention_heads
    EXPECT_EQ(m.head_dim, 64);      // hidden_size // num_attention_heads
    EXPECT_EQ(m.max_position_embeddings, 2048);
    EXPECT_FLOAT_EQ(m.norm_eps, 1e-6f);
    EXPECT_EQ(m.rope.theta, 10000.0f);
    EXPECT_EQ(m.rope.type, RopeType::Default);
    EXPECT_EQ(m.rope.partial_rotary_factor, 1.0f);
    EXPECT_EQ(m.hidden_act, "silu");
    EXPECT_FALSE(m.tied_embeddings);
    EXPECT_FALSE(m.qkv_bias);
    EXPECT_FALSE(m.o_bias);
    EXPECT_FALSE(m.mlp_bias);
    EXPECT_FALSE(m.qk_norm);
    EXPECT_EQ(m.sliding_window, 0);
    EXPECT_EQ(m.dtype, DType::F32);
    EXPECT_EQ(m.bos_token_ids, std::vector<int64_t>{1});
    EXPECT_EQ(m.eos_token_ids, std::vector<int64_t>{2});
}

TEST(ModelConfig, MistralDefaults) {
    ModelConfig m = parse(minimal("MistralForCausalLM", 512, 8));
    EXPECT_EQ(m.n_kv_heads, 8);  // MistralConfig num_key_value_heads=8
    EXPECT_EQ(m.head_dim, 64);
    EXPECT_EQ(m.max_position_embeddings, 4096 * 32);
    EXPECT_EQ(m.sliding_window, 4096);
    EXPECT_EQ(m.rope.theta, 10000.0f);
    EXPECT_EQ(m.bos_token_ids, std::vector<int64_t>{1});
    EXPECT_EQ(m.eos_token_ids, std::vector<int64_t>{2});
    // With 16 heads the default 8 kv heads still divides; explicit null means num_attention_heads.
    EXPECT_EQ(parse(with(minimal("MistralForCausalLM", 512, 16), "num_key_value_heads", "null")).n_kv_heads, 16);
}

TEST(ModelConfig, Qwen2Defaults) {
    ModelConfig m = parse(minimal("Qwen2ForCausalLM", 2048, 32));
    EXPECT_EQ(m.n_kv_heads, 32);  // Qwen2Config num_key_value_heads=32
    EXPECT_EQ(m.head_dim, 64);
    EXPECT_EQ(m.max_position_embeddings, 32768);
    EXPECT_TRUE(m.qkv_bias);
    EXPECT_FALSE(m.o_bias);
    EXPECT_FALSE(m.qk_norm);
    EXPECT_EQ(m.sliding_window, 0);
    EXPECT_TRUE(m.bos_token_ids.empty());
    EXPECT_TRUE(m.eos_token_ids.empty());
    // attention_bias is not a Qwen2 key: the q/k/v bias stays.
    EXPECT_TRUE(parse(with(minimal("Qwen2ForCausalLM", 2048, 32), "attention_bias", "false")).qkv_bias);
}

TEST(ModelConfig, Qwen3Defaults) {
    ModelConfig m = parse(minimal("Qwen3ForCausalLM", 1024, 32));
    EXPECT_EQ(m.head_dim, 128);  // Qwen3Config head_dim=128, not hidden_size / heads = 32
    EXPECT_EQ(m.n_kv_heads, 32);
    EXPECT_EQ(m.max_position_embeddings, 32768);
    EXPECT_TRUE(m.qk_norm);
    EXPECT_FALSE(m.qkv_bias);
    EXPECT_FALSE(m.o_bias);
    EXPECT_TRUE(m.bos_token_ids.empty());
    ModelConfig biased = parse(with(minimal("Qwen3ForCausalLM", 1024, 32), "attention_bias", "true"));
    EXPECT_TRUE(biased.qkv_bias);
    EXPECT_TRUE(biased.o_bias);  // Qwen3Attention o_proj bias=config.attention_bias
    EXPECT_FALSE(biased.mlp_bias);
}

TEST(ModelConfig, LlamaBiasesAndHeadDim) {
    ModelConfig m = parse(with(with(minimal("LlamaForCausalLM", 512, 8), "attention_bias", "true"), "mlp_bias", "true"));
    EXPECT_TRUE(m.qkv_bias);
    EXPECT_TRUE(m.o_bias);
    EXPECT_TRUE(m.mlp_bias);
    EXPECT_EQ(parse(with(minimal("LlamaForCausalLM", 512, 8), "head_dim", "128")).head_dim, 128);
    EXPECT_EQ(parse(with(minimal("LlamaForCausalLM", 512, 8), "head_dim", "null")).head_dim, 64);
}

TEST(ModelConfig, TokenIds) {
    std::string base = minimal("Qwen2ForCausalLM", 2048, 32);
    EXPECT_EQ(parse(with(base, "eos_token_id", "7")).eos_token_ids, std::vector<int64_t>{7});
    EXPECT_EQ(parse(with(base, "eos_token_id", "[7, 9]")).eos_token_ids, (std::vector<int64_t>{7, 9}));
    EXPECT_TRUE(parse(with(minimal("LlamaForCausalLM", 512, 8), "bos_token_id", "null")).bos_token_ids.empty());
    EXPECT_ERROR(with(base, "eos_token_id", "\"2\""), "field 'eos_token_id' must be a non-negative integer");
    EXPECT_ERROR(with(base, "eos_token_id", "[1, -3]"), "field 'eos_token_id[1]'");
}

TEST(ModelConfig, DtypeSpellings) {
    std::string base = minimal("LlamaForCausalLM", 512, 8);
    EXPECT_EQ(parse(with(base, "torch_dtype", "\"float16\"")).dtype, DType::F16);
    EXPECT_EQ(parse(with(base, "dtype", "\"bfloat16\"")).dtype, DType::BF16);
    EXPECT_EQ(parse(with(base, "torch_dtype", "\"float32\"")).dtype, DType::F32);
    EXPECT_EQ(parse(with(with(base, "dtype", "\"bfloat16\""), "torch_dtype", "\"bfloat16\"")).dtype, DType::BF16);
    EXPECT_ERROR(with(with(base, "dtype", "\"bfloat16\""), "torch_dtype", "\"float16\""),
                 "torch_dtype 'float16' and dtype 'bfloat16' disagree");
    EXPECT_ERROR(with(base, "torch_dtype", "\"int8\""),
                 "config.json: torch_dtype 'int8' is not supported (supported: float32, float16, bfloat16)");
}

// ---- rope ---------------------------------------------------------------------------------------------

TEST(ModelConfig, RopeVariants) {
    std::string base = minimal("LlamaForCausalLM", 512, 8);
    ModelConfig linear = parse(with(base, "rope_scaling", R"({"type": "linear", "factor": 2.0})"));
    EXPECT_EQ(linear.rope.type, RopeType::Linear);
    EXPECT_EQ(linear.rope.factor, 2.0f);
    ModelConfig linear5 = parse(with(base, "rope_parameters", R"({"rope_type": "linear", "factor": 4, "rope_theta": 1e6})"));
    EXPECT_EQ(linear5.rope.type, RopeType::Linear);
    EXPECT_EQ(linear5.rope.factor, 4.0f);
    EXPECT_EQ(linear5.rope.theta, 1e6f);
    EXPECT_EQ(parse(with(base, "rope_scaling", R"({"rope_type": "default"})")).rope.type, RopeType::Default);
    // The same value at the top level and in the dict is fine.
    EXPECT_EQ(parse(with(with(base, "rope_theta", "5e5"), "rope_parameters", R"({"rope_theta": 500000})")).rope.theta,
              5e5f);
    // partial_rotary_factor at the top level (transformers 4) or in rope_parameters (transformers 5).
    EXPECT_EQ(parse(with(base, "partial_rotary_factor", "0.5")).rope.partial_rotary_factor, 0.5f);
    EXPECT_EQ(parse(with(base, "rope_parameters", R"({"rope_type": "default", "partial_rotary_factor": 0.25})"))
                  .rope.partial_rotary_factor,
              0.25f);
}

TEST(ModelConfig, RopeRefusals) {
    std::string base = minimal("LlamaForCausalLM", 512, 8);
    EXPECT_ERROR(with(base, "rope_scaling", R"({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})"),
                 "config.json: rope_scaling.rope_type 'yarn' is not supported (supported: default, linear, llama3)");
    EXPECT_ERROR(with(base, "rope_scaling", R"({"type": "dynamic", "factor": 2.0})"),
                 "config.json: rope_scaling.type 'dynamic' is not supported (supported: default, linear, llama3)");
    EXPECT_ERROR(with(base, "rope_parameters", R"({"rope_type": "longrope", "short_factor": [1], "long_factor": [1]})"),
                 "config.json: rope_parameters.rope_type 'longrope' is not supported");
    EXPECT_ERROR(with(base, "rope_scaling", R"({"rope_type": "ntk", "factor": 2.0})"), "rope_type 'ntk' is not supported");
    // llama3 needs all four keys (transformers' _validate_llama3_parameters).
    EXPECT_ERROR(with(base, "rope_scaling",
                      R"({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"),
                 "config.json: field 'rope_scaling.low_freq_factor' is missing");
    EXPECT_ERROR(with(base, "rope_scaling",
                      R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"),
                 "must be greater than");
    EXPECT_ERROR(with(base, "rope_scaling", R"({"rope_type": "linear"})"), "field 'rope_scaling.factor' is missing");
    EXPECT_ERROR(with(base, "rope_scaling", R"({"rope_type": "linear", "factor": "2"})"),
                 "field 'rope_scaling.factor' must be a number");
    EXPECT_ERROR(with(with(base, "rope_theta", "10000"), "rope_parameters", R"({"rope_theta": 500000})"),
                 "rope_theta 10000 and rope_parameters.rope_theta 500000 disagree");
    EXPECT_ERROR(with(with(base, "rope_scaling", R"({"rope_type": "linear", "factor": 2})"), "rope_parameters",
                      R"({"rope_type": "default"})"),
                 "rope_scaling and rope_parameters are both given and differ");
    EXPECT_ERROR(with(base, "rope_theta", "\"1e6\""), "field 'rope_theta' must be a number");
    EXPECT_ERROR(with(base, "partial_rotary_factor", "1.5"), "partial_rotary_factor must be in (0, 1]");
}

// ---- sliding windows ----------------------------------------------------------------------------------

TEST(ModelConfig, QwenSlidingWindow) {
    std::string base = minimal("Qwen2ForCausalLM", 2048, 32);  // 2 layers
    std::string on = with(base, "use_sliding_window", "true");
    // Layers i >= max_window_layers (default 28) would slide; with 2 layers none does.
    EXPECT_EQ(parse(on).sliding_window, 0);
    EXPECT_ERROR(with(on, "max_window_layers", "1"), "config.json: use_sliding_window=true is not supported");
    EXPECT_EQ(parse(with(with(on, "max_window_layers", "1"), "sliding_window", "null")).sliding_window, 0);
    EXPECT_ERROR(with(on, "layer_types", R"(["full_attention", "sliding_attention"])"),
                 "use_sliding_window=true is not supported");
    // Without use_sliding_window, transformers sets sliding_window to None: full attention.
    EXPECT_EQ(parse(with(base, "layer_types", R"(["full_attention", "sliding_attention"])")).sliding_window, 0);
    EXPECT_ERROR(with(base, "layer_types", R"(["full_attention"])"), "field 'layer_types' has 1 entries for 2 layers");
    EXPECT_ERROR(with(minimal("Qwen3ForCausalLM", 1024, 32), "use_sliding_window", "\"yes\""),
                 "field 'use_sliding_window' must be true or false");
}

// ---- refusals -----------------------------------------------------------------------------------------

TEST(ModelConfig, RequiredFieldsAndTypes) {
    EXPECT_ERROR(with(kLlama31_8B, "architectures", ""), "config.json: field 'architectures' is missing");
    EXPECT_ERROR(with(kLlama31_8B, "architectures", "[]"), "field 'architectures' is an empty list");
    EXPECT_ERROR(with(kLlama31_8B, "architectures", "\"LlamaForCausalLM\""), "field 'architectures' must be a list");
    for (const char* key : {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"}) {
        EXPECT_ERROR(with(kLlama31_8B, key, ""), std::string("config.json: field '") + key + "' is missing");
        EXPECT_ERROR(with(kLlama31_8B, key, "\"4096\""), std::string("field '") + key + "' must be an integer, got string");
        EXPECT_ERROR(with(kLlama31_8B, key, "4096.5"), std::string("field '") + key + "' must be an integer, got number");
        EXPECT_ERROR(with(kLlama31_8B, key, "0"), std::string("field '") + key + "' must be positive");
    }
    EXPECT_ERROR(with(kLlama31_8B, "max_position_embeddings", "null"), "field 'max_position_embeddings' must be an integer");
    EXPECT_ERROR(with(kLlama31_8B, "rms_norm_eps", "\"1e-5\""), "field 'rms_norm_eps' must be a number");
    EXPECT_ERROR(with(kLlama31_8B, "rms_norm_eps", "null"), "field 'rms_norm_eps' must be a number");
    EXPECT_ERROR(with(kLlama31_8B, "tie_word_embeddings", "\"false\""), "field 'tie_word_embeddings' must be true or false");
    EXPECT_ERROR(with(kLlama31_8B, "attention_bias", "0"), "field 'attention_bias' must be true or false");
    EXPECT_ERROR(with(kLlama31_8B, "num_key_value_heads", "\"8\""), "field 'num_key_value_heads' must be an integer");
    EXPECT_ERROR(with(kLlama31_8B, "num_key_value_heads", "5"),
                 "num_attention_heads 32 is not a multiple of num_key_value_heads 5");
    EXPECT_ERROR(with(minimal("LlamaForCausalLM", 500, 8), "head_dim", ""),
                 "hidden_size 500 is not a multiple of num_attention_heads 8");
    EXPECT_ERROR("[1, 2]", "config.json: expected a JSON object at the top level");
}

TEST(ModelConfig, UnsupportedValues) {
    EXPECT_ERROR(with(kLlama31_8B, "architectures", R"(["GPT2LMHeadModel"])"),
                 "config.json: architectures[0] 'GPT2LMHeadModel' is not supported (supported: LlamaForCausalLM, "
                 "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
                 "NemotronHForCausalLM)");
    EXPECT_ERROR(with(kLlama31_8B, "architectures", R"(["MixtralForCausalLM"])"), "'MixtralForCausalLM' is not supported");
    EXPECT_ERROR(with(kLlama31_8B, "hidden_act", "\"gelu\""),
                 "config.json: hidden_act 'gelu' is not supported (supported: silu)");
    EXPECT_ERROR(with(kLlama31_8B, "hidden_act", "\"relu2\""), "hidden_act 'relu2' is not supported");
    EXPECT_EQ(parse(with(kLlama31_8B, "hidden_act", "\"swish\"")).hidden_act, "silu");  // ACT2FN: swish is SiLU
}

// ---- files --------------------------------------------------------------------------------------------

TEST(ModelConfig, LoadFromDirectory) {
    auto dir = std::filesystem::temp_directory_path() / ("nibble_config_test_" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    {
        std::ofstream(dir / "config.json") << kQwen3_8B;
    }
    ModelConfig m = load_model_config(dir.string());
    EXPECT_EQ(m.arch, Arch::Qwen3);
    EXPECT_EQ(m.n_layers, 36);
    {
        std::ofstream(dir / "config.json") << with(kQwen3_8B, "rope_scaling", R"({"rope_type": "yarn", "factor": 4.0})");
    }
    try {
        load_model_config(dir.string());
        ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find((dir / "config.json").string() + ": rope_scaling.rope_type 'yarn'"),
                  std::string::npos)
            << e.what();
    }
    {
        std::ofstream(dir / "config.json") << "{\"architectures\": [";
    }
    try {
        load_model_config(dir.string());
        ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("config.json: invalid JSON"), std::string::npos) << e.what();
    }
    std::filesystem::remove_all(dir);
    EXPECT_THROW(load_model_config(dir.string()), Error);
    EXPECT_EQ(arch_name(Arch::Mistral), "MistralForCausalLM");
}

}  // namespace
}  // namespace nibble
