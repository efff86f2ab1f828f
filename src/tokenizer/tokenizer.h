// A Hugging Face tokenizer loaded from a model folder's tokenizer.json (+ tokenizer_config.json), with
// the ids transformers produces: added tokens split out first, then normalizer -> pre-tokenizer -> BPE
// model per piece, then (optionally) the post-processor's special tokens. Decoding runs the decoder
// chain as a stream (decoder.h): Tokenizer::decode for whole sequences, Detokenizer for streaming.
//
// A Tokenizer is immutable after loading except for the BPE word cache, which is internally locked, so
// one instance may encode and decode from many threads at once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/added_tokens.h"
#include "tokenizer/decoder.h"

namespace nibble::tokenizer {

class BpeModel;
class Normalizer;
class PreTokenizer;

class Tokenizer {
public:
    // Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
    static Tokenizer load(const std::filesystem::path& model_dir);
    // Builds from parsed files; `config` may be null. `where` names the source in error messages.
    static Tokenizer from_json(const nlohmann::json& tokenizer_json, const nlohmann::json& config, std::string_view where);

    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;
    ~Tokenizer();

    // Ids of `text` (valid UTF-8, else nibble::Error); add_special_tokens adds BOS/EOS as the
    // post-processor (or tokenizer_config's add_bos_token / add_eos_token) says.
    std::vector<uint32_t> encode(std::string_view text, bool add_special_tokens = false) const;

    // Text of `ids`; unknown ids are dropped (as HF tokenizers does). No clean-up of tokenization spaces
    // unless asked: servers stream text, and clean-up would make the stream differ from the whole.
    std::string decode(std::span<const uint32_t> ids, bool skip_special_tokens = false,
                       bool clean_up_tokenization_spaces = false) const;

    std::optional<std::string_view> id_to_token(uint32_t id) const;
    std::optional<uint32_t> token_to_id(std::string_view token) const;
    size_t vocab_size() const { return id_to_token_.size(); }  // highest id + 1
    bool is_special(uint32_t id) const { return id < special_.size() && special_[id]; }

    // From tokenizer_config.json (empty / nullopt when absent).
    const std::string& bos_token() const { return bos_token_; }
    const std::string& eos_token() const { return eos_token_; }
    std::optional<uint32_t> bos_id() const { return bos_id_; }
    std::optional<uint32_t> eos_id() const { return eos_id_; }
    // The whole tokenizer_config.json (null when absent): chat_template and friends live there.
    const nlohmann::json& config() const { return config_; }

    const std::shared_ptr<const Decoder>& decoder() const { return decoder_; }

private:
    Tokenizer();
    void encode_plain(std::string_view normalized, bool at_text_start, std::vector<uint32_t>& ids) const;

    std::unique_ptr<BpeModel> model_;
    std::unique_ptr<Normalizer> normalizer_;
    std::unique_ptr<PreTokenizer> pre_tokenizer_;
    std::shared_ptr<const Decoder> decoder_;
    AddedTokenMatcher raw_added_;         // added tokens with normalized = false
    AddedTokenMatcher normalized_added_;  // added tokens with normalized = true
    std::vector<std::string> id_to_token_;  // [vocab_size], "" for unused ids
    std::vector<bool> special_;             // [vocab_size]
    std::vector<uint32_t> prefix_ids_, suffix_ids_;  // added around the text when add_special_tokens
    std::string bos_token_, eos_token_;
    std::optional<uint32_t> bos_id_, eos_id_;
    nlohmann::json config_;
};

// Streaming decode of one sequence: push ids as they are generated, get the text that became final.
// Pieces never end inside a UTF-8 character, and the concatenation of every push() and finish() equals
// Tokenizer::decode of all the ids.
class Detokenizer {
public:
    explicit Detokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = false);
    std::string push(uint32_t id);
    std::string finish();

private:
    const Tokenizer* tokenizer_;
    bool skip_special_tokens_;
    DecodeStream stream_;
};

}  // namespace nibble::tokenizer
