// Evaluator of the chat-template interpreter (see chat_template_eval.h).
#include "tokenizer/chat_template_eval.h"

#include "base/error.h"

#include <algorithm>
#include <cmath>

namespace nibble::jinja {

namespace {

int64_t as_int(const Value& v) { return v.kind == Kind::boolean ? int64_t{v.boolean} : v.integer; }
double as_double(const Value& v) {
    return v.kind == Kind::floating ? v.floating : static_cast<double>(as_int(v));
}
bool is_intlike(const Value& v) { return v.kind == Kind::integer || v.kind == Kind::boolean; }

[[noreturn]] void undefined_error(const Value& v) {
    render_fail(v.string.empty() ? "value is undefined" : v.string);
}

// The message jinja2 gives when an Undefined is used.
std::string undefined_message_for_name(const std::string& name) { return "'" + name + "' is undefined"; }

std::string py_percent_format(const std::string& fmt_str, const Value& args);

}  // namespace

std::string type_name(const Value& v) {
    switch (v.kind) {
    case Kind::undefined: return "Undefined";
    case Kind::none: return "NoneType";
    case Kind::boolean: return "bool";
    case Kind::integer: return "int";
    case Kind::floating: return "float";
    case Kind::string: return "str";
    case Kind::list: return v.list->is_tuple ? "tuple" : "list";
    case Kind::dict:
        return v.dict->kind == DictKind::namespace_obj ? "Namespace" : v.dict->kind == DictKind::loop ? "LoopContext" : "dict";
    case Kind::callable: return "function";
    }
    return "object";
}

std::vector<Value> iterate(const Value& v) {
    switch (v.kind) {
    case Kind::undefined: return {};
    case Kind::string: {
        std::vector<Value> out;
        for (auto& c : utf8_chars(v.string)) out.push_back(Value::from_string(std::move(c)));
        return out;
    }
    case Kind::list: return v.list->items;
    case Kind::dict:
        if (v.dict->kind == DictKind::plain) {
            std::vector<Value> out;
            for (const auto& item : v.dict->items) out.push_back(Value::from_string(item.first));
            return out;
        }
        break;
    default: break;
    }
    render_fail("'" + type_name(v) + "' object is not iterable");
}

int64_t length_of(const Value& v) {
    switch (v.kind) {
    case Kind::undefined: return 0;
    case Kind::string: return static_cast<int64_t>(utf8_length(v.string));
    case Kind::list: return static_cast<int64_t>(v.list->items.size());
    case Kind::dict:
        if (v.dict->kind == DictKind::plain) return static_cast<int64_t>(v.dict->items.size());
        break;
    default: break;
    }
    render_fail("object of type '" + type_name(v) + "' has no len()");
}

Interpreter::Interpreter(const Program& program, const RenderLimits& limits)
    : program_(program), limits_(limits), globals_(make_globals()) {}

void Interpreter::step() {
    if (++steps_ > limits_.max_steps) render_fail("template exceeded its evaluation step limit");
}

void Interpreter::emit(std::string& out, const std::string& text) {
    output_bytes_ += text.size();
    if (output_bytes_ > limits_.max_output_bytes)
        render_fail(fmt::format("template output exceeded {} bytes", limits_.max_output_bytes));
    out += text;
}

std::string Interpreter::render(const Value& context) {
    Frame root;
    root_ = &root;
    if (context.is_dict())
        for (const auto& [key, value] : context.dict->items) root.vars[key] = value;
    std::string out;
    try {
        exec_body(program_.body, root, out);
    } catch (const RenderError& e) {
        fail("chat template {}:{}: {}", program_.origin, line_, e.what());
    }
    return out;
}

Value Interpreter::lookup(const std::string& name, Frame& frame) {
    for (Frame* f = &frame; f; f = f->parent) {
        auto it = f->vars.find(name);
        if (it != f->vars.end()) return it->second;
    }
    auto it = globals_.find(name);
    if (it != globals_.end()) return it->second;
    return Value::undefined(undefined_message_for_name(name));
}

Interpreter::Flow Interpreter::exec_body(const Body& body, Frame& frame, std::string& out) {
    for (const auto& stmt : body) {
        Flow flow = exec(*stmt, frame, out);
        if (flow != Flow::normal) return flow;
    }
    return Flow::normal;
}

Interpreter::Flow Interpreter::exec(const Stmt& stmt, Frame& frame, std::string& out) {
    step();
    line_ = stmt.line;
    switch (stmt.kind) {
    case StmtKind::text: emit(out, stmt.text); break;
    case StmtKind::print: {
        Value v = eval(*stmt.expr, frame);
        line_ = stmt.line;
        if (v.kind == Kind::string) emit(out, v.string);
        else emit(out, to_str(v));
        break;
    }
    case StmtKind::if_: {
        for (const auto& [cond, body] : stmt.branches) {
            line_ = cond->line;
            if (eval(*cond, frame).truthy()) return exec_body(body, frame, out);
        }
        return exec_body(stmt.body, frame, out);
    }
    case StmtKind::for_: exec_for(stmt, frame, out); break;
    case StmtKind::set: assign(stmt.target, eval(*stmt.expr, frame), frame); break;
    case StmtKind::set_block: {
        std::string text;
        exec_body(stmt.body, frame, text);
        Value v = Value::from_string(std::move(text));
        if (stmt.expr) {
            const Value* saved = block_input_;
            block_input_ = &v;
            Value filtered = eval(*stmt.expr, frame);
            block_input_ = saved;
            v = filtered;
        }
        assign(stmt.target, v, frame);
        break;
    }
    case StmtKind::macro:
        frame.vars[stmt.name] = make_macro(stmt, &stmt.body, &stmt.params, root_);
        break;
    case StmtKind::call_block: {
        Value caller = make_macro(stmt, &stmt.body, &stmt.params, &frame);
        const Expr& call = *stmt.expr;
        Value callee = eval(*call.children[0], frame);
        CallArgs args = eval_args(call, frame, 1);
        args.keyword.emplace_back("caller", caller);
        Value v = this->call(callee, args);
        line_ = stmt.line;
        emit(out, to_str(v));
        break;
    }
    case StmtKind::filter_block: {
        std::string text;
        exec_body(stmt.body, frame, text);
        Value input = Value::from_string(std::move(text));
        const Value* saved = block_input_;
        block_input_ = &input;
        Value v = eval(*stmt.expr, frame);
        block_input_ = saved;
        emit(out, to_str(v));
        break;
    }
    case StmtKind::break_: return Flow::break_loop;
    case StmtKind::continue_: return Flow::continue_loop;
    case StmtKind::scope: return exec_body(stmt.body, frame, out);
    }
    return Flow::normal;
}

void Interpreter::exec_for(const Stmt& stmt, Frame& frame, std::string& out) {
    Value iterable = eval(*stmt.expr, frame);
    if (iterable.kind == Kind::none) render_fail("'NoneType' object is not iterable");
    std::vector<Value> items = iterate(iterable);
    if (stmt.condition) {
        // `for x in xs if cond`: the filter sees the target but not `loop`.
        std::vector<Value> kept;
        for (auto& item : items) {
            step();
            Frame f;
            f.parent = &frame;
            assign(stmt.target, item, f);
            if (eval(*stmt.condition, f).truthy()) kept.push_back(std::move(item));
        }
        items = std::move(kept);
    }
    if (items.empty()) {
        Frame f;
        f.parent = &frame;
        exec_body(stmt.else_body, f, out);
        return;
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
        Frame f;
        f.parent = &frame;
        Value loop = Value::new_dict(DictKind::loop);
        Dict& d = *loop.dict;
        d.set("index", Value::from_int(i + 1));
        d.set("index0", Value::from_int(i));
        d.set("revindex", Value::from_int(n - i));
        d.set("revindex0", Value::from_int(n - i - 1));
        d.set("first", Value::from_bool(i == 0));
        d.set("last", Value::from_bool(i == n - 1));
        d.set("length", Value::from_int(n));
        d.set("depth", Value::from_int(1));
        d.set("depth0", Value::from_int(0));
        d.set("previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value::undefined("there is no previous item"));
        d.set("nextitem", i + 1 < n ? items[static_cast<size_t>(i + 1)] : Value::undefined("there is no next item"));
        d.set("cycle", Value::function("cycle", [i](Interpreter&, CallArgs& args) -> Value {
                  if (args.positional.empty()) render_fail("no items for cycling given");
                  return args.positional[static_cast<size_t>(i) % args.positional.size()];
              }));
        f.vars["loop"] = loop;
        assign(stmt.target, items[static_cast<size_t>(i)], f);
        Flow flow = exec_body(stmt.body, f, out);
        if (flow == Flow::break_loop) break;
    }
}

void Interpreter::assign(const Target& target, const Value& value, Frame& frame) {
    if (!target.attribute.empty()) {
        Value obj = lookup(target.names[0], frame);
        if (obj.kind != Kind::dict || obj.dict->kind != DictKind::namespace_obj)
            render_fail("can't assign attribute on non-namespace object");
        obj.dict->set(target.attribute, value);
        return;
    }
    if (!target.is_tuple) {
        frame.vars[target.names[0]] = value;
        return;
    }
    std::vector<Value> items = iterate(value);
    if (items.size() != target.names.size())
        render_fail(items.size() > target.names.size()
                        ? fmt::format("too many values to unpack (expected {})", target.names.size())
                        : fmt::format("not enough values to unpack (expected {}, got {})", target.names.size(),
                                      items.size()));
    for (size_t i = 0; i < items.size(); ++i) frame.vars[target.names[i]] = items[i];
}

Value Interpreter::make_macro(const Stmt& stmt, const Body* body, const std::vector<MacroParam>* params,
                              Frame* parent) {
    std::string name = stmt.kind == StmtKind::macro ? stmt.name : "caller";
    return Value::function(name, [this, body, params, parent, name](Interpreter&, CallArgs& args) -> Value {
        if (++call_depth_ > limits_.max_call_depth) render_fail("maximum macro recursion depth exceeded");
        int saved_line = line_;
        Frame f;
        f.parent = parent;
        if (args.positional.size() > params->size())
            render_fail(fmt::format("macro '{}' takes not more than {} argument(s)", name, params->size()));
        std::vector<bool> bound(params->size(), false);
        for (size_t i = 0; i < args.positional.size(); ++i) {
            f.vars[(*params)[i].name] = args.positional[i];
            bound[i] = true;
        }
        for (auto& [key, value] : args.keyword) {
            size_t k = 0;
            while (k < params->size() && (*params)[k].name != key) ++k;
            if (k == params->size()) {
                if (key == "caller") {
                    f.vars["caller"] = value;
                    continue;
                }
                render_fail(fmt::format("macro '{}' takes no keyword argument '{}'", name, key));
            }
            if (bound[k]) render_fail(fmt::format("macro '{}' got multiple values for argument '{}'", name, key));
            f.vars[key] = value;
            bound[k] = true;
        }
        for (size_t i = 0; i < params->size(); ++i) {
            if (bound[i]) continue;
            const MacroParam& p = (*params)[i];
            f.vars[p.name] = p.default_value ? eval(*p.default_value, f)
                                             : Value::undefined("parameter '" + p.name + "' was not provided");
        }
        std::string out;
        exec_body(*body, f, out);
        --call_depth_;
        line_ = saved_line;
        return Value::from_string(std::move(out));
    });
}

CallArgs Interpreter::eval_args(const Expr& expr, Frame& frame, size_t first_positional) {
    CallArgs args;
    for (size_t i = first_positional; i < expr.children.size(); ++i) args.positional.push_back(eval(*expr.children[i], frame));
    for (const auto& [key, e] : expr.kwargs) args.keyword.emplace_back(key, eval(*e, frame));
    return args;
}

Value Interpreter::call(const Value& callee, CallArgs& args) {
    if (callee.kind == Kind::undefined) undefined_error(callee);
    if (callee.kind != Kind::callable) render_fail("'" + type_name(callee) + "' object is not callable");
    return callee.callable->fn(*this, args);
}

Value Interpreter::get_attr(const Value& obj, const std::string& name) {
    switch (obj.kind) {
    case Kind::undefined: undefined_error(obj);
    case Kind::dict: {
        if (obj.dict->kind == DictKind::plain) {
            if (auto m = method_of(obj, name)) return *m;
        }
        if (const Value* v = obj.dict->find(name)) return *v;
        break;
    }
    default:
        if (auto m = method_of(obj, name)) return *m;
        break;
    }
    return Value::undefined("'" + type_name(obj) + " object' has no attribute '" + name + "'");
}

Value Interpreter::get_item(const Value& obj, const Value& key) {
    switch (obj.kind) {
    case Kind::undefined: undefined_error(obj);
    case Kind::dict:
        if (key.kind == Kind::string) {
            if (const Value* v = obj.dict->find(key.string)) return *v;
            if (obj.dict->kind == DictKind::plain)
                if (auto m = method_of(obj, key.string)) return *m;
        }
        return Value::undefined("'" + type_name(obj) + " object' has no attribute '" + to_str(key) + "'");
    case Kind::list:
        if (is_intlike(key)) {
            int64_t n = static_cast<int64_t>(obj.list->items.size());
            int64_t i = as_int(key);
            if (i < 0) i += n;
            if (i >= 0 && i < n) return obj.list->items[static_cast<size_t>(i)];
            return Value::undefined(fmt::format("'{} object' has no element {}", type_name(obj), as_int(key)));
        }
        break;
    case Kind::string:
        if (is_intlike(key)) {
            auto chars = utf8_chars(obj.string);
            int64_t n = static_cast<int64_t>(chars.size());
            int64_t i = as_int(key);
            if (i < 0) i += n;
            if (i >= 0 && i < n) return Value::from_string(chars[static_cast<size_t>(i)]);
            return Value::undefined(fmt::format("'str object' has no element {}", as_int(key)));
        }
        break;
    default: break;
    }
    if (key.kind == Kind::string) return get_attr(obj, key.string);
    return Value::undefined("'" + type_name(obj) + " object' has no element " + to_str(key));
}

Value Interpreter::eval_slice(const Value& subject, const Value& start_v, const Value& stop_v, const Value& step_v) {
    auto opt = [](const Value& v, const char* what) -> std::optional<int64_t> {
        if (v.kind == Kind::none || v.kind == Kind::undefined) return std::nullopt;
        if (!is_intlike(v)) render_fail(std::string("slice ") + what + " must be an integer or None");
        return as_int(v);
    };
    std::optional<int64_t> start = opt(start_v, "indices"), stop = opt(stop_v, "indices"), stp = opt(step_v, "step");
    int64_t s = stp.value_or(1);
    if (s == 0) render_fail("slice step cannot be zero");
    std::vector<Value> items;
    bool is_string = subject.kind == Kind::string;
    std::vector<std::string> chars;
    if (is_string) chars = utf8_chars(subject.string);
    else if (subject.kind == Kind::list) items = subject.list->items;
    else if (subject.kind == Kind::undefined) undefined_error(subject);
    else render_fail("'" + type_name(subject) + "' object is not subscriptable");
    int64_t n = static_cast<int64_t>(is_string ? chars.size() : items.size());
    // Python's slice.indices().
    auto clamp = [&](std::optional<int64_t> v, int64_t def) -> int64_t {
        if (!v) return def;
        int64_t x = *v;
        if (x < 0) {
            x += n;
            if (x < 0) x = s < 0 ? -1 : 0;
        } else if (x >= n) {
            x = s < 0 ? n - 1 : n;
        }
        return x;
    };
    int64_t b = clamp(start, s < 0 ? n - 1 : 0);
    int64_t e = clamp(stop, s < 0 ? -1 : n);
    std::vector<Value> out_items;
    std::string out_str;
    for (int64_t i = b; s > 0 ? i < e : i > e;) {
        step();
        if (is_string) out_str += chars[static_cast<size_t>(i)];
        else out_items.push_back(items[static_cast<size_t>(i)]);
        if (__builtin_add_overflow(i, s, &i)) break;
    }
    if (is_string) return Value::from_string(std::move(out_str));
    return Value::new_list(std::move(out_items), subject.list->is_tuple);
}

bool Interpreter::compare(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return values_equal(a, b);
    if (op == "!=") return !values_equal(a, b);
    if (op == "in" || op == "notin") {
        bool found = false;
        switch (b.kind) {
        case Kind::string:
            if (a.kind != Kind::string)
                render_fail("'in <string>' requires string as left operand, not " + type_name(a));
            found = b.string.find(a.string) != std::string::npos;
            break;
        case Kind::list:
            for (const auto& item : b.list->items)
                if (values_equal(a, item)) {
                    found = true;
                    break;
                }
            break;
        case Kind::dict:
            if (b.dict->kind != DictKind::plain) render_fail("argument of type '" + type_name(b) + "' is not iterable");
            found = a.kind == Kind::string && b.dict->find(a.string) != nullptr;
            break;
        case Kind::undefined: found = false; break;
        default: render_fail("argument of type '" + type_name(b) + "' is not iterable");
        }
        return op == "in" ? found : !found;
    }
    // Ordering.
    int c = 0;
    if (a.is_number() && b.is_number()) {
        if (is_intlike(a) && is_intlike(b)) c = as_int(a) < as_int(b) ? -1 : as_int(a) > as_int(b) ? 1 : 0;
        else {
            double x = as_double(a), y = as_double(b);
            if (std::isnan(x) || std::isnan(y)) return false;
            c = x < y ? -1 : x > y ? 1 : 0;
        }
    } else if (a.kind == Kind::string && b.kind == Kind::string) {
        c = a.string.compare(b.string);
        c = c < 0 ? -1 : c > 0 ? 1 : 0;
    } else if (a.kind == Kind::list && b.kind == Kind::list && a.list->is_tuple == b.list->is_tuple) {
        size_t n = std::min(a.list->items.size(), b.list->items.size());
        size_t i = 0;
        while (i < n && values_equal(a.list->items[i], b.list->items[i])) ++i;
        if (i < n) {
            // values_equal above has already refused over-deep values, so this recursion is bounded.
            return compare(op, a.list->items[i], b.list->items[i]);
        }
        c = a.list->items.size() < b.list->items.size() ? -1 : a.list->items.size() > b.list->items.size() ? 1 : 0;
    } else {
        if (a.kind == Kind::undefined) undefined_error(a);
        if (b.kind == Kind::undefined) undefined_error(b);
        render_fail("'" + op + "' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
    }
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
}

Value Interpreter::eval_binary(const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return Value::from_string(to_str(a) + to_str(b));
    if (a.kind == Kind::undefined) undefined_error(a);
    if (b.kind == Kind::undefined) undefined_error(b);
    auto unsupported = [&]() -> Value {
        render_fail("unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
    };
    if (a.is_number() && b.is_number()) {
        bool ints = is_intlike(a) && is_intlike(b);
        int64_t x = ints ? as_int(a) : 0, y = ints ? as_int(b) : 0, r = 0;
        double fx = as_double(a), fy = as_double(b);
        if (op == "+") {
            if (!ints) return Value::from_float(fx + fy);
            if (__builtin_add_overflow(x, y, &r)) render_fail("integer overflow");
            return Value::from_int(r);
        }
        if (op == "-") {
            if (!ints) return Value::from_float(fx - fy);
            if (__builtin_sub_overflow(x, y, &r)) render_fail("integer overflow");
            return Value::from_int(r);
        }
        if (op == "*") {
            if (!ints) return Value::from_float(fx * fy);
            if (__builtin_mul_overflow(x, y, &r)) render_fail("integer overflow");
            return Value::from_int(r);
        }
        if (op == "/") {
            if (fy == 0.0) render_fail("division by zero");
            return Value::from_float(fx / fy);
        }
        if (op == "//" || op == "%") {
            if (ints) {
                if (y == 0) render_fail("integer division or modulo by zero");
                if (x == INT64_MIN && y == -1) render_fail("integer overflow");
                int64_t q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) {
                    --q;
                    m += y;
                }
                return Value::from_int(op == "//" ? q : m);
            }
            if (fy == 0.0) render_fail("float division by zero");
            double m = std::fmod(fx, fy);
            if (m != 0.0 && ((m < 0) != (fy < 0))) m += fy;
            if (op == "%") return Value::from_float(m);
            double div = (fx - m) / fy;  // Python's float floor division
            double floored = std::floor(div);
            if (div - floored > 0.5) floored += 1.0;
            return Value::from_float(floored);
        }
        if (op == "**") {
            if (ints && y >= 0) {
                if (x == 0 || x == 1) return Value::from_int(y == 0 ? 1 : x);
                if (x == -1) return Value::from_int(y % 2 == 0 ? 1 : -1);
                int64_t result = 1;
                for (int64_t k = 0; k < y; ++k) {
                    step();
                    if (__builtin_mul_overflow(result, x, &result)) render_fail("integer overflow");
                }
                return Value::from_int(result);
            }
            return Value::from_float(std::pow(fx, fy));
        }
        return unsupported();
    }
    if (op == "+") {
        if (a.kind == Kind::string && b.kind == Kind::string) return Value::from_string(a.string + b.string);
        if (a.kind == Kind::list && b.kind == Kind::list && a.list->is_tuple == b.list->is_tuple) {
            std::vector<Value> items = a.list->items;
            items.insert(items.end(), b.list->items.begin(), b.list->items.end());
            return Value::new_list(std::move(items), a.list->is_tuple);
        }
        if (a.kind == Kind::string || b.kind == Kind::string) {
            if (a.kind == Kind::string)
                render_fail("can only concatenate str (not \"" + type_name(b) + "\") to str");
        }
        return unsupported();
    }
    if (op == "*") {
        const Value& seq = is_intlike(a) ? b : a;
        const Value& count = is_intlike(a) ? a : b;
        if (is_intlike(count) && (seq.kind == Kind::string || seq.kind == Kind::list)) {
            int64_t n = std::max<int64_t>(0, as_int(count));
            size_t unit = seq.kind == Kind::string ? seq.string.size() : seq.list->items.size() * 16;
            if (unit && static_cast<uint64_t>(n) > limits_.max_output_bytes / unit + 1)
                render_fail("sequence repetition too large");
            if (seq.kind == Kind::string) {
                std::string s;
                for (int64_t k = 0; k < n; ++k) s += seq.string;
                return Value::from_string(std::move(s));
            }
            std::vector<Value> items;
            for (int64_t k = 0; k < n; ++k) items.insert(items.end(), seq.list->items.begin(), seq.list->items.end());
            return Value::new_list(std::move(items), seq.list->is_tuple);
        }
        return unsupported();
    }
    if (op == "%" && a.kind == Kind::string) return Value::from_string(py_percent_format(a.string, b));
    return unsupported();
}

Value Interpreter::eval(const Expr& e, Frame& frame) {
    step();
    switch (e.kind) {
    case ExprKind::constant: return e.value;
    case ExprKind::name: return lookup(e.name, frame);
    case ExprKind::list:
    case ExprKind::tuple: {
        std::vector<Value> items;
        items.reserve(e.children.size());
        for (const auto& c : e.children) items.push_back(eval(*c, frame));
        return Value::new_list(std::move(items), e.kind == ExprKind::tuple);
    }
    case ExprKind::dict: {
        Value d = Value::new_dict();
        for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
            Value key = eval(*e.children[i], frame);
            Value value = eval(*e.children[i + 1], frame);
            if (key.kind != Kind::string) render_fail("only string keys are supported in dict literals");
            d.dict->set(key.string, std::move(value));
        }
        return d;
    }
    case ExprKind::getattr: return get_attr(eval(*e.children[0], frame), e.name);
    case ExprKind::getitem: {
        Value obj = eval(*e.children[0], frame);
        return get_item(obj, eval(*e.children[1], frame));
    }
    case ExprKind::slice: {
        auto part = [&](size_t i) { return e.children[i] ? eval(*e.children[i], frame) : Value::none(); };
        if (!e.children[0]) {
            // A slice inside a tuple subscript (`x[1, :]`): no value here indexes by a tuple, so the
            // lookup gives Undefined as in jinja2; the slice object itself stands in as None.
            part(1), part(2), part(3);
            return Value::none();
        }
        Value subject = eval(*e.children[0], frame);
        Value start = part(1), stop = part(2), stp = part(3);
        return eval_slice(subject, start, stop, stp);
    }
    case ExprKind::call: {
        Value callee = eval(*e.children[0], frame);
        CallArgs args = eval_args(e, frame, 1);
        line_ = e.line;
        return call(callee, args);
    }
    case ExprKind::filter: {
        Value subject;
        if (e.children[0]) subject = eval(*e.children[0], frame);
        else if (block_input_) subject = *block_input_;
        CallArgs args = eval_args(e, frame, 1);
        line_ = e.line;
        return apply_filter(e.name, subject, args);
    }
    case ExprKind::test: {
        // `x is defined` must not fail on an undefined x, so the subject is evaluated as usual
        // (undefined names give Undefined values, not errors).
        Value subject = eval(*e.children[0], frame);
        CallArgs args = eval_args(e, frame, 1);
        line_ = e.line;
        return Value::from_bool(apply_test(e.name, subject, args));
    }
    case ExprKind::unary: {
        Value v = eval(*e.children[0], frame);
        if (v.kind == Kind::undefined) undefined_error(v);
        if (!v.is_number()) render_fail("bad operand type for unary " + e.name + ": '" + type_name(v) + "'");
        if (e.name == "+") return is_intlike(v) ? Value::from_int(as_int(v)) : v;
        if (is_intlike(v)) {
            if (as_int(v) == INT64_MIN) render_fail("integer overflow");
            return Value::from_int(-as_int(v));
        }
        return Value::from_float(-v.floating);
    }
    case ExprKind::binary: {
        Value a = eval(*e.children[0], frame);
        Value b = eval(*e.children[1], frame);
        line_ = e.line;
        return eval_binary(e.name, a, b);
    }
    case ExprKind::logical_and: {
        Value a = eval(*e.children[0], frame);
        return a.truthy() ? eval(*e.children[1], frame) : a;
    }
    case ExprKind::logical_or: {
        Value a = eval(*e.children[0], frame);
        return a.truthy() ? a : eval(*e.children[1], frame);
    }
    case ExprKind::logical_not: return Value::from_bool(!eval(*e.children[0], frame).truthy());
    case ExprKind::compare: {
        Value left = eval(*e.children[0], frame);
        for (size_t i = 0; i < e.ops.size(); ++i) {
            Value right = eval(*e.children[i + 1], frame);
            line_ = e.line;
            if (!compare(e.ops[i], left, right)) return Value::from_bool(false);
            left = std::move(right);
        }
        return Value::from_bool(true);
    }
    case ExprKind::condexpr: {
        if (eval(*e.children[1], frame).truthy()) return eval(*e.children[0], frame);
        if (e.children[2]) return eval(*e.children[2], frame);
        return Value::undefined("the inline if-expression evaluated to false and no else section was defined");
    }
    }
    return Value::undefined();
}

namespace {

// Python's printf-style `str % args` for the conversions templates use (%s %r %d %i %f %%).
std::string py_percent_format(const std::string& f, const Value& args) {
    std::vector<Value> list;
    if (args.kind == Kind::list && args.list->is_tuple) list = args.list->items;
    else list.push_back(args);
    size_t next_arg = 0;
    std::string out;
    for (size_t i = 0; i < f.size(); ++i) {
        if (f[i] != '%') {
            out += f[i];
            continue;
        }
        if (++i >= f.size()) render_fail("incomplete format");
        std::string spec;
        while (i < f.size() && (std::isdigit(static_cast<unsigned char>(f[i])) || f[i] == '.' || f[i] == '-' ||
                                f[i] == '+' || f[i] == ' ' || f[i] == '0'))
            spec += f[i++];
        if (i >= f.size()) render_fail("incomplete format");
        char conv = f[i];
        if (conv == '%') {
            out += '%';
            continue;
        }
        if (next_arg >= list.size()) render_fail("not enough arguments for format string");
        const Value& v = list[next_arg++];
        switch (conv) {
        case 's': out += to_str(v); break;
        case 'r': out += to_repr(v); break;
        case 'd':
        case 'i':
            if (!v.is_number()) render_fail("%d format: a real number is required, not " + type_name(v));
            out += std::to_string(v.kind == Kind::floating ? static_cast<int64_t>(v.floating) : as_int(v));
            break;
        case 'f': {
            if (!v.is_number()) render_fail("must be real number, not " + type_name(v));
            int precision = 6;
            auto dot = spec.find('.');
            if (dot != std::string::npos) precision = std::atoi(spec.c_str() + dot + 1);
            out += fmt::format("{:.{}f}", as_double(v), std::clamp(precision, 0, 100));
            break;
        }
        default: render_fail(std::string("unsupported format character '") + conv + "'");
        }
    }
    if (next_arg < list.size() && args.kind == Kind::list && args.list->is_tuple)
        render_fail("not all arguments converted during string formatting");
    return out;
}

}  // namespace

}  // namespace nibble::jinja
