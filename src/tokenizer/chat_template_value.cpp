// Values of the chat-template interpreter: construction, Python str()/repr(), json.dumps, equality.
#include "tokenizer/chat_template_value.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>

namespace nibble::jinja {

void render_fail(const std::string& message) { throw RenderError(message); }

namespace {
// Values nest only as deep as this (a template can build [[[...]]] in a loop); the recursive
// printers and comparisons refuse deeper values instead of overflowing the stack.
constexpr int max_value_depth = 512;
void check_depth(int depth) {
    if (depth > max_value_depth) render_fail("value nested too deeply");
}
}  // namespace

// Records `child` as a member of a container of depth `depth`.
static void note_child(int& depth, bool& has_namespace, const Value& child) {
    int child_depth = 0;
    if (child.kind == Kind::list) {
        child_depth = child.list->depth;
        has_namespace = has_namespace || child.list->has_namespace;
    } else if (child.kind == Kind::dict) {
        child_depth = child.dict->depth;
        has_namespace = has_namespace || child.dict->has_namespace || child.dict->kind == DictKind::namespace_obj;
    }
    depth = std::max(depth, child_depth + 1);
    check_depth(depth);
}

const Value* Dict::find(const std::string& key) const {
    auto it = index.find(key);
    return it == index.end() ? nullptr : &items[it->second].second;
}

void Dict::set(const std::string& key, Value value) {
    if (kind == DictKind::namespace_obj) {
        bool holds_namespace = (value.kind == Kind::list && value.list->has_namespace) ||
                               (value.kind == Kind::dict && (value.dict->has_namespace || value.dict->kind == DictKind::namespace_obj));
        if (holds_namespace) render_fail("a namespace attribute cannot hold a namespace (not supported)");
    }
    note_child(depth, has_namespace, value);
    auto it = index.find(key);
    if (it != index.end()) {
        items[it->second].second = std::move(value);
        return;
    }
    index.emplace(key, items.size());
    items.emplace_back(key, std::move(value));
}

Value Value::undefined(std::string name) {
    Value v;
    v.kind = Kind::undefined;
    v.string = std::move(name);
    return v;
}
Value Value::none() {
    Value v;
    v.kind = Kind::none;
    return v;
}
Value Value::from_bool(bool b) {
    Value v;
    v.kind = Kind::boolean;
    v.boolean = b;
    return v;
}
Value Value::from_int(int64_t i) {
    Value v;
    v.kind = Kind::integer;
    v.integer = i;
    return v;
}
Value Value::from_float(double f) {
    Value v;
    v.kind = Kind::floating;
    v.floating = f;
    return v;
}
Value Value::from_string(std::string s) {
    Value v;
    v.kind = Kind::string;
    v.string = std::move(s);
    return v;
}
Value Value::new_list(std::vector<Value> items, bool tuple) {
    Value v;
    v.kind = Kind::list;
    v.list = std::make_shared<List>();
    v.list->items = std::move(items);
    v.list->is_tuple = tuple;
    for (const auto& item : v.list->items) note_child(v.list->depth, v.list->has_namespace, item);
    return v;
}
Value Value::new_dict(DictKind kind) {
    Value v;
    v.kind = Kind::dict;
    v.dict = std::make_shared<Dict>();
    v.dict->kind = kind;
    return v;
}
Value Value::function(std::string name, NativeFn fn) {
    Value v;
    v.kind = Kind::callable;
    v.callable = std::make_shared<Callable>(Callable{std::move(name), std::move(fn)});
    return v;
}

static Value from_json_at(const nlohmann::ordered_json& j, int depth);
Value Value::from_json(const nlohmann::ordered_json& j) { return from_json_at(j, 0); }

static Value from_json_at(const nlohmann::ordered_json& j, int depth) {
    check_depth(depth);
    switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return Value::none();
    case nlohmann::ordered_json::value_t::boolean: return Value::from_bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return Value::from_int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
        uint64_t u = j.get<uint64_t>();
        if (u > static_cast<uint64_t>(INT64_MAX)) return Value::from_float(static_cast<double>(u));
        return Value::from_int(static_cast<int64_t>(u));
    }
    case nlohmann::ordered_json::value_t::number_float: return Value::from_float(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return Value::from_string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
        Value v = Value::new_list();
        v.list->items.reserve(j.size());
        for (const auto& item : j) {
            v.list->items.push_back(from_json_at(item, depth + 1));
            note_child(v.list->depth, v.list->has_namespace, v.list->items.back());
        }
        return v;
    }
    case nlohmann::ordered_json::value_t::object: {
        Value v = Value::new_dict();
        for (auto it = j.begin(); it != j.end(); ++it) v.dict->set(it.key(), from_json_at(it.value(), depth + 1));
        return v;
    }
    default: render_fail("the context holds a value JSON cannot express (binary)");
    }
}

