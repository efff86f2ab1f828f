#!/usr/bin/env bash
# Time from `nibble serve MODEL_DIR` to the first generated token, twice: with an empty tune cache and
# --tune full (tunes the model's shapes, writes the cache), then with the cache present and --tune cached.
# Usage: scripts/startup-time.sh NIBBLE_BINARY MODEL_DIR [extra serve flags]. Prints one line per start.
set -uo pipefail
bin="$1"; model="$2"; shift 2
export XDG_CACHE_HOME="$(mktemp -d)"   # an empty tune cache for the first start
port=8391
first_token() {  # waits for /health, then times one completion of one token; prints seconds since $1
    python3 - "$1" "$port" <<'PY'
import json, sys, time, urllib.request
t0, port = float(sys.argv[1]), sys.argv[2]
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        break
    except Exception:
        if time.time() - t0 > 300: sys.exit("server did not come up in 300 s")
        time.sleep(0.05)
ready = time.time() - t0
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
    data=json.dumps({"prompt": "hello", "max_tokens": 1, "temperature": 0}).encode(),
    headers={"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=120))
print(f"ready {ready:.2f} s, first token {time.time() - t0:.2f} s, text {out['choices'][0]['text']!r}")
PY
}
for mode in full cached; do
    t0=$(date +%s.%N)
    "$bin" serve "$model" --port $port --tune $mode --max-model-len 8192 "$@" > "/tmp/serve-$mode.log" 2>&1 &
    pid=$!
    echo -n "tune $mode: "
    first_token "$t0"
    kill $pid; wait $pid 2>/dev/null
    grep -E "tune|CUDA backend|uploading weights 100" "/tmp/serve-$mode.log" | tail -4
done
