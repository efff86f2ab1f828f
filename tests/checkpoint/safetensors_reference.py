#!/usr/bin/python3
"""Reference safetensors files for nibble's tests, written and checked independently of nibble's C++.

The format is simple enough for the standard library (json, struct) plus numpy for the element bytes
(numpy does its own float16/int/bool encoding, little-endian). Layout rules follow the reference
implementation (huggingface/safetensors, serialize/prepare): u64 LE header length; compact JSON
(separators "," and ":", UTF-8 kept as is) with "__metadata__" first and tensors in offset order; header
padded with spaces so that it is a multiple of 8 bytes; tensors packed with no gaps, widest dtype first,
then by name; and the reference reader's strict checks (contiguous offsets, last end == data size).
Sharded folders follow transformers' save_pretrained: model-0000i-of-0000n.safetensors plus
model.safetensors.index.json {"metadata": {"total_size": ...}, "weight_map": {...}}.

Commands:
  write-file PATH MANIFEST        a reference file and a manifest of what it holds
  write-sharded DIR MANIFEST      the same tensors as a 3-shard folder
  check-file PATH MANIFEST        PATH holds exactly the manifest's tensors, laid out as the reference does
  check-sharded DIR MANIFEST      DIR is a valid sharded checkpoint of the manifest's tensors
The manifest is JSON: {"metadata": {...}, "tensors": [{"name", "dtype", "shape", "hex"}, ...]} with the
tensors in reference file order and "hex" the little-endian element bytes.
"""
import json
import os
import struct
import sys

import numpy as np

DTYPE_SIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
              "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}
METADATA = {"format": "pt", "producer": "safetensors_reference.py"}


def bf16_bytes(values):
    # BF16 is the upper half of float32, rounded to nearest even.
    bits = np.asarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def make_tensors():
    """(name, dtype, shape, bytes) for a spread of dtypes, ranks, a scalar, an empty tensor, UTF-8 names."""
    t = []
    t.append(("model.embed_tokens.weight", "F32", [4, 3], (np.arange(12, dtype="<f4") * 0.25 - 1.0).tobytes()))
    t.append(("model.layers.0.mlp.down_proj.weight", "BF16", [2, 5], bf16_bytes(np.linspace(-2, 2, 10))))
    t.append(("model.layers.0.input_layernorm.weight", "F16", [7],
              np.array([1, -0.5, 65504, 6e-8, 0, -0.0, 3.14159], dtype="<f2").tobytes()))
    t.append(("positions", "I64", [3], np.array([-1, 2**40, 7], dtype="<i8").tobytes()))
    t.append(("mask", "BOOL", [2, 2], np.array([[True, False], [False, True]]).tobytes()))
    t.append(("packed.weight", "U8", [3, 4], np.arange(200, 212, dtype=np.uint8).tobytes()))
    t.append(("packed.weight_scale", "F8_E4M3", [3], bytes([0x38, 0x7E, 0x01])))
    t.append(("scalar", "F32", [], np.array(2.5, dtype="<f4").tobytes()))
    t.append(("empty", "F32", [0, 4], b""))
    t.append(("doubles", "F64", [2], np.array([1e300, -2.0], dtype="<f8").tobytes()))
    t.append(("ranked", "I32", [2, 1, 1, 2], np.array([1, -2, 3, -4], dtype="<i4").tobytes()))
    t.append(("ünïcode.wéight", "I16", [3], np.array([-32768, 0, 32767], dtype="<i2").tobytes()))
    # Reference order: widest dtype first, then name.
    t.sort(key=lambda x: (-DTYPE_SIZE[x[1]], x[0]))
    return t


