#!/usr/bin/env python3
"""Fleet simulation for docs/capacity.md: many distinct devices, each asking for a Google
token (the sts-exchange flow) every T, against 3 broker replicas behind HAProxy (PROXY v2, as
in tests/it/replicas.rs), with the fake STS (bench/fake_sts.py) counting the exchanges that
reach "Google". Time is compressed: the fake STS's tokens live --lifetime seconds and stand
for Google's 1 h, so a fleet minute is lifetime/60 seconds; rates are reported per fleet minute.

For each HAProxy balance mode the measured exchanges per fleet minute (steady state, after
the first token lifetime, when every device's first request has missed) are compared with
the model of docs/capacity.md:
  - sticky (a device always reaches the same replica, `balance source`):
    one exchange per device every ceil(E / T) * T, E = L - min(margin, L / 2);
  - not sticky (`balance roundrobin`): each replica caches for itself; the expected rate
    comes from the same rule applied to a device whose requests land on a random replica
    (computed by a Monte Carlo over the schedule, not measured).

usage: fleet_sim.py --bin target/release/token-broker [--devices 600] [--period 15]
                    [--lifetime 60] [--margin 5] [--duration 150] [--jitter 0.1]
                    [--balance source,roundrobin]
                    [--out FILE.json] [--quick]
Needs: haproxy, python3 with `cryptography` (device certificates).
"""

import argparse
import datetime
import heapq
import http.client
import json
import math
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lib  # noqa: E402  (bench/lib.py: free ports, waiting, metrics)

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
REPLICAS = 3


def device_certs(pki, count, out_dir):
    """COUNT device certificates with distinct SPIFFE IDs, signed by the dev CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    with open(os.path.join(pki, "ca.pem"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(pki, "ca-key.pem"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    paths = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"sim-device-{i}"
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://dev.token-broker.local/device/{name}")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = os.path.join(out_dir, f"{name}.pem")
        key_path = os.path.join(out_dir, f"{name}-key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        paths.append((cert_path, key_path))
    return paths


def broker_config(work, pki, port, admin, sts_port, margin):
    path = os.path.join(work, f"replica-{port}.toml")
    with open(path, "w") as f:
        f.write(
            f"""[server]
listen = "127.0.0.1:{port}"
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"
client_ca = "{pki}/ca.pem"
crls = ["{pki}/ca.crl.pem"]
max_connections = 20000
shutdown_grace = "1s"

[server.proxy_protocol]
mode = "v2"
trusted_cidrs = ["127.0.0.1/32"]

[admin]
listen = "127.0.0.1:{admin}"

[issuer]
url = "https://localhost:{port}"
token_ttl = "5m"
default_audience = "token-broker-dev"

[signer]
kind = "local"
key_dir = "{pki}/keys"

[[clients]]
name = "fleet"
match = {{ spiffe = ["spiffe://dev.token-broker.local/device/*"] }}
audiences = ["token-broker-dev"]
flows = ["sts-exchange"]
scopes = ["{SCOPE}"]

[google]
project_number = "123456789012"
pool_id = "devices"
provider_id = "token-broker"
sts_url = "http://127.0.0.1:{sts_port}"
refresh_margin = "{margin}s"
"""
        )
    return path


def haproxy_config(work, frontend, replicas, balance):
    path = os.path.join(work, f"haproxy-{balance}.cfg")
    lines = [
        "global",
        "  maxconn 4000",
        "defaults",
        "  mode tcp",
        "  timeout connect 2s",
        "  timeout client 60s",
        "  timeout server 60s",
        "frontend brokers",
        f"  bind 127.0.0.1:{frontend}",
        "  default_backend replicas",
        "backend replicas",
        f"  balance {balance}",
        "  option httpchk GET /readyz",
        "  http-check expect status 200",
    ]
    for i, (port, admin) in enumerate(replicas):
        lines.append(f"  server broker{i} 127.0.0.1:{port} send-proxy-v2 check port {admin} inter 1s")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def source_address(i):
    """A distinct loopback source per device (127.1.0.1, ...), as if each had its own IP."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


