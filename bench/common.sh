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
# up to ${BROKER_MAX_CONNECTIONS:-20000} connections are accepted.
[server]
listen = "127.0.0.1:$BROKER_PORT"
cert = "$PKI/server.pem"
key = "$PKI/server-key.pem"
client_ca = "$PKI/ca.pem"
crls = ["${BROKER_CRL:-$PKI/ca.crl.pem}"]
tls_versions = ["1.2", "1.3"]
handshake_timeout = "10s"
request_header_timeout = "1h"
max_connections = ${BROKER_MAX_CONNECTIONS:-20000}
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

# --- Google path: start_google_broker NAME KEY_DIR starts the fake STS (bench/fake_sts.py,
# plain HTTP on loopback; STS_PID, STS_PORT) and a broker whose client rule also allows the
# sts-exchange flow; GOOGLE_BODY is a token request for that flow.
start_google_broker() {
    read -r STS_PORT < <("$PY" "$LIB" free-ports 1)
    "$PY" "$ROOT/bench/fake_sts.py" "$STS_PORT" &
    STS_PID=$!
    PIDS+=("$STS_PID")
    "$PY" "$LIB" wait-tcp "127.0.0.1:$STS_PORT" 10
    local scope=https://www.googleapis.com/auth/cloud-platform
    BROKER_RULE_FLOWS='["mtls-client-credentials", "sts-exchange"]'
    BROKER_RULE_EXTRA="scopes = [\"$scope\"]"
    BROKER_EXTRA_CONFIG="[google]
project_number = \"123456789012\"
pool_id = \"devices\"
provider_id = \"token-broker\"
sts_url = \"http://127.0.0.1:$STS_PORT\""
    start_broker "$@"
    BROKER_RULE_FLOWS='["mtls-client-credentials"]'
    BROKER_RULE_EXTRA=""
    BROKER_EXTRA_CONFIG=""
    GOOGLE_BODY="grant_type=client_credentials&scope=$("$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$scope")"
}
cache_metric() { "$PY" "$LIB" metric "http://127.0.0.1:$ADMIN_PORT/metrics" "token_broker_token_cache_$1_total"; }

# --- measurements
# Whole-machine busy and steal ticks (/proc/stat): with the server's and the load
# generator's own CPU they show how much else ran during a measurement (a noisy neighbour,
# another build) and how much the hypervisor took.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4, $9; exit}' /proc/stat; }

# measure NAME TAGS_JSON "PIDS" LOADGEN_ARGS... : one loadgen run (under LOADGEN_WRAP, e.g.
# `taskset -c 0`), server CPU around it; the record goes to RESULTS.
LOADGEN_WRAP=()
measure() {
    local name=$1 tags=$2 pids=$3 out before after busy0 steal0 busy1 steal1 t0
    shift 3
    t0=${EPOCHREALTIME/./}
    read -r busy0 steal0 < <(machine_ticks)
    # shellcheck disable=SC2086 # pids is a list
    before=$(cpu_ticks $pids)
    out=$(${LOADGEN_WRAP[@]+"${LOADGEN_WRAP[@]}"} "$LOADGEN" "${CLIENT_ARGS[@]}" --label "$name" "$@") || die "loadgen failed: $name"
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
FLOOR_WRAP=()          # as BROKER_WRAP: e.g. (taskset -c 1) or (valgrind --tool=callgrind ...)
FLOOR_READY_SECONDS=10
start_floor() { # start_floor NAME [FLOOR_ARGS...]
    local name=$1
    shift
    read -r FLOOR_PORT < <("$PY" "$LIB" free-ports 1)
    "${FLOOR_WRAP[@]+"${FLOOR_WRAP[@]}"}" "$FLOOR" --listen "127.0.0.1:$FLOOR_PORT" --cert "$PKI/server.pem" --key "$PKI/server-key.pem" \
        --client-ca "$PKI/ca.pem" --crl "$PKI/ca.crl.pem" --tls-versions 1.2,1.3 "$@" \
        2>"$WORK/$name.log" &
    FLOOR_PID=$!
    PIDS+=("$FLOOR_PID")
    "$PY" "$LIB" wait-tcp "127.0.0.1:$FLOOR_PORT" "$FLOOR_READY_SECONDS"
    echo "floor $name: pid $FLOOR_PID, https://127.0.0.1:$FLOOR_PORT"
}

# --- file descriptors: the broker, nginx and each load generator hold up to IDLE_MAX; without
# the right to raise the hard limit (CAP_SYS_RESOURCE), IDLE_COUNTS are capped to what fits.
fit_fds() {
    local want_fds=$((IDLE_MAX + 2000)) hard fit i
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited && $hard -lt $want_fds ]]; then
        ulimit -Hn "$want_fds" 2>/dev/null || true
        hard=$(ulimit -Hn)
    fi
    if [[ $hard == unlimited || $hard -ge $want_fds ]]; then
        ulimit -n "$want_fds"
    else
        ulimit -n "$hard"
        fit=$((hard - 1000))
        echo "bench: file descriptor limit $hard < $want_fds; idle connections capped at $fit" >&2
        for i in "${!IDLE_COUNTS[@]}"; do
            ((IDLE_COUNTS[i] > fit)) && IDLE_COUNTS[i]=$fit
        done
        IDLE_MAX=${IDLE_COUNTS[-1]}
    fi
}

