// Builtins of the chat-template interpreter: jinja2's filters and tests, the globals of transformers'
// environment (raise_exception, strftime_now, range, namespace, dict), and the Python str/dict/list
// methods templates call. Each follows the Python implementation's observable behaviour.
// Case mapping follows Python's full Unicode mappings (through ICU).
#include "tokenizer/chat_template_eval.h"
#include "tokenizer/utf8.h"

#include "base/error.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <set>

#include <unicode/uchar.h>
#include <unicode/ustring.h>

namespace nibble::jinja {
namespace {

// Positional-or-keyword argument `pos`/`name`, or null when not given.
const Value* arg(CallArgs& a, size_t pos, const char* name) {
    if (pos < a.positional.size()) return &a.positional[pos];
    for (auto& [key, value] : a.keyword)
        if (key == name) return &value;
    return nullptr;
}

bool is_intlike(const Value& v) { return v.kind == Kind::integer || v.kind == Kind::boolean; }
int64_t as_int(const Value& v) { return v.kind == Kind::boolean ? int64_t{v.boolean} : v.integer; }
double as_double(const Value& v) { return v.kind == Kind::floating ? v.floating : static_cast<double>(as_int(v)); }

std::string need_str(const Value* v, const char* what) {
    if (!v || v->kind != Kind::string)
        render_fail(std::string(what) + " must be str, not " + (v ? type_name(*v) : std::string("nothing")));
    return v->string;
}

// Python's str() except that Undefined is "" (jinja2's soft_str).
std::string soft_str(const Value& v) { return to_str(v); }

// --- UTF-8 code points and Python whitespace ---------------------------------------------------

std::vector<uint32_t> decode(const std::string& s) {
    std::vector<uint32_t> out;
    for (const auto& c : utf8_chars(s)) {
        auto b = static_cast<unsigned char>(c[0]);
        uint32_t cp = c.size() == 1 ? b : c.size() == 2 ? (b & 0x1f) : c.size() == 3 ? (b & 0x0f) : (b & 0x07);
        for (size_t k = 1; k < c.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(c[k]) & 0x3f);
        out.push_back(cp);
    }
    return out;
}

bool py_isspace(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
           cp == 0x3000;
}

// str.strip / lstrip / rstrip with optional chars.
std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
    auto pieces = utf8_chars(s);
    auto cps = decode(s);
    std::vector<uint32_t> set;
    bool use_set = chars && chars->kind == Kind::string;
    if (chars && !use_set && chars->kind != Kind::none && chars->kind != Kind::undefined)
        render_fail("strip arg must be None or str");
    if (use_set) set = decode(chars->string);
    auto strip_me = [&](uint32_t cp) {
        return use_set ? std::find(set.begin(), set.end(), cp) != set.end() : py_isspace(cp);
    };
    size_t b = 0, e = cps.size();
    if (left)
        while (b < e && strip_me(cps[b])) ++b;
    if (right)
        while (e > b && strip_me(cps[e - 1])) --e;
    std::string out;
    for (size_t i = b; i < e; ++i) out += pieces[i];
    return out;
}

char ascii_upper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; }
char ascii_lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }

std::string encode_cp(uint32_t cp) {
    std::string out;
    tokenizer::append_utf8(out, static_cast<char32_t>(cp));
    return out;
}

// Full Unicode case mapping (root locale, as Python's str.upper/lower: "ß".upper() == "SS").
std::string icu_case(const std::string& s, bool to_upper) {
    bool ascii = std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
    if (ascii) {
        std::string out = s;
        for (char& c : out) c = to_upper ? ascii_upper(c) : ascii_lower(c);
        return out;
    }
    UErrorCode err = U_ZERO_ERROR;
    int32_t n16 = 0;
    u_strFromUTF8WithSub(nullptr, 0, &n16, s.data(), static_cast<int32_t>(s.size()), 0xfffd, nullptr, &err);
    err = U_ZERO_ERROR;
    std::u16string src(static_cast<size_t>(n16), u'\0');
    u_strFromUTF8WithSub(src.data(), n16, nullptr, s.data(), static_cast<int32_t>(s.size()), 0xfffd, nullptr, &err);
    std::u16string dst(src.size() * 3 + 8, u'\0');
    err = U_ZERO_ERROR;
    int32_t m = to_upper ? u_strToUpper(dst.data(), static_cast<int32_t>(dst.size()), src.data(), n16, "", &err)
                         : u_strToLower(dst.data(), static_cast<int32_t>(dst.size()), src.data(), n16, "", &err);
    if (U_FAILURE(err)) render_fail("case mapping failed");
    std::string out(static_cast<size_t>(m) * 3 + 4, '\0');
    int32_t n8 = 0;
    err = U_ZERO_ERROR;
    u_strToUTF8(out.data(), static_cast<int32_t>(out.size()), &n8, dst.data(), m, &err);
    if (U_FAILURE(err)) render_fail("case mapping failed");
    out.resize(static_cast<size_t>(n8));
    return out;
}
std::string upper(const std::string& s) { return icu_case(s, true); }
std::string lower(const std::string& s) { return icu_case(s, false); }
bool is_cased(uint32_t cp) { return u_hasBinaryProperty(static_cast<UChar32>(cp), UCHAR_CASED); }
std::string title_cp(uint32_t cp) { return encode_cp(static_cast<uint32_t>(u_totitle(static_cast<UChar32>(cp)))); }

