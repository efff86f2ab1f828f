// Parser of the chat-template interpreter: tokens -> statement tree, with jinja2's grammar and
// operator precedence (condexpr < or < and < not < compare < + - < ~ < * / // % < ** < unary <
// postfix . [] < filters | tests is < calls). Nesting depth is capped so hostile input cannot
// overflow the stack.
#include "tokenizer/chat_template_ast.h"

#include "base/error.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>

namespace nibble::jinja {
namespace {

constexpr int max_nesting = 200;

class Parser {
public:
    Parser(std::vector<Token> tokens, std::string origin) : tokens_(std::move(tokens)), origin_(std::move(origin)) {}

    Body parse_template() {
        std::string end;
        Body body = parse_body({}, end);
        return body;
    }

private:
    struct DepthGuard {
        Parser& p;
        explicit DepthGuard(Parser& parser) : p(parser) {
            if (++p.depth_ > max_nesting) p.error("template nesting too deep");
        }
        ~DepthGuard() { --p.depth_; }
    };

    [[noreturn]] void error(const std::string& message) {
        fail("chat template {}:{}: syntax error: {}", origin_, cur().line, message);
    }

    const Token& cur() const { return tokens_[i_]; }
    const Token& peek(size_t n = 1) const { return tokens_[std::min(i_ + n, tokens_.size() - 1)]; }
    void next() {
        if (i_ + 1 < tokens_.size()) ++i_;
    }
    bool is_op(const char* op) const { return cur().type == TokenType::op && cur().text == op; }
    bool is_name(const char* name) const { return cur().type == TokenType::name && cur().text == name; }
    bool skip_op(const char* op) {
        if (!is_op(op)) return false;
        next();
        return true;
    }
    bool skip_name(const char* name) {
        if (!is_name(name)) return false;
        next();
        return true;
    }
    static std::string describe(const Token& t) {
        switch (t.type) {
        case TokenType::data: return "template data";
        case TokenType::variable_begin: return "'{{'";
        case TokenType::variable_end: return "end of print statement";
        case TokenType::block_begin: return "'{%'";
        case TokenType::block_end: return "end of statement block";
        case TokenType::eof: return "end of template";
        case TokenType::string: return "string";
        default: return "'" + t.text + "'";
        }
    }
    void expect_op(const char* op) {
        if (!skip_op(op)) error(std::string("expected '") + op + "', got " + describe(cur()));
    }
    std::string expect_name() {
        if (cur().type != TokenType::name) error("expected a name, got " + describe(cur()));
        std::string n = cur().text;
        next();
        return n;
    }
    void expect_block_end() {
        if (cur().type != TokenType::block_end) error("expected end of statement block, got " + describe(cur()));
        next();
    }

    ExprPtr make(ExprKind kind, int line) {
        auto e = std::make_unique<Expr>();
        e->kind = kind;
        e->line = line;
        return e;
    }

    // Statements until one of `ends` opens a block tag; `found` receives that tag's name (the parser
    // then stands just after it).
    Body parse_body(const std::vector<std::string>& ends, std::string& found) {
        DepthGuard guard(*this);
        Body body;
        while (true) {
            const Token& t = cur();
            if (t.type == TokenType::eof) {
                if (!ends.empty()) {
                    std::string list;
                    for (const auto& e : ends) list += (list.empty() ? "'" : ", '") + e + "'";
                    error("unexpected end of template, expected one of " + list);
                }
                return body;
            }
            if (t.type == TokenType::data) {
                auto s = std::make_unique<Stmt>();
                s->kind = StmtKind::text;
                s->line = t.line;
                s->text = t.text;
                body.push_back(std::move(s));
                next();
            } else if (t.type == TokenType::variable_begin) {
                auto s = std::make_unique<Stmt>();
                s->kind = StmtKind::print;
                s->line = t.line;
                next();
                s->expr = parse_tuple(true, {}, false);
                if (cur().type != TokenType::variable_end) error("expected end of print statement, got " + describe(cur()));
                next();
                body.push_back(std::move(s));
            } else if (t.type == TokenType::block_begin) {
                next();
                if (cur().type != TokenType::name) error("expected a statement name, got " + describe(cur()));
                if (std::find(ends.begin(), ends.end(), cur().text) != ends.end()) {
                    found = cur().text;
                    next();
                    return body;
                }
                body.push_back(parse_statement());
            } else {
                error("unexpected " + describe(t));
            }
        }
    }