class Fleet:
    """Each device asks for a token every PERIOD seconds (+- JITTER of it, as real devices
    drift) on a new connection, first request at a random offset within one period, from its
    own certificate and source address."""

    def __init__(self, certs, ca, frontend, period, jitter, duration, workers=24):
        self.frontend = frontend
        self.period = period
        self.jitter = jitter
        self.rnd = random.Random(2)
        self.deadline = time.monotonic() + duration
        self.contexts = []
        for cert, key in certs:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.load_cert_chain(cert, key)
            self.contexts.append(ctx)
        start = time.monotonic()
        rnd = random.Random(1)
        self.queue = [(start + rnd.uniform(0, period), i) for i in range(len(certs))]
        heapq.heapify(self.queue)
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = {}
        self.late = 0
        self.body = ("grant_type=client_credentials&scope=" + urllib.parse.quote(SCOPE, safe="")).encode()
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]

    def start(self):
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()

    def work(self):
        while True:
            with self.lock:
                if not self.queue:
                    return
                due, i = heapq.heappop(self.queue)
                if due >= self.deadline:
                    return
                step = self.period * (1 + self.rnd.uniform(-self.jitter, self.jitter))
                heapq.heappush(self.queue, (due + step, i))
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -1:
                with self.lock:
                    self.late += 1
            self.request(i)

    def request(self, i):
        try:
            conn = http.client.HTTPSConnection(
                "localhost", self.frontend, context=self.contexts[i], timeout=10,
                source_address=(source_address(i), 0),
            )
            conn.request("POST", "/token", self.body, {"Content-Type": "application/x-www-form-urlencoded"})
            response = conn.getresponse()
            response.read()
            conn.close()
            outcome = "ok" if response.status == 200 else f"status_{response.status}"
        except (OSError, http.client.HTTPException) as e:
            outcome = type(e).__name__
        with self.lock:
            if outcome == "ok":
                self.ok += 1
            else:
                self.errors[outcome] = self.errors.get(outcome, 0) + 1