// Python's str.title(): a cased character after an uncased one is title-cased, the rest of each run
// of cased characters lowered (as a run, so a final sigma becomes ς).
std::string py_title(const std::string& s) {
    std::string out;
    auto cps = decode(s);
    size_t i = 0;
    while (i < cps.size()) {
        if (!is_cased(cps[i])) {
            out += encode_cp(cps[i++]);
            continue;
        }
        out += title_cp(cps[i++]);
        std::string run;
        while (i < cps.size() && is_cased(cps[i])) run += encode_cp(cps[i++]);
        out += lower(run);
    }
    return out;
}
// Python's str.capitalize(): the first character title-cased, the rest lowered.
std::string py_capitalize(const std::string& s) {
    auto cps = decode(s);
    if (cps.empty()) return s;
    std::string rest;
    for (size_t i = 1; i < cps.size(); ++i) rest += encode_cp(cps[i]);
    return title_cp(cps[0]) + lower(rest);
}

// str.split(sep=None, maxsplit=-1) and rsplit.
Value py_split(const std::string& s, const Value* sep_v, const Value* max_v, bool from_right) {
    int64_t maxsplit = max_v && is_intlike(*max_v) ? as_int(*max_v) : -1;
    std::vector<std::string> parts;
    if (!sep_v || sep_v->kind == Kind::none) {
        auto pieces = utf8_chars(s);
        auto cps = decode(s);
        std::vector<std::pair<size_t, size_t>> words;  // code point ranges
        size_t i = 0;
        while (i < cps.size()) {
            while (i < cps.size() && py_isspace(cps[i])) ++i;
            if (i >= cps.size()) break;
            size_t j = i;
            while (j < cps.size() && !py_isspace(cps[j])) ++j;
            words.emplace_back(i, j);
            i = j;
        }
        auto join_range = [&](size_t a, size_t b) {
            std::string out;
            for (size_t k = a; k < b; ++k) out += pieces[k];
            return out;
        };
        if (maxsplit < 0 || static_cast<size_t>(maxsplit) + 1 >= words.size()) {
            for (auto [a, b] : words) parts.push_back(join_range(a, b));
        } else if (!from_right) {
            for (size_t k = 0; k < static_cast<size_t>(maxsplit); ++k) parts.push_back(join_range(words[k].first, words[k].second));
            // The remainder keeps its trailing whitespace, as Python's does.
            parts.push_back(join_range(words[static_cast<size_t>(maxsplit)].first, cps.size()));
        } else {
            size_t first_kept = words.size() - static_cast<size_t>(maxsplit);
            parts.push_back(join_range(0, words[first_kept - 1].second));
            for (size_t k = first_kept; k < words.size(); ++k) parts.push_back(join_range(words[k].first, words[k].second));
        }
    } else {
        std::string sep = need_str(sep_v, "separator");
        if (sep.empty()) render_fail("empty separator");
        if (!from_right) {
            size_t start = 0;
            int64_t n = 0;
            while (maxsplit < 0 || n < maxsplit) {
                size_t p = s.find(sep, start);
                if (p == std::string::npos) break;
                parts.push_back(s.substr(start, p - start));
                start = p + sep.size();
                ++n;
            }
            parts.push_back(s.substr(start));
        } else {
            size_t end = s.size();
            int64_t n = 0;
            std::vector<std::string> rev;
            while (maxsplit < 0 || n < maxsplit) {
                if (end < sep.size()) break;
                size_t p = s.rfind(sep, end - sep.size());
                if (p == std::string::npos) break;
                rev.push_back(s.substr(p + sep.size(), end - p - sep.size()));
                end = p;
                ++n;
            }
            rev.push_back(s.substr(0, end));
            parts.assign(rev.rbegin(), rev.rend());
        }
    }
    std::vector<Value> items;
    for (auto& p : parts) items.push_back(Value::from_string(std::move(p)));
    return Value::new_list(std::move(items));
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& repl, int64_t count) {
    std::string out;
    if (old.empty()) {
        // Python inserts `repl` between every character (and at both ends).
        auto chars = utf8_chars(s);
        int64_t n = 0;
        for (size_t i = 0; i <= chars.size(); ++i) {
            if (count < 0 || n < count) {
                out += repl;
                ++n;
            }
            if (i < chars.size()) out += chars[i];
        }
        return out;
    }
    size_t start = 0;
    int64_t n = 0;
    while (count < 0 || n < count) {
        size_t p = s.find(old, start);
        if (p == std::string::npos) break;
        out.append(s, start, p - start);
        out += repl;
        start = p + old.size();
        ++n;
    }
    out.append(s, start, std::string::npos);
    return out;
}

bool starts_or_ends(const std::string& s, const Value& affix, bool ends) {
    auto one = [&](const std::string& a) {
        if (a.size() > s.size()) return false;
        return ends ? s.compare(s.size() - a.size(), a.size(), a) == 0 : s.compare(0, a.size(), a) == 0;
    };
    if (affix.kind == Kind::string) return one(affix.string);
    if (affix.kind == Kind::list && affix.list->is_tuple) {
        for (const auto& item : affix.list->items)
            if (one(need_str(&item, "tuple item"))) return true;
        return false;
    }
    render_fail(std::string(ends ? "endswith" : "startswith") + " first arg must be str or a tuple of str, not " +
                type_name(affix));
}