    StmtPtr parse_statement() {
        auto s = std::make_unique<Stmt>();
        s->line = cur().line;
        std::string tag = expect_name();
        std::string found;
        if (tag == "if") {
            s->kind = StmtKind::if_;
            while (true) {
                ExprPtr cond = parse_tuple(false, {}, false);
                expect_block_end();
                Body body = parse_body({"elif", "else", "endif"}, found);
                s->branches.emplace_back(std::move(cond), std::move(body));
                if (found == "elif") continue;
                if (found == "else") {
                    expect_block_end();
                    s->body = parse_body({"endif"}, found);
                }
                break;
            }
            expect_block_end();
        } else if (tag == "for") {
            s->kind = StmtKind::for_;
            s->target = parse_target(false);
            if (!skip_name("in")) error("expected 'in', got " + describe(cur()));
            s->expr = parse_tuple(false, {"recursive"}, false);
            if (skip_name("if")) s->condition = parse_expression(true);
            if (is_name("recursive")) error("recursive for loops are not supported");
            expect_block_end();
            s->body = parse_body({"endfor", "else"}, found);
            if (found == "else") {
                expect_block_end();
                s->else_body = parse_body({"endfor"}, found);
            }
            expect_block_end();
        } else if (tag == "set") {
            s->target = parse_target(true);
            if (skip_op("=")) {
                s->kind = StmtKind::set;
                s->expr = parse_tuple(true, {}, false);
                expect_block_end();
            } else {
                s->kind = StmtKind::set_block;
                if (!s->target.attribute.empty() || s->target.is_tuple) error("block set needs a single name");
                if (is_op("|")) s->expr = parse_filter(nullptr);
                expect_block_end();
                s->body = parse_body({"endset"}, found);
                expect_block_end();
            }
        } else if (tag == "macro") {
            s->kind = StmtKind::macro;
            s->name = expect_name();
            s->params = parse_params();
            expect_block_end();
            s->body = parse_body({"endmacro"}, found);
            if (cur().type == TokenType::name && cur().text == s->name) next();
            expect_block_end();
        } else if (tag == "call") {
            s->kind = StmtKind::call_block;
            if (is_op("(")) s->params = parse_params();
            s->expr = parse_expression(true);
            if (s->expr->kind != ExprKind::call) error("expected a call in the call block");
            expect_block_end();
            s->body = parse_body({"endcall"}, found);
            expect_block_end();
        } else if (tag == "filter") {
            s->kind = StmtKind::filter_block;
            s->expr = parse_filter(nullptr, true);
            expect_block_end();
            s->body = parse_body({"endfilter"}, found);
            expect_block_end();
        } else if (tag == "break" || tag == "continue") {
            s->kind = tag == "break" ? StmtKind::break_ : StmtKind::continue_;
            expect_block_end();
        } else if (tag == "generation") {
            // transformers' AssistantTracker extension: renders its body unchanged.
            s->kind = StmtKind::scope;
            expect_block_end();
            s->body = parse_body({"endgeneration"}, found);
            expect_block_end();
        } else {
            --i_;
            error("encountered unknown tag '" + tag + "'");
        }
        return s;
    }

    std::vector<MacroParam> parse_params() {
        std::vector<MacroParam> params;
        expect_op("(");
        while (!is_op(")")) {
            if (!params.empty()) expect_op(",");
            if (is_op(")")) break;
            MacroParam p;
            p.name = expect_name();
            if (skip_op("=")) p.default_value = parse_expression(true);
            else if (!params.empty() && params.back().default_value) error("non-default argument follows default argument");
            params.push_back(std::move(p));
        }
        expect_op(")");
        return params;
    }

    Target parse_target(bool with_namespace) {
        Target t;
        if (with_namespace && cur().type == TokenType::name && peek().type == TokenType::op && peek().text == ".") {
            t.names.push_back(expect_name());
            next();
            t.attribute = expect_name();
            return t;
        }
        bool paren = skip_op("(");
        while (true) {
            t.names.push_back(expect_name());
            if (!skip_op(",")) break;
            t.is_tuple = true;
            if (cur().type != TokenType::name) break;
        }
        if (paren) {
            expect_op(")");
            t.is_tuple = true;
        }
        return t;
    }

