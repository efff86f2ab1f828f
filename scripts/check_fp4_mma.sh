#!/usr/bin/env bash
# CI check of the FP4 tensor-core GEMV (src/ops/linear/gemv_fp4mma_cuda.cu) for Blackwell sm_120a / sm_121a,
# which no machine here can run. It proves, without such a GPU:
#   1. the sm_120a and sm_121a PTX of the file holds the block-scaled FP4 MMA, exactly
#      mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3,
#      once in each instantiation of gemv_fp4mma_kernel (F32 and BF16 activations);
#   2. ptxas assembles that PTX for sm_120a and sm_121a (the assembler accepts the instruction and its
#      operands for those targets);
#   3. the sm_90a PTX holds no such instruction (the kernel is a trap stub there).
# This checks PTX and assembly, not SASS: this CUDA toolkit ships no cuobjdump / nvdisasm to disassemble
# the cubin (docs/tuning.md).
# Usage: scripts/check_fp4_mma.sh        (NVCC / PTXAS override the tools; exits 1 on any failure)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NVCC="${NVCC:-/usr/local/cuda/bin/nvcc}"
PTXAS="${PTXAS:-$(dirname "$NVCC")/ptxas}"
SRC="$ROOT/src/ops/linear/gemv_fp4mma_cuda.cu"
MMA='mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3'
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

fail() { echo "check_fp4_mma: FAIL: $*" >&2; exit 1; }

for arch in 120a 121a; do
    ptx="$TMP/gemv_fp4mma.sm_$arch.ptx"
    "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -I "$ROOT/src" \
        -gencode "arch=compute_$arch,code=compute_$arch" -ptx "$SRC" -o "$ptx" \
        || fail "nvcc could not compile $SRC to PTX for compute_$arch"
    count=$(grep -cF "$MMA" "$ptx" || true)
    kernels=$(grep -c '\.entry .*gemv_fp4mma_kernel' "$ptx" || true)
    [ "$kernels" -ge 2 ] || fail "sm_$arch PTX has $kernels gemv_fp4mma_kernel entries, expected 2"
    # every gemv_fp4mma_kernel entry holds at least one (the instruction is not in a dead helper only)
    without=$(awk -v mma="$MMA" '/\.entry /{ if (in_k && !n) bad++; in_k = /gemv_fp4mma_kernel/; n = 0 }
                                 in_k && index($0, mma) { n++ }
                                 END { if (in_k && !n) bad++; print bad + 0 }' "$ptx")
    [ "$without" -eq 0 ] || fail "sm_$arch PTX: $without gemv_fp4mma_kernel entries lack '$MMA'"
    "$PTXAS" -arch="sm_$arch" "$ptx" -o "$TMP/gemv_fp4mma.sm_$arch.cubin" \
        || fail "ptxas rejected the sm_$arch PTX"
    echo "check_fp4_mma: sm_$arch: $count FP4 block-scaled mma.sync in $kernels kernels; ptxas assembles it"
done

"$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -I "$ROOT/src" \
    -gencode arch=compute_90a,code=compute_90a -ptx "$SRC" -o "$TMP/gemv_fp4mma.sm_90a.ptx" \
    || fail "nvcc could not compile $SRC to PTX for compute_90a"
if grep -qF 'kind::mxf4nvf4' "$TMP/gemv_fp4mma.sm_90a.ptx"; then
    fail "the sm_90a PTX holds an FP4 block-scaled mma (the feature guard is broken)"
fi
echo "check_fp4_mma: sm_90a: no FP4 mma (trap stub), as intended"
echo "check_fp4_mma: OK (PTX + ptxas assembly checked; SASS not inspected: no disassembler in this toolkit)"
