// Deterministic tiny model. Weights: N(0, std) from a fixed-seed xorshift64* + Box-Muller (portable, unlike
// std::normal_distribution), stored as BF16. Tokenizer: GPT-2's byte-to-unicode alphabet (256 tokens),
// merges learned greedily on a fixed text (most frequent pair, ties to the smaller pair), and three special
// tokens for ChatML.
#include "cli/default_model.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "base/error.h"
#include "base/log.h"
#include "checkpoint/safetensors.h"
#include "tensor/float_formats.h"

namespace nibble::cli {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

constexpr int64_t kHidden = 64, kLayers = 2, kHeads = 4, kKvHeads = 2, kHeadDim = 16, kFf = 128;
constexpr int kMerges = 240;

const char* kCorpus =
    "The quick brown fox jumps over the lazy dog. Hello, world! This is nibble, an inference server. "
    "It serves models over an OpenAI-compatible API: chat completions, completions, streaming, tools and "
    "reasoning. This tiny model has random weights, so what it writes means nothing at all. Try a real "
    "checkpoint with nibble serve MODEL_DIR, and ask it what the capital of France is. "
    "def main():\n    print(\"hello\")\n    return 0\n";

// GPT-2's reversible map from bytes to printable unicode code points.
std::vector<uint32_t> byte_to_codepoint() {
    std::vector<uint32_t> map(256, 0);
    std::vector<bool> direct(256, false);
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) map[b] = direct[b] ? static_cast<uint32_t>(b) : next++;
    return map;
}

std::string utf8(uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
        s += static_cast<char>(cp);
    } else if (cp < 0x800) {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        s += static_cast<char>(0xE0 | (cp >> 12));
        s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return s;
}

// Words as GPT-2's pre-tokenizer roughly splits them: an optional leading space, then a run of letters,
// digits, or other non-space characters.
std::vector<std::string> words_of(const std::string& text) {
    std::vector<std::string> words;
    size_t i = 0;
    auto cls = [](unsigned char c) { return std::isalpha(c) ? 0 : std::isdigit(c) ? 1 : std::isspace(c) ? 3 : 2; };
    while (i < text.size()) {
        size_t j = i;
        if (text[j] == ' ' && j + 1 < text.size() && cls(static_cast<unsigned char>(text[j + 1])) != 3) ++j;
        const int c = cls(static_cast<unsigned char>(text[j]));
        while (j < text.size() && cls(static_cast<unsigned char>(text[j])) == c) ++j;
        words.push_back(text.substr(i, j - i));
        i = j;
    }
    return words;
}

