#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh "$@"
ctest --test-dir build --output-on-failure -j "$(nproc)"

# A 30-second libFuzzer session over the safetensors reader, when clang is installed: its own
# sanitizer-instrumented build in build-fuzz/ (only the fuzz target), a scratch corpus grown from the
# committed seeds; a crash fails the run and leaves its input in build-fuzz/.
if command -v clang++ >/dev/null 2>&1; then
    CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DNIBBLE_FUZZ=ON -DNIBBLE_CUDA=OFF \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    cmake --build build-fuzz --target safetensors_header_fuzz -j "$(nproc)"
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    mkdir "$scratch/corpus"
    if ! build-fuzz/safetensors_header_fuzz "$scratch/corpus" fuzz/corpus/safetensors_header \
        -dict=fuzz/safetensors.dict -max_total_time=30 -artifact_prefix=build-fuzz/ >"$scratch/log" 2>&1; then
        tail -40 "$scratch/log"
        exit 1
    fi
    grep -E "^Done" "$scratch/log"
fi
