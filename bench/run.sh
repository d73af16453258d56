#!/usr/bin/env bash
# token-broker benchmark: builds release, creates a dev PKI, starts the broker (ES256 and
# RS256 signing keys) and nginx (mTLS reference), drives both with examples/loadgen.rs, runs
# `openssl speed`, and prints a table and the ratios against the targets. See BENCHMARKS.md.
#
#   bench/run.sh            full run (~8 minutes on 2 cores)
#   bench/run.sh --quick    tiny durations and connection counts (CI smoke test, < 1 minute)
#
# Options: --no-build (use the binaries already in $CARGO_TARGET_DIR/release),
#          --keep (keep the work folder with logs), --out DIR (default bench/out/latest),
#          --duration S (seconds per load run, default 10; quick 0.3).
# Needs: cargo, python3, openssl; nginx (installed with apt-get when missing and possible).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
BUILD=1
KEEP=0
OUT="$ROOT/bench/out/latest"
DURATION=""

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [[ $QUICK == 1 ]]; then
    DUR=${DURATION:-0.3}     # seconds per load run
    WARMUP=0.2
    CONC=16                  # concurrent workers/connections
    IDLE_COUNTS=(100 200)    # idle connections held (cumulative)
    SPEED_SECONDS=1
    SETTLE=0.2               # pause before reading RSS
    LOW_RATE_KEEPALIVE=200   # fixed low rates for the latency runs (req/s)
    LOW_RATE_NEWCONN=50
    PAIR_ROUNDS=1            # alternating rounds per paired comparison, seconds per side
    PAIR_DUR=0.2
    MODE_NAME=quick
else
    DUR=${DURATION:-10}
    WARMUP=1
    CONC=32
    IDLE_COUNTS=(1000 10000)
    SPEED_SECONDS=2
    SETTLE=1
    LOW_RATE_KEEPALIVE=1000
    LOW_RATE_NEWCONN=200
    PAIR_ROUNDS=5
    PAIR_DUR=2
    MODE_NAME=full
fi
IDLE_MAX=${IDLE_COUNTS[-1]}

# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

tools=(openssl)
[[ $BUILD == 1 ]] && tools+=(cargo)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

fit_fds

find_nginx

# --- build, work folder (cleanup on exit)
bench_build
bench_workdir token-broker-bench
RESULTS="$WORK/results.jsonl"

# --- machine
log "machine"
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
"$PY" "$LIB" add "$RESULTS" "$("$PY" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    name machine nproc "$(nproc)" cpu_model "$CPU_MODEL" kernel "$(uname -r)" \
    mem "$(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)" \
    mode "$MODE_NAME" date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)" \
    openssl "$(openssl version)" nginx "$("$NGINX" -v 2>&1)" rustc "$(rustc --version 2>/dev/null || echo ?)" \
    commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo +uncommitted)")"
echo "$(nproc) CPUs, $CPU_MODEL, kernel $(uname -r); work folder $WORK; duration ${DUR}s per run"

# --- PKI: the broker's dev PKI (P-256 everywhere, ES256 signing key) plus an RSA-2048 key dir
log "PKI"
bench_pki
ls "$PKI" "$PKI/keys" | tr '\n' ' '; echo

# matrix SERVER ALG LOG PORT "PIDS": new-connection and keep-alive paths, TLS 1.3 and 1.2,
# each at maximum throughput and then at a fixed 50% of that maximum.
matrix() {
    local server=$1 alg=$2 loglevel=$3 port=$4 pids=$5 tls path flag name rate tags before_issued after_issued
    for tls in 1.3 1.2; do
        flag=()
        [[ $tls == 1.2 ]] && flag=(--tls12)
        for path in new-conn keep-alive; do
            name="$server-$alg-tls$tls-$path"
            [[ $loglevel == info || $server == nginx ]] || name="$name-log$loglevel"
            tags=$(printf '{"server":"%s","alg":%s,"tls":"%s","path":"%s","log":"%s"}' "$server" \
                "$([[ $alg == - ]] && echo null || echo "\"$alg\"")" "$tls" "$path" \
                "$([[ $server == nginx ]] && echo - || echo "$loglevel")")
            [[ $server == broker ]] && before_issued=$(issued)
            measure "$name" "${tags%\}},\"kind\":\"max\"}" "$pids" --addr "127.0.0.1:$port" \
                "${flag[@]+"${flag[@]}"}" --mode "$path" --concurrency "$CONC" --duration "$DUR"
            if [[ $server == broker ]]; then
                after_issued=$(issued)
                echo "    server counted $((after_issued - before_issued)) tokens issued"
            fi
            rate=$("$PY" "$LIB" half-rate "$RESULTS" "$name")
            measure "$name-rate" "${tags%\}},\"kind\":\"rate\"}" "$pids" --addr "127.0.0.1:$port" \
                "${flag[@]+"${flag[@]}"}" --mode "$path" --concurrency "$CONC" --duration "$DUR" --rate "$rate"
        done
    done
}

