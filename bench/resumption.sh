#!/usr/bin/env bash
# A returning device's new connection, resumed vs full handshake, across two replicas that
# share one session ticket key file (server.session_ticket_keys).
#
#   bench/resumption.sh [--quick] [--rounds N] [--seconds S] [--out FILE]
#
# Two brokers (the bench/run.sh config plus the key file) serve one device certificate. Each
# round measures, side after side, new connections alternating between the two replicas
# (loadgen --mode new-conn --addr A --addr2 B): "full" without a session store (every
# handshake full), "resumed" with one per worker (loadgen --resume: each connection resumes the
# ticket of the worker's previous one, from the other replica). Server CPU is both brokers'
# utime+stime; per token = CPU / tokens. The floor server's (examples/floor.rs) and, with nginx installed, nginx's full
# handshakes are measured in the same rounds. Then the device side between runs: rounds of
# `token` processes (200; --quick: 20), each a full handshake (`--session-file`, which
# resumed them, was removed with the patched rustls it needed: BENCHMARKS.md (h)).
# Prints one JSON line per run (raw data) and a summary of the per-round ratios.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=5 DUR=3 OUT="" QUICK=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --quick) QUICK=1 ROUNDS=2 DUR=2 ;;
    --rounds) ROUNDS=$2; shift ;;
    --seconds) DUR=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
    shift
done
BUILD=${BUILD:-0} KEEP=${KEEP:-0}
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
bench_build
bench_workdir token-broker-resumption
bench_pki
"$BIN" rotate-ticket-keys "$WORK/ticket-keys" >/dev/null
export BROKER_SERVER_EXTRA="session_ticket_keys = \"$WORK/ticket-keys\""
start_broker a "$PKI/keys"
PID_A=$BROKER_PID PORT_A=$BROKER_PORT ADMIN_A=$ADMIN_PORT
start_broker b "$PKI/keys"
PID_B=$BROKER_PID PORT_B=$BROKER_PORT ADMIN_B=$ADMIN_PORT
resumed_count() {
    local a b
    a=$("$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_A/metrics" token_broker_tls_resumed_handshakes_total)
    b=$("$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_B/metrics" token_broker_tls_resumed_handshakes_total)
    "$PY" -c 'import sys; print(int(float(sys.argv[1]) + float(sys.argv[2])))' "$a" "$b"
}

# The references, started as bench/run.sh starts them (common.sh): nginx when it is
# installed, and the floor server (examples/floor.rs).
NGINX_PORT="" NGINX_PIDS=""
NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
[[ -z $NGINX ]] || start_nginx 4096
start_floor floor

RAW="$WORK/resumption.jsonl"
run() { # run ROUND SIDE "PIDS" LOADGEN_ARGS...: one JSON line with server CPU per token
    local round=$1 side=$2 pids=$3 before after resumed0 resumed1 out
    shift 3
    resumed0=$(resumed_count)
    # shellcheck disable=SC2086 # pids is a list
    before=$(cpu_ticks $pids)
    out=$("$LOADGEN" "${CLIENT_ARGS[@]}" --mode new-conn --concurrency 32 --duration "$DUR" "$@")
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    resumed1=$(resumed_count)
    "$PY" -c '
import json, sys
r = json.loads(sys.argv[1])
ticks = int(sys.argv[4]) - int(sys.argv[3])
r.update(round=int(sys.argv[2]), side=sys.argv[7], server_cpu_s=ticks / int(sys.argv[5]),
         server_us_per_token=ticks * 1e6 / int(sys.argv[5]) / max(r["ok"], 1),
         broker_resumed_handshakes=int(sys.argv[8]) - int(sys.argv[6]), load=open("/proc/loadavg").read().split()[:3])
print(json.dumps(r))' "$out" "$round" "$before" "$after" "$HZ" "$resumed0" "$side" "$resumed1" | tee -a "$RAW"
}
BROKERS=(--addr "127.0.0.1:$PORT_A" --addr2 "127.0.0.1:$PORT_B")
log "warm-up"
run 0 warm "$PID_A $PID_B" "${BROKERS[@]}" >/dev/null
run 0 warm "$PID_A $PID_B" "${BROKERS[@]}" --resume >/dev/null
VERSIONS=("" "--tls12")
[[ $QUICK == 1 ]] && VERSIONS=("")
for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS (uptime: $(uptime | sed 's/.*load/load/'))"
    for flags in "${VERSIONS[@]}"; do
        # shellcheck disable=SC2086 # flags is one optional word
        {
            run "$round" "full$flags" "$PID_A $PID_B" "${BROKERS[@]}" $flags
            run "$round" "resumed$flags" "$PID_A $PID_B" "${BROKERS[@]}" --resume $flags
            [[ -z $NGINX_PORT ]] || run "$round" "nginx$flags" "$NGINX_PIDS" --addr "127.0.0.1:$NGINX_PORT" $flags
            [[ -z $FLOOR_PORT ]] || run "$round" "floor$flags" "$FLOOR_PID" --addr "127.0.0.1:$FLOOR_PORT" $flags
        } >/dev/null
    done
