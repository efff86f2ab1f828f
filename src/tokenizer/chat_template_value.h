// Values of the chat-template interpreter: the Python objects a jinja2 template sees (None, bool, int,
// float, str, list/tuple, dict, namespace, callables, Undefined), with Python's printing rules (str,
// repr) and json.dumps as transformers' tojson filter calls it.
// Layout: a small tagged struct; lists, dicts and callables are shared (reference semantics as in
// Python, so `namespace` attribute writes are seen by every holder). Dicts keep insertion order.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace nibble::jinja {

struct Value;
class Interpreter;

// An error while evaluating; the interpreter adds the template's origin and line and turns it into
// nibble::Error at the API boundary.
class RenderError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};
[[noreturn]] void render_fail(const std::string& message);

enum class Kind : uint8_t { undefined, none, boolean, integer, floating, string, list, dict, callable };

// Positional and keyword arguments of a call, as Python passes them.
struct CallArgs {
    std::vector<Value> positional;
    std::vector<std::pair<std::string, Value>> keyword;
};

using NativeFn = std::function<Value(Interpreter&, CallArgs&)>;

struct Callable {
    std::string name;
    NativeFn fn;
};

// Nesting is tracked as values are built (lists and plain dicts are immutable once built), so a
// template cannot build values deep enough to overflow the stack when printed or destroyed; a
// namespace may not hold another namespace, which also rules out reference cycles.
struct List {
    std::vector<Value> items;
    bool is_tuple = false;
    int depth = 1;
    bool has_namespace = false;
};

enum class DictKind : uint8_t { plain, namespace_obj, loop };

// An insertion-ordered str -> Value map (JSON objects only ever have string keys).
struct Dict {
    std::vector<std::pair<std::string, Value>> items;
    std::unordered_map<std::string, size_t> index;
    DictKind kind = DictKind::plain;
    int depth = 1;
    bool has_namespace = false;

    const Value* find(const std::string& key) const;
    void set(const std::string& key, Value value);
};

struct Value {
    Kind kind = Kind::undefined;
    bool boolean = false;
    int64_t integer = 0;
    double floating = 0.0;
    std::string string;  // the str, or for an Undefined the name that was looked up (for messages)
    std::shared_ptr<List> list;
    std::shared_ptr<Dict> dict;
    std::shared_ptr<Callable> callable;

    static Value undefined(std::string name = {});
    static Value none();
    static Value from_bool(bool b);
    static Value from_int(int64_t i);
    static Value from_float(double f);
    static Value from_string(std::string s);
    static Value new_list(std::vector<Value> items = {}, bool tuple = false);
    static Value new_dict(DictKind kind = DictKind::plain);
    static Value function(std::string name, NativeFn fn);
    static Value from_json(const nlohmann::ordered_json& j);

    bool is_undefined() const { return kind == Kind::undefined; }
    bool is_none() const { return kind == Kind::none; }
    bool is_string() const { return kind == Kind::string; }
    bool is_list() const { return kind == Kind::list; }
    bool is_dict() const { return kind == Kind::dict; }
    bool is_number() const { return kind == Kind::integer || kind == Kind::floating || kind == Kind::boolean; }
    bool truthy() const;
};

// Python's str() of a value (what {{ x }} prints); Undefined prints as "".
std::string to_str(const Value& v);
// Python's repr() (used inside lists and dicts).
std::string to_repr(const Value& v);
// Python's repr() of a float: shortest round-trip digits, exponent form outside [1e-4, 1e16).
std::string float_repr(double d);
// Python's repr() of a str: quotes chosen as Python does, escapes for control characters.
std::string string_repr(const std::string& s);

struct JsonDumpOptions {
    bool ensure_ascii = false;
    std::optional<std::string> indent;  // none: single line
    std::string item_separator = ", ";
    std::string key_separator = ": ";
    bool sort_keys = false;
};
// json.dumps(v, ...) with Python's output format; fails for values JSON cannot hold.
std::string json_dumps(const Value& v, const JsonDumpOptions& options);

// Equality and ordering as Python defines them between these types.
bool values_equal(const Value& a, const Value& b);

// UTF-8 helpers: Python strings index by code point.
std::vector<std::string> utf8_chars(const std::string& s);
size_t utf8_length(const std::string& s);

}  // namespace nibble::jinja
