#!/usr/bin/env bash
# Configures and builds nibble into build/ (CUDA backend when nvcc is found; pass -DNIBBLE_CUDA=OFF to skip).
# NIBBLE_CUDA_ARCHS (e.g. "90a;121a") narrows the CUDA architectures compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
args=(-G Ninja -DCMAKE_BUILD_TYPE=Release)
[ -n "${NIBBLE_CUDA_ARCHS:-}" ] && args+=("-DNIBBLE_CUDA_ARCHS=${NIBBLE_CUDA_ARCHS}")
cmake -S . -B build "${args[@]}" "$@"
cmake --build build -j "$(nproc)"