done
[[ -z $OUT ]] || cp "$RAW" "$OUT"
"$PY" - "$RAW" <<'EOF'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = defaultdict(dict)
for r in rows:
    if r["side"] != "warm":
        by[r["round"]][r["side"]] = r
sides = sorted({s for r in by.values() for s in r})
print(f"{'side':<16} {'server µs/token':>16} {'tokens/s':>9} {'resumed':>8} {'errors':>7}")
for side in sides:
    rs = [by[k][side] for k in by if side in by[k]]
    us = statistics.median(r["server_us_per_token"] for r in rs)
    rps = statistics.median(r["rps"] for r in rs)
    resumed = sum(r["resumed_handshakes"] for r in rs) / max(sum(r["connections_opened"] for r in rs), 1)
    print(f"{side:<16} {us:>16.1f} {rps:>9.0f} {resumed:>8.3f} {sum(r['errors'] for r in rs):>7}")
for v in ("", "--tls12"):
    for ref in ("full", "nginx", "floor"):
        pairs = [(by[k]["resumed" + v], by[k][ref + v]) for k in by if "resumed" + v in by[k] and ref + v in by[k]]
        if pairs:
            ratios = [a["server_us_per_token"] / b["server_us_per_token"] for a, b in pairs]
            print(f"resumed{v} / {ref}{v}: median {statistics.median(ratios):.3f} "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} rounds)")
EOF
# The device side between runs: `token`, a new process per token as Google's executable
# source starts it, alternating replicas; each run is a full handshake (nothing kept between
# runs). Broker CPU (both replicas) per run.
TOKEN_RUNS=$([[ $QUICK == 1 ]] && echo 20 || echo 200)
token_side() { # token_side ROUND SIDE [TOKEN_ARGS...]
    local round=$1 side=$2 before after resumed0 i port
    shift 2
    resumed0=$(resumed_count)
    before=$(cpu_ticks "$PID_A" "$PID_B")
    for i in $(seq 1 "$TOKEN_RUNS"); do
        port=$((i % 2 == 0 ? PORT_A : PORT_B))
        "$BIN" token --url "https://localhost:$port" --ca "$PKI/ca.pem" --cert "$PKI/device.pem" \
            --key "$PKI/device-key.pem" "$@" >/dev/null || die "token run failed ($side)"
    done
    after=$(cpu_ticks "$PID_A" "$PID_B")
    "$PY" -c 'import json, sys; a = sys.argv; print(json.dumps({"round": int(a[1]), "side": a[2], "runs": int(a[3]),
        "broker_us_per_run": (int(a[5]) - int(a[4])) * 1e6 / int(a[6]) / int(a[3]),
        "broker_resumed_handshakes": int(a[7]) - int(a[8]), "load": open("/proc/loadavg").read().split()[:3]}))' \
        "$round" "$side" "$TOKEN_RUNS" "$before" "$after" "$HZ" "$(resumed_count)" "$resumed0" | tee -a "$WORK/token.jsonl"
}
log "token runs: $TOKEN_RUNS per round"
token_side 0 warm >/dev/null
for round in $(seq 1 "$ROUNDS"); do
    token_side "$round" token-full >/dev/null
done
[[ -z $OUT ]] || cat "$WORK/token.jsonl" >>"$OUT"
"$PY" - "$WORK/token.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    if r["side"] != "warm":
        by.setdefault(r["round"], {})[r["side"]] = r
rs = [v["token-full"] for v in by.values() if "token-full" in v]
print(f"{'token-full':<20} broker µs per run (median) {statistics.median(r['broker_us_per_run'] for r in rs):8.1f}"
      f"  resumed {sum(r['broker_resumed_handshakes'] for r in rs)}/{sum(r['runs'] for r in rs)}")
EOF
for name in a b; do
    BROKER_PID=$([[ $name == a ]] && echo "$PID_A" || echo "$PID_B")
    stop_broker "$name"
done