def header_bytes(metadata, entries):
    """entries: [(name, dtype, shape, begin, end)] in offset order."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * ((8 - len(text) % 8) % 8)


def write_file(path, tensors, metadata):
    entries, offset = [], 0
    for name, dtype, shape, data in tensors:
        entries.append((name, dtype, shape, offset, offset + len(data)))
        offset += len(data)
    header = header_bytes(metadata, entries)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for _, _, _, data in tensors:
            f.write(data)


def write_manifest(path, tensors, metadata):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"metadata": metadata,
                   "tensors": [{"name": n, "dtype": d, "shape": s, "hex": b.hex()} for n, d, s, b in tensors]},
                  f, ensure_ascii=False, indent=1)


def read_manifest(path):
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    return m["metadata"], [(t["name"], t["dtype"], t["shape"], bytes.fromhex(t["hex"])) for t in m["tensors"]]


def fail(msg):
    print("safetensors_reference.py: " + msg, file=sys.stderr)
    sys.exit(1)


def read_file_strict(path):
    """As the reference reader: returns (metadata, {name: (dtype, shape, bytes)}, ordered names, raw header)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        fail(f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > 100_000_000 or 8 + n > len(raw):
        fail(f"{path}: bad header length {n}")
    header_raw = raw[8:8 + n]
    header = json.loads(header_raw.decode("utf-8"), object_pairs_hook=lambda pairs: pairs)
    keys = [k for k, _ in header]
    if len(set(keys)) != len(keys):
        fail(f"{path}: duplicate keys")
    data = raw[8 + n:]
    metadata, tensors, order, ranges = {}, {}, [], []
    for name, entry in header:
        if name == "__metadata__":
            metadata = dict(entry)
            continue
        entry = dict(entry)
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            fail(f"{path}: tensor {name}: fields {sorted(entry)}")
        begin, end = entry["data_offsets"]
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if end - begin != numel * DTYPE_SIZE[entry["dtype"]]:
            fail(f"{path}: tensor {name}: byte count")
        tensors[name] = (entry["dtype"], entry["shape"], data[begin:end])
        order.append(name)
        ranges.append((begin, end))
    ranges.sort()
    pos = 0
    for begin, end in ranges:
        if begin != pos:
            fail(f"{path}: offsets not contiguous at {begin} (expected {pos})")
        pos = end
    if pos != len(data):
        fail(f"{path}: data section is {len(data)} bytes, tensors cover {pos}")
    return metadata, tensors, order, header_raw


def check_file(path, metadata, tensors):
    got_meta, got, order, header_raw = read_file_strict(path)
    if got_meta != metadata:
        fail(f"{path}: metadata {got_meta} != {metadata}")
    if order != [t[0] for t in tensors]:
        fail(f"{path}: tensor order {order}")
    for name, dtype, shape, data in tensors:
        if got[name] != (dtype, shape, data):
            fail(f"{path}: tensor {name} differs: {got[name][:2]} vs {(dtype, shape)}")
    # Byte-exact header as the reference writer would produce for these tensors in this order.
    entries, offset = [], 0
    for name, dtype, shape, data in tensors:
        entries.append((name, dtype, shape, offset, offset + len(data)))
        offset += len(data)
    if header_raw != header_bytes(metadata, entries):
        fail(f"{path}: header differs from the reference layout:\n{header_raw!r}\n{header_bytes(metadata, entries)!r}")


def shard_plan(tensors, n_shards):
    per = (len(tensors) + n_shards - 1) // n_shards
    return [tensors[i:i + per] for i in range(0, len(tensors), per)]


def write_sharded(folder, tensors, metadata):
    os.makedirs(folder, exist_ok=True)
    shards = shard_plan(tensors, 3)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(os.path.join(folder, name), shard, metadata)
        for t in shard:
            weight_map[t[0]] = name
            total += len(t[3])
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True,
                  ensure_ascii=False)
        f.write("\n")


def check_sharded(folder, metadata, tensors):
    with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    if sorted(weight_map) != sorted(t[0] for t in tensors):
        fail(f"{folder}: weight_map names differ")
    if index["metadata"]["total_size"] != sum(len(t[3]) for t in tensors):
        fail(f"{folder}: total_size {index['metadata']['total_size']}")
    expected = {t[0]: t for t in tensors}
    shard_names = sorted(set(weight_map.values()))
    for i, shard in enumerate(shard_names):
        if shard != f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors":
            fail(f"{folder}: shard name {shard}")
        held = [name for name, s in weight_map.items() if s == shard]
        got_meta, got, order, _ = read_file_strict(os.path.join(folder, shard))
        if sorted(order) != sorted(held) or got_meta != metadata:
            fail(f"{folder}/{shard}: holds {order}, index says {held}")
        check_file(os.path.join(folder, shard), metadata, [expected[n] for n in order])


def main():
    cmd, target, manifest = sys.argv[1:4]
    if cmd == "write-file":
        write_file(target, make_tensors(), METADATA)
        write_manifest(manifest, make_tensors(), METADATA)
    elif cmd == "write-sharded":
        write_sharded(target, make_tensors(), METADATA)
        write_manifest(manifest, make_tensors(), METADATA)
    elif cmd == "check-file":
        check_file(target, *read_manifest(manifest))
    elif cmd == "check-sharded":
        check_sharded(target, *read_manifest(manifest))
    else:
        fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