# low_rate SERVER ALG LOG PORT "PIDS": latency at fixed low rates (TLS 1.3), far from
# saturation, so that queueing on the shared 2 cores does not dominate the tail.
low_rate() {
    local server=$1 alg=$2 loglevel=$3 port=$4 pids=$5 path rate tags
    for path in keep-alive new-conn; do
        rate=$LOW_RATE_KEEPALIVE
        [[ $path == new-conn ]] && rate=$LOW_RATE_NEWCONN
        tags=$(printf '{"server":"%s","alg":%s,"tls":"1.3","path":"%s","log":"%s","kind":"low"}' "$server" \
            "$([[ $alg == - ]] && echo null || echo "\"$alg\"")" "$path" "$loglevel")
        measure "$server-$alg-tls1.3-$path-at-$rate" "$tags" "$pids" --addr "127.0.0.1:$port" \
            --mode "$path" --concurrency "$CONC" --duration "$DUR" --rate "$rate"
    done
}

warmup() { # warmup PORT
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$1" --mode new-conn --concurrency 8 --duration "$WARMUP" >/dev/null
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$1" --mode keep-alive --concurrency 8 --duration "$WARMUP" >/dev/null
}

log "broker, ES256 signing key, default log level (info: one audit line per token)"
start_broker broker-es256 "$PKI/keys"
warmup "$BROKER_PORT"
matrix broker ES256 info "$BROKER_PORT" "$BROKER_PID"
low_rate broker ES256 info "$BROKER_PORT" "$BROKER_PID"
# The post-quantum hybrid key exchange, as clients that prefer it offer it (the matrix uses
# X25519, which is what nginx on OpenSSL 3.0 negotiates; it cannot do the hybrid).
tags='{"server":"broker","alg":"ES256","tls":"1.3","path":"new-conn","log":"info","kx":"X25519MLKEM768","kind":"max"}'
measure broker-ES256-tls1.3-new-conn-pqkx "$tags" "$BROKER_PID" --addr "127.0.0.1:$BROKER_PORT" \
    --kx x25519mlkem768 --mode new-conn --concurrency "$CONC" --duration "$DUR"
stop_broker broker-es256

log "broker, RS256 signing key (RSA-2048)"
start_broker broker-rs256 "$WORK/keys-rs256"
warmup "$BROKER_PORT"
matrix broker RS256 info "$BROKER_PORT" "$BROKER_PID"
stop_broker broker-rs256

# --- Google cache-hit path: the sts-exchange flow answered from the broker's token cache.
# A minimal fake STS (bench/fake_sts.py, plain HTTP on loopback) answers the first exchange;
# every measured request is a cache hit (checked with the cache metrics and the fake's count).
log "broker, Google sts-exchange flow served from the token cache (fake STS behind the first miss)"
start_google_broker broker-google "$PKI/keys"
# The first request misses (one exchange at the fake STS); the rest hit.
"$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$BROKER_PORT" --body "$GOOGLE_BODY" --mode keep-alive \
    --concurrency 1 --duration "$WARMUP" >/dev/null
