#!/usr/bin/env bash
# A/B comparison of two broker builds: server CPU per token, measured in alternating rounds
# (A, B, A, B, ...) so that the machine's drift hits both sides alike. Use it to decide
# whether a change pays before running the full bench/run.sh.
#
#   bench/ab.sh BIN_A BIN_B [ROUNDS] [SECONDS]     (defaults: 5 rounds of 3 s per side)
#
# Both brokers run the bench/run.sh config (ES256, log level info, JSON audit lines) on the
# same PKI. Prints, per path (keep-alive and new connection, TLS 1.3 and 1.2), the median
# CPU µs per token of each side, and the median of the per-round ratios B/A.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $# -ge 2 ]] || { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
BIN_A=$(realpath "$1") BIN_B=$(realpath "$2") ROUNDS=${3:-5} DUR=${4:-3}
BUILD=0 KEEP=0
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOADGEN="$CARGO_TARGET_DIR/release/examples/loadgen"
[[ -x $LOADGEN ]] || (cd "$ROOT" && cargo build --release --locked --example loadgen)

bench_workdir token-broker-ab
BIN=$BIN_A bench_pki
BIN=$BIN_A start_broker a "$PKI/keys"
PID_A=$BROKER_PID PORT_A=$BROKER_PORT
BIN=$BIN_B start_broker b "$PKI/keys"
PID_B=$BROKER_PID PORT_B=$BROKER_PORT

RESULTS="$WORK/ab.tsv"
one() { # one SIDE PID PORT PATH [FLAGS...]: appends "path side µs/token"
    local side=$1 pid=$2 port=$3 path=$4 before after out
    shift 4
    before=$(cpu_ticks "$pid")
    out=$("$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$port" --mode "$path" \
        --concurrency 32 --duration "$DUR" "$@")
    after=$(cpu_ticks "$pid")
    "$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); t=(int(sys.argv[3])-int(sys.argv[2]))*1e6/int(sys.argv[4]); print(sys.argv[5], sys.argv[6], t/max(r["ok"],1), r["ok"]/r["duration_s"] if "duration_s" in r else 0, sep="\t")' \
        "$out" "$before" "$after" "$HZ" "$path${*:+ $*}" "$side" >>"$RESULTS"
}
for flags in "" "--tls12"; do
    # shellcheck disable=SC2086 # flags is one optional word
    for i in 1 2; do one warm "$PID_A" "$PORT_A" keep-alive $flags; one warm "$PID_B" "$PORT_B" keep-alive $flags; done
done
for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS"
    for path in keep-alive new-conn; do
        for flags in "" "--tls12"; do
            # shellcheck disable=SC2086
            one A "$PID_A" "$PORT_A" "$path" $flags
            # shellcheck disable=SC2086
            one B "$PID_B" "$PORT_B" "$path" $flags
        done
    done
done
"$PY" - "$RESULTS" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
sides = defaultdict(lambda: defaultdict(list))
for path, side, us, _ in rows:
    if side != "warm":
        sides[path][side].append(float(us))
print(f"{'path':<26} {'A µs/token':>11} {'B µs/token':>11} {'B/A (per-round median)':>24}")
for path, s in sides.items():
    ratios = [b / a for a, b in zip(s["A"], s["B"])]
    print(f"{path:<26} {statistics.median(s['A']):>11.1f} {statistics.median(s['B']):>11.1f} "
          f"{statistics.median(ratios):>10.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
EOF
