#!/usr/bin/env bash
# A huge CRL (issue 16): load time, memory held and revocation cost per request for CRLs of
# 10k, 100k and 1M revoked serials, then reloads of the largest under load. See BENCHMARKS.md,
# "Scale: a huge CRL".
#
#   bench/crl.sh            10k, 100k, 1M entries; 5 reloads of the 1M CRL under load
#   bench/crl.sh --quick    10k entries only, 2 reloads, short runs (smoke test, ~20 s built)
#
# Options: --no-build, --keep (keep the work folder), --out DIR (default bench/out/crl),
#          --before BIN (a crl_scale built from an older commit: its load runs alternate
#          with this build's, round after round, for a paired comparison),
#          --reload-only (only the reloads under load).
# Generated CRLs are cached in $CARGO_TARGET_DIR/bench-crl/ (1M entries: ~46 MB, ~1 min).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
BUILD=1
KEEP=0
OUT="$ROOT/bench/out/crl"
BEFORE=""
RELOAD_ONLY=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        --before) BEFORE=$2; shift ;;
        --reload-only) RELOAD_ONLY=1 ;;
        -h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
source "$ROOT/bench/common.sh"

if [[ $QUICK == 1 ]]; then
    COUNTS=(10000) ROUNDS=1 RELOADS=2 RELOAD_GAP=1
else
    COUNTS=(10000 100000 1000000) ROUNDS=3 RELOADS=5 RELOAD_GAP=4
fi
RELOAD_COUNT=${COUNTS[-1]}

bench_build
SCALE="$CARGO_TARGET_DIR/release/examples/crl_scale"
if [[ $BUILD == 1 ]]; then
    log "cargo build --release --locked --example crl_scale"
    (cd "$ROOT" && cargo build --release --locked --example crl_scale)
fi
[[ -x $SCALE ]] || die "missing $SCALE (build first)"
bench_workdir crl-bench
mkdir -p "$OUT"
CACHE="$CARGO_TARGET_DIR/bench-crl"

log "generating CRLs (cached in $CACHE)"
for count in "${COUNTS[@]}"; do
    "$SCALE" gen --dir "$CACHE" --count "$count"
done
"$SCALE" gen --dir "$CACHE" --count "$RELOAD_COUNT" --version 2 >/dev/null
uptime | tee "$OUT/uptime-start.txt"

if [[ $RELOAD_ONLY == 0 ]]; then
log "load: time, RSS held, verify cost against an empty CRL (paired rounds in-process)"
: >"$OUT/load.jsonl"
for count in "${COUNTS[@]}"; do
    for round in $(seq "$ROUNDS"); do
        # Each load in a fresh process: RSS before/after is that process's.
        if [[ -n $BEFORE ]]; then
            "$BEFORE" load --dir "$CACHE" --count "$count" |
                sed 's/^{/{"side":"before","round":'"$round"',/' | tee -a "$OUT/load.jsonl"
        fi
        "$SCALE" load --dir "$CACHE" --count "$count" |
            sed 's/^{/{"side":"after","round":'"$round"',/' | tee -a "$OUT/load.jsonl"
    done
done

log "lookup: revocation lookups alone, random order, half hits"
: >"$OUT/lookup.jsonl"
for count in "${COUNTS[@]}"; do
    "$SCALE" lookup --dir "$CACHE" --count "$count" | tee -a "$OUT/lookup.jsonl"
done

fi

log "reload of the $RELOAD_COUNT-entry CRL under load ($RELOADS times)"
PKI="$CACHE/pki"
CLIENT_ARGS=(--ca "$PKI/ca.pem" --cert "$PKI/device.pem" --key "$PKI/device-key.pem"
    --server-name localhost)
cp "$(dirname "$PKI")/crl-$RELOAD_COUNT-v1.crl" "$WORK/live.crl"
# Every new connection validates its chain (no verified-chain cache), so every request
# checks revocation against whichever CRL is loaded at that moment.
BROKER_CRL="$WORK/live.crl" BROKER_SERVER_EXTRA='verified_chain_cache = 0
reload_interval = "1s"' BROKER_READY_SECONDS=120 start_broker crl "$PKI/keys"
rss_start=$(rss_kb "$BROKER_PID")
LOAD_SECONDS=$((RELOADS * RELOAD_GAP + RELOAD_GAP + 6))
"$LOADGEN" --addr "127.0.0.1:$BROKER_PORT" "${CLIENT_ARGS[@]}" --mode new-conn \
    --concurrency 8 --duration "$LOAD_SECONDS" >"$WORK/loadgen.json" &
LOADGEN_PID=$!
PIDS+=("$LOADGEN_PID")
sleep 2
: >"$OUT/reload-rss.txt"
for i in $(seq "$RELOADS"); do
    version=$((i % 2 + 1))
    cp "$(dirname "$PKI")/crl-$RELOAD_COUNT-v$version.crl" "$WORK/next.crl"
    mv "$WORK/next.crl" "$WORK/live.crl"
    sleep "$RELOAD_GAP"
    echo "after reload $i (v$version): VmRSS $(rss_kb "$BROKER_PID") KiB" | tee -a "$OUT/reload-rss.txt"
done
wait "$LOADGEN_PID" || true
forget_pid "$LOADGEN_PID"
rss_end=$(rss_kb "$BROKER_PID")
reloads=$("$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_PORT/metrics" 'token_broker_config_reloads_total{result="ok"}' || echo 0)
failed=$("$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_PORT/metrics" 'token_broker_config_reloads_total{result="error"}' || echo 0)
stop_broker crl
cp "$WORK/loadgen.json" "$OUT/reload-loadgen.json"
grep -E 'reloading configuration|configuration reloaded|reload failed' "$WORK/crl.log" >"$OUT/reload-log.jsonl" || true
"$PY" - "$WORK/loadgen.json" "$rss_start" "$rss_end" "$reloads" "$failed" "$RELOADS" <<'EOF' | tee "$OUT/reload.json"
import json, sys
run = json.load(open(sys.argv[1]))
print(json.dumps({
    "requests": run["requests"], "errors": run["errors"], "error_kinds": run["error_kinds"],
    "reloads_ok": float(sys.argv[4]), "reloads_failed": float(sys.argv[5]),
    "crl_swaps": int(sys.argv[6]),
    "rss_start_kib": int(sys.argv[2]), "rss_end_kib": int(sys.argv[3]),
}))
EOF
uptime | tee "$OUT/uptime-end.txt"
errors=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["errors"])' "$OUT/reload.json")
[[ $errors == 0 ]] || die "$errors requests failed during the reloads"
log "done: $OUT"