    bool is_tuple_end(const std::vector<std::string>& extra) const {
        const Token& t = cur();
        if (t.type == TokenType::variable_end || t.type == TokenType::block_end || t.type == TokenType::eof) return true;
        if (t.type == TokenType::op && t.text == ")") return true;
        return t.type == TokenType::name && std::find(extra.begin(), extra.end(), t.text) != extra.end();
    }

    ExprPtr parse_tuple(bool with_condexpr, const std::vector<std::string>& extra_end, bool explicit_parens) {
        int line = cur().line;
        std::vector<ExprPtr> items;
        bool is_tuple = false;
        while (true) {
            if (!items.empty()) expect_op(",");
            if (is_tuple_end(extra_end)) break;
            items.push_back(parse_expression(with_condexpr));
            if (is_op(",")) is_tuple = true;
            else break;
        }
        if (!is_tuple) {
            if (!items.empty()) return std::move(items[0]);
            if (!explicit_parens) error("expected an expression, got " + describe(cur()));
        }
        auto e = make(ExprKind::tuple, line);
        e->children = std::move(items);
        return e;
    }

    ExprPtr parse_expression(bool with_condexpr) {
        DepthGuard guard(*this);
        if (!with_condexpr) return parse_or();
        ExprPtr expr = parse_or();
        while (is_name("if")) {
            int line = cur().line;
            next();
            ExprPtr cond = parse_or();
            ExprPtr otherwise;
            if (skip_name("else")) otherwise = parse_expression(true);
            auto e = make(ExprKind::condexpr, line);
            e->children.push_back(std::move(expr));
            e->children.push_back(std::move(cond));
            e->children.push_back(std::move(otherwise));
            expr = std::move(e);
        }
        return expr;
    }

    ExprPtr binary(ExprKind kind, std::string op, ExprPtr left, ExprPtr right, int line) {
        auto e = make(kind, line);
        e->name = std::move(op);
        e->children.push_back(std::move(left));
        e->children.push_back(std::move(right));
        return e;
    }

    ExprPtr parse_or() {
        ExprPtr left = parse_and();
        while (is_name("or")) {
            int line = cur().line;
            next();
            left = binary(ExprKind::logical_or, "or", std::move(left), parse_and(), line);
        }
        return left;
    }

    ExprPtr parse_and() {
        ExprPtr left = parse_not();
        while (is_name("and")) {
            int line = cur().line;
            next();
            left = binary(ExprKind::logical_and, "and", std::move(left), parse_not(), line);
        }
        return left;
    }

    ExprPtr parse_not() {
        if (is_name("not")) {
            DepthGuard guard(*this);
            auto e = make(ExprKind::logical_not, cur().line);
            next();
            e->children.push_back(parse_not());
            return e;
        }
        return parse_compare();
    }

    ExprPtr parse_compare() {
        int line = cur().line;
        ExprPtr first = parse_math1();
        ExprPtr result;
        std::vector<std::string> ops;
        std::vector<ExprPtr> operands;
        while (true) {
            const Token& t = cur();
            std::string op;
            if (t.type == TokenType::op &&
                (t.text == "==" || t.text == "!=" || t.text == "<" || t.text == "<=" || t.text == ">" || t.text == ">=")) {
                op = t.text;
                next();
            } else if (is_name("in")) {
                op = "in";
                next();
            } else if (is_name("not") && peek().type == TokenType::name && peek().text == "in") {
                op = "notin";
                next();
                next();
            } else {
                break;
            }
            ops.push_back(op);
            operands.push_back(parse_math1());
        }
        if (ops.empty()) return first;
        auto e = make(ExprKind::compare, line);
        e->children.push_back(std::move(first));
        for (auto& o : operands) e->children.push_back(std::move(o));
        e->ops = std::move(ops);
        return e;
    }

    ExprPtr parse_math1() {
        ExprPtr left = parse_concat();
        while (is_op("+") || is_op("-")) {
            std::string op = cur().text;
            int line = cur().line;
            next();
            left = binary(ExprKind::binary, op, std::move(left), parse_concat(), line);
        }
        return left;
    }

    ExprPtr parse_concat() {
        ExprPtr left = parse_math2();
        while (is_op("~")) {
            int line = cur().line;
            next();
            left = binary(ExprKind::binary, "~", std::move(left), parse_math2(), line);
        }
        return left;
    }

    ExprPtr parse_math2() {
        ExprPtr left = parse_pow();
        while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
            std::string op = cur().text;
            int line = cur().line;
            next();
            left = binary(ExprKind::binary, op, std::move(left), parse_pow(), line);
        }
        return left;
    }