// str.format with {} / {0} / {name} fields (no format specs beyond plain conversion).
std::string py_format(const std::string& f, CallArgs& args) {
    std::string out;
    size_t auto_index = 0;
    for (size_t i = 0; i < f.size(); ++i) {
        char c = f[i];
        if (c == '{') {
            if (i + 1 < f.size() && f[i + 1] == '{') {
                out += '{';
                ++i;
                continue;
            }
            size_t close = f.find('}', i);
            if (close == std::string::npos) render_fail("Single '{' encountered in format string");
            std::string field = f.substr(i + 1, close - i - 1);
            std::string spec;
            if (auto colon = field.find(':'); colon != std::string::npos) {
                spec = field.substr(colon + 1);
                field = field.substr(0, colon);
            }
            if (!spec.empty()) render_fail("format specs in str.format are not supported");
            const Value* v = nullptr;
            if (field.empty()) {
                if (auto_index >= args.positional.size()) render_fail("Replacement index out of range");
                v = &args.positional[auto_index++];
            } else if (std::all_of(field.begin(), field.end(), [](char d) { return d >= '0' && d <= '9'; })) {
                size_t k = 0;
                auto res = std::from_chars(field.data(), field.data() + field.size(), k);
                if (res.ec != std::errc() || k >= args.positional.size()) render_fail("Replacement index out of range");
                v = &args.positional[k];
            } else {
                for (auto& [key, value] : args.keyword)
                    if (key == field) v = &value;
                if (!v) render_fail("KeyError: '" + field + "'");
            }
            out += to_str(*v);
            i = close;
        } else if (c == '}') {
            if (i + 1 < f.size() && f[i + 1] == '}') ++i;
            else render_fail("Single '}' encountered in format string");
            out += '}';
        } else {
            out += c;
        }
    }
    return out;
}

Value bound(const std::string& name, NativeFn fn) { return Value::function(name, std::move(fn)); }

std::optional<Value> string_method(const Value& obj, const std::string& name) {
    std::string s = obj.string;
    if (name == "startswith" || name == "endswith") {
        bool ends = name == "endswith";
        return bound(name, [s, ends](Interpreter&, CallArgs& a) {
            const Value* affix = arg(a, 0, "prefix");
            if (!affix) render_fail("startswith/endswith needs an argument");
            return Value::from_bool(starts_or_ends(s, *affix, ends));
        });
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
        bool left = name != "rstrip", right = name != "lstrip";
        return bound(name, [s, left, right](Interpreter&, CallArgs& a) {
            return Value::from_string(py_strip(s, arg(a, 0, "chars"), left, right));
        });
    }
    if (name == "split" || name == "rsplit") {
        bool from_right = name == "rsplit";
        return bound(name, [s, from_right](Interpreter&, CallArgs& a) {
            return py_split(s, arg(a, 0, "sep"), arg(a, 1, "maxsplit"), from_right);
        });
    }
    if (name == "replace") {
        return bound(name, [s](Interpreter&, CallArgs& a) {
            const Value* count = arg(a, 2, "count");
            return Value::from_string(py_replace(s, need_str(arg(a, 0, "old"), "replace() argument 1"),
                                                 need_str(arg(a, 1, "new"), "replace() argument 2"),
                                                 count && is_intlike(*count) ? as_int(*count) : -1));
        });
    }
    if (name == "upper") return bound(name, [s](Interpreter&, CallArgs&) { return Value::from_string(upper(s)); });
    if (name == "lower") return bound(name, [s](Interpreter&, CallArgs&) { return Value::from_string(lower(s)); });
    if (name == "title") return bound(name, [s](Interpreter&, CallArgs&) { return Value::from_string(py_title(s)); });
    if (name == "capitalize")
        return bound(name, [s](Interpreter&, CallArgs&) { return Value::from_string(py_capitalize(s)); });
    if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
        return bound(name, [s, name](Interpreter&, CallArgs& a) {
            std::string sub = need_str(arg(a, 0, "sub"), "substring");
            if (name == "count") {
                if (sub.empty()) return Value::from_int(static_cast<int64_t>(utf8_length(s)) + 1);
                int64_t n = 0;
                for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
                return Value::from_int(n);
            }
            size_t p = (name == "find" || name == "index") ? s.find(sub) : s.rfind(sub);
            if (p == std::string::npos) {
                if (name == "index" || name == "rindex") render_fail("substring not found");
                return Value::from_int(-1);
            }
            return Value::from_int(static_cast<int64_t>(utf8_length(s.substr(0, p))));
        });
    }
    if (name == "join") {
        return bound(name, [s](Interpreter&, CallArgs& a) {
            const Value* it = arg(a, 0, "iterable");
            if (!it) render_fail("join() takes exactly one argument");
            std::string out;
            bool first = true;
            for (const auto& item : iterate(*it)) {
                if (item.kind != Kind::string)
                    render_fail("sequence item: expected str instance, " + type_name(item) + " found");
                if (!first) out += s;
                first = false;
                out += item.string;
            }
            return Value::from_string(std::move(out));
        });
    }
    if (name == "format") {
        return bound(name, [s](Interpreter&, CallArgs& a) { return Value::from_string(py_format(s, a)); });
    }
    if (name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "isspace" || name == "isupper" ||
        name == "islower") {
        return bound(name, [s, name](Interpreter&, CallArgs&) {
            if (s.empty()) return Value::from_bool(false);
            auto cps = decode(s);
            bool any_cased = false;
            for (uint32_t cp : cps) {
                bool digit = cp >= '0' && cp <= '9';
                bool alpha = (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
                if (name == "isdigit" && !digit) return Value::from_bool(false);
                if (name == "isalpha" && !alpha) return Value::from_bool(false);
                if (name == "isalnum" && !alpha && !digit) return Value::from_bool(false);
                if (name == "isspace" && !py_isspace(cp)) return Value::from_bool(false);
                if (name == "isupper" && cp >= 'a' && cp <= 'z') return Value::from_bool(false);
                if (name == "islower" && cp >= 'A' && cp <= 'Z') return Value::from_bool(false);
                if (alpha) any_cased = true;
            }
            if (name == "isupper" || name == "islower") return Value::from_bool(any_cased);
            return Value::from_bool(true);
        });
    }
    if (name == "splitlines") {
        return bound(name, [s](Interpreter&, CallArgs&) {
            std::vector<Value> lines;
            size_t start = 0;
            for (size_t i = 0; i < s.size(); ++i) {
                if (s[i] == '\n' || s[i] == '\r') {
                    lines.push_back(Value::from_string(s.substr(start, i - start)));
                    if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
                    start = i + 1;
                }
            }
            if (start < s.size()) lines.push_back(Value::from_string(s.substr(start)));
            return Value::new_list(std::move(lines));
        });
    }
    return std::nullopt;
}

