#!/usr/bin/env python3
"""Prints the `tokens` tensor of a golden fixture's expected.safetensors as a comma-separated list."""
import json
import struct
import sys

with open(sys.argv[1], "rb") as f:
    data = f.read()
n = struct.unpack("<Q", data[:8])[0]
info = json.loads(data[8:8 + n])["tokens"]
begin, end = info["data_offsets"]
fmt = {"I32": "i", "I64": "q"}[info["dtype"]]
raw = data[8 + n + begin:8 + n + end]
print(",".join(str(v) for v in struct.unpack("<%d%s" % (len(raw) // struct.calcsize(fmt), fmt), raw)))
