#!/usr/bin/env bash
# Packs what the lent GPU machine lacks into .carry/pack.tar.xz for scripts/device-run.sh: the CUDA build's
# binaries (built here for sm_90a) and the shared libraries of this machine that `ldd` says they need
# (not the C runtime, not NCCL or cuBLASLt, which load from the device's own CUDA).
#   scripts/pack-device.sh [BUILD_DIR [PACK]]   (defaults build-cuda, .carry/pack.tar.xz; e.g. a build with
#   -DNIBBLE_PROGRAMMATIC_LAUNCH=OFF into .carry/base.tar.xz, run beside the default by NIBBLE_PACK=... device-run.sh)
set -euo pipefail
build="${1:-build-cuda}"
out="${2:-.carry/pack.tar.xz}"
cmake --build "$build" -j2 --target nibble nibble-device-tests nibble-kernel-bench nibble-wave-probe
pack="$(mktemp -d)"
mkdir -p "$pack/bin" "$pack/lib" .carry
cp "$build/nibble" "$build/nibble-device-tests" "$build/nibble-kernel-bench" "$build/nibble-wave-probe" "$pack/bin/"
for b in "$pack"/bin/*; do ldd "$b" | awk '/=> \//{print $3}'; done | sort -u |
    grep -v -E 'lib(c|m|stdc\+\+|gcc_s|pthread|dl|rt|nccl|cublas|cublasLt)\.so|ld-linux' |
    xargs -I{} cp -L {} "$pack/lib/"
# The kernel tracer (docs/perf.md: Kernel traces without nsys), when this build has it, and the toolkit's
# CUPTI it loads (the GPU machine may lack it).
if cmake --build "$build" --target help | grep '^nibble-trace:' >/dev/null; then
    cmake --build "$build" -j2 --target nibble-trace
    cp "$build/libnibble_trace.so" "$pack/lib/"
    cupti="$(ldd "$build/libnibble_trace.so" | awk '/libcupti/ && /=> \//{print $3}')"
    cp -L "${cupti:-/usr/local/cuda/lib64/libcupti.so.13}" "$pack/lib/"
fi
tar -C "$pack" -cf - . | xz -T2 -6 > "$out"
rm -rf "$pack"
echo "packed $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty') into $out: $(du -h "$out" | cut -f1)"
