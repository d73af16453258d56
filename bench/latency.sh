#!/usr/bin/env bash
# Latency measured fairly: the load generator pinned to CPU 0 (one runtime thread), the
# broker to CPU 1 (`taskset`), so the client does not queue behind the server on the same
# core. Per round: the maximum rate (closed loop), then p50/p99/p99.9 at 25%, 50% and 75% of
# that round's maximum, for keep-alive token requests (mtls-client-credentials, ES256) and
# the cache-hit Google path (sts-exchange answered from the broker's token cache; the fake
# STS, bench/fake_sts.py, answers the first miss only), and as the reference the floor
# (examples/floor.rs, one runtime thread on the server's core) at the token path's rates:
# what tail the machine itself gives at those rates. The paths alternate within each round;
# the report's last column is the time the hypervisor gave our vCPUs to others. See
# BENCHMARKS.md, "Scale: connections and latency".
#
#   bench/latency.sh            2 rounds, 4 s maximum runs, 6 s fixed-rate runs (~3 minutes)
#   bench/latency.sh --quick    1 round of 0.3 s runs (smoke test)
#
# Options: --no-build, --keep, --out DIR (default bench/out/latency), --rounds N.
# Needs: 2 CPUs or more, taskset (util-linux).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
BUILD=1
KEEP=0
OUT="$ROOT/bench/out/latency"
ROUNDS=""
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    MAX_DUR=0.3
    RATE_DUR=0.3
else
    ROUNDS=${ROUNDS:-2}
    MAX_DUR=4
    RATE_DUR=6
fi
CONC=16 # connections of the load generator
FRACTIONS=(0.25 0.5 0.75)
# The floor runs at the token path's rates: the same request rate on the same pinned cores,
# with less work per request than either broker path.
PATHS="token google floor"
LOADGEN_CPUS=0
SERVER_CPUS=1

# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
command -v taskset >/dev/null || die "taskset is required (apt-get install util-linux)"
(($(nproc) >= 2)) || die "needs 2 CPUs to pin the load generator and the server apart"
bench_build
bench_workdir token-broker-latency
RESULTS="$WORK/results.jsonl"
bench_pki
"$PY" "$LIB" add "$RESULTS" "$("$PY" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    name machine nproc "$(nproc)" kernel "$(uname -r)" date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)" loadgen_cpus "taskset -c $LOADGEN_CPUS, 1 thread" \
    server_cpus "taskset -c $SERVER_CPUS" \
    commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo +uncommitted)")"

BROKER_WRAP=(taskset -c "$SERVER_CPUS")
LOADGEN_WRAP=(taskset -c "$LOADGEN_CPUS")
start_broker broker-pinned "$PKI/keys"
TOKEN_PID=$BROKER_PID
TOKEN_PORT=$BROKER_PORT
start_google_broker broker-pinned-google "$PKI/keys"
GOOGLE_PID=$BROKER_PID
GOOGLE_PORT=$BROKER_PORT
# The fake STS answers the Google broker's first miss; keep it off the server's CPU.
taskset -p -c "$LOADGEN_CPUS" "$STS_PID" >/dev/null
# The reference: our own TLS stack answering a static 200 on the same pinned core. Whatever
# tail it shows at a rate belongs to the machine, not to the broker.
FLOOR_WRAP=(taskset -c "$SERVER_CPUS")
start_floor floor-pinned --threads 1
# Warm up; the Google path's first request is the one cache miss.
"$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$TOKEN_PORT" --mode keep-alive --concurrency 4 --duration 0.5 >/dev/null
"$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$GOOGLE_PORT" --body "$GOOGLE_BODY" --mode keep-alive \
    --concurrency 4 --duration 0.5 >/dev/null
misses0=$(cache_metric misses)

# pinned PATH ROUND FRACTION [LOADGEN_ARGS...]: one run of PATH (token | google).
pinned() {
    local path=$1 round=$2 fraction=$3 port=$TOKEN_PORT pid=$TOKEN_PID body=()
    shift 3
    if [[ $path == google ]]; then
        port=$GOOGLE_PORT
        pid=$GOOGLE_PID
        body=(--body "$GOOGLE_BODY")
    elif [[ $path == floor ]]; then
        port=$FLOOR_PORT
        pid=$FLOOR_PID
    fi
    measure "pinned-$path-$round-$fraction" \
        "{\"kind\":\"pinned\",\"path\":\"$path\",\"round\":$round,\"fraction\":$fraction}" "$pid" \
        --addr "127.0.0.1:$port" --threads 1 --mode keep-alive --concurrency "$CONC" \
        "${body[@]+"${body[@]}"}" "$@"
}

for round in $(seq 1 "$ROUNDS"); do
    log "round $round: maximum, then ${FRACTIONS[*]} of it (token, google and the floor alternating)"
    for path in $PATHS; do
        pinned "$path" "$round" 1 --duration "$MAX_DUR"
    done
    for fraction in "${FRACTIONS[@]}"; do
        for path in $PATHS; do
            of=$path
            [[ $path == floor ]] && of=token
            rate=$("$PY" "$LIB" rate-at "$RESULTS" "pinned-$of-$round-1" "$fraction")
            pinned "$path" "$round" "$fraction" --duration "$RATE_DUR" --rate "$rate"
        done
    done
done
misses=$(($(cache_metric misses) - misses0))
echo "    google path: $misses cache misses during the measured runs"
[[ $misses == 0 ]] || echo "bench: $misses cache misses during the cache-hit runs" >&2
BROKER_PID=$TOKEN_PID
stop_broker broker-pinned
BROKER_PID=$GOOGLE_PID
stop_broker broker-pinned-google

"$PY" "$LIB" add "$RESULTS" "{\"name\":\"end\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"google_cache_misses\":$misses}"
mkdir -p "$OUT"
stamp=$(date -u +%Y-%m-%dT%H%MZ)
cp "$RESULTS" "$OUT/latency-$stamp.jsonl"
"$PY" "$LIB" latency-report "$RESULTS" | tee "$OUT/latency-$stamp.md"
echo "results: $OUT/latency-$stamp.jsonl"
