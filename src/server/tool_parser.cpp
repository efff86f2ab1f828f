// Tool-call extraction. Outside a call, a suffix of the text that may begin "<tool_call>" is held back;
// inside one, everything is held until "</tool_call>".
#include "server/tool_parser.h"

#include <cstdlib>

#include "base/error.h"

namespace nibble::server {

namespace {

using ojson = nlohmann::ordered_json;

constexpr std::string_view kOpen = "<tool_call>";
constexpr std::string_view kClose = "</tool_call>";

size_t partial_suffix(std::string_view text, std::string_view tag) {
    for (size_t n = std::min(text.size(), tag.size() - 1); n > 0; --n)
        if (text.substr(text.size() - n) == tag.substr(0, n)) return n;
    return 0;
}

bool is_blank(std::string_view s) { return s.find_first_not_of(" \t\r\n") == std::string_view::npos; }

std::string_view trim(std::string_view s) {
    const size_t b = s.find_first_not_of(" \t\r\n");
    if (b == std::string_view::npos) return {};
    const size_t e = s.find_last_not_of(" \t\r\n");
    return s.substr(b, e - b + 1);
}

// The JSON schema type the tool `function` gives `param`, or "" when it gives none.
std::string param_type(const ojson& tools, const std::string& function, const std::string& param) {
    if (!tools.is_array()) return "";
    for (const auto& t : tools) {
        const ojson& f = t.value("function", ojson::object());
        if (!f.is_object() || f.value("name", "") != function) continue;
        const ojson& props = f.value("parameters", ojson::object()).value("properties", ojson::object());
        if (!props.is_object() || !props.contains(param) || !props.at(param).is_object()) return "";
        const ojson& type = props.at(param).value("type", ojson());
        if (type.is_string()) return type.get<std::string>();
        // ["integer", "null"]: the first non-null type.
        if (type.is_array())
            for (const auto& x : type)
                if (x.is_string() && x.get<std::string>() != "null") return x.get<std::string>();
        return "";
    }
    return "";
}

ojson convert_value(const std::string& value, const std::string& type) {
    if (type.empty() || type == "string") return value;
    if (value == "null") return nullptr;
    try {
        ojson v = ojson::parse(value);
        if ((type == "integer" || type == "int") && v.is_number_integer()) return v;
        if ((type == "number" || type == "float") && v.is_number()) return v;
        if (type == "boolean" && v.is_boolean()) return v;
        if ((type == "object" && v.is_object()) || (type == "array" && v.is_array())) return v;
    } catch (const nlohmann::json::exception&) {
    }
    return value;  // not of the declared type: left as the model wrote it
}

}  // namespace

ToolParserKind tool_parser_kind(const std::string& name) {
    if (name == "hermes") return ToolParserKind::Hermes;
    if (name == "qwen3_coder") return ToolParserKind::Qwen3Coder;
    fail("--tool-call-parser {} is not supported (supported: hermes, qwen3_coder)", name);
}

std::string forced_call_prefix(ToolParserKind kind, const std::string& function) {
    std::string prefix = std::string(kOpen) + "\n";
    if (kind == ToolParserKind::Hermes) {
        if (!function.empty()) prefix += "{\"name\": " + ojson(function).dump() + ", \"arguments\": ";
        return prefix;
    }
    prefix += "<function=";
    if (!function.empty()) prefix += function + ">\n";
    return prefix;
}

ToolCallParser::ToolCallParser(ToolParserKind kind, ojson tools) : kind_(kind), tools_(std::move(tools)) {}

void ToolCallParser::begin_forced(std::string_view prefix) {
    NIBBLE_CHECK(prefix.substr(0, kOpen.size()) == kOpen && pending_.empty() && !in_call_ && !any_call_,
                 "tool-call parser: a forced prefix must open a call before any output (got '{}')", prefix);
    in_call_ = true;
    pending_ = prefix.substr(kOpen.size());
    forced_body_ = pending_.size();
}

std::optional<std::vector<ParsedToolCall>> ToolCallParser::parse_body(std::string_view body, bool truncated) const {
    std::vector<ParsedToolCall> calls;
    if (kind_ == ToolParserKind::Hermes) {
        ojson call;
        try {
            call = ojson::parse(trim(body));
        } catch (const nlohmann::json::exception&) {
            return std::nullopt;
        }
        if (!call.is_object() || !call.contains("name") || !call.at("name").is_string()) return std::nullopt;
        ojson args = call.value("arguments", ojson::object());
        if (args.is_string()) {
            // Some models write the arguments as a JSON string already.
            try {
                args = ojson::parse(args.get<std::string>());
            } catch (const nlohmann::json::exception&) {
                return std::nullopt;
            }
        }
        if (args.is_null()) args = ojson::object();
        calls.push_back({call.at("name").get<std::string>(), args.dump()});
        return calls;
    }
    // qwen3_coder: one or more <function=NAME> blocks.
    std::string_view rest = body;
    constexpr std::string_view kFn = "<function=", kFnEnd = "</function>", kParam = "<parameter=",
                               kParamEnd = "</parameter>";
    for (;;) {
        const size_t fn = rest.find(kFn);
        if (fn == std::string_view::npos) break;
        if (!is_blank(rest.substr(0, fn))) return std::nullopt;
        const size_t name_end = rest.find('>', fn);
        if (name_end == std::string_view::npos) return std::nullopt;
        const std::string name(trim(rest.substr(fn + kFn.size(), name_end - fn - kFn.size())));
        if (name.empty()) return std::nullopt;
        size_t fn_end = rest.find(kFnEnd, name_end);
        if (truncated && fn_end == std::string_view::npos) return std::nullopt;
        std::string_view inner = rest.substr(name_end + 1, fn_end == std::string_view::npos ? std::string_view::npos
                                                                                            : fn_end - name_end - 1);
        ojson args = ojson::object();
        for (;;) {
            const size_t p = inner.find(kParam);
            if (p == std::string_view::npos) break;
            const size_t pname_end = inner.find('>', p);
            if (pname_end == std::string_view::npos) return std::nullopt;
            const std::string pname(trim(inner.substr(p + kParam.size(), pname_end - p - kParam.size())));
            size_t vend = inner.find(kParamEnd, pname_end);
            // A missing </parameter> ends at the next parameter or the end of the function.
            const size_t next = inner.find(kParam, pname_end);
            size_t stop = vend;
            if (vend == std::string_view::npos || (next != std::string_view::npos && next < vend)) stop = next;
            std::string_view value = inner.substr(pname_end + 1, stop == std::string_view::npos ? std::string_view::npos
                                                                                                 : stop - pname_end - 1);
            if (!value.empty() && value.front() == '\n') value.remove_prefix(1);
            if (!value.empty() && value.back() == '\n') value.remove_suffix(1);
            args[pname] = convert_value(std::string(value), param_type(tools_, name, pname));
            if (stop == std::string_view::npos) {
                inner = {};
                break;
            }
            inner = inner.substr(stop == vend ? vend + kParamEnd.size() : stop);
        }
        calls.push_back({name, args.dump()});
        if (fn_end == std::string_view::npos) {
            rest = {};
            break;
        }
        rest = rest.substr(fn_end + kFnEnd.size());
    }
    if (calls.empty() || !is_blank(rest)) return std::nullopt;
    return calls;
}

void ToolCallParser::emit_content(ToolDelta& out, std::string text) {
    if (text.empty() || (any_call_ && is_blank(text))) return;
    out.content += text;
}

void ToolCallParser::drain(ToolDelta& out, bool final, bool truncated) {
    for (;;) {
        if (!in_call_) {
            const size_t open = pending_.find(kOpen);
            if (open != std::string::npos) {
                emit_content(out, pending_.substr(0, open));
                pending_.erase(0, open + kOpen.size());
                in_call_ = true;
                continue;
            }
            if (final) {
                emit_content(out, std::move(pending_));
                pending_.clear();
                return;
            }
            size_t keep = partial_suffix(pending_, kOpen);
            // After a call, blank text is held: it is dropped if another call follows.
            if (any_call_ && is_blank(pending_)) keep = pending_.size();
            emit_content(out, pending_.substr(0, pending_.size() - keep));
            pending_.erase(0, pending_.size() - keep);
            return;
        }
        const size_t close = pending_.find(kClose);
        if (close == std::string::npos && !final) return;
        const std::string body = pending_.substr(0, close);
        auto calls = parse_body(body, truncated && close == std::string::npos);
        if (calls) {
            for (auto& c : *calls) out.calls.push_back(std::move(c));
            any_call_ = true;
        } else if (forced_body_ > 0) {
            // A forced call that does not parse: only what the model wrote is content, not the prompt's part.
            out.content += body.substr(std::min(forced_body_, body.size()));
            if (close != std::string::npos) out.content += kClose;
        } else {
            // Not a call after all: the text goes out as the model wrote it.
            std::string raw = std::string(kOpen) + body + (close == std::string::npos ? "" : std::string(kClose));
            out.content += raw;
        }
        forced_body_ = 0;
        pending_.erase(0, close == std::string::npos ? pending_.size() : close + kClose.size());
        in_call_ = false;
        if (final && pending_.empty()) return;
    }
}

ToolDelta ToolCallParser::push(std::string_view text) {
    pending_ += text;
    ToolDelta out;
    drain(out, false, false);
    return out;
}

ToolDelta ToolCallParser::finish(bool truncated) {
    ToolDelta out;
    drain(out, true, truncated);
    return out;
}

}  // namespace nibble::server
