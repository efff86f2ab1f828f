// Chat templates: the public API (parse, render, apply_chat_template's context) and loading the
// templates of a model folder the way transformers' tokenizer loading does.
#include "tokenizer/chat_template.h"

#include "base/error.h"
#include "tokenizer/chat_template_ast.h"
#include "tokenizer/chat_template_eval.h"

#include <fstream>
#include <sstream>

namespace nibble {

ChatTemplate ChatTemplate::parse(std::string source, std::string origin) {
    ChatTemplate t;
    t.program_ = jinja::parse_program(source, origin);
    t.source_ = std::move(source);
    t.origin_ = std::move(origin);
    return t;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
    return render(context, ChatTemplateLimits{});
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context, const ChatTemplateLimits& limits) const {
    NIBBLE_CHECK(context.is_object(), "chat template {}: the context must be a JSON object, got {}", origin_,
                 context.type_name());
    jinja::Value ctx;
    try {
        ctx = jinja::Value::from_json(context);
    } catch (const jinja::RenderError& e) {
        fail("chat template {}: {}", origin_, e.what());
    }
    jinja::Interpreter interpreter(*program_, limits);
    return interpreter.render(ctx);
}

nlohmann::ordered_json chat_context(const ChatInputs& inputs) {
    nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
    ctx["messages"] = inputs.messages;
    ctx["tools"] = inputs.tools ? *inputs.tools : nlohmann::ordered_json(nullptr);
    ctx["documents"] = inputs.documents ? *inputs.documents : nlohmann::ordered_json(nullptr);
    ctx["add_generation_prompt"] = inputs.add_generation_prompt;
    for (const auto& [key, value] : inputs.special_tokens) ctx[key] = value;
    NIBBLE_CHECK(inputs.extra.is_object(), "chat template kwargs must be a JSON object, got {}", inputs.extra.type_name());
    for (auto it = inputs.extra.begin(); it != inputs.extra.end(); ++it) {
        const std::string& key = it.key();
        NIBBLE_CHECK(key != "messages" && key != "tools" && key != "documents" && key != "add_generation_prompt",
                     "chat template kwarg '{}' clashes with an argument of apply_chat_template", key);
        ctx[key] = it.value();
    }
    return ctx;
}

std::string render_chat(const ChatTemplate& chat_template, const ChatInputs& inputs) {
    NIBBLE_CHECK(inputs.messages.is_array(), "chat messages must be a JSON array, got {}", inputs.messages.type_name());
    return chat_template.render(chat_context(inputs));
}

std::vector<std::pair<std::string, nlohmann::ordered_json>> special_tokens_from_config(
    const nlohmann::ordered_json& config) {
    std::vector<std::pair<std::string, nlohmann::ordered_json>> out;
    auto token_text = [](const nlohmann::ordered_json& v) -> std::optional<std::string> {
        if (v.is_string()) return v.get<std::string>();
        if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
        return std::nullopt;
    };
    for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
        if (!config.contains(key)) continue;
        if (auto text = token_text(config[key])) out.emplace_back(key, *text);
    }
    if (config.contains("additional_special_tokens") && config["additional_special_tokens"].is_array() &&
        !config["additional_special_tokens"].empty()) {
        nlohmann::ordered_json list = nlohmann::ordered_json::array();
        for (const auto& v : config["additional_special_tokens"])
            if (auto text = token_text(v)) list.push_back(*text);
        out.emplace_back("additional_special_tokens", list);
    }
    return out;
}

namespace {

std::string read_text(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    NIBBLE_CHECK(in, "cannot open {}", path.string());
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

nlohmann::ordered_json read_json(const std::filesystem::path& path) {
    try {
        return nlohmann::ordered_json::parse(read_text(path));
    } catch (const nlohmann::json::exception& e) {
        fail("{}: invalid JSON: {}", path.string(), e.what());
    }
}

}  // namespace

std::map<std::string, std::string> read_chat_templates(const std::filesystem::path& model_dir) {
    std::map<std::string, std::string> templates;
    auto config_path = model_dir / "tokenizer_config.json";
    if (std::filesystem::exists(config_path)) {
        nlohmann::ordered_json config = read_json(config_path);
        if (config.contains("chat_template") && !config["chat_template"].is_null()) {
            const auto& ct = config["chat_template"];
            if (ct.is_string()) {
                templates["default"] = ct.get<std::string>();
            } else if (ct.is_array()) {
                for (const auto& entry : ct) {
                    NIBBLE_CHECK(entry.is_object() && entry.contains("name") && entry["name"].is_string() &&
                                     entry.contains("template") && entry["template"].is_string(),
                                 "{}: chat_template list entries must be {{\"name\": str, \"template\": str}}",
                                 config_path.string());
                    templates[entry["name"].get<std::string>()] = entry["template"].get<std::string>();
                }
            } else {
                fail("{}: chat_template must be a string or a list, got {}", config_path.string(), ct.type_name());
            }
        }
    }
    // chat_template.jinja clobbers the config's template (transformers does the same).
    if (auto jinja_path = model_dir / "chat_template.jinja"; std::filesystem::exists(jinja_path))
        templates["default"] = read_text(jinja_path);
    if (auto extra_dir = model_dir / "additional_chat_templates"; std::filesystem::is_directory(extra_dir)) {
        for (const auto& entry : std::filesystem::directory_iterator(extra_dir))
            if (entry.path().extension() == ".jinja") templates[entry.path().stem().string()] = read_text(entry.path());
    }
    if (templates.empty()) {
        if (auto json_path = model_dir / "chat_template.json"; std::filesystem::exists(json_path)) {
            nlohmann::ordered_json j = read_json(json_path);
            NIBBLE_CHECK(j.contains("chat_template") && j["chat_template"].is_string(),
                         "{}: expected a string field \"chat_template\"", json_path.string());
            templates["default"] = j["chat_template"].get<std::string>();
        }
    }
    return templates;
}

std::optional<ChatTemplate> load_chat_template(const std::filesystem::path& model_dir, bool with_tools,
                                               const std::optional<std::filesystem::path>& override_file) {
    if (override_file) return ChatTemplate::parse(read_text(*override_file), override_file->string());
    auto templates = read_chat_templates(model_dir);
    if (templates.empty()) return std::nullopt;
    std::string name = with_tools && templates.count("tool_use") ? "tool_use" : "default";
    auto it = templates.find(name);
    if (it == templates.end()) {
        std::string names;
        for (const auto& [n, t] : templates) names += (names.empty() ? "" : ", ") + n;
        fail("{}: the model has chat templates ({}) but none named \"default\"", model_dir.string(), names);
    }
    std::string origin = (model_dir / "tokenizer_config.json").string();
    if (std::filesystem::exists(model_dir / "chat_template.jinja") && name == "default")
        origin = (model_dir / "chat_template.jinja").string();
    else if (name != "default" || templates.size() > 1)
        origin += " (" + name + ")";
    return ChatTemplate::parse(it->second, origin);
}

}  // namespace nibble
