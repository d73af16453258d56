#!/usr/bin/env bash
# Where does the broker's CPU go? Profiles the broker (ES256, TLS 1.3, default log level)
# during a keep-alive run and a new-connection run, and prints a summary by cost centre
# (handshake ECDH/ECDSA, client signature check, chain + CRL verification, JWT signing, JSON,
# audit logging, allocation, kernel) plus the top functions. See BENCHMARKS.md.
#
#   bench/profile.sh [--tool auto|perf|callgrind|both] [--duration S] [--no-build] [--keep] [--out DIR]
#
# auto: `perf record` when `perf stat -e instructions true` works (hardware counters), else
# valgrind --tool=callgrind on a short run. perf samples with the cpu-clock software event
# and DWARF call graphs, so it also works in VMs without a PMU; callgrind counts instructions
# (no kernel, and its virtual CPU hides SHA-NI/AVX-512, so crypto costs differ a little).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL=auto
DURATION=""
BUILD=1
KEEP=0
OUT="$ROOT/bench/out/profile"
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --tool) TOOL=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

perf_counters_work() {
    command -v perf >/dev/null || return 1
    local out
    out=$(perf stat -e instructions true 2>&1) || return 1
    ! grep -qE 'not supported|not counted|<not' <<<"$out"
}
if [[ $TOOL == auto ]]; then
    if perf_counters_work; then TOOL=perf; else TOOL=callgrind; fi
    echo "profile: perf stat -e instructions $(perf_counters_work && echo works || echo 'does not work') -> $TOOL"
fi
case $TOOL in
    perf | callgrind | both) ;;
    *) die "--tool must be auto, perf, callgrind or both" ;;
esac
if [[ $TOOL == perf || $TOOL == both ]]; then
    command -v perf >/dev/null || die "perf is missing (Debian: apt-get install linux-perf)"
fi
if [[ $TOOL == callgrind || $TOOL == both ]]; then
    command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"
fi

bench_build
bench_workdir token-broker-profile
bench_pki
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

run_load() { # run_load PATH SECONDS CONCURRENCY
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$BROKER_PORT" --mode "$1" --duration "$2" \
        --concurrency "$3" --timeout 60
}

if [[ $TOOL == perf || $TOOL == both ]]; then
    D=${DURATION:-8}
    log "perf: broker ES256, TLS 1.3, $D s per path at maximum load"
    start_broker profile-perf "$PKI/keys"
    run_load keep-alive 1 8 >/dev/null
    run_load new-conn 1 8 >/dev/null
    for path in keep-alive new-conn; do
        data="$WORK/perf-$path.data"
        perf record -q -F 999 -e cpu-clock --call-graph dwarf,16384 -o "$data" -p "$BROKER_PID" \
            -- sleep "$D" 2>"$WORK/perf-$path.err" &
        perf_pid=$!
        PIDS+=("$perf_pid")
        sleep 0.3
        before=$(cpu_ticks "$BROKER_PID")
        run_load "$path" "$("$PY" -c "print($D - 0.6)")" 32 >"$WORK/load-$path.json"
        after=$(cpu_ticks "$BROKER_PID")
        wait "$perf_pid" || true
        forget_pid "$perf_pid"
        "$PY" "$LIB" perf-summary "$data" "$path" "$WORK/load-$path.json" "$OUT/perf-$path.txt" \
            "$("$PY" -c "print(($after - $before) / $HZ)")"
    done
    stop_broker profile-perf
fi

if [[ $TOOL == callgrind || $TOOL == both ]]; then
    D=${DURATION:-15}
    log "callgrind: broker ES256, TLS 1.3, $D s per path (4 workers; ~50x slower than native)"
    BROKER_WRAP=(valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out.%p")
    BROKER_READY_SECONDS=180
    start_broker profile-callgrind "$PKI/keys"
    run_load keep-alive 2 4 >/dev/null
    run_load new-conn 2 4 >/dev/null
    for path in keep-alive new-conn; do
        callgrind_control --zero "$BROKER_PID" >/dev/null
        run_load "$path" "$D" 4 >"$WORK/load-$path.json"
        callgrind_control --dump="$path" "$BROKER_PID" >/dev/null
        sleep 0.5
        dump=$(grep -l "^desc: Trigger: dump $path" "$WORK"/callgrind.out.* | head -1)
        [[ -n $dump ]] || die "no callgrind dump for $path"
        cp "$dump" "$OUT/callgrind.out.$path"
        "$PY" "$LIB" callgrind-summary "$OUT/callgrind.out.$path" "$path" "$WORK/load-$path.json" \
            "$OUT/callgrind-$path.txt"
    done
    stop_broker profile-callgrind
    BROKER_WRAP=()
fi
echo
echo "profiles: $OUT"