std::optional<Value> dict_method(const Value& obj, const std::string& name) {
    auto d = obj.dict;
    if (name == "get") {
        return bound(name, [d](Interpreter&, CallArgs& a) {
            const Value* key = arg(a, 0, "key");
            const Value* def = arg(a, 1, "default");
            if (!key) render_fail("get expected at least 1 argument, got 0");
            if (key->kind == Kind::string)
                if (const Value* v = d->find(key->string)) return *v;
            return def ? *def : Value::none();
        });
    }
    if (name == "items" || name == "keys" || name == "values") {
        return bound(name, [d, name](Interpreter&, CallArgs&) {
            std::vector<Value> out;
            for (const auto& [key, value] : d->items) {
                if (name == "items") out.push_back(Value::new_list({Value::from_string(key), value}, true));
                else if (name == "keys") out.push_back(Value::from_string(key));
                else out.push_back(value);
            }
            return Value::new_list(std::move(out));
        });
    }
    static const std::set<std::string> unsafe = {"pop", "popitem", "update", "clear", "setdefault", "copy", "fromkeys"};
    if (unsafe.count(name))
        return bound(name, [name](Interpreter&, CallArgs&) -> Value {
            render_fail("access to attribute '" + name + "' of 'dict' object is unsafe.");
        });
    return std::nullopt;
}

std::optional<Value> list_method(const Value& obj, const std::string& name) {
    auto l = obj.list;
    if (name == "index" || name == "count") {
        return bound(name, [l, name](Interpreter&, CallArgs& a) {
            const Value* x = arg(a, 0, "value");
            if (!x) render_fail(name + "() takes exactly one argument");
            int64_t n = 0;
            for (size_t i = 0; i < l->items.size(); ++i) {
                if (values_equal(l->items[i], *x)) {
                    if (name == "index") return Value::from_int(static_cast<int64_t>(i));
                    ++n;
                }
            }
            if (name == "index") render_fail("value is not in list");
            return Value::from_int(n);
        });
    }
    static const std::set<std::string> unsafe = {"append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear", "copy"};
    if (!l->is_tuple && unsafe.count(name))
        return bound(name, [name](Interpreter&, CallArgs&) -> Value {
            render_fail("access to attribute '" + name + "' of 'list' object is unsafe.");
        });
    return std::nullopt;
}

// --- filters ----------------------------------------------------------------------------------

// jinja2's make_attrgetter: dotted path, integer parts as indexes, item lookup first.
Value get_path(Interpreter& in, const Value& item, const std::string& path) {
    Value cur = item;
    size_t start = 0;
    while (true) {
        size_t dot = path.find('.', start);
        std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
        int64_t index = 0;
        if (numeric && std::from_chars(part.data(), part.data() + part.size(), index).ec != std::errc()) numeric = false;
        cur = in.get_item(cur, numeric ? Value::from_int(index) : Value::from_string(part));
        if (dot == std::string::npos) break;
        start = dot + 1;
    }
    return cur;
}

std::string attribute_name(const Value* v) {
    if (!v) return "";
    if (v->kind == Kind::integer) return std::to_string(v->integer);
    return need_str(v, "attribute");
}

Value filter_tojson(const Value& v, CallArgs& a) {
    // transformers: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
    JsonDumpOptions o;
    if (const Value* e = arg(a, 0, "ensure_ascii")) o.ensure_ascii = e->truthy();
    if (const Value* ind = arg(a, 1, "indent"); ind && ind->kind != Kind::none) {
        if (is_intlike(*ind)) o.indent = std::string(static_cast<size_t>(std::max<int64_t>(0, std::min<int64_t>(as_int(*ind), 256))), ' ');
        else if (ind->kind == Kind::string) o.indent = ind->string;
        else render_fail("tojson indent must be an int or a str");
        o.item_separator = ",";
    }
    if (const Value* sep = arg(a, 2, "separators"); sep && sep->kind != Kind::none) {
        if (sep->kind != Kind::list || sep->list->items.size() != 2) render_fail("tojson separators must be a pair");
        o.item_separator = need_str(&sep->list->items[0], "separator");
        o.key_separator = need_str(&sep->list->items[1], "separator");
    }
    if (const Value* sk = arg(a, 3, "sort_keys")) o.sort_keys = sk->truthy();
    return Value::from_string(json_dumps(v, o));
}

Value py_int(const Value& v, const Value* def_v, const Value* base_v) {
    Value def = def_v ? *def_v : Value::from_int(0);
    int base = base_v && is_intlike(*base_v) ? static_cast<int>(as_int(*base_v)) : 10;
    if (is_intlike(v)) return Value::from_int(as_int(v));
    if (v.kind == Kind::floating) {
        if (!std::isfinite(v.floating) || std::fabs(v.floating) >= 9.2e18) return def;
        return Value::from_int(static_cast<int64_t>(v.floating));
    }
    if (v.kind == Kind::string) {
        std::string s = py_strip(v.string, nullptr, true, true);
        s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
        if (!s.empty()) {
            errno = 0;
            char* end = nullptr;
            long long x = std::strtoll(s.c_str(), &end, base);
            if (end && *end == 0 && errno == 0) return Value::from_int(x);
            double d = std::strtod(s.c_str(), &end);
            if (end && *end == 0 && std::isfinite(d) && std::fabs(d) < 9.2e18) return Value::from_int(static_cast<int64_t>(d));
        }
    }
    return def;
}

