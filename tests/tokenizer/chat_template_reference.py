#!/usr/bin/python3
"""Reference renderer for the chat-template tests: Python's jinja2 set up as transformers'
apply_chat_template sets it up (written from its documented behaviour, standard library + jinja2):

  ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                extensions=[<{% generation %} tag>, jinja2.ext.loopcontrols])
  filters["tojson"]  = json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
  globals["raise_exception"] raises TemplateError(message); globals["strftime_now"](fmt) = now().strftime(fmt)

Reads a JSON list of cases from the file named by argv[1]; each case is either
  {"template": str, "context": {...}}                      rendered with the context as given, or
  {"template": str, "chat": {"messages": [...], "tools": [...]?, "documents": ...?,
                             "add_generation_prompt": bool, "special_tokens": [[k, v]...], "extra": {...}}}
                                                           rendered with the context apply_chat_template builds.
Writes a JSON list of {"ok": rendered} or {"error": message} to stdout.
"""
import json
import sys
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class GenerationTag(Extension):
    """{% generation %}...{% endgeneration %}: transformers uses it to mark assistant text; it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def make_env():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def chat_context(chat):
    # apply_chat_template: render(messages=..., tools=..., documents=..., add_generation_prompt=...,
    #                             **special_tokens_map, **kwargs)
    ctx = {
        "messages": chat["messages"],
        "tools": chat.get("tools"),
        "documents": chat.get("documents"),
        "add_generation_prompt": chat.get("add_generation_prompt", False),
    }
    for key, value in chat.get("special_tokens", []):
        ctx[key] = value
    ctx.update(chat.get("extra", {}))
    return ctx


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    env = make_env()
    results = []
    for case in cases:
        try:
            template = env.from_string(case["template"])
            ctx = case["context"] if "context" in case else chat_context(case["chat"])
            results.append({"ok": template.render(**ctx)})
        except Exception as e:  # the test only checks that both sides fail
            results.append({"error": f"{type(e).__name__}: {e}"})
    sys.stdout.write(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
