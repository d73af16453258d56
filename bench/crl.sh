#!/usr/bin/env bash
# A huge CRL (issue 16): load time, memory held and revocation cost per request for CRLs of
# 10k, 100k and 1M revoked serials, then reloads of the largest under load, then downloads
# of it under load (the broker fetching it itself, [[server.crl_sources]]). See
# BENCHMARKS.md, "Scale: a huge CRL".
#
#   bench/crl.sh            10k, 100k, 1M entries; 5 reloads of the 1M CRL under load;
#                           3 rounds of 30 s of downloads of it under load
#   bench/crl.sh --quick    10k entries only, 2 reloads, short runs (smoke test, ~30 s built)
#
# Options: --no-build, --keep (keep the work folder), --out DIR (default bench/out/crl),
#          --before BIN (a crl_scale built from an older commit: its load runs alternate
#          with this build's, round after round, for a paired comparison),
#          --before-broker BIN (a token-broker built from an older commit: its download
#          rounds alternate with this build's),
#          --reload-only, --fetch-only (only the reloads, or only the downloads, under load).
# Generated CRLs are cached in $CARGO_TARGET_DIR/bench-crl/ (1M entries: ~46 MB, ~1 min).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
BUILD=1
KEEP=0
OUT="$ROOT/bench/out/crl"
BEFORE=""
BEFORE_BROKER=""
PARTS=all
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        --before) BEFORE=$2; shift ;;
        --before-broker) BEFORE_BROKER=$2; shift ;;
        --reload-only) PARTS=reload ;;
        --fetch-only) PARTS=fetch ;;
        -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
source "$ROOT/bench/common.sh"

if [[ $QUICK == 1 ]]; then
    COUNTS=(10000) ROUNDS=1 RELOADS=2 RELOAD_GAP=1 FETCH_ROUNDS=1 FETCH_SECONDS=6
else
    COUNTS=(10000 100000 1000000) ROUNDS=3 RELOADS=5 RELOAD_GAP=4 FETCH_ROUNDS=3 FETCH_SECONDS=30
fi
# Downloads: the broker asks every 2 s; the served CRL changes every FETCH_GAP s.
FETCH_GAP=3 FETCH_RATE=200
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

if [[ $PARTS == all ]]; then
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

PKI="$CACHE/pki"
CLIENT_ARGS=(--ca "$PKI/ca.pem" --cert "$PKI/device.pem" --key "$PKI/device-key.pem"
    --server-name localhost)

if [[ $PARTS != fetch ]]; then
log "reload of the $RELOAD_COUNT-entry CRL under load ($RELOADS times)"
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
errors=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["errors"])' "$OUT/reload.json")
[[ $errors == 0 ]] || die "$errors requests failed during the reloads"
fi