hits0=$(cache_metric hits)
misses0=$(cache_metric misses)
tags='{"server":"broker","alg":"ES256","tls":"1.3","path":"keep-alive","log":"info","flow":"sts-exchange cache hit"'
measure broker-google-cache-hit "$tags,\"kind\":\"max\"}" "$BROKER_PID" --addr "127.0.0.1:$BROKER_PORT" \
    --body "$GOOGLE_BODY" --mode keep-alive --concurrency "$CONC" --duration "$DUR"
rate=$("$PY" "$LIB" half-rate "$RESULTS" broker-google-cache-hit)
measure broker-google-cache-hit-rate "$tags,\"kind\":\"rate\"}" "$BROKER_PID" --addr "127.0.0.1:$BROKER_PORT" \
    --body "$GOOGLE_BODY" --mode keep-alive --concurrency "$CONC" --duration "$DUR" --rate "$rate"
measure "broker-google-cache-hit-at-$LOW_RATE_KEEPALIVE" "$tags,\"kind\":\"low\"}" "$BROKER_PID" \
    --addr "127.0.0.1:$BROKER_PORT" --body "$GOOGLE_BODY" --mode keep-alive --concurrency "$CONC" \
    --duration "$DUR" --rate "$LOW_RATE_KEEPALIVE"
hits=$(($(cache_metric hits) - hits0))
misses=$(($(cache_metric misses) - misses0))
exchanges=$("$PY" -c "import json, urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:$STS_PORT/count'))['count'])")
echo "    cache hits $hits, misses $misses during the runs; fake STS exchanges in all: $exchanges"
[[ $misses == 0 ]] || echo "bench: $misses cache misses during the cache-hit runs" >&2
stop_broker broker-google
stop_pid "$STS_PID" TERM

# --- nginx: same server certificate, CA bundle and CRL; static 200 for POST /token.
log "nginx reference (mTLS, static 200)"
start_nginx "$IDLE_MAX"
warmup "$NGINX_PORT"
matrix nginx - - "$NGINX_PORT" "$NGINX_PIDS"
low_rate nginx - - "$NGINX_PORT" "$NGINX_PIDS"

# --- Paired comparisons. This machine's speed drifts by 10-30% over minutes (shared host),
# which moves every absolute figure; a ratio is only trustworthy when its two sides are
# measured alternately, round after round. Pairs: broker vs nginx per new connection
# (TLS 1.3 and 1.2), and the broker at log level info vs warn (the audit line's cost).
log "paired rounds: broker (ES256) vs nginx, and TOKEN_BROKER_LOG=info vs warn, alternating"
start_broker broker-paired-info "$PKI/keys"
INFO_PID=$BROKER_PID
INFO_PORT=$BROKER_PORT
warmup "$INFO_PORT"
start_broker broker-paired-warn "$PKI/keys" TOKEN_BROKER_LOG=warn
WARN_PID=$BROKER_PID
WARN_PORT=$BROKER_PORT
warmup "$WARN_PORT"
# The load generator presents one device certificate, so after its first request every
# chain is a verified-chain cache hit; this broker validates every chain, as for devices
# it has not seen since its last reload.
BROKER_SERVER_EXTRA="verified_chain_cache = 0" start_broker broker-paired-validate "$PKI/keys"
VALIDATE_PID=$BROKER_PID
VALIDATE_PORT=$BROKER_PORT
warmup "$VALIDATE_PORT"
pair_round() { # pair_round PAIR ROUND SIDE PORT "PIDS" PATH [LOADGEN_ARGS...]
    local pair=$1 round=$2 side=$3 port=$4 pids=$5 path=$6
    shift 6
    measure "pair-$pair-$side-$round" \
        "{\"kind\":\"pair\",\"pair\":\"$pair\",\"side\":\"$side\",\"round\":$round}" "$pids" \
        --addr "127.0.0.1:$port" --mode "$path" --concurrency "$CONC" --duration "$PAIR_DUR" "$@"
}
for round in $(seq 1 "$PAIR_ROUNDS"); do
    pair_round newconn-tls1.3 "$round" broker "$INFO_PORT" "$INFO_PID" new-conn
    pair_round newconn-tls1.3 "$round" nginx "$NGINX_PORT" "$NGINX_PIDS" new-conn
    pair_round newconn-tls1.2 "$round" broker "$INFO_PORT" "$INFO_PID" new-conn --tls12
    pair_round newconn-tls1.2 "$round" nginx "$NGINX_PORT" "$NGINX_PIDS" new-conn --tls12
    pair_round newconn-validated-tls1.3 "$round" broker "$VALIDATE_PORT" "$VALIDATE_PID" new-conn
    pair_round newconn-validated-tls1.3 "$round" nginx "$NGINX_PORT" "$NGINX_PIDS" new-conn
    pair_round newconn-validated-tls1.2 "$round" broker "$VALIDATE_PORT" "$VALIDATE_PID" new-conn --tls12
    pair_round newconn-validated-tls1.2 "$round" nginx "$NGINX_PORT" "$NGINX_PIDS" new-conn --tls12
    pair_round logging-keep-alive "$round" info "$INFO_PORT" "$INFO_PID" keep-alive
    pair_round logging-keep-alive "$round" warn "$WARN_PORT" "$WARN_PID" keep-alive
    pair_round logging-new-conn "$round" info "$INFO_PORT" "$INFO_PID" new-conn
    pair_round logging-new-conn "$round" warn "$WARN_PORT" "$WARN_PID" new-conn