ojson make_tokenizer_json(int64_t& vocab_size) {
    const std::vector<uint32_t> b2u = byte_to_codepoint();
    ojson vocab = ojson::object();
    std::vector<std::string> tokens;
    for (int b = 0; b < 256; ++b) tokens.push_back(utf8(b2u[b]));
    // Word -> its current split, and counts.
    std::map<std::string, int> counts;
    for (const auto& w : words_of(kCorpus)) ++counts[w];
    std::map<std::string, std::vector<std::string>> splits;
    for (const auto& [w, n] : counts)
        for (unsigned char c : w) splits[w].push_back(tokens[c]);
    ojson merges = ojson::array();
    for (int m = 0; m < kMerges; ++m) {
        std::map<std::pair<std::string, std::string>, int> pairs;
        for (const auto& [w, n] : counts) {
            const auto& s = splits[w];
            for (size_t i = 0; i + 1 < s.size(); ++i) pairs[{s[i], s[i + 1]}] += n;
        }
        if (pairs.empty()) break;
        auto best = pairs.begin();
        for (auto it = pairs.begin(); it != pairs.end(); ++it)
            if (it->second > best->second) best = it;  // first in order among equals: deterministic
        const auto [a, b] = best->first;
        merges.push_back(ojson::array({a, b}));
        tokens.push_back(a + b);
        for (auto& [w, s] : splits) {
            std::vector<std::string> out;
            for (size_t i = 0; i < s.size(); ++i) {
                if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
                    out.push_back(a + b);
                    ++i;
                } else {
                    out.push_back(s[i]);
                }
            }
            s = std::move(out);
        }
    }
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
    ojson added = ojson::array();
    const int64_t first_special = static_cast<int64_t>(tokens.size());
    int64_t id = first_special;
    for (const char* t : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
        added.push_back({{"id", id++}, {"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                         {"normalized", false}, {"special", true}});
    }
    vocab_size = id;
    const ojson byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                              {"use_regex", true}};
    return ojson{{"version", "1.0"},
                 {"truncation", nullptr},
                 {"padding", nullptr},
                 {"added_tokens", added},
                 {"normalizer", nullptr},
                 {"pre_tokenizer", byte_level},
                 {"post_processor", byte_level},
                 {"decoder", byte_level},
                 {"model",
                  {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                   {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                   {"ignore_merges", false}, {"vocab", vocab}, {"merges", merges}}}};
}

// xorshift64* and Box-Muller: the same numbers on every platform.
class Normal {
public:
    explicit Normal(uint64_t seed) : state_(seed ? seed : 1) {}
    float operator()(float stddev) {
        const double u1 = (static_cast<double>(next() >> 11) + 1.0) / 9007199254740993.0;
        const double u2 = static_cast<double>(next() >> 11) / 9007199254740992.0;
        return static_cast<float>(stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }

private:
    uint64_t next() {
        state_ ^= state_ >> 12;
        state_ ^= state_ << 25;
        state_ ^= state_ >> 27;
        return state_ * 0x2545F4914F6CDD1DULL;
    }
    uint64_t state_;
};

void write_json(const fs::path& path, const ojson& j) {
    std::ofstream out(path, std::ios::binary);
    out << j.dump(2) << "\n";
    NIBBLE_CHECK(out.good(), "{}: cannot write", path.string());
}

void write_model(const fs::path& dir) {
    int64_t vocab = 0;
    write_json(dir / "tokenizer.json", make_tokenizer_json(vocab));
    const int64_t eos = vocab - 1;  // <|im_end|> ends a turn
    const char* chat_template =
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
    write_json(dir / "tokenizer_config.json",
               ojson{{"tokenizer_class", "GPT2Tokenizer"}, {"bos_token", nullptr}, {"eos_token", "<|im_end|>"},
                     {"pad_token", "<|endoftext|>"}, {"unk_token", nullptr}, {"model_max_length", 2048},
                     {"clean_up_tokenization_spaces", false}, {"chat_template", chat_template}});
    write_json(dir / "config.json",
               ojson{{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", kHidden},
                     {"intermediate_size", kFf}, {"num_hidden_layers", kLayers}, {"num_attention_heads", kHeads},
                     {"num_key_value_heads", kKvHeads}, {"head_dim", kHeadDim}, {"hidden_act", "silu"},
                     {"max_position_embeddings", 2048}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                     {"rope_scaling", nullptr}, {"attention_bias", false}, {"mlp_bias", false},
                     {"tie_word_embeddings", false}, {"vocab_size", vocab}, {"bos_token_id", nullptr},
                     {"eos_token_id", eos}, {"torch_dtype", "bfloat16"}});
    write_json(dir / "generation_config.json", ojson{{"eos_token_id", eos}});

    // Tensors in the order the reference writer would lay them out is not needed: declared order is kept.
    struct Spec {
        std::string name;
        Shape shape;
        float stddev;  // 0: ones (norm weights)
    };
    std::vector<Spec> specs;
    specs.push_back({"model.embed_tokens.weight", {vocab, kHidden}, 1.0f});
    for (int64_t l = 0; l < kLayers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        specs.push_back({p + "input_layernorm.weight", {kHidden}, 0.0f});
        specs.push_back({p + "self_attn.q_proj.weight", {kHeads * kHeadDim, kHidden}, 0.125f});
        specs.push_back({p + "self_attn.k_proj.weight", {kKvHeads * kHeadDim, kHidden}, 0.125f});
        specs.push_back({p + "self_attn.v_proj.weight", {kKvHeads * kHeadDim, kHidden}, 0.125f});
        specs.push_back({p + "self_attn.o_proj.weight", {kHidden, kHeads * kHeadDim}, 0.125f});
        specs.push_back({p + "post_attention_layernorm.weight", {kHidden}, 0.0f});
        specs.push_back({p + "mlp.gate_proj.weight", {kFf, kHidden}, 0.125f});
        specs.push_back({p + "mlp.up_proj.weight", {kFf, kHidden}, 0.125f});
        specs.push_back({p + "mlp.down_proj.weight", {kHidden, kFf}, 0.09f});
    }
    specs.push_back({"model.norm.weight", {kHidden}, 0.0f});
    specs.push_back({"lm_head.weight", {vocab, kHidden}, 0.5f});

    SafetensorsWriter writer((dir / "model.safetensors").string());
    writer.set_metadata("format", "pt");
    for (const auto& s : specs) writer.declare(s.name, DType::BF16, s.shape);
    Normal normal(0x6e6962626c65ULL);  // "nibble"
    for (const auto& s : specs) {
        std::vector<uint16_t> data(static_cast<size_t>(s.shape.numel()));
        for (auto& x : data) x = bf16_from_float(s.stddev == 0.0f ? 1.0f : normal(s.stddev));
        writer.write(s.name, data.data(), data.size() * sizeof(uint16_t));
    }
    writer.finish();
}

}  // namespace

fs::path default_model_dir() {
    if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return fs::path(xdg) / "nibble" / "default-model-v1";
    if (const char* home = std::getenv("HOME"); home && *home)
        return fs::path(home) / ".cache" / "nibble" / "default-model-v1";
    return fs::temp_directory_path() / "nibble" / "default-model-v1";
}

fs::path ensure_default_model(const fs::path& dir) {
    if (fs::exists(dir / "model.safetensors") && fs::exists(dir / "tokenizer_config.json")) return dir;
    std::error_code ec;
    fs::create_directories(dir.parent_path(), ec);
    NIBBLE_CHECK(!ec, "cannot create {}: {}", dir.parent_path().string(), ec.message());
    const fs::path tmp = dir.parent_path() / (dir.filename().string() + ".tmp-" + std::to_string(::getpid()));
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp);
    log::info("creating the built-in tiny model in {}", dir.string());
    write_model(tmp);
    fs::rename(tmp, dir, ec);
    if (ec) {
        // Another process created it first: keep theirs.
        fs::remove_all(tmp);
        NIBBLE_CHECK(fs::exists(dir / "model.safetensors"), "cannot create {}: {}", dir.string(), ec.message());
    }
    return dir;
}

}  // namespace nibble::cli