if [[ $PARTS != reload ]]; then
log "downloads of the $RELOAD_COUNT-entry CRL under load ($FETCH_ROUNDS rounds of $FETCH_SECONDS s${BEFORE_BROKER:+, alternating with $BEFORE_BROKER})"
# The broker downloads the CRL of its CA from a local HTTP server every 2 s, while the
# served file alternates between two versions every FETCH_GAP s: each change is downloaded,
# checked (parsed: about a second at 1M entries) and kept, or refused as older than the kept
# one; a kept one is then loaded by a reload. Meanwhile an open-loop client asks for tokens
# at FETCH_RATE/s, every request validating its chain: its tail latency shows whether the
# download's work stalls the workers that serve tokens.
SERVED="$WORK/served"
mkdir -p "$SERVED"
serve_version() { cp "$CACHE/crl-$RELOAD_COUNT-v$1.crl" "$SERVED/next" && mv "$SERVED/next" "$SERVED/crl"; }
serve_version 1
read -r HTTP_PORT < <("$PY" "$LIB" free-ports 1)
(cd "$SERVED" && exec "$PY" -m http.server --bind 127.0.0.1 "$HTTP_PORT") >"$WORK/http.log" 2>&1 &
PIDS+=("$!")
"$PY" "$LIB" wait-tcp "127.0.0.1:$HTTP_PORT" 10
fetch_round() { # fetch_round SIDE ROUND BIN
    local side=$1 round=$2 name="fetch-$1-$2" loadgen i
    serve_version 1
    rm -rf "$WORK/crl-cache"
    BIN=$3 BROKER_SERVER_EXTRA="verified_chain_cache = 0
crl_cache_dir = \"$WORK/crl-cache\"
crl_sources = [{ url = \"http://127.0.0.1:$HTTP_PORT/crl\", refresh = \"2s\", timeout = \"30s\", max_bytes = 134217728 }]" \
        BROKER_READY_SECONDS=120 start_broker "$name" "$PKI/keys"
    "$LOADGEN" --addr "127.0.0.1:$BROKER_PORT" "${CLIENT_ARGS[@]}" --mode new-conn \
        --concurrency 8 --rate "$FETCH_RATE" --duration "$FETCH_SECONDS" >"$WORK/$name.json" &
    loadgen=$!
    PIDS+=("$loadgen")
    for i in $(seq $((FETCH_SECONDS / FETCH_GAP - 1))); do
        sleep "$FETCH_GAP"
        serve_version $((i % 2 + 1))
    done
    wait "$loadgen" || true
    forget_pid "$loadgen"
    local metrics="http://127.0.0.1:$ADMIN_PORT/metrics" result counts=()
    for result in updated older not_modified; do
        counts+=("$("$PY" "$LIB" metric "$metrics" "token_broker_crl_fetches_total{result=\"$result\"}" || echo 0)")
    done
    counts+=("$("$PY" "$LIB" metric "$metrics" 'token_broker_config_reloads_total{result="ok"}' || echo 0)")
    stop_broker "$name"
    "$PY" - "$WORK/$name.json" "$side" "$round" "${counts[@]}" <<'EOF' | tee -a "$OUT/fetch.jsonl"
import json, sys
run = json.load(open(sys.argv[1]))
updated, older, not_modified, reloads = (float(v) for v in sys.argv[4:8])
print(json.dumps({
    "side": sys.argv[2], "round": int(sys.argv[3]),
    "requests": run["requests"], "errors": run["errors"], "error_kinds": run["error_kinds"],
    "late_starts": run["late_starts"], "latency_ms": run["latency_ms"],
    "fetches_updated": updated, "fetches_older": older, "fetches_not_modified": not_modified,
    "reloads_ok": reloads,
}))
EOF
}
: >"$OUT/fetch.jsonl"
for round in $(seq "$FETCH_ROUNDS"); do
    [[ -z $BEFORE_BROKER ]] || fetch_round before "$round" "$BEFORE_BROKER"
    fetch_round after "$round" "$BIN"
done
"$PY" - "$OUT/fetch.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("side    round  requests errors  p50 ms  p99 ms  p99.9 ms  max ms  kept/older/304  reloads")
for r in rows:
    l = r["latency_ms"]
    print(f'{r["side"]:<7} {r["round"]:>5} {r["requests"]:>9} {r["errors"]:>6} {l["p50"]:>7.2f} {l["p99"]:>7.2f}'
          f' {l["p999"]:>9.2f} {l["max"]:>7.2f}  {r["fetches_updated"]:.0f}/{r["fetches_older"]:.0f}/{r["fetches_not_modified"]:.0f}'
          f'       {r["reloads_ok"]:.0f}')
EOF
errors=$("$PY" -c 'import json,sys; print(sum(json.loads(l)["errors"] for l in open(sys.argv[1]) if json.loads(l)["side"] == "after"))' "$OUT/fetch.jsonl")
[[ $errors == 0 ]] || die "$errors requests failed during the downloads"
fi
uptime | tee "$OUT/uptime-end.txt"
log "done: $OUT"
