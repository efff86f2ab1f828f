// Syntax of the chat-template interpreter: lexer tokens and the tree the parser builds.
// The lexer applies jinja2's whitespace rules (`-` markers, trim_blocks, lstrip_blocks, one trailing
// newline dropped, \r\n and \r read as \n) so the tree holds the exact text that gets printed.
#pragma once

#include "tokenizer/chat_template_value.h"

#include <memory>
#include <string>
#include <vector>

namespace nibble::jinja {

enum class TokenType : uint8_t {
    data, variable_begin, variable_end, block_begin, block_end, name, string, integer, floating, op, eof
};

struct Token {
    TokenType type;
    std::string text;  // data text, name, decoded string literal, number text, or operator
    int line;
};

// Splits a template into tokens; throws nibble::Error naming origin and line on bad syntax.
std::vector<Token> tokenize(const std::string& source, const std::string& origin);

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

enum class ExprKind : uint8_t {
    constant, name, list, tuple, dict, getattr, getitem, slice, call, filter, test,
    unary, binary, logical_and, logical_or, logical_not, compare, condexpr
};

struct Expr {
    ExprKind kind;
    int line = 0;
    Value value;                    // constant
    std::string name;               // name, attribute, filter or test name, operator
    std::vector<ExprPtr> children;  // operands; for calls/filters/tests: [subject, positional args...];
                                    // dict: key, value, key, value...; slice: [subject, start, stop, step]
                                    // (null where omitted); condexpr: [then, condition, else or null]
    std::vector<std::pair<std::string, ExprPtr>> kwargs;
    std::vector<std::string> ops;   // compare: one operator per operand after the first
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

enum class StmtKind : uint8_t {
    text, print, if_, for_, set, set_block, macro, call_block, filter_block, break_, continue_, scope
};

// An assignment target: a name, `ns.attr`, or a tuple of names.
struct Target {
    std::vector<std::string> names;
    std::string attribute;  // set when the target is names[0].attribute
    bool is_tuple = false;
};

struct MacroParam {
    std::string name;
    ExprPtr default_value;
};

struct Stmt {
    StmtKind kind;
    int line = 0;
    std::string text;                                   // text
    ExprPtr expr;                                       // print, set, for iterable, call_block call, filter_block
    Target target;                                      // set, set_block, for
    std::vector<std::pair<ExprPtr, Body>> branches;     // if/elif (condition, body)
    Body body;                                          // if's else, for, set_block, macro, call_block
    Body else_body;                                     // for-else
    ExprPtr condition;                                  // for ... if condition
    std::string name;                                   // macro name
    std::vector<MacroParam> params;                     // macro / call-block caller parameters
};

struct Program {
    Body body;
    std::string origin;
};

// Parses a template; throws nibble::Error naming origin and line on bad syntax.
std::shared_ptr<const Program> parse_program(const std::string& source, const std::string& origin);

}  // namespace nibble::jinja
