#!/usr/bin/env bash
# Many distinct devices: COUNT device certificates (made once by examples/bench_devices.rs,
# cached under target/bench-devices/COUNT/ with their own dev PKI), each connecting for a
# token in a random order (examples/loadgen.rs --devices). Measures, see BENCHMARKS.md
# ("Scale: the floor and many devices"):
#   1. one pass over every device against a fresh broker: tokens/s, server CPU per token,
#      p50/p99, and the broker's RSS growth per device (its verified-chain cache fills);
#   2. paired rounds, new connections, TLS 1.3 and 1.2, every connection a device not seen
#      before: a fresh broker vs the floor server (examples/floor.rs) with the same devices.
#
#   bench/devices.sh [--quick] [--no-build] [--keep] [--count N] [--pass N] [--rounds R] [--seconds S] [--out DIR]
#
# --pass N stops the one pass after N devices (default: all of them; on a loaded machine a
# pass over 100,000 takes minutes).
# Defaults: 100,000 devices, passes of 10 s, 5 rounds of 2 s per side; --quick: 1,000
# devices, 1 round of 0.3 s. Results in DIR (default bench/out/devices). Run it under
# `flock /work/bench.lock` on a shared machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=1 KEEP=0 COUNT=100000 PASS="" ROUNDS=5 PAIR_DUR=2 PASS_DUR=10 CONC=32 QUICK=0
OUT="$ROOT/bench/out/devices"
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 COUNT=1000 ROUNDS=1 PAIR_DUR=0.3 PASS_DUR=1 CONC=16 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --count) COUNT=$2; shift ;;
        --pass) PASS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --seconds) PAIR_DUR=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
