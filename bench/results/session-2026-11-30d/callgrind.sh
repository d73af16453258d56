#!/usr/bin/env bash
# Instructions and simulated L1 misses per new-connection request (TLS 1.3), the broker
# (device seen before) against the floor, each under valgrind's callgrind with its cache
# simulation. Counts, not time: they do not move with the host, so they show where the
# broker's own work is when CPU-time ratios are within the machine's noise. Needs valgrind
# (apt-get install valgrind) and release builds (bench/floor.sh builds them).
#
#   bash bench/results/session-2026-11-30d/callgrind.sh [OUT_DIR]
# then: python3 bench/results/session-2026-11-30d/callgrind_diff.py OUT_DIR Ir+D1mr+D1mw 30
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
OUT=$(realpath -m "${1:-$ROOT/bench/out/callgrind}")
mkdir -p "$OUT"
BUILD=0 KEEP=0
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
bench_build
bench_workdir token-broker-callgrind
bench_pki
CG=(valgrind --tool=callgrind --cache-sim=yes --compress-strings=no --compress-pos=no)
FLOOR_WRAP=("${CG[@]}" --callgrind-out-file="$OUT/floor.out")
FLOOR_READY_SECONDS=60
start_floor floor
BROKER_WRAP=("${CG[@]}" --callgrind-out-file="$OUT/broker.out")
BROKER_READY_SECONDS=120
start_broker broker-cached "$PKI/keys"
for side in broker floor; do
    port=$BROKER_PORT pid=$BROKER_PID
    [[ $side == floor ]] && port=$FLOOR_PORT pid=$FLOOR_PID
    # Warm up (the broker's first request validates the chain), then count from zero.
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$port" --mode new-conn --concurrency 1 --duration 3 >/dev/null
    callgrind_control -z "$pid" >/dev/null
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$port" --mode new-conn --concurrency 2 \
        --duration 15 >"$OUT/$side.json"
    callgrind_control -d "$pid" >/dev/null
done
echo "callgrind profiles: $OUT/{broker,floor}.out.1, requests in $OUT/{broker,floor}.json"
