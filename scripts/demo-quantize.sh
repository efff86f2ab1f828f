#!/usr/bin/env bash
# The quantization demo (formerly setup.sh's main job): quantize a tiny BF16 Qwen3 checkpoint committed with
# the tests to NVFP4 and compare nibble's logits with the BF16 original and with transformers'.
# Needs build/nibble (scripts/setup.sh or scripts/build.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/nibble ] || { echo "build/nibble is missing: run scripts/build.sh first" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=tests/golden/fixtures/qwen3_qknorm/model
tokens=$(python3 scripts/fixture_tokens.py tests/golden/fixtures/qwen3_qknorm/expected.safetensors)
echo "== nibble quantize $src -> NVFP4 (ModelOpt layout)"
build/nibble quantize "$src" "$work/nvfp4" --layout modelopt 2>/dev/null | tail -n 1
build/nibble logits --model "$src" --tokens "$tokens" --out "$work/bf16.safetensors" 2>/dev/null
build/nibble logits --model "$work/nvfp4" --tokens "$tokens" --out "$work/nvfp4.safetensors" 2>/dev/null
# The NVFP4 fixture holds the same weights quantized by torch, with transformers' logits on its own tokens.
ref_tokens=$(python3 scripts/fixture_tokens.py tests/golden/fixtures/qwen3_nvfp4_modelopt/expected.safetensors)
build/nibble logits --model "$work/nvfp4" --tokens "$ref_tokens" --out "$work/nvfp4-ref-tokens.safetensors" 2>/dev/null
echo "== BF16 logits against transformers (BF16 weights)"
python3 scripts/compare_logits.py tests/golden/fixtures/qwen3_qknorm/expected.safetensors "$work/bf16.safetensors"
echo "== NVFP4 logits against transformers (the same NVFP4 weights, quantized by torch, dequantized)"
python3 scripts/compare_logits.py tests/golden/fixtures/qwen3_nvfp4_modelopt/expected.safetensors \
    "$work/nvfp4-ref-tokens.safetensors"
echo "== NVFP4 logits against BF16 (quantization error on this tiny random model)"
python3 scripts/compare_logits.py "$work/bf16.safetensors" "$work/nvfp4.safetensors"