    ExprPtr parse_pow() {
        ExprPtr left = parse_unary(true);
        while (is_op("**")) {
            int line = cur().line;
            next();
            left = binary(ExprKind::binary, "**", std::move(left), parse_unary(true), line);
        }
        return left;
    }

    ExprPtr parse_unary(bool with_filter) {
        DepthGuard guard(*this);
        ExprPtr node;
        if (is_op("-") || is_op("+")) {
            auto e = make(ExprKind::unary, cur().line);
            e->name = cur().text;
            next();
            e->children.push_back(parse_unary(false));
            node = std::move(e);
        } else {
            node = parse_primary();
        }
        node = parse_postfix(std::move(node));
        if (with_filter) node = parse_filter_expr(std::move(node));
        return node;
    }

    ExprPtr parse_primary() {
        DepthGuard guard(*this);
        const Token& t = cur();
        int line = t.line;
        if (t.type == TokenType::name) {
            std::string n = t.text;
            next();
            auto e = make(ExprKind::constant, line);
            if (n == "true" || n == "True") e->value = Value::from_bool(true);
            else if (n == "false" || n == "False") e->value = Value::from_bool(false);
            else if (n == "none" || n == "None") e->value = Value::none();
            else {
                e->kind = ExprKind::name;
                e->name = n;
            }
            return e;
        }
        if (t.type == TokenType::string) {
            std::string s;
            while (cur().type == TokenType::string) {
                s += cur().text;
                next();
            }
            auto e = make(ExprKind::constant, line);
            e->value = Value::from_string(std::move(s));
            return e;
        }
        if (t.type == TokenType::integer) {
            auto e = make(ExprKind::constant, line);
            int64_t v = 0;
            auto res = std::from_chars(t.text.data(), t.text.data() + t.text.size(), v);
            if (res.ec != std::errc()) error("integer literal out of range: " + t.text);
            e->value = Value::from_int(v);
            next();
            return e;
        }
        if (t.type == TokenType::floating) {
            auto e = make(ExprKind::constant, line);
            e->value = Value::from_float(std::strtod(t.text.c_str(), nullptr));
            next();
            return e;
        }
        if (is_op("(")) {
            next();
            ExprPtr e = parse_tuple(true, {}, true);
            expect_op(")");
            return e;
        }
        if (is_op("[")) {
            next();
            auto e = make(ExprKind::list, line);
            while (!is_op("]")) {
                if (!e->children.empty()) expect_op(",");
                if (is_op("]")) break;
                e->children.push_back(parse_expression(true));
            }
            expect_op("]");
            return e;
        }
        if (is_op("{")) {
            next();
            auto e = make(ExprKind::dict, line);
            while (!is_op("}")) {
                if (!e->children.empty()) expect_op(",");
                if (is_op("}")) break;
                e->children.push_back(parse_expression(true));
                expect_op(":");
                e->children.push_back(parse_expression(true));
            }
            expect_op("}");
            return e;
        }
        error("unexpected " + describe(t));
    }

    ExprPtr parse_postfix(ExprPtr node) {
        while (true) {
            int line = cur().line;
            if (is_op(".")) {
                next();
                if (cur().type == TokenType::name) {
                    auto e = make(ExprKind::getattr, line);
                    e->name = cur().text;
                    e->children.push_back(std::move(node));
                    next();
                    node = std::move(e);
                } else if (cur().type == TokenType::integer) {
                    auto e = make(ExprKind::getitem, line);
                    auto idx = make(ExprKind::constant, line);
                    idx->value = Value::from_int(std::strtoll(cur().text.c_str(), nullptr, 10));
                    e->children.push_back(std::move(node));
                    e->children.push_back(std::move(idx));
                    next();
                    node = std::move(e);
                } else {
                    error("expected a name or number after '.'");
                }
            } else if (is_op("[")) {
                next();
                std::vector<ExprPtr> args;
                while (!is_op("]")) {
                    if (!args.empty()) expect_op(",");
                    if (is_op("]")) break;
                    args.push_back(parse_subscribed());
                }
                expect_op("]");
                if (args.empty()) error("expected a subscript");
                ExprPtr index;
                if (args.size() == 1) {
                    index = std::move(args[0]);
                } else {
                    index = make(ExprKind::tuple, line);
                    index->children = std::move(args);
                }
                if (index->kind == ExprKind::slice) {
                    index->children[0] = std::move(node);
                    node = std::move(index);
                } else {
                    auto e = make(ExprKind::getitem, line);
                    e->children.push_back(std::move(node));
                    e->children.push_back(std::move(index));
                    node = std::move(e);
                }
            } else if (is_op("(")) {
                // Calls are valid after attributes and items as well as after filters and tests.
                node = parse_call(std::move(node));
            } else {
                return node;
            }
        }
    }

