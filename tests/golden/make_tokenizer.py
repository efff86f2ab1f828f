#!/usr/bin/env python3
"""Writes a tiny byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a ChatML chat
template) whose 512 ids fit the golden fixtures' vocabulary, so `nibble run` and `nibble tokenize` work on
them. 256 byte tokens, 255 merges learned here on a fixed English text, and one special token
<|endoftext|> (id 511). Standard library only; deterministic.

usage: make_tokenizer.py OUT_DIR [OUT_DIR ...]
"""
import collections
import json
import os
import re
import sys

CORPUS = """The quick brown fox jumps over the lazy dog. A language model reads tokens and writes tokens.
Once upon a time there was a small model that wanted to run on every machine, from a laptop to a
data-center GPU. It learned that memory bandwidth decides how fast it can speak, and that four bits per
weight let it speak more than three times faster than sixteen. The engineers who built it wrote tests
first, compared every number with a reference, and measured before they believed. Hello, world! How are
you today? I am fine, thank you. What is the capital of France? Paris is the capital of France.
def main():\n    print("hello")\n    return 0\n"""


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def main():
    b2u = bytes_to_unicode()
    words = collections.Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", CORPUS))
    splits = {w: [b2u[b] for b in w.encode("utf-8")] for w in words}
    vocab = [b2u[b] for b in range(256)]
    merges = []
    while len(merges) < 255:
        pairs = collections.Counter()
        for w, count in words.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        vocab.append(a + b)
        for w in words:
            s, out, i = splits[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    assert len(vocab) == 511, len(vocab)
    eos = "<|endoftext|>"
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 511, "content": eos, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(vocab)},
                  "merges": [[a, b] for a, b in merges]},
    }
    chat_template = (
        "{%- for message in messages %}"
        "{{- '<|endoftext|>' + message['role'] + '\\n' + message['content'] + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|endoftext|>assistant\\n' }}{%- endif %}")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": None, "eos_token": eos, "pad_token": eos,
              "unk_token": None, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {"511": {"content": eos, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}},
              "chat_template": chat_template}
    for out in sys.argv[1:]:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer, f, ensure_ascii=False, indent=1)
        with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main()
