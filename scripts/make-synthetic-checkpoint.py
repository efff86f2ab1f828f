#!/usr/bin/env python3
"""Writes a Hugging Face-style checkpoint of a real architecture's shape with random weights, in ModelOpt's
NVFP4 layout (lm_head BF16, as ModelOpt exports it), for measuring load and start-up time without a download.
Standard library only. The tokenizer is the tiny byte-level one of a golden fixture (ids fit any vocabulary).

    scripts/make-synthetic-checkpoint.py OUT_DIR [--shape llama3-8b|llama3-70b|llama-tiny]
"""
import argparse
import json
import os
import random
import shutil
import struct
import sys

SHAPES = {  # hidden, layers, heads, kv_heads, intermediate, vocab, rope_theta (published config.json files)
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0),
    "llama3-70b": (8192, 80, 64, 8, 28672, 128256, 500000.0),
    # Not published: small enough to load in a second, with head_dim 64 (what the CUDA attention takes) and
    # heads, KV heads and intermediate size that split 2 ways on 16-value blocks (scripts/tp-serve-check.sh).
    "llama-tiny": (512, 2, 8, 4, 1024, 1024, 10000.0),
}
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FROM = os.path.join(HERE, "..", "tests", "golden", "fixtures", "llama_gqa", "model")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    a = ap.parse_args()
    d, layers, heads, kvh, ff, vocab, theta = SHAPES[a.shape]
    hd = d // heads
    os.makedirs(a.out, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kvh, "head_dim": hd,
        "intermediate_size": ff, "vocab_size": vocab, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": theta, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                "exclude_modules": ["lm_head"]},
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(a.out, "hf_quant_config.json"), "w") as f:
        json.dump({"producer": {"name": "modelopt", "version": "0.29.0"},
                   "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"],
                                    "kv_cache_quant_algo": None}}, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_FROM, name), os.path.join(a.out, name))

    tensors = []  # (name, dtype, shape, kind)
    def add(name, dtype, shape, kind):
        tensors.append((name, dtype, shape, kind))
    add("model.embed_tokens.weight", "BF16", [vocab, d], "bf16")
    for l in range(layers):
        p = f"model.layers.{l}."
        add(p + "input_layernorm.weight", "BF16", [d], "one")
        add(p + "post_attention_layernorm.weight", "BF16", [d], "one")
        for m, n, k in (("self_attn.q_proj", heads * hd, d), ("self_attn.k_proj", kvh * hd, d),
                        ("self_attn.v_proj", kvh * hd, d), ("self_attn.o_proj", d, heads * hd),
                        ("mlp.gate_proj", ff, d), ("mlp.up_proj", ff, d), ("mlp.down_proj", d, ff)):
            add(p + m + ".weight", "U8", [n, k // 2], "bytes")
            add(p + m + ".weight_scale", "F8_E4M3", [n, k // 16], "e4m3")
            add(p + m + ".weight_scale_2", "F32", [], "f32")
            add(p + m + ".input_scale", "F32", [], "f32")
    add("model.norm.weight", "BF16", [d], "one")
    add("lm_head.weight", "BF16", [vocab, d], "bf16")

    size = {"BF16": 2, "U8": 1, "F8_E4M3": 1, "F32": 4}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    # Widest dtypes first keeps every tensor aligned to its element size.
    order = sorted(tensors, key=lambda t: -size[t[1]])
    for name, dtype, shape, _ in order:
        n = size[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)

    rng = random.Random(1)
    chunk = 1 << 24
    random_bytes = rng.randbytes(chunk)
    # BF16 values with exponents 2^-7..2^-4 and random signs and mantissas; E4M3 scales 2^-5..2^-4.
    bf16 = bytes(b for i in range(0, chunk, 2)
                 for b in ((random_bytes[i]), (random_bytes[i + 1] & 0x81) | 0x3c))
    e4m3 = bytes((b & 0x0f) | 0x10 for b in random_bytes)
    one = struct.pack("<H", 0x3f80)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, dtype, shape, kind in order:
            lo, hi = header[name]["data_offsets"]
            n = hi - lo
            if kind == "f32":
                f.write(struct.pack("<f", 0.25 if name.endswith("weight_scale_2") else 1.0))
                continue
            if kind == "one":
                f.write(one * (n // 2))
                continue
            src = {"bf16": bf16, "bytes": random_bytes, "e4m3": e4m3}[kind]
            while n > 0:
                w = min(n, len(src))
                f.write(src[:w])
                n -= w
    print(f"{a.out}: {a.shape} NVFP4 (lm_head BF16), {offset / 1e9:.2f} GB of tensors")


if __name__ == "__main__":
    sys.exit(main())
