#!/usr/bin/env python3
"""Compares `logits` tensors of safetensors files with the first (the reference): max |difference|, and how
often the top-1 token agrees. Standard library only."""
import json
import struct
import sys


def read_logits(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8:8 + n])["logits"]
    rows, cols = info["shape"]
    begin, end = info["data_offsets"]
    flat = struct.unpack("<%df" % (rows * cols), data[8 + n + begin:8 + n + end])
    return [flat[r * cols:(r + 1) * cols] for r in range(rows)]


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


ref = read_logits(sys.argv[1])
print("%-50s %14s %12s" % ("logits", "max |diff|", "top-1 agree"))
for path in sys.argv[2:]:
    got = read_logits(path)
    diff = max(abs(a - b) for ra, rb in zip(ref, got) for a, b in zip(ra, rb))
    agree = sum(argmax(ra) == argmax(rb) for ra, rb in zip(ref, got))
    print("%-50s %14.3g %8d/%d" % (path.split("/")[-1], diff, agree, len(ref)))
