// Tokenizer loading, encoding and decoding (see tokenizer.h).
#include "tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>

#include "base/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/utf8.h"

namespace nibble::tokenizer {
namespace {

nlohmann::json read_json(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    NIBBLE_CHECK(in.good(), "{}: cannot open", path.string());
    std::stringstream ss;
    ss << in.rdbuf();
    try {
        return nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", path.string(), e.what());
    }
}

// A token in tokenizer_config.json: a string, or {"content": ...} (an AddedToken), or null.
std::string config_token(const nlohmann::json& config, const char* key) {
    if (!config.is_object() || !config.contains(key)) return {};
    const auto& v = config.at(key);
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object() && v.contains("content") && v.at("content").is_string()) return v.at("content").get<std::string>();
    return {};
}

AddedToken parse_added_token(const nlohmann::json& j, uint32_t id) {
    AddedToken t;
    t.id = id;
    t.content = j.at("content").get<std::string>();
    t.special = j.value("special", false);
    t.lstrip = j.value("lstrip", false);
    t.rstrip = j.value("rstrip", false);
    t.single_word = j.value("single_word", false);
    t.normalized = j.value("normalized", !t.special);
    return t;
}

// Collects the ids the post-processor puts before and after a single sequence.
void parse_post_processor(const nlohmann::json& j, std::vector<uint32_t>& prefix, std::vector<uint32_t>& suffix,
                          bool& has_template) {
    if (j.is_null()) return;
    const std::string type = j.at("type").get<std::string>();
    if (type == "Sequence") {
        for (const auto& p : j.at("processors")) parse_post_processor(p, prefix, suffix, has_template);
    } else if (type == "ByteLevel") {
        // Only moves offsets; ids are unchanged.
    } else if (type == "TemplateProcessing") {
        has_template = true;
        prefix.clear();
        suffix.clear();
        bool seen_sequence = false;
        const auto& specials = j.at("special_tokens");
        for (const auto& item : j.at("single")) {
            if (item.contains("Sequence")) {
                NIBBLE_CHECK(item.at("Sequence").at("id").get<std::string>() == "A",
                             "tokenizer.json: TemplateProcessing single template uses sequence B");
                seen_sequence = true;
            } else if (item.contains("SpecialToken")) {
                const std::string name = item.at("SpecialToken").at("id").get<std::string>();
                NIBBLE_CHECK(specials.contains(name), "tokenizer.json: TemplateProcessing special token '{}' is not defined", name);
                for (const auto& id : specials.at(name).at("ids")) (seen_sequence ? suffix : prefix).push_back(id.get<uint32_t>());
            }
        }
    } else {
        fail("tokenizer.json: post_processor type '{}' is not supported", type);
    }
}

// transformers' clean_up_tokenization: drop spaces before punctuation and English contractions.
std::string clean_up_tokenization(std::string s) {
    static constexpr std::pair<std::string_view, std::string_view> kRules[] = {
        {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
        {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& [from, to] : kRules) {
        if (s.find(from) != std::string::npos) s = replace_all(s, from, to);
    }
    return s;
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::filesystem::path& model_dir) {
    auto tokenizer_path = model_dir / "tokenizer.json";
    NIBBLE_CHECK(std::filesystem::exists(tokenizer_path), "{}: no tokenizer.json in the model folder", model_dir.string());
    nlohmann::json tj = read_json(tokenizer_path);
    nlohmann::json config;
    auto config_path = model_dir / "tokenizer_config.json";
    if (std::filesystem::exists(config_path)) config = read_json(config_path);
    return from_json(tj, config, tokenizer_path.string());
}

Tokenizer Tokenizer::from_json(const nlohmann::json& tj, const nlohmann::json& config, std::string_view where) {
    Tokenizer t;
    try {
        NIBBLE_CHECK(tj.is_object() && tj.contains("model"), "{}: no 'model'", where);
        const auto& model = tj.at("model");
        std::string type = model.value("type", model.contains("merges") ? "BPE" : "");
        NIBBLE_CHECK(type == "BPE", "{}: model type '{}' is not supported", where, type);
        t.model_ = std::make_unique<BpeModel>(model, where);
        t.normalizer_ = std::make_unique<Normalizer>(Normalizer::from_json(tj.value("normalizer", nlohmann::json())));
        t.pre_tokenizer_ = std::make_unique<PreTokenizer>(PreTokenizer::from_json(tj.value("pre_tokenizer", nlohmann::json())));
        t.decoder_ = Decoder::from_json(tj.value("decoder", nlohmann::json()));

        // Added tokens: tokenizer.json's list, then tokenizer_config.json's added_tokens_decoder entries
        // whose ids it lacks (transformers adds those at load time).
        std::vector<AddedToken> added;
        std::vector<bool> have;
        auto note = [&](AddedToken tok) {
            if (tok.id >= have.size()) have.resize(tok.id + 1, false);
            if (have[tok.id]) return;
            have[tok.id] = true;
            added.push_back(std::move(tok));
        };
        if (tj.contains("added_tokens")) {
            for (const auto& a : tj.at("added_tokens")) note(parse_added_token(a, a.at("id").get<uint32_t>()));
        }
        if (config.is_object() && config.contains("added_tokens_decoder")) {
            for (const auto& [key, a] : config.at("added_tokens_decoder").items()) {
                uint32_t id = 0;
                try {
                    id = static_cast<uint32_t>(std::stoul(key));
                } catch (const std::exception&) {
                    fail("tokenizer_config.json: added_tokens_decoder key '{}' is not an id", key);
                }
                note(parse_added_token(a, id));
            }
        }

        // id -> token table over the vocab and the added tokens.
        size_t size = 0;
        for (const auto& [tok, id] : t.model_->vocab()) size = std::max<size_t>(size, id + 1);
        for (const auto& a : added) size = std::max<size_t>(size, a.id + 1);
        t.id_to_token_.assign(size, std::string());
        t.special_.assign(size, false);
        for (const auto& [tok, id] : t.model_->vocab()) t.id_to_token_[id] = tok;
        for (const auto& a : added) {
            t.id_to_token_[a.id] = a.content;
            t.special_[a.id] = a.special;
        }
        // additional_special_tokens count as special for skip_special_tokens, as in transformers.
        if (config.is_object() && config.contains("additional_special_tokens")) {
            for (const auto& s : config.at("additional_special_tokens")) {
                std::string content = s.is_string() ? s.get<std::string>() : s.value("content", std::string());
                for (auto& a : added) {
                    if (a.content == content) {
                        a.special = true;
                        t.special_[a.id] = true;
                    }
                }
            }
        }
        std::vector<AddedToken> raw, normalized;
        for (auto& a : added) (a.normalized && !t.normalizer_->empty() ? normalized : raw).push_back(a);
        t.raw_added_ = AddedTokenMatcher(std::move(raw));
        t.normalized_added_ = AddedTokenMatcher(std::move(normalized));

        bool has_template = false;
        parse_post_processor(tj.value("post_processor", nlohmann::json()), t.prefix_ids_, t.suffix_ids_, has_template);

        t.config_ = config;
        t.bos_token_ = config_token(config, "bos_token");
        t.eos_token_ = config_token(config, "eos_token");
        if (!t.bos_token_.empty()) t.bos_id_ = t.token_to_id(t.bos_token_);
        if (!t.eos_token_.empty()) t.eos_id_ = t.token_to_id(t.eos_token_);
        // transformers' Llama/Gemma tokenizers rebuild the post-processor from add_bos_token /
        // add_eos_token when the config sets them.
        if (config.is_object() && (config.contains("add_bos_token") || config.contains("add_eos_token"))) {
            bool add_bos = config.value("add_bos_token", false) == true;
            bool add_eos = config.value("add_eos_token", false) == true;
            t.prefix_ids_.clear();
            t.suffix_ids_.clear();
            if (add_bos) {
                NIBBLE_CHECK(t.bos_id_.has_value(), "tokenizer_config.json: add_bos_token is set but bos_token '{}' is not a token", t.bos_token_);
                t.prefix_ids_.push_back(*t.bos_id_);
            }
            if (add_eos) {
                NIBBLE_CHECK(t.eos_id_.has_value(), "tokenizer_config.json: add_eos_token is set but eos_token '{}' is not a token", t.eos_token_);
                t.suffix_ids_.push_back(*t.eos_id_);
            }
        }
    } catch (const nlohmann::json::exception& e) {
        fail("{}: unexpected structure: {}", where, e.what());
    }
    return t;
}

std::optional<std::string_view> Tokenizer::id_to_token(uint32_t id) const {
    if (id >= id_to_token_.size() || id_to_token_[id].empty()) return std::nullopt;
    return std::string_view(id_to_token_[id]);
}

std::optional<uint32_t> Tokenizer::token_to_id(std::string_view token) const {
    if (auto id = model_->token_to_id(token)) return id;
    for (uint32_t id = 0; id < id_to_token_.size(); ++id) {
        if (id_to_token_[id] == token) return id;  // added tokens outside the model's vocab (rare lookups)
    }
    return std::nullopt;
}

void Tokenizer::encode_plain(std::string_view text, bool at_text_start, std::vector<uint32_t>& ids) const {
    if (text.empty()) return;
    PreTokens pieces, scratch;
    pieces.buffer.assign(text);
    pieces.spans.push_back({0, static_cast<uint32_t>(text.size()), at_text_start});
    pre_tokenizer_->apply(pieces, scratch);
    std::string_view buffer = pieces.buffer;
    for (const auto& span : pieces.spans) model_->encode_word(buffer.substr(span.begin, span.end - span.begin), ids);
}

std::vector<uint32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
    size_t bad = find_invalid_utf8(text);
    NIBBLE_CHECK(bad == std::string_view::npos, "tokenize: text is not valid UTF-8 (byte {})", bad);
    NIBBLE_CHECK(text.size() < (size_t{1} << 31), "tokenize: text of {} bytes is too long", text.size());
    std::vector<uint32_t> ids;
    ids.reserve(text.size() / 3 + 4);
    if (add_special_tokens) ids.insert(ids.end(), prefix_ids_.begin(), prefix_ids_.end());
    std::vector<Segment> segments, inner;
    raw_added_.split(text, segments);
    for (const auto& seg : segments) {
        if (seg.token >= 0) {
            ids.push_back(raw_added_.token(static_cast<size_t>(seg.token)).id);
            continue;
        }
        std::string_view piece = text.substr(seg.begin, seg.end - seg.begin);
        if (piece.empty()) continue;
        if (normalizer_->empty()) {
            encode_plain(piece, seg.begin == 0, ids);
            continue;
        }
        std::string normalized = normalizer_->apply(piece);
        inner.clear();
        normalized_added_.split(normalized, inner);
        for (const auto& sub : inner) {
            if (sub.token >= 0) {
                ids.push_back(normalized_added_.token(static_cast<size_t>(sub.token)).id);
            } else {
                encode_plain(std::string_view(normalized).substr(sub.begin, sub.end - sub.begin),
                             seg.begin == 0 && sub.begin == 0, ids);
            }
        }
    }
    if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
    return ids;
}

std::string Tokenizer::decode(std::span<const uint32_t> ids, bool skip_special_tokens, bool clean_up_tokenization_spaces) const {
    Detokenizer d(*this, skip_special_tokens);
    std::string out;
    for (uint32_t id : ids) out += d.push(id);
    out += d.finish();
    if (clean_up_tokenization_spaces) out = clean_up_tokenization(std::move(out));
    return out;
}

Detokenizer::Detokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_tokens_(skip_special_tokens), stream_(tokenizer.decoder()) {}

std::string Detokenizer::push(uint32_t id) {
    std::string out;
    auto token = tokenizer_->id_to_token(id);
    if (!token || (skip_special_tokens_ && tokenizer_->is_special(id))) return out;
    stream_.push(*token, out);
    return out;
}

std::string Detokenizer::finish() {
    std::string out;
    stream_.finish(out);
    return out;
}

}  // namespace nibble::tokenizer