bool Value::truthy() const {
    switch (kind) {
    case Kind::undefined:
    case Kind::none: return false;
    case Kind::boolean: return boolean;
    case Kind::integer: return integer != 0;
    case Kind::floating: return floating != 0.0;
    case Kind::string: return !string.empty();
    case Kind::list: return !list->items.empty();
    case Kind::dict: return dict->kind != DictKind::plain || !dict->items.empty();
    case Kind::callable: return true;
    }
    return false;
}

std::string float_repr(double d) {
    if (std::isnan(d)) return "nan";
    if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
    if (d == 0.0) return std::signbit(d) ? "-0.0" : "0.0";
    char buf[64];
    auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
    std::string sci(buf, res.ptr);
    bool negative = sci[0] == '-';
    if (negative) sci.erase(0, 1);
    size_t e_pos = sci.find('e');
    std::string mantissa = sci.substr(0, e_pos);
    int exponent = std::stoi(sci.substr(e_pos + 1));
    std::string digits;
    for (char c : mantissa)
        if (c != '.') digits.push_back(c);
    std::string out = negative ? "-" : "";
    if (exponent < -4 || exponent >= 16) {
        out += digits.substr(0, 1);
        if (digits.size() > 1) {
            out += '.';
            out += digits.substr(1);
        }
        out += fmt::format("e{}{:02d}", exponent < 0 ? '-' : '+', std::abs(exponent));
        return out;
    }
    int decpt = exponent + 1;  // digits before the decimal point
    if (decpt <= 0) {
        out += "0.";
        out.append(static_cast<size_t>(-decpt), '0');
        out += digits;
    } else if (static_cast<size_t>(decpt) >= digits.size()) {
        out += digits + std::string(static_cast<size_t>(decpt) - digits.size(), '0') + ".0";
    } else {
        out += digits.substr(0, static_cast<size_t>(decpt));
        out += '.';
        out += digits.substr(static_cast<size_t>(decpt));
    }
    return out;
}

// Decodes one UTF-8 code point at s[i]; invalid bytes decode as themselves (one byte).
static uint32_t decode_utf8(const std::string& s, size_t& i) {
    auto b = static_cast<unsigned char>(s[i]);
    int len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 1;
    if (i + static_cast<size_t>(len) > s.size()) len = 1;
    uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1f) : len == 3 ? (b & 0x0f) : (b & 0x07);
    for (int k = 1; k < len; ++k) {
        auto c = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
        if ((c & 0xc0) != 0x80) {
            len = 1;
            cp = b;
            break;
        }
        cp = (cp << 6) | (c & 0x3f);
    }
    i += static_cast<size_t>(len);
    return cp;
}

std::vector<std::string> utf8_chars(const std::string& s) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i < s.size()) {
        size_t start = i;
        decode_utf8(s, i);
        out.push_back(s.substr(start, i - start));
    }
    return out;
}

size_t utf8_length(const std::string& s) {
    size_t n = 0;
    for (size_t i = 0; i < s.size();) {
        decode_utf8(s, i);
        ++n;
    }
    return n;
}