def entry_life(lifetime, margin):
    return lifetime - min(margin, lifetime // 2)


def model_sticky(devices, period, lifetime, margin):
    """Exchanges per fleet minute (= per wall second) when each device keeps its replica."""
    life = entry_life(lifetime, margin)
    if period >= life:
        return devices / period
    return devices / (math.ceil(life / period) * period)


def model_random(devices, period, lifetime, margin, replicas=REPLICAS, requests=200_000):
    """Same rule, each request on a uniformly random replica with its own cache (Monte Carlo)."""
    life = entry_life(lifetime, margin)
    rnd = random.Random(7)
    expires = [-1.0] * replicas
    misses = 0
    for n in range(requests):
        t = n * period
        r = rnd.randrange(replicas)
        if t >= expires[r]:
            misses += 1
            expires[r] = t + life
    return devices / period * misses / requests


def fetch_count(sts_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{sts_port}/count", timeout=5) as r:
        return json.load(r)["count"]


def run(args):
    work = tempfile.mkdtemp(prefix="fleet-sim.")
    procs = []
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "devices": args.devices,
        "period_s": args.period,
        "token_lifetime_s": args.lifetime,
        "refresh_margin_s": args.margin,
        "duration_s": args.duration,
        "replicas": REPLICAS,
        "fleet_minute_s": args.lifetime / 60,
        "jitter": args.jitter,
        "scenarios": [],
    }
    try:
        pki = os.path.join(work, "pki")
        subprocess.run([args.bin, "init", "--dir", pki], check=True, stdout=subprocess.DEVNULL)
        certs_dir = os.path.join(work, "devices")
        os.makedirs(certs_dir)
        t0 = time.monotonic()
        certs = device_certs(pki, args.devices, certs_dir)
        print(f"fleet: {len(certs)} device certificates in {time.monotonic() - t0:.1f}s", flush=True)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        for balance in args.balance.split(","):
            ports = lib.free_ports_list(2 * REPLICAS + 2)
            sts_port, frontend = ports[0], ports[1]
            replicas = [(ports[2 + 2 * i], ports[3 + 2 * i]) for i in range(REPLICAS)]
            sts = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_sts.py"), str(sts_port), str(args.lifetime)])
            procs.append(sts)
            lib.wait_tcp(f"127.0.0.1:{sts_port}", 30)
            brokers = []
            for i, (port, admin) in enumerate(replicas):
                config = broker_config(work, pki, port, admin, sts_port, args.margin)
                log = open(os.path.join(work, f"replica-{balance}-{i}.log"), "w")
                p = subprocess.Popen([args.bin, "--log-format", "json", "-c", config, "serve"], stderr=log, stdout=log)
                procs.append(p)
                brokers.append(p)
            for _, admin in replicas:
                lib.wait_http(f"http://127.0.0.1:{admin}/readyz", 30)
            cfg = haproxy_config(work, frontend, replicas, balance)
            lb = subprocess.Popen([haproxy, "-f", cfg, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(lb)
            lib.wait_tcp(f"127.0.0.1:{frontend}", 10)
            time.sleep(2)  # health checks up
            print(f"fleet: balance {balance}: {args.devices} devices every {args.period}s for {args.duration}s", flush=True)
            fleet = Fleet(certs, os.path.join(pki, "ca.pem"), frontend, args.period, args.jitter, args.duration)
            started = time.monotonic()
            fleet.start()
            counts = []  # (seconds since start, exchanges so far), once a second
            while any(t.is_alive() for t in fleet.threads):
                counts.append((time.monotonic() - started, fetch_count(sts_port)))
                time.sleep(1)
            fleet.join()
            counts.append((time.monotonic() - started, fetch_count(sts_port)))
            # Steady state: from one token lifetime after the start (every device's first
            # request has missed by one period; the first refresh misses come after E) to
            # the end of the schedule.
            window_start = args.lifetime + args.period
            window = [(t, c) for t, c in counts if window_start <= t <= args.duration]
            measured = None
            if len(window) >= 2:
                (ta, ca), (tb, cb) = window[0], window[-1]
                measured = (cb - ca) / (tb - ta)
            per_replica = []
            for _, admin in replicas:
                url = f"http://127.0.0.1:{admin}/metrics"
                per_replica.append({
                    "hits": lib.metric_value(url, "token_broker_token_cache_hits_total"),
                    "misses": lib.metric_value(url, "token_broker_token_cache_misses_total"),
                })
            sticky = balance == "source"
            # Per wall second -> per fleet minute (the token lifetime stands for 1 h).
            minute = args.lifetime / 60
            predicted = minute * (model_sticky if sticky else model_random)(args.devices, args.period, args.lifetime, args.margin)
            if measured is not None:
                measured *= minute
            scenario = {
                "balance": balance,
                "requests_ok": fleet.ok,
                "errors": fleet.errors,
                "late_starts": fleet.late,
                "requests_per_fleet_minute": fleet.ok / args.duration * minute,
                "exchanges_total": counts[-1][1],
                "steady_window_s": [window[0][0], window[-1][0]] if len(window) >= 2 else None,
                "exchanges_per_fleet_minute_measured": measured,
                "exchanges_per_fleet_minute_model": predicted,
                "model": "sticky" if sticky else "random replica (Monte Carlo)",
                "model_sticky": minute * model_sticky(args.devices, args.period, args.lifetime, args.margin),
                "replicas": per_replica,
                "counts": counts,
                "loadavg": open("/proc/loadavg").read().split()[:3],
            }
            results["scenarios"].append(scenario)
            print(
                f"fleet: balance {balance}: {fleet.ok} ok, errors {fleet.errors}, "
                f"exchanges per fleet minute {measured if measured is None else round(measured, 2)} "
                f"(model {predicted:.2f}), per replica {per_replica}",
                flush=True,
            )
            for p in [lb, *brokers, sts]:
                p.terminate()
                p.wait(10)
                procs.remove(p)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"fleet: work folder kept: {work}", file=sys.stderr)
    return results


def markdown(results):
    m = results["fleet_minute_s"]
    out = [
        f"{results['devices']} devices, each asking every {results['period_s'] / m:.0f} fleet minutes "
        f"(+-{results['jitter']:.0%}); Google tokens live 60 fleet minutes, refresh_margin "
        f"{results['refresh_margin_s'] / m:.0f} fleet minutes; {results['replicas']} replicas behind HAProxy; "
        f"{results['duration_s'] / m:.0f} fleet minutes in {results['duration_s']:.0f} s "
        f"(a fleet minute is {m:g} s); load at start {' '.join(results['loadavg_start'])}.",
        "",
        "| HAProxy balance | token requests ok | errors | requests per fleet minute | STS exchanges per fleet minute, measured (steady state) | model | measured / model | misses per replica |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in results["scenarios"]:
        m, p = s["exchanges_per_fleet_minute_measured"], s["exchanges_per_fleet_minute_model"]
        ratio = f"{m / p:.2f}" if m is not None and p else "-"
        out.append(
            f"| {s['balance']} | {s['requests_ok']:,} | {sum(s['errors'].values())} | "
            f"{s['requests_per_fleet_minute']:.1f} | {'-' if m is None else f'{m:.2f}'} | {p:.2f} ({s['model']}) | "
            f"{ratio} | {', '.join(str(int(r['misses'])) for r in s['replicas'])} |"
        )
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--devices", type=int, default=600)
    parser.add_argument("--period", type=float, default=15)
    parser.add_argument("--lifetime", type=int, default=60)
    parser.add_argument("--margin", type=int, default=5)
    parser.add_argument("--duration", type=float, default=150)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--balance", default="source,roundrobin")
    parser.add_argument("--out", help="write the results (JSON) here and a Markdown table next to it")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="60 devices, 25 s per scenario (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.period, args.lifetime, args.margin, args.duration = 60, 5, 10, 2, 25
    results = run(args)
    table = markdown(results)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table)
    failed = any(sum(s["errors"].values()) for s in results["scenarios"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
