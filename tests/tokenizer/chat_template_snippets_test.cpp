// Interpreter features, one small template each, rendered by nibble and by Python's jinja2 with
// transformers' environment (the reference): outputs must match character for character, and where
// jinja2 raises, nibble must raise too.
#include "tokenizer/chat_template.h"

#include "base/error.h"
#include "chat_template_reference.h"

#include <gtest/gtest.h>

namespace nibble {
namespace {

struct Snippet {
    const char* tmpl;
    const char* context;  // JSON object
};

const Snippet snippets[] = {
    // Output, literals, printing of Python values.
    {"plain text", "{}"},
    {"{{ 'a' }}{{ \"b\" }}{{ 'it''s' }}{{ 'x' 'y' }}", "{}"},
    {R"J({{ 'tab\there\nnl \\ \' \" \x41 \u00e9 \U0001F600 \q' }})J", "{}"},
    {"{{ 1 }} {{ -3 }} {{ 1.5 }} {{ 2.0 }} {{ 1e3 }} {{ 1_000 }} {{ .5 if false else 0.1 }}", "{}"},
    {"{{ true }} {{ True }} {{ false }} {{ none }} {{ None }} {{ [] }} {{ {} }}", "{}"},
    {"{{ [1, 'a', none, true, 2.5, [3], {'k': 'v'}] }}", "{}"},
    {"{{ (1,) }} {{ (1, 2) }} {{ () }} {{ 1, 2 }}", "{}"},
    {"{{ {'a': 1, 'b': \"it's\", 'c': 'say \"hi\"', 'd': 'both \\' \"'} }}", "{}"},
    {"{{ x }}|{{ d }}|{{ l }}|{{ f }}|{{ n }}", R"({"x": "str", "d": {"z": 1, "a": [true, null]}, "l": [1.0, 1e20, 1e-7, 0.0001, 123456789012345678], "f": 3.14, "n": null})"},
    {"{{ 0.1 + 0.2 }} {{ 1e16 }} {{ 1e15 }} {{ 1/3 }} {{ -0.0 }} {{ 2**0.5 }} {{ 100000000000000000000.0 }}", "{}"},
    // Arithmetic and operators.
    {"{{ 7 / 2 }} {{ 8 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 2 ** 10 }}", "{}"},
    {"{{ 1 + 2 * 3 - 4 }} {{ (1 + 2) * 3 }} {{ 2 * 3 ** 2 }} {{ -2 ** 2 }} {{ 1 + true }} {{ 1.5 + 1 }}", "{}"},
    {"{{ 'a' + 'b' }} {{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] * 2 }} {{ [1] + [2] }} {{ x ~ 'y' }}", "{}"},
    {"{{ 'a' + 1 }}", "{}"},
    {"{{ 1 < 2 }} {{ 2 <= 1 }} {{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ 1 != 2 }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ [1,2] < [1,3] }}", "{}"},
    {"{{ 'a' < 1 }}", "{}"},
    {"{{ 'b' in 'abc' }} {{ 1 in [1, 2] }} {{ 'k' in d }} {{ 'z' not in d }} {{ 3 not in [1] }} {{ 'x' in u }}", R"({"d": {"k": 1}})"},
    {"{{ 1 in 'abc' }}", "{}"},
    {"{{ true and 'x' }}|{{ false and 'x' }}|{{ '' or 'dflt' }}|{{ 0 or none }}|{{ not 0 }}|{{ not 'a' }}|{{ u or 5 }}", "{}"},
    {"{{ 'yes' if x else 'no' }} {{ 'yes' if y else 'no' }} [{{ 'only' if false }}] {{ 1 if 0 else 2 if 0 else 3 }}", R"({"x": [1]})"},
    // Variables, attributes, items, undefined.
    {"{{ m.role }} {{ m['content'] }} {{ m.missing }} [{{ m.missing is defined }}] {{ l[0] }} {{ l[-1] }} {{ l.1 }} [{{ l[5] }}]", R"({"m": {"role": "user", "content": "hi"}, "l": [1, 2, 3]})"},
    {"{{ m.missing.deeper }}", R"({"m": {}})"},
    {"{{ undefined_name.attr }}", "{}"},
    {"[{{ nothing }}] {{ nothing is defined }} {{ nothing is undefined }} {{ nothing | default('d') }} {{ nothing | length }} {{ none.attr is defined }}", "{}"},
    {"{{ m.items is defined }} {{ m['items'] }} {{ m.get('a') }} {{ m.get('z', 'dflt') }} {{ m.get('z') }}", R"({"m": {"a": 1, "items": "field"}})"},
    {"{{ s.content }}|{{ s[0] }}|{{ s[-1] }}|{{ s[1:3] }}|{{ s[::-1] }}|{{ s[::2] }}|{{ s[10:] }}|{{ s[-2:] }}", R"({"s": "héllo wörld"})"},
    {"{{ l[1:] }} {{ l[:-1] }} {{ l[::-1] }} {{ l[-2::-1] }} {{ l[5:1:-2] }} {{ l[1:2:0] if false else l[:0] }}", R"({"l": [1, 2, 3, 4, 5, 6]})"},
    // Whitespace control, trim_blocks, lstrip_blocks.
    {"a\n  {% if true %}\n    b\n  {% endif %}\nc\n", "{}"},
    {"a  {%- if true -%}  b  {%- endif -%}  c", "{}"},
    {"a\n    {%+ if true %}x{% endif %}\n  {{- 'y' -}}  \n  {# c #}\nz\n\n", "{}"},
    {"{% for i in [1,2] %}\n  {{ i }}\n{% endfor %}\nend", "{}"},
    {"  {# comment -#}   x {#- c2 #}\ny\r\nz\r\n", "{}"},
    {"{{ 'a' }}\n{{ 'b' }}\n{% if true %}{{ 'c' }}{% endif %}\n\n", "{}"},
    {"line1\n\t {% set x = 1 %}\t\nline2 {% if x %}yes{% endif +%}\nline3", "{}"},
    {"a\u00a0\u3000 {%- if true -%}\u2003 b \u00a0\n{{- 'c' }}\n\u3000{% if true %}d{% endif %}\u00a0{#- x #}", "{}"},
    {"{% raw %}{{ not evaluated }} {% if %}{% endraw %}\n  {% raw -%}  x  {%- endraw %}", "{}"},
    // Control flow.
    {"{% if a %}A{% elif b %}B{% else %}C{% endif %}{% if not a and not b %}!{% endif %}", R"({"b": 1})"},
    {"{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}|{% endfor %}", R"({"l": ["a", "b", "c"]})"},
    {"{% for x in l %}{{ loop.previtem }}-{{ loop.nextitem }}-{{ loop.cycle('o', 'e') }};{% endfor %}", R"({"l": [1, 2, 3]})"},
    {"{% for x in l if x > 1 %}{{ x }}{{ loop.index }}{{ loop.last }} {% else %}empty{% endfor %}", R"({"l": [1, 2, 3]})"},
    {"{% for x in [] %}x{% else %}empty{% endfor %} {% for x in u %}x{% else %}undef{% endfor %}", "{}"},
    {"{% for k in d %}{{ k }}{% endfor %} {% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %} {% for k, v in d | items %}{{ k }}{{ v }}{% endfor %}", R"({"d": {"z": 1, "a": 2}})"},
    {"{% for c in 'héj' %}[{{ c }}]{% endfor %} {% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}", "{}"},
    {"{% for x in l %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", R"({"l": [1, 2, 3, 4, 5]})"},
    {"{% for x in l %}{% for y in l %}{{ loop.index }}{% endfor %}{{ loop.index }}|{% endfor %}", R"({"l": [1, 2]})"},
    {"{% for x in none %}{% endfor %}", "{}"},
    {"{% for a, b in [[1, 2, 3]] %}{% endfor %}", "{}"},
    // Scoping: set, namespace, loops.
    {"{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}{% for i in [1] %}{% set x = 3 %}{{ x }}{% endfor %}{{ x }}", "{}"},
    {"{% set y = 1 %}{% for x in [1, 2] %}[{{ y }}]{% set y = x * 10 %}[{{ y }}]{% endfor %}{{ y }}", "{}"},
    {"{% for x in [1, 2] %}{% if loop.first %}{% set z = 5 %}{% endif %}[{{ z }}]{% endfor %}", "{}"},
    {"{% set ns = namespace(n=0, found=false) %}{% for x in [1, 2, 3] %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }} {{ ns.found }} {{ ns.other }}", "{}"},
    {"{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t = 1, 2 %}{{ t }}", "{}"},
    {"{% set x %}block {{ 1 + 1 }}{% endset %}[{{ x }}]{% set y | upper %}  shout  {% endset %}[{{ y }}]", "{}"},
    {"{% set n = 1 %}{% set n.attr = 2 %}", "{}"},
    {"{% set messages = messages[1:] %}{{ messages | length }}", R"({"messages": [1, 2, 3]})"},
    // Macros.
    {"{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') }} {{ greet(name='c', punct='.') }} {{ greet() }}", "{}"},
    {"{% macro f(x) %}{% if x > 0 %}{{ x }}{{ f(x - 1) }}{% endif %}{% endmacro %}{{ f(3) }}", "{}"},
    {"{% set g = 'global' %}{% macro m() %}{{ g }}{% set g = 'local' %}{{ g }}{% endmacro %}{{ m() }}{{ g }}", "{}"},
    {"{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }}", "{}"},
    {"{% macro m(a, b=a) %}{{ a }}{{ b }}{% endmacro %}{{ m(1) }}{% set r = m(3, 4) %}{{ r | length }}", "{}"},
    {"{% macro wrap() %}<{{ caller() }}>{% endmacro %}{% call wrap() %}inside{% endcall %}", "{}"},
    {"{% filter upper %}shout {{ 'this' }}{% endfilter %}", "{}"},
    {"{% generation %}gen {{ 1 }}{% endgeneration %}", "{}"},
    // Filters.
    {"{{ '  pad  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ 'Hello' | upper }}|{{ 'Hello' | lower }}|{{ 'hello world-foo' | title }}|{{ 'hELLO' | capitalize }}", "{}"},
    {"{{ 'a-b-c' | replace('-', '+') }} {{ 'aaa' | replace('a', 'b', 2) }} {{ [1, 2] | length }} {{ 'héllo' | length }} {{ {'a': 1} | count }}", "{}"},
    {"{{ u | default('x') }} {{ '' | default('x') }} {{ '' | default('x', true) }} {{ none | d('n') }} {{ 0 | d(5, boolean=true) }}", "{}"},
    {"{{ [1, 2, 3] | join(', ') }} {{ ['a', 'b'] | join }} {{ users | join(',', attribute='name') }} {{ users | map(attribute='name') | join('/') }}", R"({"users": [{"name": "x"}, {"name": "y"}]})"},
    {"{{ users | map(attribute='age', default=0) | list }} {{ ['a', 'b'] | map('upper') | list }} {{ users | map(attribute='name') | first }}", R"({"users": [{"name": "x", "age": 3}, {"name": "y"}]})"},
    {"{{ users | selectattr('admin') | map(attribute='name') | list }} {{ users | rejectattr('admin') | list | length }} {{ users | selectattr('name', 'equalto', 'y') | list }} {{ users | selectattr('admin', 'defined') | list | length }}", R"({"users": [{"name": "x", "admin": true}, {"name": "y"}, {"name": "z", "admin": false}]})"},
    {"{{ [1, 2, 3, 4] | select('odd') | list }} {{ [1, 2, 3, 4] | reject('even') | list }} {{ [0, 1, '', 'a'] | select | list }} {{ [1, 5, 3] | select('gt', 2) | list }}", "{}"},
    {"{{ [3, 1, 2] | first }} {{ [3, 1, 2] | last }} {{ 'abc' | first }} {{ [] | first }} {{ d | first }} {{ [3, 1, 2] | sort }} {{ ['b', 'A', 'c'] | sort }} {{ [3, 1, 2] | sort(reverse=true) }}", R"({"d": {"k": 1, "j": 2}})"},
    {"{{ users | sort(attribute='age') | map(attribute='name') | join }} {{ [1, 2, 1, 3] | unique | list }} {{ ['a', 'A', 'b'] | unique | list }} {{ [1, 2] | reverse | list }} {{ 'abc' | reverse }}", R"({"users": [{"name": "x", "age": 3}, {"name": "y", "age": 1}]})"},
    {"{{ 42 | string }} {{ none | string }} {{ [1] | string }} {{ 'ab' | list }} {{ d | list }} {{ 1.9 | int }} {{ '12' | int }} {{ ' 7 ' | int }} {{ 'x' | int }} {{ 'x' | int(5) }} {{ '3.7' | int }} {{ '1.5' | float }} {{ 3 | float }} {{ 'no' | float }}", R"({"d": {"a": 1}})"},
    {"{{ -3 | abs }} {{ -2.5 | abs }} {{ 2.5 | round }} {{ 3.5 | round }} {{ 2.675 | round(2) }} {{ 2.1 | round(method='ceil') }} {{ [1, 2, 3] | sum }} {{ [1, 5, 2] | max }} {{ [1, 5, 2] | min }} {{ ['b', 'A'] | max }}", "{}"},
    {"{{ d | items | list }} {{ d | dictsort }} {{ u | items | list }} {{ '<a href=\"x\">&</a>' | e }} {{ 'x' | safe }} {{ '%s is %d' | format('a', 3) }} {{ '%s-%s' % ('a', 'b') }}", R"({"d": {"b": 1, "a": 2}})"},
    {"{{ 'line1\nline2\n\nline4' | indent }}|{{ 'a\nb' | indent(2, first=true) }}|{{ 'a\n\nb' | indent('>', blank=true) }}", "{}"},
    {"{{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ 'one two  three' | wordcount }} {{ 'abc' | count }}", "{}"},
    {"{{ x | unknown_filter }}", "{}"},
    {"{{ {'b': 1, 'a': [1, 2, {'c': none}], 'u': 'é😀\\n\"'} | tojson }}", "{}"},
    {"{{ d | tojson(indent=4) }}|{{ d | tojson(indent=2, sort_keys=true) }}|{{ d | tojson(separators=(',', ':')) }}|{{ d | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=2) }}|{{ {} | tojson }}", R"({"d": {"z": [1, 2.5, true, null], "a": {"x": "ü"}, "e": [], "o": {}}})"},
    {"{{ 'x' | tojson }} {{ 1.0 | tojson }} {{ 1e100 | tojson }} {{ none | tojson }} {{ (1, 2) | tojson }} {{ '\x01\x7f' | tojson }}", "{}"},
    {"{{ u | tojson }}", "{}"},
    // Tests.
    {"{{ 1 is number }}{{ 1.5 is number }}{{ true is number }}{{ 'a' is number }}|{{ 1 is integer }}{{ true is integer }}{{ 1.0 is float }}|{{ true is boolean }}{{ 1 is boolean }}|{{ true is true }}{{ 1 is true }}{{ false is false }}", "{}"},
    {"{{ 'a' is string }}{{ 1 is string }}|{{ d is mapping }}{{ l is mapping }}|{{ l is sequence }}{{ 's' is sequence }}{{ d is sequence }}{{ 1 is sequence }}{{ u is sequence }}|{{ l is iterable }}{{ 's' is iterable }}{{ 1 is iterable }}{{ u is iterable }}", R"({"d": {}, "l": []})"},
    {"{{ none is none }}{{ 0 is none }}{{ u is none }}|{{ 2 is odd }}{{ 2 is even }}{{ 9 is divisibleby 3 }}{{ 3 is divisibleby(2) }}|{{ 'ab' is lower }}{{ 'AB' is upper }}|{{ 1 is eq 1 }}{{ 1 is equalto 2 }}{{ 1 is ne 2 }}{{ 2 is gt 1 }}{{ 2 is ge 3 }}{{ 1 is lt 2 }}{{ 1 is le 1 }}{{ 1 is in [1] }}{{ 'a' is in 'bc' }}", "{}"},
    {"{{ x is not none }} {{ x is not defined }} {{ not x is defined }} {{ x is defined and x }} {{ range is callable }} {{ 'a' is callable }}", R"({"x": 0})"},
    {"{{ x is frobnicated }}", R"({"x": 0})"},
    // String methods.
    {"{{ s.startswith('he') }} {{ s.endswith('ld') }} {{ s.startswith(('x', 'h')) }} {{ s.upper() }} {{ s.title() }} {{ s.capitalize() }} {{ s.split() }} {{ s.split('o') }} {{ s.split('o', 1) }} {{ s.rsplit('o', 1) }}", R"({"s": "hello world"})"},
    {"[{{ s.strip() }}] [{{ s.lstrip() }}] [{{ s.rstrip() }}] [{{ s.strip(' \n') }}] {{ s.split() }} {{ s.split(none, 1) }} {{ s.rsplit(none, 1) }}", R"({"s": "  \n a b  c \t "})"},
    {"{{ s.replace('l', 'L') }} {{ s.replace('l', 'L', 1) }} {{ s.find('o') }} {{ s.find('z') }} {{ s.count('l') }} {{ '-'.join(['a', 'b']) }} {{ '{} and {}'.format('x', 1) }} {{ '{0}{name}'.format('a', name='b') }}", R"({"s": "hello world"})"},
    {"{{ \"they're bill's friends\".title() }} {{ 'x1y'.isalpha() }} {{ '123'.isdigit() }} {{ '  '.isspace() }} {{ 'a\nb\r\nc'.splitlines() }} {{ s.lower() }} {{ s.index('l') }}", R"({"s": "MiXeD"})"},
    {"[{{ s.strip() }}] {{ s.split() | length }}", R"({"s": "\u00a0\u2003 unicode\u3000spaces \u00a0"})"},
    {"{{ s | upper }}|{{ s | lower }}|{{ s | title }}|{{ s | capitalize }}|{{ s.upper() }}|{{ s.title() }}|{{ s.capitalize() }}", R"({"s": "éCOLE straße ǆungla ΣΊΣΥΦΟΣ 日本abc o'neil"})"},
    {"{{ l.append(1) }}", R"({"l": []})"},
    {"{{ d.update({}) }}", R"({"d": {}})"},
    // More printing and lookups.
    {"{{ 'abc'[5] }}|{{ d.x.y }}|{{ 12345678901234 }}|{{ [1, 2] | join }}|{{ [1, 2] == (1, 2) }}|{{ '%.2f' | format(3.14159) }}|[{{ loop }}]|{{ 'a' ~ [1] }}|{{ 1e-7 | tojson }}", R"({"d": {"x": null}})"},
    {"{% for x in d.items() %}{{ x }}{% endfor %} {% for x in d %}{{ x }}{% endfor %} {{ d.values() | list }} {{ d.keys() | list }}", R"({"d": {"a": 1, "b": [2]}})"},
    {"  {{ 'var at line start keeps its indent' }}\n  {% if true %}x{% endif %}", "{}"},
    {"{% macro m(ns) %}{% set ns.v = ns.v + 1 %}{% endmacro %}{% set n = namespace(v=1) %}{{ m(n) }}{{ m(n) }}{{ n.v }}", "{}"},
    {"{{ 10 // 0 }}", "{}"},
    {"{{ x is string and x.startswith('a') }} {{ y is string and y.startswith('a') }} {{ none | string | length }}", R"({"x": "abc", "y": 5})"},
    {"{% set c = m.content %}{{ c if c is string else c | map(attribute='text') | join }}|{{ m2.content[0]['text'] }}", R"({"m": {"content": [{"type": "text", "text": "part1"}, {"type": "text", "text": "part2"}]}, "m2": {"content": [{"text": "t"}]}})"},
    {"{{ 'abc'[1::9223372036854775807] }} {{ range(9223372036854775800, 9223372036854775807, 5) | list }} {{ [[1]] | map(attribute='99999999999999999999') | list }}", "{}"},
    {"{{ '{99999999999999999999}'.format(1) }}", "{}"},
    // Globals.
    {"{{ range(3) | list }} {{ range(1, 7, 2) | list }} {{ range(3, 0, -1) | join }} {{ dict(a=1, b=2) }} {{ namespace(a=1).a }}", "{}"},
    {"{{ raise_exception('custom failure') }}", "{}"},
    {"{{ strftime_now('%Y') | length }}", "{}"},
    // Syntax errors.
    {"{% if x %}unclosed", "{}"},
    {"{% endif %}", "{}"},
    {"{{ 1 + }}", "{}"},
    {"{% frobnicate %}", "{}"},
    {"{{ 'unterminated }}", "{}"},
    {"{% do x %}", "{}"},
    {"{# never closed", "{}"},
    {"{{ (1, 2 }}", "{}"},
    {"{{ [1, 2][1,:] }}", "{}"},  // found by chat_template_fuzz
    {"{% for %}{% endfor %}", "{}"},
};

TEST(ChatTemplateSnippets, MatchJinja2) {
    nlohmann::ordered_json cases = nlohmann::ordered_json::array();
    for (const auto& s : snippets)
        cases.push_back({{"template", s.tmpl}, {"context", nlohmann::ordered_json::parse(s.context)}});
    nlohmann::ordered_json expected = test::jinja2_reference(cases);
    if (expected.is_null()) GTEST_SKIP() << "Python's jinja2 is not installed";
    ASSERT_EQ(expected.size(), cases.size());
    size_t errors_expected = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
        SCOPED_TRACE(testing::Message() << "snippet " << i << ": " << snippets[i].tmpl);
        std::string got;
        std::string error;
        try {
            got = ChatTemplate::parse(snippets[i].tmpl, "snippet").render(cases[i]["context"]);
        } catch (const Error& e) {
            error = e.what();
        }
        if (expected[i].contains("error")) {
            ++errors_expected;
            EXPECT_FALSE(error.empty()) << "jinja2 raised " << expected[i]["error"].get<std::string>()
                                        << " but nibble rendered: " << got;
            EXPECT_NE(error.find("snippet:"), std::string::npos) << "error does not name the origin: " << error;
        } else {
            EXPECT_TRUE(error.empty()) << "nibble failed: " << error;
            EXPECT_EQ(got, expected[i]["ok"].get<std::string>());
        }
    }
    EXPECT_GT(errors_expected, 10u);  // the error cases above really are errors in jinja2
}

TEST(ChatTemplateSnippets, ErrorsNameOriginAndLine) {
    try {
        ChatTemplate::parse("line one\n{% if x %}\nnever closed", "my_template.jinja");
        FAIL() << "expected a syntax error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("my_template.jinja:3"), std::string::npos) << e.what();
    }
    try {
        ChatTemplate::parse("a\nb\n{{ raise_exception('bad role') }}", "t.jinja").render(nlohmann::ordered_json::object());
        FAIL() << "expected raise_exception to throw";
    } catch (const Error& e) {
        std::string what = e.what();
        EXPECT_NE(what.find("t.jinja:3"), std::string::npos) << what;
        EXPECT_NE(what.find("bad role"), std::string::npos) << what;
    }
    try {
        ChatTemplate::parse("\n{{ x | nope }}", "t.jinja").render(nlohmann::ordered_json::object());
        FAIL() << "expected an unknown-filter error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("t.jinja:2"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos) << e.what();
    }
}

TEST(ChatTemplateSnippets, LimitsStopRunawayTemplates) {
    ChatTemplateLimits limits;
    limits.max_steps = 100000;
    auto loop = ChatTemplate::parse("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "t");
    EXPECT_THROW(loop.render(nlohmann::ordered_json::object(), limits), Error);
    limits = ChatTemplateLimits{};
    limits.max_output_bytes = 1000;
    auto big = ChatTemplate::parse("{% for i in range(1000) %}0123456789{% endfor %}", "t");
    EXPECT_THROW(big.render(nlohmann::ordered_json::object(), limits), Error);
    auto recursion = ChatTemplate::parse("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "t");
    EXPECT_THROW(recursion.render(nlohmann::ordered_json::object()), Error);
    // Values built deeper than the interpreter's nesting limit, and namespaces holding namespaces
    // (which could form reference cycles), are refused rather than risking the stack.
    auto nest = ChatTemplate::parse("{% set ns = namespace(x=[]) %}{% for i in range(2000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | length }}", "t");
    EXPECT_THROW(nest.render(nlohmann::ordered_json::object()), Error);
    auto cycle = ChatTemplate::parse("{% set ns = namespace() %}{% set ns.self = [ns] %}", "t");
    EXPECT_THROW(cycle.render(nlohmann::ordered_json::object()), Error);
    std::string deep(5000, '(');
    EXPECT_THROW(ChatTemplate::parse("{{ " + deep + " }}", "t"), Error);
}

}  // namespace
}  // namespace nibble