// Code points Python's str.isprintable() rejects (categories Cc, Cf, Zs except space, Zl, Zp, Co):
// the common ones; repr() escapes them.
static bool python_unprintable(uint32_t cp) {
    if (cp < 0x20 || (cp >= 0x7f && cp <= 0xa0) || cp == 0xad) return true;
    if ((cp >= 0x2000 && cp <= 0x200f) || (cp >= 0x2028 && cp <= 0x202f) || (cp >= 0x205f && cp <= 0x206f))
        return true;
    if (cp == 0x1680 || cp == 0x3000 || cp == 0xfeff || (cp >= 0xe000 && cp <= 0xf8ff)) return true;
    if (cp == 0x061c || cp == 0x180e || (cp >= 0xfff9 && cp <= 0xfffb)) return true;
    return false;
}

std::string string_repr(const std::string& s) {
    char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
    std::string out(1, quote);
    size_t i = 0;
    while (i < s.size()) {
        size_t start = i;
        uint32_t cp = decode_utf8(s, i);
        if (cp == '\\') out += "\\\\";
        else if (cp == static_cast<uint32_t>(quote)) out += std::string("\\") + quote;
        else if (cp == '\n') out += "\\n";
        else if (cp == '\r') out += "\\r";
        else if (cp == '\t') out += "\\t";
        else if (python_unprintable(cp)) {
            if (cp <= 0xff) out += fmt::format("\\x{:02x}", cp);
            else out += fmt::format("\\u{:04x}", cp);
        } else out.append(s, start, i - start);
    }
    out += quote;
    return out;
}

static std::string repr_at(const Value& v, int depth);
std::string to_repr(const Value& v) { return repr_at(v, 0); }

static std::string repr_at(const Value& v, int depth) {
    check_depth(depth);
    switch (v.kind) {
    case Kind::string: return string_repr(v.string);
    case Kind::list: {
        std::string out = v.list->is_tuple ? "(" : "[";
        for (size_t i = 0; i < v.list->items.size(); ++i) {
            if (i) out += ", ";
            out += repr_at(v.list->items[i], depth + 1);
        }
        if (v.list->is_tuple && v.list->items.size() == 1) out += ",";
        out += v.list->is_tuple ? ")" : "]";
        return out;
    }
    case Kind::dict: {
        if (v.dict->kind == DictKind::namespace_obj) return "<Namespace>";
        std::string out = "{";
        bool first = true;
        for (const auto& [key, value] : v.dict->items) {
            if (!first) out += ", ";
            first = false;
            out += string_repr(key) + ": " + repr_at(value, depth + 1);
        }
        return out + "}";
    }
    case Kind::undefined: return "Undefined";  // jinja2's Undefined.__repr__
    default: return to_str(v);
    }
}

std::string to_str(const Value& v) {
    switch (v.kind) {
    case Kind::undefined: return "";
    case Kind::none: return "None";
    case Kind::boolean: return v.boolean ? "True" : "False";
    case Kind::integer: return std::to_string(v.integer);
    case Kind::floating: return float_repr(v.floating);
    case Kind::string: return v.string;
    case Kind::list:
    case Kind::dict: return to_repr(v);
    case Kind::callable: return "<function " + v.callable->name + ">";
    }
    return "";
}

static void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
    out += '"';
    size_t i = 0;
    while (i < s.size()) {
        size_t start = i;
        uint32_t cp = decode_utf8(s, i);
        switch (cp) {
        case '"': out += "\\\""; continue;
        case '\\': out += "\\\\"; continue;
        case '\n': out += "\\n"; continue;
        case '\r': out += "\\r"; continue;
        case '\t': out += "\\t"; continue;
        case '\b': out += "\\b"; continue;
        case '\f': out += "\\f"; continue;
        default: break;
        }
        if (cp < 0x20 || (ensure_ascii && cp >= 0x7f)) {
            if (cp >= 0x10000) {
                uint32_t u = cp - 0x10000;
                out += fmt::format("\\u{:04x}\\u{:04x}", 0xd800 + (u >> 10), 0xdc00 + (u & 0x3ff));
            } else {
                out += fmt::format("\\u{:04x}", cp);
            }
        } else {
            out.append(s, start, i - start);
        }
    }
    out += '"';
}

