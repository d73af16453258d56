# Shared by bench/run.sh and bench/profile.sh (sourced; expects ROOT, BUILD, KEEP to be set).
# Processes started here are remembered in PIDS and stopped by pid on any exit.

LIB="$ROOT/bench/lib.py"
# The interpreter itself, not a version-manager shim (pyenv's costs ~0.1 s per call).
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }
PY=$(python3 -c 'import sys; print(sys.executable)')

log() { printf '\n== [%3ds] %s\n' "$SECONDS" "$*"; }
die() {
    printf 'bench: %s\n' "$*" >&2
    exit 1
}

# --- build: the broker binary and the load generator, release profile.
bench_build() {
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
    BIN="$CARGO_TARGET_DIR/release/token-broker"
    LOADGEN="$CARGO_TARGET_DIR/release/examples/loadgen"
    FLOOR="$CARGO_TARGET_DIR/release/examples/floor"
    if [[ $BUILD == 1 ]]; then
        log "cargo build --release --locked --example loadgen --example floor --bin token-broker"
        (cd "$ROOT" && cargo build --release --locked --example loadgen --example floor --bin token-broker)
    fi
    [[ -x $BIN && -x $LOADGEN && -x $FLOOR ]] || die "missing $BIN, $LOADGEN or $FLOOR (build first)"
}

# --- work folder and cleanup on any exit (also INT/TERM): stop what we started, by pid.
PIDS=()
bench_workdir() { # bench_workdir PREFIX
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
bench_cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 || $rc != 0 ]]; then
        echo "bench: work folder kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}