# --- nginx (reference): Debian package, installed when missing.
find_nginx() {
    NGINX=$(command -v nginx || true)
    [[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
    if [[ -z $NGINX ]]; then
        if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
            log "installing nginx (apt-get)"
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
            NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            log "installing nginx (sudo apt-get)"
            sudo -n apt-get update -qq >/dev/null
            sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
            NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        else
            die "nginx is missing and cannot be installed here (apt-get install nginx)"
        fi
    fi
    [[ -x $NGINX ]] || die "nginx not found after installation"
}

# start_nginx MAX_CONNECTIONS [WRAP...]: same server certificate, CA bundle and CRL as the
# broker; static 200 for POST /token. Sets NGINX_PID, NGINX_PORT and NGINX_PIDS (master and
# workers, summed for CPU and RSS). WRAP, e.g. `taskset -c 1`, runs nginx under a tool.
start_nginx() {
    local max=$1 workers
    shift
    NGINX_DIR="$WORK/nginx"
    mkdir -p "$NGINX_DIR/tmp"
    read -r NGINX_PORT < <("$PY" "$LIB" free-ports 1)
    cat >"$NGINX_DIR/nginx.conf" <<NGINXCONF
worker_processes $(nproc);
worker_rlimit_nofile $(ulimit -n);
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events { worker_connections $((max + 1000)); }
http {
    access_log off;
    client_body_temp_path $NGINX_DIR/tmp/body;
    proxy_temp_path $NGINX_DIR/tmp/proxy;
    fastcgi_temp_path $NGINX_DIR/tmp/fastcgi;
    uwsgi_temp_path $NGINX_DIR/tmp/uwsgi;
    scgi_temp_path $NGINX_DIR/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 3600s;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        server_name localhost;
        ssl_certificate $PKI/server.pem;
        ssl_certificate_key $PKI/server-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client on;
        ssl_client_certificate $PKI/ca.pem;
        ssl_crl $PKI/ca.crl.pem;
        location = /token { return 200 "ok"; }
        location / { return 404; }
    }
}
NGINXCONF
    "$NGINX" -t -q -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" -e "$NGINX_DIR/error.log"
    "$@" "$NGINX" -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" -e "$NGINX_DIR/error.log" \
        -g 'daemon off;' &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    "$PY" "$LIB" wait-tcp "127.0.0.1:$NGINX_PORT" 10
    for _ in $(seq 1 100); do
        (($(children "$NGINX_PID" | wc -l) >= $(nproc))) && break
        sleep 0.05
    done
    workers=$(children "$NGINX_PID" | tr '\n' ' ')
    [[ -n $workers ]] || die "no nginx worker process"
    NGINX_PIDS="$NGINX_PID $workers"
    echo "nginx: master $NGINX_PID, processes $NGINX_PIDS, https://127.0.0.1:$NGINX_PORT ($("$NGINX" -v 2>&1))"
}

# --- memory: RSS idle, then with COUNTS idle mTLS connections held (cumulative, one load
# generator per step, connections spread over SOURCE_IPS loopback addresses). With
# ACTIVE_ARGS set (loadgen arguments, e.g. a fixed keep-alive rate), an active client's
# latency is measured before the first step and at each step while the connections are held.
# memory_run NAME SERVER PORT "PIDS" IDLE_REQUEST(0|1) COUNTS...
SOURCE_IPS=${SOURCE_IPS:-1}
ACTIVE_ARGS=()
active_probe() { # active_probe NAME PORT: one JSON line, or null without ACTIVE_ARGS
    [[ ${#ACTIVE_ARGS[@]} -gt 0 ]] || {
        echo null
        return
    }
    "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$2" --mode keep-alive --label "$1-active" \
        "${ACTIVE_ARGS[@]}" || die "active client failed: $1"
}
show_active() { # show_active JSON WHAT
    [[ $1 == null ]] ||
        "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); l=d['latency_ms']; print('  %s: %.0f req/s, p50 %.2f p99 %.2f p99.9 %.2f ms, %d errors' % (sys.argv[2], d['rps'], l['p50'], l['p99'], l['p999'], d['errors']))" "$1" "$2"
}
memory_run() {
    local name=$1 server=$2 port=$3 pids=$4 idle_request=$5 idle_kb held=0 n add out pid base points=() rss
    shift 5
    local loaders=() active baseline extra
    sleep "$SETTLE"
    # shellcheck disable=SC2086
    idle_kb=$(rss_kb $pids)
    echo "  $name: RSS idle $((idle_kb / 1024)) MiB"
    baseline=$(active_probe "$name" "$port")
    show_active "$baseline" "$name: active client, no idle connections"
    for n in "$@"; do
        add=$((n - held))
        out="$WORK/$name-$n.out"
        [[ $server == broker ]] && base=$(handshakes_ok)
        extra=()
        [[ $idle_request == 1 ]] && extra=(--idle-request)
        "$LOADGEN" "${CLIENT_ARGS[@]}" --addr "127.0.0.1:$port" --mode idle --connections "$add" \
            --source-ips "$SOURCE_IPS" --concurrency 64 --duration 3600 --label "$name-$n" \
            "${extra[@]+"${extra[@]}"}" >"$out" &
        pid=$!
        PIDS+=("$pid")
        loaders+=("$pid")
        "$PY" "$LIB" wait-line "$out" "$pid" 600
        if [[ $server == broker ]]; then # wait until the server has completed every handshake
            for _ in $(seq 1 200); do
                (($(handshakes_ok) >= base + add)) && break
                sleep 0.1
            done
        fi
        sleep "$SETTLE"
        held=$n
        # shellcheck disable=SC2086
        rss=$(rss_kb $pids)
        "$PY" -c "import json,sys; d=json.loads(open(sys.argv[1]).read()); print('  %s: %d held (+%d, %d errors, %.0f handshakes/s), RSS %d MiB' % (sys.argv[2], int(sys.argv[3]), d['established'], d['errors'], d['handshakes_per_s'], int(sys.argv[4]) // 1024))" \
            "$out" "$name" "$n" "$rss"
        active=$(active_probe "$name" "$port")
        show_active "$active" "$name: active client, $n idle connections held"
        points+=("{\"connections\":$n,\"rss_kb\":$rss,\"bytes_per_conn\":$(((rss - idle_kb) * 1024 / n)),\"load\":$(cat "$out"),\"active\":$active,\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}")
    done
    "$PY" "$LIB" add "$RESULTS" "{\"name\":\"memory-$name\",\"server\":\"$server\",\"idle_request\":$([[ $idle_request == 1 ]] && echo true || echo false),\"rss_idle_kb\":$idle_kb,\"active_alone\":$baseline,\"points\":[$(IFS=,; echo "${points[*]}")]}"
    for pid in "${loaders[@]}"; do stop_pid "$pid" TERM; done
}
