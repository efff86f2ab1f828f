#!/usr/bin/env bash
# Runs on the lent GPU machine: the device tests FILTER of a PDL pack (built with NIBBLE_PROGRAMMATIC_LAUNCH on,
# the default) once per kernel selection (cuda/pdl.cuh: NIBBLE_PDL_ONLY / NIBBLE_PDL_SKIP, substrings of kernel
# names), and a table of failed tests per selection last.
#   scripts/pdl-bisect.sh PACK FILTER SELECTION...   where SELECTION is all, only=a,b or skip=a,b
set -uo pipefail
pack="$1" filter="$2"
shift 2
root="/tmp/nibble-pack-$(basename "$pack" .tar.xz)"
mkdir -p "$root" && tar -C "$root" -xJf "$pack"
export LD_LIBRARY_PATH="$root/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
out="${OUT:-/tmp/out}"
mkdir -p "$out"
table=""
for sel in "$@"; do
    only="" skip=""
    case "$sel" in
        only=*) only="${sel#only=}" ;;
        skip=*) skip="${sel#skip=}" ;;
    esac
    log="$out/bisect-$(echo "$sel" | tr -c 'a-zA-Z0-9_\n' '_').log"
    NIBBLE_PDL_ONLY="$only" NIBBLE_PDL_SKIP="$skip" timeout 120 "$root/bin/nibble-device-tests" --gtest_brief=1 \
        --gtest_filter="$filter" > "$log" 2>&1
    rc=$?
    failed="$(grep '^\[  FAILED  \]' "$log" | sed 's/ (.*//; s/.*\] //' | tr '\n' ' ')"
    table+="$(printf '%-60s rc=%-3s failed: %s' "$sel" "$rc" "${failed:-none}")"$'\n'
done
printf '%s' "$table"
