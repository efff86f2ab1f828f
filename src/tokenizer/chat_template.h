// Chat templates: a Jinja interpreter for the subset real chat templates use, rendering exactly as
// transformers' apply_chat_template does (jinja2's ImmutableSandboxedEnvironment with trim_blocks,
// lstrip_blocks, loopcontrols, the {% generation %} tag, and the globals/filters transformers adds:
// tojson as json.dumps(ensure_ascii=False, ...), raise_exception, strftime_now).
//
// Context values are nlohmann::ordered_json: key order matters because `tojson` and dict printing
// keep insertion order, as Python's dicts do. Parse request bodies with ordered_json::parse.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace nibble {

namespace jinja {
struct Program;
}

// Guards against runaway templates; exceeding one is a nibble::Error.
struct ChatTemplateLimits {
    size_t max_output_bytes = size_t{256} << 20;  // all text produced, including macro bodies
    uint64_t max_steps = 4'000'000'000;           // statements + expressions evaluated
    int max_call_depth = 200;                     // nested macro calls
};

class ChatTemplate {
public:
    // Parses `source`; syntax errors are nibble::Error naming `origin` and the line.
    static ChatTemplate parse(std::string source, std::string origin);

    // Renders with `context` (a JSON object) as the template's variables. Errors (undefined
    // attributes, type errors, raise_exception) are nibble::Error naming origin and line.
    std::string render(const nlohmann::ordered_json& context) const;
    std::string render(const nlohmann::ordered_json& context, const ChatTemplateLimits& limits) const;

    const std::string& source() const { return source_; }
    const std::string& origin() const { return origin_; }

private:
    std::shared_ptr<const jinja::Program> program_;
    std::string source_;
    std::string origin_;
};

// What apply_chat_template passes to a template.
struct ChatInputs {
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    std::optional<nlohmann::ordered_json> tools;      // not given: the template sees tools = None
    std::optional<nlohmann::ordered_json> documents;  // not given: documents = None
    bool add_generation_prompt = false;
    nlohmann::ordered_json extra = nlohmann::ordered_json::object();  // kwargs: enable_thinking, reasoning_effort...
    // transformers' special_tokens_map (bos_token, eos_token, unk_token, pad_token, ...); tokens the
    // tokenizer lacks are absent, so the template sees them undefined.
    std::vector<std::pair<std::string, nlohmann::ordered_json>> special_tokens;
};

// The template context transformers builds: messages, tools, documents, add_generation_prompt, then
// the special tokens, then the extra kwargs (which override special tokens of the same name).
nlohmann::ordered_json chat_context(const ChatInputs& inputs);
std::string render_chat(const ChatTemplate& chat_template, const ChatInputs& inputs);

// transformers' special_tokens_map from a tokenizer_config.json: bos/eos/unk/sep/pad/cls/mask tokens
// (a string, or an AddedToken object's "content") and additional_special_tokens, in that order.
std::vector<std::pair<std::string, nlohmann::ordered_json>> special_tokens_from_config(
    const nlohmann::ordered_json& tokenizer_config);

// The named templates of a model folder, as transformers loads them: tokenizer_config.json's
// `chat_template` (a string -> "default", or a list of {name, template}), replaced by
// chat_template.jinja when that file exists, plus additional_chat_templates/<name>.jinja.
// chat_template.json ({"chat_template": ...}, a processor's file) is used only when nothing else is.
std::map<std::string, std::string> read_chat_templates(const std::filesystem::path& model_dir);

// Picks the template apply_chat_template would use: `override_file` (--chat-template FILE) if
// given; else "tool_use" when tools are given and the model has one, else "default".
// Returns nullopt when the model has no chat template.
std::optional<ChatTemplate> load_chat_template(const std::filesystem::path& model_dir, bool with_tools,
                                               const std::optional<std::filesystem::path>& override_file = {});

}  // namespace nibble