    // One subscript: an expression or a slice start:stop:step (subject filled in by the caller).
    ExprPtr parse_subscribed() {
        int line = cur().line;
        ExprPtr start;
        if (is_op(":")) {
            next();
        } else {
            start = parse_expression(true);
            if (!is_op(":")) return start;
            next();
        }
        auto e = make(ExprKind::slice, line);
        e->children.push_back(nullptr);
        e->children.push_back(std::move(start));
        if (!is_op(":") && !is_op("]") && !is_op(",")) e->children.push_back(parse_expression(true));
        else e->children.push_back(nullptr);
        if (skip_op(":")) {
            if (!is_op("]") && !is_op(",")) e->children.push_back(parse_expression(true));
            else e->children.push_back(nullptr);
        } else {
            e->children.push_back(nullptr);
        }
        return e;
    }

    ExprPtr parse_filter_expr(ExprPtr node) {
        while (true) {
            if (is_op("|")) node = parse_filter(std::move(node));
            else if (is_name("is")) node = parse_test(std::move(node));
            else if (is_op("(")) node = parse_call(std::move(node));
            else return node;
        }
    }

    void parse_call_args(Expr& e) {
        expect_op("(");
        bool first = true;
        while (!is_op(")")) {
            if (!first) expect_op(",");
            first = false;
            if (is_op(")")) break;
            if (is_op("*") || is_op("**")) error("*args and **kwargs in calls are not supported");
            if (cur().type == TokenType::name && peek().type == TokenType::op && peek().text == "=") {
                std::string key = cur().text;
                next();
                next();
                e.kwargs.emplace_back(key, parse_expression(true));
            } else {
                if (!e.kwargs.empty()) error("positional argument follows keyword argument");
                e.children.push_back(parse_expression(true));
            }
        }
        expect_op(")");
    }

    ExprPtr parse_call(ExprPtr node) {
        auto e = make(ExprKind::call, cur().line);
        e->children.push_back(std::move(node));
        parse_call_args(*e);
        return e;
    }

    // `| name(args) | name ...`; with `start_inline` the first filter has no leading pipe.
    ExprPtr parse_filter(ExprPtr node, bool start_inline = false) {
        while (is_op("|") || start_inline) {
            if (!start_inline) next();
            start_inline = false;
            auto e = make(ExprKind::filter, cur().line);
            e->name = expect_name();
            while (is_op(".")) {
                next();
                e->name += '.';
                e->name += expect_name();
            }
            e->children.push_back(std::move(node));
            if (is_op("(")) parse_call_args(*e);
            node = std::move(e);
        }
        return node;
    }

    ExprPtr parse_test(ExprPtr node) {
        int line = cur().line;
        next();  // 'is'
        bool negated = skip_name("not");
        auto e = make(ExprKind::test, line);
        e->name = expect_name();
        while (is_op(".")) {
            next();
            e->name += '.';
                e->name += expect_name();
        }
        e->children.push_back(std::move(node));
        const Token& t = cur();
        if (is_op("(")) {
            parse_call_args(*e);
        } else if ((t.type == TokenType::name || t.type == TokenType::string || t.type == TokenType::integer ||
                    t.type == TokenType::floating || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and")) {
            if (is_name("is")) error("you cannot chain multiple tests with is");
            ExprPtr arg = parse_postfix(parse_primary());
            e->children.push_back(std::move(arg));
        }
        if (!negated) return e;
        auto n = make(ExprKind::logical_not, line);
        n->children.push_back(std::move(e));
        return n;
    }

    std::vector<Token> tokens_;
    std::string origin_;
    size_t i_ = 0;
    int depth_ = 0;
};

}  // namespace

std::shared_ptr<const Program> parse_program(const std::string& source, const std::string& origin) {
    auto program = std::make_shared<Program>();
    program->origin = origin;
    program->body = Parser(tokenize(source, origin), origin).parse_template();
    return program;
}

}  // namespace nibble::jinja
