// `nibble tokenize`: JSON lines in, JSON lines out, with the model folder's tokenizer.
//   {"text": "..."}                                   -> {"ids": [...]}            (no special tokens added)
//   {"messages": [...], "tools": [...], "add_generation_prompt": true, ...}
//                                                     -> {"ids": [...], "text": "<rendered prompt>"}
//   with --detokenize: {"ids": [...]}                 -> {"text": "..."}
// Chat lines render the model's chat template as transformers' apply_chat_template does (other keys of
// the line, e.g. enable_thinking, are passed to the template), then encode the text without adding
// special tokens, as apply_chat_template(tokenize=True) does.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>

#include "base/error.h"
#include "cli/commands.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace nibble::cli {

namespace {

struct TokenizeOptions {
    std::string model_dir;
    std::string jsonl;  // "-" reads stdin
    bool detokenize = false;
    bool skip_special_tokens = false;
    std::string chat_template;  // overrides the model's
};

using ojson = nlohmann::ordered_json;

class ChatRenderer {
public:
    ChatRenderer(const TokenizeOptions& options) : options_(options) {
        std::ifstream in(std::filesystem::path(options.model_dir) / "tokenizer_config.json");
        if (in.good()) special_tokens_ = special_tokens_from_config(ojson::parse(in));
    }

    std::string render(const ojson& line, const std::string& where) {
        ChatInputs inputs;
        inputs.special_tokens = special_tokens_;
        for (const auto& [key, value] : line.items()) {
            if (key == "messages") {
                NIBBLE_CHECK(value.is_array(), "{}: \"messages\" must be an array", where);
                inputs.messages = value;
            } else if (key == "tools") {
                if (!value.is_null()) inputs.tools = value;
            } else if (key == "documents") {
                if (!value.is_null()) inputs.documents = value;
            } else if (key == "add_generation_prompt") {
                NIBBLE_CHECK(value.is_boolean(), "{}: \"add_generation_prompt\" must be true or false", where);
                inputs.add_generation_prompt = value.get<bool>();
            } else {
                inputs.extra[key] = value;
            }
        }
        const bool with_tools = inputs.tools.has_value();
        std::optional<ChatTemplate>& tmpl = with_tools ? with_tools_ : without_tools_;
        if (!tmpl) {
            std::optional<std::filesystem::path> override_file;
            if (!options_.chat_template.empty()) override_file = options_.chat_template;
            tmpl = load_chat_template(options_.model_dir, with_tools, override_file);
            NIBBLE_CHECK(tmpl.has_value(), "{}: the model in {} has no chat template (use --chat-template FILE)", where,
                         options_.model_dir);
        }
        return render_chat(*tmpl, inputs);
    }

private:
    const TokenizeOptions& options_;
    std::vector<std::pair<std::string, ojson>> special_tokens_;
    std::optional<ChatTemplate> with_tools_, without_tools_;
};

void run_tokenize(const TokenizeOptions& options) {
    const tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(options.model_dir);
    std::ifstream file;
    std::istream* in = &std::cin;
    if (options.jsonl != "-") {
        file.open(options.jsonl, std::ios::binary);
        NIBBLE_CHECK(file.good(), "{}: cannot open", options.jsonl);
        in = &file;
    }
    std::optional<ChatRenderer> chat;
    std::string raw;
    size_t line_no = 0;
    while (std::getline(*in, raw)) {
        ++line_no;
        const std::string where = fmt::format("{}:{}", options.jsonl, line_no);
        if (!raw.empty() && raw.back() == '\r') raw.pop_back();
        if (raw.find_first_not_of(" \t") == std::string::npos) continue;
        ojson line;
        try {
            line = ojson::parse(raw);
        } catch (const nlohmann::json::exception& e) {
            fail("{}: not valid JSON: {}", where, e.what());
        }
        NIBBLE_CHECK(line.is_object(), "{}: each line must be a JSON object", where);
        ojson out = ojson::object();
        if (options.detokenize) {
            NIBBLE_CHECK(line.contains("ids") && line.at("ids").is_array(), "{}: expected {{\"ids\": [...]}}", where);
            std::vector<uint32_t> ids;
            for (const auto& id : line.at("ids")) {
                NIBBLE_CHECK(id.is_number_unsigned() && id.get<uint64_t>() <= UINT32_MAX,
                             "{}: ids must be non-negative 32-bit integers", where);
                ids.push_back(id.get<uint32_t>());
            }
            out["text"] = tok.decode(ids, options.skip_special_tokens);
        } else if (line.contains("text")) {
            NIBBLE_CHECK(line.at("text").is_string(), "{}: \"text\" must be a string", where);
            out["ids"] = tok.encode(line.at("text").get<std::string>(), false);
        } else if (line.contains("messages")) {
            if (!chat) chat.emplace(options);
            std::string text = chat->render(line, where);
            out["ids"] = tok.encode(text, false);
            out["text"] = std::move(text);
        } else {
            fail("{}: expected {{\"text\": ...}} or {{\"messages\": [...]}}", where);
        }
        std::string s = out.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
        s.push_back('\n');
        std::fwrite(s.data(), 1, s.size(), stdout);
    }
    std::fflush(stdout);
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
    auto options = std::make_shared<TokenizeOptions>();
    auto* cmd = app.add_subcommand("tokenize", "Encode text or chat messages to token ids (or decode ids) as JSON lines");
    cmd->add_option("--model", options->model_dir, "Model folder with tokenizer.json")->required();
    cmd->add_option("--jsonl", options->jsonl, "Input JSON lines file ('-' for stdin)")->required();
    cmd->add_flag("--detokenize", options->detokenize, "Decode {\"ids\": [...]} lines to {\"text\": ...}");
    cmd->add_flag("--skip-special-tokens", options->skip_special_tokens, "With --detokenize: drop special tokens");
    cmd->add_option("--chat-template", options->chat_template, "Jinja chat template file overriding the model's");
    cmd->callback([options] { run_tokenize(*options); });
}

}  // namespace nibble::cli
