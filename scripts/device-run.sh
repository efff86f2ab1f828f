#!/usr/bin/env bash
# Runs on the lent GPU machine (the `device` tool): unpacks binaries and the shared libraries that machine
# lacks from .carry/pack.tar.xz (built here for sm_90a), then runs the device tests and the benchmarks named
# by the arguments: tests[:FILTER], bench[:ARGS...], kbench[:PART], wave (nibble-wave-probe), startup[:SERVE FLAGS] (serve start to
# first token on a synthetic 8B NVFP4 checkpoint), tpserve[:N] (nibble serve -tp N against -tp 1:
# scripts/tp-serve-check.sh; needs N GPUs), trace:[NIBBLE_TRACE_*=V ...] ARGS (`nibble ARGS` under the CUPTI
# kernel tracer: docs/perf.md, Kernel traces without nsys; report in $OUT/trace[-N].txt). Logs go to $OUT.
# NIBBLE_PACK=.carry/other.tar.xz runs another pack (e.g. a baseline build, for figures of the same call).
set -uo pipefail
pack="${NIBBLE_PACK:-.carry/pack.tar.xz}"
root="/tmp/nibble-pack-$(basename "$pack" .tar.xz)"
mkdir -p "$root" && tar -C "$root" -xJf "$pack"
# NCCL: the one this build's headers are from (2.28.9, CUDA 13's) when the machine has it, so that NCCL's device
# API (the fused all-reduce + norm of tensor parallelism) can run: the lent machines' system NCCL is 2.28.3, and
# their PyTorch environment carries 2.28.9. NIBBLE_NCCL_LIB_DIR overrides.
nccl_dir="${NIBBLE_NCCL_LIB_DIR:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib}"
[[ -d "$nccl_dir" ]] || nccl_dir=""
export LD_LIBRARY_PATH="$root/lib:/usr/local/cuda/lib64${nccl_dir:+:$nccl_dir}:${LD_LIBRARY_PATH:-}"
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for step in "$@"; do
    kind="${step%%:*}"
    arg=""
    [[ "$step" == *:* ]] && arg="${step#*:}"
    case "$kind" in
        tests) "$root/bin/nibble-device-tests" --gtest_brief=1 ${arg:+--gtest_filter=$arg} 2>&1 | tee "$out/tests.log" | grep -E "FAILED|OK \]|PASSED|detail|Failure|error|expected|got" | tail -60
               # --gtest_brief prints no list of failures at the end: name them here, last, so a tail shows them.
               echo "failed tests: $(grep -c '^\[  FAILED  \]' "$out/tests.log")"
               grep '^\[  FAILED  \]' "$out/tests.log" | sed 's/, where GetParam.*//' ;;
        bench) "$root/bin/nibble" bench $arg 2>&1 | tee -a "$out/bench.log" | grep -v "^\[" ;;
        kbench) "$root/bin/nibble-kernel-bench" $arg 2>&1 | tee -a "$out/kbench.log" | tail -40 ;;
        wave) "$root/bin/nibble-wave-probe" 2>&1 | tee -a "$out/wave.log" ;;
        tpserve) NCCL_NVLS_ENABLE=0 scripts/tp-serve-check.sh "$root/bin/nibble" "" "${arg:-2}" 2>&1 | tee -a "$out/tpserve.log" | tail -40 ;;
        trace) read -ra words <<< "$arg"; envs=()
               while [[ "${words[0]:-}" == NIBBLE_TRACE_*=* ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
               ntrace=$(( ${ntrace:-0} + 1 )); report="$out/trace$( (( ntrace > 1 )) && echo "-$ntrace").txt"
               env CUDA_INJECTION64_PATH="$root/lib/libnibble_trace.so" NIBBLE_TRACE_OUT="$report" "${envs[@]}" \
                   "$root/bin/nibble" "${words[@]}" 2>&1 | tee -a "$out/trace.log" | grep -v "^\[" | tail -20
               head -n 33 "$report"; sed -n '/^== timeline summary/,$p' "$report" ;;
        startup) python3 scripts/make-synthetic-checkpoint.py /tmp/synth8b && \
                 scripts/startup-time.sh "$root/bin/nibble" /tmp/synth8b $arg 2>&1 | tee -a "$out/startup.log" ;;
    esac
done