done
BROKER_PID=$INFO_PID
stop_broker broker-paired-info
BROKER_PID=$WARN_PID
stop_broker broker-paired-warn
BROKER_PID=$VALIDATE_PID
stop_broker broker-paired-validate

# --- memory: RSS idle, then with IDLE_COUNTS idle mTLS connections held (cumulative).
log "memory: nginx with ${IDLE_COUNTS[*]} idle mTLS connections"
memory_run nginx nginx "$NGINX_PORT" "$NGINX_PIDS" 0 "${IDLE_COUNTS[@]}"
stop_pid "$NGINX_PID" TERM

log "memory: fresh broker with ${IDLE_COUNTS[*]} idle mTLS connections"
start_broker broker-memory "$PKI/keys"
memory_run broker broker "$BROKER_PORT" "$BROKER_PID" 0 "${IDLE_COUNTS[@]}"
stop_broker broker-memory
log "memory: fresh broker, ${IDLE_COUNTS[0]} connections that each fetched one token"
start_broker broker-memory-req "$PKI/keys"
memory_run broker-after-request broker "$BROKER_PORT" "$BROKER_PID" 1 "${IDLE_COUNTS[0]}"
stop_broker broker-memory-req

# --- openssl speed: the signing floors, one core.
log "openssl speed -seconds $SPEED_SECONDS ecdsap256 rsa2048"
openssl speed -seconds "$SPEED_SECONDS" ecdsap256 rsa2048 >"$WORK/speed.txt" 2>/dev/null
"$PY" "$LIB" speed "$RESULTS" "$WORK/speed.txt"

# --- a huge CRL: the quick form of bench/crl.sh (10k entries, two reloads under load); the
# full one (up to 1M entries) runs on its own.
if [[ $QUICK == 1 ]]; then
    log "bash bench/crl.sh --quick"
    crl_options=(--quick --out "$OUT/crl")
    [[ $BUILD == 1 ]] || crl_options+=(--no-build)
    bash "$ROOT/bench/crl.sh" "${crl_options[@]}"
fi

# --- report
log "report"
"$PY" "$LIB" add "$RESULTS" "{\"name\":\"end\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
mkdir -p "$OUT"
cp "$RESULTS" "$OUT/results.jsonl"
"$PY" "$LIB" report "$RESULTS" "$OUT/report.md"
echo
echo "results: $OUT/results.jsonl, $OUT/report.md"

# --- scale smoke tests: the quick forms of bench/conns.sh and bench/latency.sh (their full
# runs take minutes each and are run on their own; see BENCHMARKS.md, "Scale").
if [[ $QUICK == 1 ]]; then
    log "scale smoke tests: conns.sh --quick, latency.sh --quick"
    bash "$ROOT/bench/conns.sh" --quick --no-build --out "$OUT/conns"
    bash "$ROOT/bench/latency.sh" --quick --no-build --out "$OUT/latency"
fi