Value py_float(const Value& v, const Value* def_v) {
    Value def = def_v ? *def_v : Value::from_float(0.0);
    if (v.is_number()) return Value::from_float(as_double(v));
    if (v.kind == Kind::string) {
        std::string s = py_strip(v.string, nullptr, true, true);
        std::string low = lower(s);
        if (low == "inf" || low == "+inf" || low == "infinity") return Value::from_float(INFINITY);
        if (low == "-inf" || low == "-infinity") return Value::from_float(-INFINITY);
        if (low == "nan") return Value::from_float(NAN);
        char* end = nullptr;
        double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end && *end == 0 && low.find('x') == std::string::npos) return Value::from_float(d);
    }
    return def;
}

// Python's sort key ordering for sort/unique/min/max (strings lowered unless case_sensitive).
Value sort_key(Interpreter& in, const Value& item, const std::string& attribute, bool case_sensitive) {
    Value key = attribute.empty() ? item : get_path(in, item, attribute);
    if (!case_sensitive && key.kind == Kind::string) return Value::from_string(lower(key.string));
    return key;
}

std::string html_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&#34;"; break;
        case '\'': out += "&#39;"; break;
        default: out += c;
        }
    }
    return out;
}

}  // namespace

std::optional<Value> method_of(const Value& obj, const std::string& name) {
    if (!name.empty() && name[0] == '_') return std::nullopt;
    switch (obj.kind) {
    case Kind::string: return string_method(obj, name);
    case Kind::dict: return obj.dict->kind == DictKind::plain ? dict_method(obj, name) : std::nullopt;
    case Kind::list: return list_method(obj, name);
    default: return std::nullopt;
    }
}

