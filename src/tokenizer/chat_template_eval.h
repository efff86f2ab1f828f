// Evaluator of the chat-template interpreter: walks the statement tree with jinja2's runtime
// semantics (frames per for-iteration and per macro call, Undefined for missing names and keys,
// attribute-then-item lookup for `a.b`, item-then-attribute for `a[b]`, Python operators).
// Filters, tests, global functions and str/dict methods live in chat_template_builtins.cpp.
#pragma once

#include "tokenizer/chat_template.h"
#include "tokenizer/chat_template_ast.h"

#include <cstdint>
#include <string>
#include <unordered_map>

namespace nibble::jinja {

using RenderLimits = nibble::ChatTemplateLimits;

class Interpreter {
public:
    Interpreter(const Program& program, const RenderLimits& limits);

    // Renders the program with `context` (a dict value) as its top-level variables.
    std::string render(const Value& context);

    // Hooks for the builtins.
    Value call(const Value& callee, CallArgs& args);
    Value apply_filter(const std::string& name, const Value& subject, CallArgs& args);
    bool apply_test(const std::string& name, const Value& subject, CallArgs& args);
    Value get_attr(const Value& obj, const std::string& name);  // a.b
    Value get_item(const Value& obj, const Value& key);         // a[b]
    void step();

private:
    struct Frame {
        std::unordered_map<std::string, Value> vars;
        Frame* parent = nullptr;
    };
    enum class Flow { normal, break_loop, continue_loop };

    Flow exec_body(const Body& body, Frame& frame, std::string& out);
    Flow exec(const Stmt& stmt, Frame& frame, std::string& out);
    void exec_for(const Stmt& stmt, Frame& frame, std::string& out);
    void assign(const Target& target, const Value& value, Frame& frame);
    Value make_macro(const Stmt& stmt, const Body* body, const std::vector<MacroParam>* params, Frame* parent);
    Value eval(const Expr& expr, Frame& frame);
    Value eval_binary(const std::string& op, const Value& a, const Value& b);
    bool compare(const std::string& op, const Value& a, const Value& b);
    Value eval_slice(const Value& subject, const Value& start, const Value& stop, const Value& step);
    CallArgs eval_args(const Expr& expr, Frame& frame, size_t first_positional);
    Value lookup(const std::string& name, Frame& frame);
    void emit(std::string& out, const std::string& text);

    const Program& program_;
    RenderLimits limits_;
    Frame* root_ = nullptr;
    std::unordered_map<std::string, Value> globals_;
    uint64_t steps_ = 0;
    size_t output_bytes_ = 0;
    int call_depth_ = 0;
    int line_ = 0;
    const Value* block_input_ = nullptr;  // subject of a filter chain in {% filter %} / {% set x | f %}
};

// Python-style names of value types, for error messages ("str", "int", "dict"...).
std::string type_name(const Value& v);
// Python's iter(): the items a for loop visits (chars of a str, keys of a dict).
std::vector<Value> iterate(const Value& v);
// Python's len(); fails for values without a length.
int64_t length_of(const Value& v);
// The global functions of transformers' environment plus jinja2's defaults (range, namespace, dict).
std::unordered_map<std::string, Value> make_globals();
// Bound methods of str, dict and list values (None where the name is not one).
std::optional<Value> method_of(const Value& obj, const std::string& name);

}  // namespace nibble::jinja
