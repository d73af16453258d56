#!/usr/bin/env bash
# Many idle mTLS connections: RSS per connection of nginx and of the broker in the same run,
# and the latency of an active client (keep-alive tokens at a fixed rate) while they are
# held. Uses run.sh's memory measurement (bench/common.sh memory_run). See BENCHMARKS.md,
# "Scale: connections and latency".
#
#   bench/conns.sh            50,000 idle connections per server (capped to the fd limit)
#   bench/conns.sh --quick    300 connections, short active runs (smoke test, < 1 minute)
#
# Options: --no-build, --keep, --out DIR (default bench/out/conns), --connections N,
#          --compare BIN (also measure this other broker binary, e.g. the build before a
#          change, in the same run: paired before/after).
# Needs: the fd hard limit above N + 2000 (root with CAP_SYS_RESOURCE raises it), nginx.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
BUILD=1
KEEP=0
OUT="$ROOT/bench/out/conns"
TOTAL=""
COMPARE=""
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        --connections) TOTAL=$2; shift ;;
        --compare) COMPARE=$(realpath "$2"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [[ $QUICK == 1 ]]; then
    TOTAL=${TOTAL:-300}
    STEP=150
    SETTLE=0.2
    ACTIVE=(--concurrency 2 --duration 0.5 --rate 200)
else
    TOTAL=${TOTAL:-50000}
    STEP=10000 # connections per load generator process (each holds that many fds)
    SETTLE=2
    ACTIVE=(--concurrency 4 --duration 5 --rate 1000)
fi
IDLE_COUNTS=()
for ((n = STEP; n < TOTAL; n += STEP)); do IDLE_COUNTS+=("$n"); done
IDLE_COUNTS+=("$TOTAL")
IDLE_MAX=$TOTAL

# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
fit_fds
# Capped counts may repeat: keep each once.
mapfile -t IDLE_COUNTS < <(printf '%s\n' "${IDLE_COUNTS[@]}" | sort -nu)
# An ephemeral port range of about 28,000 ports per source address: one more loopback
# source address per 20,000 connections.
SOURCE_IPS=$((IDLE_MAX / 20000 + 1))
BROKER_MAX_CONNECTIONS=$((IDLE_MAX + 1000))
ACTIVE_ARGS=("${ACTIVE[@]}")
find_nginx
bench_build
bench_workdir token-broker-conns
RESULTS="$WORK/results.jsonl"
bench_pki

"$PY" "$LIB" add "$RESULTS" "$("$PY" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    name machine nproc "$(nproc)" kernel "$(uname -r)" date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)" fd_limit "$(ulimit -n)" requested "$TOTAL" \
    held "$IDLE_MAX" source_ips "$SOURCE_IPS" active "${ACTIVE[*]}" nginx "$("$NGINX" -v 2>&1)" \
    commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo +uncommitted)")"
echo "idle connections: ${IDLE_COUNTS[*]} (requested $TOTAL, fd limit $(ulimit -n)), $SOURCE_IPS source addresses"

log "nginx with ${IDLE_COUNTS[*]} idle mTLS connections"
start_nginx "$IDLE_MAX"
"$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$NGINX_PORT" --mode keep-alive --concurrency 4 --duration 0.3 >/dev/null
memory_run nginx nginx "$NGINX_PORT" "$NGINX_PIDS" 0 "${IDLE_COUNTS[@]}"
stop_pid "$NGINX_PID" TERM

if [[ -n $COMPARE ]]; then
    log "broker $COMPARE (compared) with ${IDLE_COUNTS[*]} idle mTLS connections"
    CURRENT_BIN=$BIN
    BIN=$COMPARE
    start_broker broker-compared "$PKI/keys"
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$BROKER_PORT" --mode keep-alive --concurrency 4 --duration 0.3 >/dev/null
    memory_run broker-compared broker "$BROKER_PORT" "$BROKER_PID" 0 "${IDLE_COUNTS[@]}"
    stop_broker broker-compared
    BIN=$CURRENT_BIN
fi

log "broker with ${IDLE_COUNTS[*]} idle mTLS connections"
start_broker broker-conns "$PKI/keys"
"$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$BROKER_PORT" --mode keep-alive --concurrency 4 --duration 0.3 >/dev/null
memory_run broker broker "$BROKER_PORT" "$BROKER_PID" 0 "${IDLE_COUNTS[@]}"
stop_broker broker-conns

"$PY" "$LIB" add "$RESULTS" "{\"name\":\"end\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
mkdir -p "$OUT"
stamp=$(date -u +%Y-%m-%dT%H%MZ)
cp "$RESULTS" "$OUT/conns-$stamp.jsonl"
"$PY" "$LIB" conns-report "$RESULTS" | tee "$OUT/conns-$stamp.md"
echo "results: $OUT/conns-$stamp.jsonl"