Value Interpreter::apply_filter(const std::string& name, const Value& v, CallArgs& a) {
    step();
    // Python's `<` between sort keys.
    auto less = [this](const Value& l, const Value& r) { return compare("<", l, r); };
    if (name == "tojson") return filter_tojson(v, a);
    if (name == "trim") {
        if (v.kind == Kind::undefined) return Value::from_string("");
        return Value::from_string(py_strip(soft_str(v), arg(a, 0, "chars"), true, true));
    }
    if (name == "length" || name == "count") return Value::from_int(length_of(v));
    if (name == "upper") return Value::from_string(upper(soft_str(v)));
    if (name == "lower") return Value::from_string(lower(soft_str(v)));
    if (name == "capitalize") return Value::from_string(py_capitalize(soft_str(v)));
    if (name == "title") {
        // jinja2: re.split(r"([-\s({\[<]+)"), then item[0].upper() + item[1:].lower() for each item.
        std::string out, word;
        bool in_sep = false;
        auto flush = [&]() {
            if (word.empty()) return;
            if (in_sep) {
                out += word;
            } else {
                auto chars = utf8_chars(word);
                std::string rest;
                for (size_t k = 1; k < chars.size(); ++k) rest += chars[k];
                out += upper(chars[0]) + lower(rest);
            }
            word.clear();
        };
        for (uint32_t cp : decode(soft_str(v))) {
            bool sep = cp == '-' || cp == '(' || cp == '{' || cp == '[' || cp == '<' || py_isspace(cp);
            if (sep != in_sep) {
                flush();
                in_sep = sep;
            }
            word += encode_cp(cp);
        }
        flush();
        return Value::from_string(std::move(out));
    }
    if (name == "replace") {
        const Value* count = arg(a, 2, "count");
        std::string s = soft_str(v);
        return Value::from_string(py_replace(s, soft_str(arg(a, 0, "old") ? *arg(a, 0, "old") : Value()),
                                             soft_str(arg(a, 1, "new") ? *arg(a, 1, "new") : Value()),
                                             count && is_intlike(*count) ? as_int(*count) : -1));
    }
    if (name == "default" || name == "d") {
        const Value* def = arg(a, 0, "default_value");
        const Value* boolean = arg(a, 1, "boolean");
        bool use_default = v.kind == Kind::undefined || (boolean && boolean->truthy() && !v.truthy());
        if (use_default) return def ? *def : Value::from_string("");
        return v;
    }
    if (name == "items") {
        if (v.kind == Kind::undefined) return Value::new_list();
        if (v.kind != Kind::dict || v.dict->kind != DictKind::plain) render_fail("Can only get item pairs from a mapping.");
        std::vector<Value> out;
        for (const auto& [key, value] : v.dict->items) out.push_back(Value::new_list({Value::from_string(key), value}, true));
        return Value::new_list(std::move(out));
    }
    if (name == "join") {
        const Value* d = arg(a, 0, "d");
        std::string attribute = attribute_name(arg(a, 1, "attribute"));
        std::string sep = d ? soft_str(*d) : "";
        std::string out;
        bool first = true;
        for (const auto& item : iterate(v)) {
            if (!first) out += sep;
            first = false;
            out += soft_str(attribute.empty() ? item : get_path(*this, item, attribute));
        }
        return Value::from_string(std::move(out));
    }
    if (name == "map") {
        std::vector<Value> out;
        std::string attribute = attribute_name(arg(a, 99, "attribute"));
        if (!attribute.empty() || a.positional.empty()) {
            const Value* def = arg(a, 99, "default");
            for (const auto& item : iterate(v)) {
                Value x = get_path(*this, item, attribute);
                if (x.kind == Kind::undefined && def) x = *def;
                out.push_back(x);
            }
        } else {
            std::string filter = need_str(&a.positional[0], "filter name");
            CallArgs rest;
            rest.positional.assign(a.positional.begin() + 1, a.positional.end());
            rest.keyword = a.keyword;
            for (const auto& item : iterate(v)) {
                CallArgs copy = rest;
                out.push_back(apply_filter(filter, item, copy));
            }
        }
        return Value::new_list(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
        bool by_attr = name == "selectattr" || name == "rejectattr";
        bool keep_if = name == "select" || name == "selectattr";
        size_t first = 0;
        std::string attribute;
        if (by_attr) {
            if (a.positional.empty()) render_fail(name + " needs an attribute");
            attribute = attribute_name(&a.positional[0]);
            first = 1;
        }
        std::optional<std::string> test;
        if (a.positional.size() > first) test = need_str(&a.positional[first], "test name");
        CallArgs test_args;
        if (a.positional.size() > first + 1) test_args.positional.assign(a.positional.begin() + static_cast<long>(first) + 1, a.positional.end());
        test_args.keyword = a.keyword;
        std::vector<Value> out;
        for (const auto& item : iterate(v)) {
            Value x = by_attr ? get_path(*this, item, attribute) : item;
            bool ok;
            if (test) {
                CallArgs copy = test_args;
                ok = apply_test(*test, x, copy);
            } else {
                ok = x.truthy();
            }
            if (ok == keep_if) out.push_back(item);
        }
        return Value::new_list(std::move(out));
    }
    if (name == "first") {
        if (v.kind == Kind::undefined) return Value::undefined("No first item, sequence was empty.");
        auto items = iterate(v);
        if (items.empty()) return Value::undefined("No first item, sequence was empty.");
        return items.front();
    }
    if (name == "last") {
        if (v.kind == Kind::undefined) return Value::undefined("No last item, sequence was empty.");
        auto items = iterate(v);
        if (items.empty()) return Value::undefined("No last item, sequence was empty.");
        return items.back();
    }
    if (name == "string") return Value::from_string(soft_str(v));
    if (name == "list") return Value::new_list(iterate(v));
    if (name == "int") return py_int(v, arg(a, 0, "default"), arg(a, 1, "base"));
    if (name == "float") return py_float(v, arg(a, 0, "default"));
    if (name == "abs") {
        if (is_intlike(v)) {
            if (as_int(v) == INT64_MIN) render_fail("integer overflow");
            return Value::from_int(std::llabs(as_int(v)));
        }
        if (v.kind == Kind::floating) return Value::from_float(std::fabs(v.floating));
        render_fail("bad operand type for abs(): '" + type_name(v) + "'");
    }
    if (name == "safe") return v;
    if (name == "escape" || name == "e" || name == "forceescape") return Value::from_string(html_escape(soft_str(v)));
    if (name == "unique") {
        const Value* cs = arg(a, 0, "case_sensitive");
        std::string attribute = attribute_name(arg(a, 1, "attribute"));
        std::vector<Value> out, seen;
        for (const auto& item : iterate(v)) {
            Value key = sort_key(*this, item, attribute, cs && cs->truthy());
            bool dup = false;
            for (const auto& s : seen)
                if (values_equal(s, key)) dup = true;
            if (!dup) {
                seen.push_back(key);
                out.push_back(item);
            }
        }
        return Value::new_list(std::move(out));
    }
    if (name == "sort" || name == "dictsort") {
        bool is_dict = name == "dictsort";
        const Value* reverse = arg(a, is_dict ? 2 : 0, "reverse");
        const Value* cs = arg(a, is_dict ? 0 : 1, "case_sensitive");
        std::string attribute = is_dict ? "" : attribute_name(arg(a, 2, "attribute"));
        std::vector<Value> items;
        if (is_dict) {
            if (v.kind != Kind::dict) render_fail("dictsort needs a mapping");
            for (const auto& [key, value] : v.dict->items) items.push_back(Value::new_list({Value::from_string(key), value}, true));
            const Value* by = arg(a, 1, "by");
            attribute = by && by->kind == Kind::string && by->string == "value" ? "1" : "0";
        } else {
            items = iterate(v);
        }
        bool case_sensitive = cs && cs->truthy();
        std::vector<std::pair<Value, Value>> keyed;
        for (auto& item : items) keyed.emplace_back(sort_key(*this, item, attribute, case_sensitive), item);
        std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& l, const auto& r) { return less(l.first, r.first); });
        if (reverse && reverse->truthy()) {
            // Python's sort(reverse=True) keeps equal elements in their original order.
            std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& l, const auto& r) { return less(r.first, l.first); });
        }
        std::vector<Value> out;
        for (auto& kv : keyed) out.push_back(kv.second);
        return Value::new_list(std::move(out));
    }
    if (name == "reverse") {
        if (v.kind == Kind::string) {
            auto chars = utf8_chars(v.string);
            std::string out;
            for (auto it = chars.rbegin(); it != chars.rend(); ++it) out += *it;
            return Value::from_string(std::move(out));
        }
        auto items = iterate(v);
        std::reverse(items.begin(), items.end());
        return Value::new_list(std::move(items));
    }
    if (name == "sum") {
        std::string attribute = attribute_name(arg(a, 0, "attribute"));
        const Value* start = arg(a, 1, "start");
        Value total = start ? *start : Value::from_int(0);
        for (const auto& item : iterate(v)) {
            Value x = attribute.empty() ? item : get_path(*this, item, attribute);
            if (!total.is_number() || !x.is_number()) render_fail("unsupported operand type(s) for +: '" + type_name(total) + "' and '" + type_name(x) + "'");
            if (is_intlike(total) && is_intlike(x)) {
                int64_t r;
                if (__builtin_add_overflow(as_int(total), as_int(x), &r)) render_fail("integer overflow");
                total = Value::from_int(r);
            } else {
                total = Value::from_float(as_double(total) + as_double(x));
            }
        }
        return total;
    }
    if (name == "min" || name == "max") {
        const Value* cs = arg(a, 0, "case_sensitive");
        std::string attribute = attribute_name(arg(a, 1, "attribute"));
        auto items = iterate(v);
        if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
        size_t best = 0;
        Value best_key = sort_key(*this, items[0], attribute, cs && cs->truthy());
        for (size_t i = 1; i < items.size(); ++i) {
            Value key = sort_key(*this, items[i], attribute, cs && cs->truthy());
            if (name == "min" ? less(key, best_key) : less(best_key, key)) {
                best = i;
                best_key = key;
            }
        }
        return items[best];
    }
    if (name == "round") {
        const Value* prec = arg(a, 0, "precision");
        const Value* method = arg(a, 1, "method");
        int64_t p = prec && is_intlike(*prec) ? as_int(*prec) : 0;
        std::string m = method && method->kind == Kind::string ? method->string : "common";
        if (!v.is_number()) render_fail("round needs a number");
        double x = as_double(v);
        double scale = std::pow(10.0, static_cast<double>(p));
        if (m == "ceil") return Value::from_float(std::ceil(x * scale) / scale);
        if (m == "floor") return Value::from_float(std::floor(x * scale) / scale);
        if (m != "common") render_fail("method must be common, ceil or floor");
        if (p == 0) return Value::from_float(std::nearbyint(x));
        std::string text = fmt::format("{:.{}f}", x, static_cast<int>(std::clamp<int64_t>(p, 0, 300)));
        return Value::from_float(std::strtod(text.c_str(), nullptr));
    }
    if (name == "indent") {
        const Value* width = arg(a, 0, "width");
        const Value* first = arg(a, 1, "first");
        const Value* blank = arg(a, 2, "blank");
        std::string ind = width && width->kind == Kind::string ? width->string
                                                               : std::string(static_cast<size_t>(std::clamp<int64_t>(width && is_intlike(*width) ? as_int(*width) : 4, 0, 1024)), ' ');
        std::string s = soft_str(v) + "\n";
        std::vector<std::string> lines;
        size_t start = 0;
        for (size_t i = 0; i < s.size(); ++i) {
            if (s[i] == '\n' || s[i] == '\r') {
                lines.push_back(s.substr(start, i - start));
                if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
                start = i + 1;
            }
        }
        if (start < s.size()) lines.push_back(s.substr(start));
        std::string rv;
        if (blank && blank->truthy()) {
            for (size_t i = 0; i < lines.size(); ++i) rv += (i ? "\n" + ind : "") + lines[i];
        } else {
            rv = lines.empty() ? "" : lines[0];
            for (size_t i = 1; i < lines.size(); ++i) rv += "\n" + (lines[i].empty() ? "" : ind + lines[i]);
        }
        if (first && first->truthy()) rv = ind + rv;
        return Value::from_string(std::move(rv));
    }
    if (name == "attr") {
        std::string n = need_str(arg(a, 0, "name"), "attribute name");
        if (v.kind == Kind::dict && v.dict->kind != DictKind::plain) {
            if (const Value* x = v.dict->find(n)) return *x;
        }
        if (auto m = method_of(v, n)) return *m;
        return Value::undefined("'" + type_name(v) + " object' has no attribute '" + n + "'");
    }
    if (name == "format") {
        // jinja2: `value % args` (printf-style).
        return eval_binary("%", Value::from_string(soft_str(v)), Value::new_list(a.positional, true));
    }
    if (name == "wordcount") {
        auto cps = decode(soft_str(v));
        int64_t n = 0;
        bool in_word = false;
        for (uint32_t cp : cps) {
            bool w = (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_' || cp >= 0x80;
            if (w && !in_word) ++n;
            in_word = w;
        }
        return Value::from_int(n);
    }
    if (name == "batch") {
        const Value* size = arg(a, 0, "linecount");
        const Value* fill = arg(a, 1, "fill_with");
        if (!size || !is_intlike(*size) || as_int(*size) <= 0) render_fail("batch needs a positive size");
        auto items = iterate(v);
        std::vector<Value> out, cur;
        for (auto& item : items) {
            cur.push_back(item);
            if (static_cast<int64_t>(cur.size()) == as_int(*size)) {
                out.push_back(Value::new_list(std::move(cur)));
                cur.clear();
            }
        }
        if (!cur.empty()) {
            if (fill && fill->kind != Kind::none)
                while (static_cast<int64_t>(cur.size()) < as_int(*size)) cur.push_back(*fill);
            out.push_back(Value::new_list(std::move(cur)));
        }
        return Value::new_list(std::move(out));
    }
    render_fail("no filter named '" + name + "'");
}