bench_build
GEN="$CARGO_TARGET_DIR/release/examples/bench_devices"
if [[ $BUILD == 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked --example bench_devices)
fi
[[ -x $GEN ]] || die "missing $GEN (build first)"
bench_workdir token-broker-devices
RESULTS="$WORK/results.jsonl"
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"machine\",\"mode\":\"$([[ $QUICK == 1 ]] && echo quick || echo full)\",\"devices\":$COUNT,\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"commit\":\"$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock examples 2>/dev/null || echo +uncommitted)\",\"nproc\":$(nproc)}"

# --- the devices, made once: their own dev PKI (CA, server certificate, CRL valid a year).
CACHE="${BENCH_DEVICES_DIR:-$ROOT/target/bench-devices}/$COUNT"
if [[ ! -s $CACHE/devices.pem ]]; then
    log "generating $COUNT device certificates into $CACHE (once)"
    rm -rf "$CACHE"
    mkdir -p "$CACHE"
    "$BIN" init --dir "$CACHE/pki" >/dev/null
    t0=${EPOCHREALTIME/./}
    "$GEN" --pki "$CACHE/pki" --count "$COUNT" --out "$CACHE/devices.pem"
    echo "{\"devices\":$COUNT,\"seconds\":$(((${EPOCHREALTIME/./} - t0) / 1000))e-3,\"nproc\":$(nproc),\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"bytes\":$(stat -c %s "$CACHE/devices.pem")}" >"$CACHE/generation.json"
fi
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"generation\",\"generation\":$(cat "$CACHE/generation.json")}"
cat "$CACHE/generation.json"
PKI="$CACHE/pki"
mkdir -p "$WORK/keys-rs256"
CLIENT_ARGS=(--ca "$PKI/ca.pem" --devices "$CACHE/devices.pem" --server-name localhost)
ONE_DEVICE=(--ca "$PKI/ca.pem" --cert "$PKI/device.pem" --key "$PKI/device-key.pem" --server-name localhost)
metric() { "$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_PORT/metrics" "token_broker_verified_chain_cache_$1_total"; }

# --- 1. one pass over every device, fresh broker (the default verified_chain_cache).
PASS=${PASS:-$COUNT}
log "one pass: $PASS of $COUNT devices, random order, new connections (TLS 1.3)"
start_broker broker-pass "$PKI/keys"
"$LOADGEN" "${ONE_DEVICE[@]}" --addr "127.0.0.1:$BROKER_PORT" --mode new-conn --concurrency 8 --duration 0.3 >/dev/null
sleep 1
rss0=$(rss_kb "$BROKER_PID")
misses0=$(metric misses) hits0=$(metric hits)
start=0 part=0
while ((start < PASS)); do
    part=$((part + 1))
    measure "pass-$part" "{\"kind\":\"pass\",\"part\":$part}" "$BROKER_PID" --addr "127.0.0.1:$BROKER_PORT" \
        --mode new-conn --concurrency "$CONC" --duration "$PASS_DUR" --device-seed 1 --device-start "$start"
    start=$("$PY" "$LIB" get "$RESULTS" "pass-$part" loadgen.devices.next)
done
sleep 1
rss1=$(rss_kb "$BROKER_PID")
misses=$(($(metric misses) - misses0)) hits=$(($(metric hits) - hits0))
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"pass-memory\",\"rss_before_kb\":$rss0,\"rss_after_kb\":$rss1,\"connections\":$start,\"cache_misses\":$misses,\"cache_hits\":$hits,\"bytes_per_device\":$(((rss1 - rss0) * 1024 / (misses > 0 ? misses : 1)))}"
echo "  RSS $((rss0 / 1024)) -> $((rss1 / 1024)) MiB over $misses chains validated and cached ($hits hits): $(((rss1 - rss0) * 1024 / (misses > 0 ? misses : 1))) B per device"
stop_broker broker-pass

# --- 2. paired rounds: every connection a device the broker has not seen, vs the floor.
log "paired rounds: broker (devices not seen before) vs floor, $ROUNDS x ${PAIR_DUR}s"
start_floor floor
start_broker broker-distinct "$PKI/keys"
"$LOADGEN" "${ONE_DEVICE[@]}" --addr "127.0.0.1:$BROKER_PORT" --mode new-conn --concurrency 8 --duration 0.3 >/dev/null
"$LOADGEN" "${ONE_DEVICE[@]}" --addr "127.0.0.1:$FLOOR_PORT" --mode new-conn --concurrency 8 --duration 0.3 >/dev/null
misses0=$(metric misses) hits0=$(metric hits)
broker_start=0 floor_start=0
for round in $(seq 1 "$ROUNDS"); do
    for tls in 1.3 1.2; do
        flag=()
        [[ $tls == 1.2 ]] && flag=(--tls12)
        pair="distinct-newconn-tls$tls"
        measure "$pair-floor-$round" "{\"kind\":\"pair\",\"pair\":\"$pair\",\"side\":\"floor\",\"round\":$round}" "$FLOOR_PID" \
            --addr "127.0.0.1:$FLOOR_PORT" --mode new-conn --concurrency "$CONC" --duration "$PAIR_DUR" \
            --device-seed 2 --device-start "$floor_start" "${flag[@]+"${flag[@]}"}"
        floor_start=$("$PY" "$LIB" get "$RESULTS" "$pair-floor-$round" loadgen.devices.next)
        measure "$pair-broker-$round" "{\"kind\":\"pair\",\"pair\":\"$pair\",\"side\":\"broker-distinct\",\"round\":$round}" "$BROKER_PID" \
            --addr "127.0.0.1:$BROKER_PORT" --mode new-conn --concurrency "$CONC" --duration "$PAIR_DUR" \
            --device-seed 3 --device-start "$broker_start" "${flag[@]+"${flag[@]}"}"
        broker_start=$("$PY" "$LIB" get "$RESULTS" "$pair-broker-$round" loadgen.devices.next)
    done
done
misses=$(($(metric misses) - misses0)) hits=$(($(metric hits) - hits0))
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"pairs-cache\",\"cache_misses\":$misses,\"cache_hits\":$hits,\"broker_connections\":$broker_start}"
echo "  broker: $misses chains validated, $hits cache hits (devices used: $broker_start of $COUNT)"
stop_broker broker-distinct
stop_pid "$FLOOR_PID" TERM

"$PY" "$LIB" add "$RESULTS" "{\"name\":\"end\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
mkdir -p "$OUT"
cp "$RESULTS" "$OUT/results.jsonl"
"$PY" - "$RESULTS" <<'PYEOF' | tee "$OUT/pass.md"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
passes = [r for r in recs if r.get("kind") == "pass"]
ok = sum(r["loadgen"]["ok"] for r in passes)
errors = sum(r["loadgen"]["errors"] for r in passes)
cpu = sum(r["server_cpu_s"] for r in passes)
elapsed = sum(r["loadgen"]["elapsed_s"] for r in passes)
mem = next(r for r in recs if r["name"] == "pass-memory")
print("| devices | tokens | errors | tokens/s | server CPU µs/token | p50 ms (per part) | p99 ms (per part) | RSS growth per device (B) |")
print("|--:|--:|--:|--:|--:|---|---|--:|")
p50 = ", ".join("%.2f" % r["loadgen"]["latency_ms"]["p50"] for r in passes)
p99 = ", ".join("%.2f" % r["loadgen"]["latency_ms"]["p99"] for r in passes)
print(f"| {mem['connections']:,} | {ok:,} | {errors} | {ok / elapsed:,.0f} | {cpu / max(ok, 1) * 1e6:.1f} | "
      f"{p50} | {p99} | {mem['bytes_per_device']:,} |")
PYEOF
"$PY" "$LIB" pairs "$RESULTS" floor "$OUT/pairs.md"
echo "results: $OUT/results.jsonl, $OUT/pass.md, $OUT/pairs.md"