static void json_dump(std::string& out, const Value& v, const JsonDumpOptions& o, int level) {
    check_depth(level);
    auto newline = [&](int lvl) {
        out += '\n';
        for (int k = 0; k < lvl; ++k) out += *o.indent;
    };
    switch (v.kind) {
    case Kind::none: out += "null"; return;
    case Kind::boolean: out += v.boolean ? "true" : "false"; return;
    case Kind::integer: out += std::to_string(v.integer); return;
    case Kind::floating:
        if (std::isnan(v.floating)) out += "NaN";
        else if (std::isinf(v.floating)) out += v.floating > 0 ? "Infinity" : "-Infinity";
        else out += float_repr(v.floating);
        return;
    case Kind::string: json_string(out, v.string, o.ensure_ascii); return;
    case Kind::list: {
        if (v.list->items.empty()) {
            out += "[]";
            return;
        }
        out += '[';
        for (size_t i = 0; i < v.list->items.size(); ++i) {
            if (i) out += o.item_separator;
            if (o.indent) newline(level + 1);
            json_dump(out, v.list->items[i], o, level + 1);
        }
        if (o.indent) newline(level);
        out += ']';
        return;
    }
    case Kind::dict: {
        if (v.dict->kind != DictKind::plain) render_fail("Object of type Namespace is not JSON serializable");
        if (v.dict->items.empty()) {
            out += "{}";
            return;
        }
        std::vector<const std::pair<std::string, Value>*> items;
        for (const auto& item : v.dict->items) items.push_back(&item);
        if (o.sort_keys)
            std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
        out += '{';
        for (size_t i = 0; i < items.size(); ++i) {
            if (i) out += o.item_separator;
            if (o.indent) newline(level + 1);
            json_string(out, items[i]->first, o.ensure_ascii);
            out += o.key_separator;
            json_dump(out, items[i]->second, o, level + 1);
        }
        if (o.indent) newline(level);
        out += '}';
        return;
    }
    case Kind::undefined: render_fail("Object of type Undefined is not JSON serializable");
    case Kind::callable: render_fail("Object of type function is not JSON serializable");
    }
}

std::string json_dumps(const Value& v, const JsonDumpOptions& options) {
    std::string out;
    json_dump(out, v, options, 0);
    return out;
}

static bool equal_at(const Value& a, const Value& b, int depth);
bool values_equal(const Value& a, const Value& b) { return equal_at(a, b, 0); }

static bool equal_at(const Value& a, const Value& b, int depth) {
    check_depth(depth);
    if (a.is_number() && b.is_number()) {
        if (a.kind == Kind::floating || b.kind == Kind::floating) {
            auto as_double = [](const Value& v) {
                return v.kind == Kind::floating ? v.floating
                       : v.kind == Kind::boolean ? (v.boolean ? 1.0 : 0.0)
                                                  : static_cast<double>(v.integer);
            };
            return as_double(a) == as_double(b);
        }
        auto as_int = [](const Value& v) { return v.kind == Kind::boolean ? int64_t{v.boolean} : v.integer; };
        return as_int(a) == as_int(b);
    }
    if (a.kind != b.kind) return false;
    switch (a.kind) {
    case Kind::undefined:
    case Kind::none: return true;
    case Kind::string: return a.string == b.string;
    case Kind::list: {
        if (a.list == b.list) return true;
        if (a.list->is_tuple != b.list->is_tuple || a.list->items.size() != b.list->items.size()) return false;
        for (size_t i = 0; i < a.list->items.size(); ++i)
            if (!equal_at(a.list->items[i], b.list->items[i], depth + 1)) return false;
        return true;
    }
    case Kind::dict: {
        if (a.dict == b.dict) return true;
        if (a.dict->kind != DictKind::plain || b.dict->kind != DictKind::plain) return false;
        if (a.dict->items.size() != b.dict->items.size()) return false;
        for (const auto& [key, value] : a.dict->items) {
            const Value* other = b.dict->find(key);
            if (!other || !equal_at(value, *other, depth + 1)) return false;
        }
        return true;
    }
    case Kind::callable: return a.callable == b.callable;
    default: return false;
    }
}

}  // namespace nibble::jinja