bool Interpreter::apply_test(const std::string& name, const Value& v, CallArgs& a) {
    step();
    auto other = [&]() -> const Value& {
        if (a.positional.empty()) render_fail("test '" + name + "' needs an argument");
        return a.positional[0];
    };
    if (name == "defined") return v.kind != Kind::undefined;
    if (name == "undefined") return v.kind == Kind::undefined;
    if (name == "none") return v.kind == Kind::none;
    if (name == "boolean") return v.kind == Kind::boolean;
    if (name == "true") return v.kind == Kind::boolean && v.boolean;
    if (name == "false") return v.kind == Kind::boolean && !v.boolean;
    if (name == "integer") return v.kind == Kind::integer;
    if (name == "float") return v.kind == Kind::floating;
    if (name == "number") return v.is_number();
    if (name == "string") return v.kind == Kind::string;
    if (name == "mapping") return v.kind == Kind::dict && v.dict->kind == DictKind::plain;
    if (name == "iterable") return v.kind == Kind::undefined || v.kind == Kind::string || v.kind == Kind::list ||
                                   (v.kind == Kind::dict && v.dict->kind == DictKind::plain);
    if (name == "sequence") return v.kind == Kind::undefined || v.kind == Kind::string || v.kind == Kind::list ||
                                   (v.kind == Kind::dict && v.dict->kind == DictKind::plain);
    if (name == "callable") return v.kind == Kind::callable;
    if (name == "escaped") return false;
    if (name == "odd" || name == "even") {
        if (!is_intlike(v)) render_fail("test '" + name + "' needs an integer");
        int64_t r = as_int(v) % 2;
        return name == "odd" ? r != 0 : r == 0;
    }
    if (name == "divisibleby") {
        const Value& d = other();
        if (!is_intlike(v) || !is_intlike(d)) render_fail("divisibleby needs integers");
        if (as_int(d) == 0) render_fail("integer division or modulo by zero");
        return as_int(v) % as_int(d) == 0;
    }
    if (name == "lower") return soft_str(v) == lower(soft_str(v)) && v.kind == Kind::string;
    if (name == "upper") return soft_str(v) == upper(soft_str(v)) && v.kind == Kind::string;
    if (name == "sameas") {
        const Value& o = other();
        if (v.kind != o.kind) return false;
        switch (v.kind) {
        case Kind::none: return true;
        case Kind::boolean: return v.boolean == o.boolean;
        case Kind::list: return v.list == o.list;
        case Kind::dict: return v.dict == o.dict;
        case Kind::callable: return v.callable == o.callable;
        case Kind::integer: return v.integer == o.integer && v.integer >= -5 && v.integer <= 256;
        default: return false;
        }
    }
    static const std::pair<const char*, const char*> compare_names[] = {
        {"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="}, {"lt", "<"}, {"lessthan", "<"},
        {"<", "<"}, {"le", "<="}, {"<=", "<="}, {"gt", ">"}, {"greaterthan", ">"}, {">", ">"}, {"ge", ">="},
        {">=", ">="}, {"in", "in"}};
    for (const auto& [test, op] : compare_names)
        if (name == test) return compare(op, v, other());
    if (name == "filter") return false;
    if (name == "test") return false;
    render_fail("no test named '" + name + "'");
}

