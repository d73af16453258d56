#!/usr/bin/env bash
# The floor of the broker's stack: server CPU per new-connection token of the broker over
# a bare rustls + hyper server (examples/floor.rs: rustls' WebPkiClientVerifier with the
# same CA bundle and CRL, the same certificate, provider and TLS versions, answering 200
# "ok"), in paired rounds (sides alternating round after round), TLS 1.3 and 1.2, for a
# device seen before (verified-chain cache hit) and one whose chain is validated
# (`server.verified_chain_cache = 0`). See BENCHMARKS.md, "Scale: the floor and many devices".
#
#   bench/floor.sh [--quick] [--no-build] [--keep] [--pin] [--rounds N] [--seconds S] [--out DIR]
#
# --pin: each server on CPU 1 with one runtime thread, the load generator on CPU 0 with one
# (`taskset`): no server thread competes with the client or migrates, so a round's CPU per
# request moves far less than unpinned (BENCHMARKS.md, "Scale: the floor pinned").
#
# Defaults: 5 rounds of 2 s per side (quick: 1 round of 0.3 s). Results: DIR/results.jsonl
# and DIR/pairs.md (default bench/out/floor). Run it under `flock /work/bench.lock` on a
# shared machine. Serving the floor alone for other scripts: `start_floor` in common.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=1 KEEP=0 ROUNDS=5 PAIR_DUR=2 OUT="$ROOT/bench/out/floor" CONC=32 QUICK=0 PIN=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ROUNDS=1 PAIR_DUR=0.3 CONC=16 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --pin) PIN=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --seconds) PAIR_DUR=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
bench_build
bench_workdir token-broker-floor
RESULTS="$WORK/results.jsonl"
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"machine\",\"mode\":\"$([[ $QUICK == 1 ]] && echo quick || echo full)\",\"pinned\":$([[ $PIN == 1 ]] && echo true || echo false),\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"commit\":\"$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock examples 2>/dev/null || echo +uncommitted)\",\"nproc\":$(nproc)}"

bench_pki
FLOOR_ARGS=() LOADGEN_ARGS=()
if [[ $PIN == 1 ]]; then
    command -v taskset >/dev/null || die "--pin needs taskset (apt-get install util-linux)"
    (($(nproc) >= 2)) || die "--pin needs 2 CPUs"
    # The broker's runtime sizes itself to the CPUs it may use: one thread here.
    BROKER_WRAP=(taskset -c 1) FLOOR_WRAP=(taskset -c 1) LOADGEN_WRAP=(taskset -c 0)
    FLOOR_ARGS=(--threads 1) LOADGEN_ARGS=(--threads 1)
fi
start_floor floor "${FLOOR_ARGS[@]+"${FLOOR_ARGS[@]}"}"
start_broker broker-cached "$PKI/keys"
CACHED_PID=$BROKER_PID CACHED_PORT=$BROKER_PORT
BROKER_SERVER_EXTRA="verified_chain_cache = 0" start_broker broker-validated "$PKI/keys"
VALIDATED_PID=$BROKER_PID VALIDATED_PORT=$BROKER_PORT
for port in "$FLOOR_PORT" "$CACHED_PORT" "$VALIDATED_PORT"; do
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$port" --mode new-conn --concurrency 8 --duration 0.3 >/dev/null
done

side() { # side PAIR ROUND SIDE PORT PID [LOADGEN_ARGS...]
    local pair=$1 round=$2 name=$3 port=$4 pid=$5
    shift 5
    measure "$pair-$name-$round" "{\"kind\":\"pair\",\"pair\":\"$pair\",\"side\":\"$name\",\"round\":$round}" "$pid" \
        --addr "127.0.0.1:$port" --mode new-conn --concurrency "$CONC" --duration "$PAIR_DUR" \
        "${LOADGEN_ARGS[@]+"${LOADGEN_ARGS[@]}"}" "$@"
}
log "paired rounds: floor, broker (device seen before), broker (chain validated); $ROUNDS x ${PAIR_DUR}s"
for round in $(seq 1 "$ROUNDS"); do
    for tls in 1.3 1.2; do
        flag=()
        [[ $tls == 1.2 ]] && flag=(--tls12)
        side "newconn-tls$tls" "$round" floor "$FLOOR_PORT" "$FLOOR_PID" "${flag[@]+"${flag[@]}"}"
        side "newconn-tls$tls" "$round" broker-seen-before "$CACHED_PORT" "$CACHED_PID" "${flag[@]+"${flag[@]}"}"
        side "newconn-tls$tls" "$round" broker-validated "$VALIDATED_PORT" "$VALIDATED_PID" "${flag[@]+"${flag[@]}"}"
    done
done
BROKER_PID=$CACHED_PID
stop_broker broker-cached
BROKER_PID=$VALIDATED_PID
stop_broker broker-validated
stop_pid "$FLOOR_PID" TERM
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"end\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
mkdir -p "$OUT"
cp "$RESULTS" "$OUT/results.jsonl"
log "server CPU per new-connection request over the floor's (paired rounds)"
"$PY" "$LIB" pairs "$RESULTS" floor "$OUT/pairs.md"
echo "results: $OUT/results.jsonl, $OUT/pairs.md"