stop_pid() { # stop_pid PID [SIGNAL]
    kill "-${2:-TERM}" "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

HZ=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of the given pids (all threads), in clock ticks
    local total=0 pid f
    for pid in "$@"; do
        read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
rss_kb() { # VmRSS sum of the given pids
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")))
    done
    echo "$total"
}
children() { cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -v '^$' || true; }

# --- PKI: the broker's dev PKI (P-256 CA, server and device certificates, empty CRL, ES256
# signing key) and an RSA-2048 signing key in a second key_dir for RS256.
bench_pki() {
    PKI="$WORK/pki"
    "$BIN" init --dir "$PKI" >/dev/null
    mkdir -p "$WORK/keys-rs256"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
        -out "$WORK/keys-rs256/signing-rsa.pem" 2>/dev/null
    CLIENT_ARGS=(--ca "$PKI/ca.pem" --cert "$PKI/device.pem" --key "$PKI/device-key.pem"
        --server-name localhost)
}

# --- broker
BROKER_PID=""
BROKER_PORT=""
ADMIN_PORT=""
BROKER_WRAP=()          # e.g. (valgrind --tool=callgrind ...) to run the broker under a tool
BROKER_READY_SECONDS=30
BROKER_RULE_FLOWS='["mtls-client-credentials"]'
BROKER_RULE_EXTRA=""    # more keys for the client rule (e.g. scopes)
BROKER_EXTRA_CONFIG=""  # more tables (e.g. [google])
start_broker() { # start_broker NAME KEY_DIR [ENV=VALUE...]
    local name=$1 key_dir=$2
    shift 2
    read -r BROKER_PORT ADMIN_PORT < <("$PY" "$LIB" free-ports 2)
    local config="$WORK/$name.toml"
    cat >"$config" <<EOF
# Benchmark config: like the shipped config.toml, without [dev]. Idle connections are
# kept for an hour (the production default request_header_timeout, 10s, closes them) and
# up to 20000 connections are accepted.
[server]
listen = "127.0.0.1:$BROKER_PORT"
cert = "$PKI/server.pem"
key = "$PKI/server-key.pem"
client_ca = "$PKI/ca.pem"
crls = ["${BROKER_CRL:-$PKI/ca.crl.pem}"]
tls_versions = ["1.2", "1.3"]
handshake_timeout = "10s"
request_header_timeout = "1h"
max_connections = 20000
shutdown_grace = "1s"
${BROKER_SERVER_EXTRA:-}

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[issuer]
url = "https://localhost:$BROKER_PORT"
token_ttl = "5m"
default_audience = "token-broker-dev"

[signer]
kind = "local"
key_dir = "$key_dir"

[[clients]]
name = "dev-devices"
match = { spiffe = ["spiffe://dev.token-broker.local/device/*"] }
audiences = ["token-broker-dev"]
flows = $BROKER_RULE_FLOWS
claims = { environment = "benchmark" }
$BROKER_RULE_EXTRA

$BROKER_EXTRA_CONFIG
EOF
    env "$@" "${BROKER_WRAP[@]+"${BROKER_WRAP[@]}"}" "$BIN" --log-format json -c "$config" serve \
        2>"$WORK/$name.log" &
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    "$PY" "$LIB" wait-http "http://127.0.0.1:$ADMIN_PORT/readyz" "$BROKER_READY_SECONDS" ||
        {
            tail -20 "$WORK/$name.log" >&2
            die "broker $name did not become ready"
        }
    echo "broker $name: pid $BROKER_PID, https://127.0.0.1:$BROKER_PORT, admin $ADMIN_PORT"
}
stop_broker() { # stop_broker NAME
    local errors
    stop_pid "$BROKER_PID" TERM
    errors=$(grep -c '"level":"ERROR"' "$WORK/$1.log" || true)
    [[ $errors == 0 ]] || echo "bench: $errors ERROR lines in $WORK/$1.log" >&2
}
issued() { "$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_PORT/metrics" token_broker_tokens_issued_total; }
handshakes_ok() {
    "$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_PORT/metrics" 'token_broker_tls_handshakes_total{result="ok"}'
}

# --- one measured load run (expects RESULTS, CLIENT_ARGS, LOADGEN)
# Whole-machine busy and steal ticks (/proc/stat): with the server's and the load
# generator's own CPU they show how much else ran during a measurement (a noisy neighbour,
# another build) and how much the hypervisor took.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4, $9; exit}' /proc/stat; }

# measure NAME TAGS_JSON "PIDS" LOADGEN_ARGS... : one loadgen run, server CPU around it.
measure() {
    local name=$1 tags=$2 pids=$3 out before after busy0 steal0 busy1 steal1 t0
    shift 3
    t0=${EPOCHREALTIME/./}
    read -r busy0 steal0 < <(machine_ticks)
    # shellcheck disable=SC2086 # pids is a list
    before=$(cpu_ticks $pids)
    out=$("$LOADGEN" "${CLIENT_ARGS[@]}" --label "$name" "$@") || die "loadgen failed: $name"
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    read -r busy1 steal1 < <(machine_ticks)
    printf '%s\n' "$out" | "$PY" "$LIB" record "$RESULTS" "$name" "$tags" "$before" "$after" "$HZ" \
        "{\"machine_busy_ticks\": $((busy1 - busy0)), \"steal_ticks\": $((steal1 - steal0)), \"window_s\": $((${EPOCHREALTIME/./} - t0))e-6}"
}

# --- the floor server (examples/floor.rs): rustls' own verifier with the broker's CA bundle
# and CRLs, the same certificate, provider and TLS versions; hyper answers 200 "ok".
FLOOR_PID=""
FLOOR_PORT=""
start_floor() { # start_floor NAME [FLOOR_ARGS...]
    local name=$1
    shift
    read -r FLOOR_PORT < <("$PY" "$LIB" free-ports 1)
    "$FLOOR" --listen "127.0.0.1:$FLOOR_PORT" --cert "$PKI/server.pem" --key "$PKI/server-key.pem" \
        --client-ca "$PKI/ca.pem" --crl "$PKI/ca.crl.pem" --tls-versions 1.2,1.3 "$@" \
        2>"$WORK/$name.log" &
    FLOOR_PID=$!
    PIDS+=("$FLOOR_PID")
    "$PY" "$LIB" wait-tcp "127.0.0.1:$FLOOR_PORT" 10
    echo "floor $name: pid $FLOOR_PID, https://127.0.0.1:$FLOOR_PORT"
}
