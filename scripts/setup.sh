#!/usr/bin/env bash
# Fresh machine to a running server: installs the Debian packages, builds build/nibble (with the CUDA backend
# when nvcc is present), then runs `nibble serve` with no model: a built-in tiny model with random weights
# (its text is meaningless) on http://127.0.0.1:8000, to try the OpenAI-compatible API (README shows curl and
# openai-client calls). Serve a real checkpoint with `build/nibble serve /path/to/model`. Arguments go to
# CMake (e.g. -DNIBBLE_CUDA=OFF). The NVFP4 quantization demo is scripts/demo-quantize.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh "$@"

echo "== nibble serve (built-in tiny model; Ctrl-C stops it)"
exec build/nibble serve