std::unordered_map<std::string, Value> make_globals() {
    std::unordered_map<std::string, Value> g;
    g["raise_exception"] = Value::function("raise_exception", [](Interpreter&, CallArgs& a) -> Value {
        const Value* m = arg(a, 0, "message");
        render_fail("raise_exception: " + (m ? to_str(*m) : std::string()));
    });
    g["strftime_now"] = Value::function("strftime_now", [](Interpreter&, CallArgs& a) -> Value {
        std::string format = need_str(arg(a, 0, "format"), "strftime_now format");
        std::time_t now = std::time(nullptr);
        std::tm local{};
        localtime_r(&now, &local);
        std::string out(256 + format.size() * 8, '\0');
        size_t n = format.empty() ? 0 : std::strftime(out.data(), out.size(), format.c_str(), &local);
        out.resize(n);
        return Value::from_string(std::move(out));
    });
    g["range"] = Value::function("range", [](Interpreter& in, CallArgs& a) -> Value {
        std::vector<int64_t> p;
        for (const auto& v : a.positional) {
            if (!is_intlike(v)) render_fail("'" + type_name(v) + "' object cannot be interpreted as an integer");
            p.push_back(as_int(v));
        }
        if (p.empty() || p.size() > 3) render_fail("range expected 1 to 3 arguments");
        int64_t start = p.size() == 1 ? 0 : p[0], stop = p.size() == 1 ? p[0] : p[1], step = p.size() == 3 ? p[2] : 1;
        if (step == 0) render_fail("range() arg 3 must not be zero");
        std::vector<Value> out;
        for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
            // jinja2's sandbox refuses ranges longer than MAX_RANGE (100000).
            if (out.size() >= 100000) render_fail("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
            in.step();
            out.push_back(Value::from_int(i));
            if (__builtin_add_overflow(i, step, &i)) break;
        }
        return Value::new_list(std::move(out));
    });
    g["namespace"] = Value::function("namespace", [](Interpreter&, CallArgs& a) -> Value {
        Value ns = Value::new_dict(DictKind::namespace_obj);
        for (const auto& v : a.positional) {
            if (v.kind != Kind::dict) render_fail("namespace() positional argument must be a mapping");
            for (const auto& [key, value] : v.dict->items) ns.dict->set(key, value);
        }
        for (const auto& [key, value] : a.keyword) ns.dict->set(key, value);
        return ns;
    });
    g["dict"] = Value::function("dict", [](Interpreter&, CallArgs& a) -> Value {
        Value d = Value::new_dict();
        for (const auto& v : a.positional) {
            if (v.kind != Kind::dict) render_fail("dict() positional argument must be a mapping");
            for (const auto& [key, value] : v.dict->items) d.dict->set(key, value);
        }
        for (const auto& [key, value] : a.keyword) d.dict->set(key, value);
        return d;
    });
    return g;
}

}  // namespace nibble::jinja
