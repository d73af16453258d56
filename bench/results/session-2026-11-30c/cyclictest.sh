#!/usr/bin/env bash
# The machine's own stalls: cyclictest (rt-tests) wakes a thread every 200 us on each
# core (CPU 0: the load generator's, CPU 1: the server's) while the floor serves 5,000
# kept-alive requests/s, pinned as in bench/latency.sh.
# Run: flock /work/bench.lock bash THIS_FILE (needs cyclictest).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd) BUILD=0 KEEP=0
source "$ROOT/bench/common.sh"
bench_build
bench_workdir cyc
bench_pki
start_floor floor --threads 1
taskset -a -p -c 1 "$FLOOR_PID" >/dev/null
taskset -c 0 "$LOADGEN" "${CLIENT_ARGS[@]}" --addr 127.0.0.1:$FLOOR_PORT --threads 1 --mode keep-alive --concurrency 16 --duration 1 >/dev/null
cyclictest -a 0,1 -t 2 -i 200 -D 12 -q -h 30000 -m > "$WORK/cyclictest.txt" 2>/dev/null &
cp=$!
sleep 1
taskset -c 0 "$LOADGEN" "${CLIENT_ARGS[@]}" --addr 127.0.0.1:$FLOOR_PORT --threads 1 --mode keep-alive --concurrency 16 --duration 10 --rate 5000 | python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("floor at 5000/s:", d["latency_ms"])'
wait $cp
# Percentiles of the wakeup latency histogram (microseconds).
"$PY" - "$WORK/cyclictest.txt" <<'PY'
import sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if l[0].isdigit()]
for cpu in (0, 1):
    h = [(r[0], r[1 + cpu]) for r in rows]
    total = sum(c for _, c in h)
    def pct(p):
        acc = 0
        for us, c in h:
            acc += c
            if acc >= p * total:
                return us
    print(f"CPU {cpu}: wakeups", total, "p50/p99/p99.9/p99.99 us", [pct(p) for p in (0.5, 0.99, 0.999, 0.9999)],
          "max", max(us for us, c in h if c), "over 2 ms", sum(c for us, c in h if us >= 2000))
PY
