#!/usr/bin/env python3
"""Helpers for bench/run.sh: waiting for servers, reading metrics, recording loadgen results,
parsing `openssl speed`, and printing the report (text and Markdown).

Standard library only. Subcommands (see run.sh for use):
  free-ports N                 print N free TCP ports on 127.0.0.1
  wait-http URL SECONDS        wait until URL answers 200
  wait-tcp HOST:PORT SECONDS   wait until a TCP connect succeeds
  metric URL NAME              print the sum of a Prometheus metric (NAME may carry {labels})
  wait-line FILE PID SECONDS   wait until FILE has a complete line (or PID died)
  record RESULTS NAME TAGS CPU0 CPU1 HZ [EXTRA_JSON]   loadgen JSON on stdin -> RESULTS
  add RESULTS JSON             append one record
  get RESULTS NAME KEY         print a key of the last record called NAME (dotted path)
  half-rate RESULTS NAME       50% of the req/s measured by run NAME (at least 1)
  rate-at RESULTS NAME F       F (0-1) of the req/s measured by run NAME (at least 1)
  speed RESULTS FILE           parse `openssl speed` output into RESULTS
  report RESULTS [MARKDOWN_OUT]
  pairs RESULTS REF [MARKDOWN_OUT]   paired rounds against side REF: per side, median of the
                               per-round ratios side / REF of server CPU per request
  pool REF RESULTS...          the rounds of several such runs together, with a 95% bootstrap
                               interval of their median ratio
  conns-report RESULTS         table of bench/conns.sh (idle connections, active client)
  latency-report RESULTS       table of bench/latency.sh (pinned, fractions of the maximum)
  perf-summary DATA PATH LOAD_JSON OUT_TXT [CPU_SECONDS]   summarize a `perf record` profile
  callgrind-summary FILE PATH LOAD_JSON OUT_TXT            summarize a callgrind dump
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request


def free_ports(n):
    print(" ".join(map(str, free_ports_list(n))))


def free_ports_list(n):
    socks, ports = [], []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_http(url, seconds):
    deadline = time.time() + float(seconds)
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - anything means "not yet"
            last = e
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {url}: {last}")


def wait_tcp(addr, seconds):
    host, port = addr.rsplit(":", 1)
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"timed out waiting for {addr}")


def metric(url, name):
    total = metric_value(url, name)
    print(int(total) if total.is_integer() else total)


def metric_value(url, name):
    """The sum of a Prometheus metric's samples (NAME may carry {labels})."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    base, _, labels = name.partition("{")
    wanted = [l for l in labels.rstrip("}").split(",") if l]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        metric_name = key.split("{", 1)[0]
        if metric_name != base:
            continue
        if all(w in key for w in wanted):
            total += float(value)
    return total


def wait_line(path, pid, seconds):
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        try:
            with open(path) as f:
                data = f.read()
            if "\n" in data:
                return
        except FileNotFoundError:
            pass
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"process {pid} exited before writing {path}")
        time.sleep(0.05)
    sys.exit(f"timed out waiting for a line in {path}")


def append(results, record):
    with open(results, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def load(results):
    with open(results) as f:
        return [json.loads(l) for l in f if l.strip()]


def record(results, name, tags, cpu0, cpu1, hz, extra="{}"):
    line = sys.stdin.read().strip().splitlines()
    if not line:
        sys.exit(f"{name}: loadgen printed nothing")
    run = json.loads(line[-1])
    cpu_s = (int(cpu1) - int(cpu0)) / float(hz)
    rec = {"name": name, **json.loads(tags), **json.loads(extra), "loadgen": run, "server_cpu_s": cpu_s}
    requests = run.get("requests", 0)
    rec["cpu_per_req_us"] = cpu_s / requests * 1e6 if requests else None
    # Everything else that ran meanwhile, in cores (machine busy - server - load generator).
    if "machine_busy_ticks" in rec:
        rec["steal_s"] = rec.pop("steal_ticks") / float(hz)
        busy = rec.pop("machine_busy_ticks") / float(hz)
        # user+system of the whole machine over the measurement window, minus the server and
        # the whole load generator process (softirq/irq time, attributed to nobody, left out).
        client = run.get("client_process_cpu_s")
        window = rec.get("window_s")
        if client is not None and window:
            rec["other_cores"] = max(0.0, (busy - cpu_s - client) / window)
    append(results, rec)
    lat = run.get("latency_ms", {})
    rate = run.get("target_rate")
    print(
        f"  {name:<34} {run['rps']:>9.0f} req/s  ok={run['ok']:<7} err={run['errors']:<4}"
        f" cpu/req={fmt(rec['cpu_per_req_us'], 1)} us"
        f"  p50/p90/p99={lat.get('p50', 0):.2f}/{lat.get('p90', 0):.2f}/{lat.get('p99', 0):.2f} ms"
        + (f"  (rate {rate:.0f}/s)" if rate else ""),
        flush=True,
    )
    if run["errors"]:
        print(f"    errors: {run['error_kinds']} first: {run.get('first_error')}", flush=True)
    if rec.get("other_cores", 0) > 0.15 or rec.get("steal_s", 0) > 0.05 * rec.get("window_s", 1):
        print(
            f"    noisy: other processes used {rec.get('other_cores', 0):.2f} cores, "
            f"hypervisor steal {rec.get('steal_s', 0):.2f} s during this run",
            flush=True,
        )


def get(results, name, key):
    recs = [r for r in load(results) if r.get("name") == name]
    if not recs:
        sys.exit(f"no record {name}")
    value = recs[-1]
    for part in key.split("."):
        value = value[part]
    print(value)


def half_rate(results, name):
    """The fixed rate for the latency run: 50% of the maximum measured in run NAME."""
    rate_at(results, name, 0.5)


def rate_at(results, name, fraction):
    """FRACTION of the req/s measured in run NAME (at least 1)."""
    recs = [r for r in load(results) if r.get("name") == name]
    if not recs:
        sys.exit(f"no record {name}")
    print(max(1.0, float(fraction) * recs[-1]["loadgen"]["rps"]))


SPEED_PATTERNS = {
    "ecdsap256": re.compile(r"256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)"),
    "rsa2048": re.compile(r"rsa\s+2048 bits\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)"),
}


def speed(results, path):
    with open(path) as f:
        text = f.read()
    rec = {"name": "openssl-speed"}
    for alg, pattern in SPEED_PATTERNS.items():
        m = pattern.search(text)
        if not m:
            sys.exit(f"cannot find {alg} in openssl speed output ({path})")
        rec[f"{alg}_sign_per_s"] = float(m.group(1))
        rec[f"{alg}_verify_per_s"] = float(m.group(2))
    append(results, rec)
    print(
        f"  openssl speed (1 core): P-256 sign {rec['ecdsap256_sign_per_s']:.0f}/s verify "
        f"{rec['ecdsap256_verify_per_s']:.0f}/s; RSA-2048 sign {rec['rsa2048_sign_per_s']:.0f}/s "
        f"verify {rec['rsa2048_verify_per_s']:.0f}/s"
    )


def median(values):
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def fmt(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def report(results, markdown_out=None):
    recs = load(results)
    by_name = {r["name"]: r for r in recs}
    out = []
    machine = by_name.get("machine", {})
    if machine:
        end = by_name.get("end", {})
        out.append(
            f"Machine: {machine.get('nproc')} CPUs, {machine.get('cpu_model')}, kernel {machine.get('kernel')}, "
            f"{machine.get('mem')}; {machine.get('mode')} run, {machine.get('date')}, commit {machine.get('commit')}; "
            f"load average at start {machine.get('loadavg_start')}, at end {end.get('loadavg', '?')}; "
            f"{machine.get('openssl')}, {machine.get('nginx')}, {machine.get('rustc')}"
        )
        out.append("")

    runs = [r for r in recs if "loadgen" in r and r.get("kind") in ("max", "rate", "low")]
    out.append("### Throughput, latency, server CPU")
    out.append("")
    out.append(
        "| server | signing | TLS | path | logging | max req/s | server CPU µs/req | "
        "rate (50% of max) | p50 ms | p90 ms | p99 ms | errors | other load (cores) |"
    )
    out.append("|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    groups = {}
    for r in runs:
        if r["kind"] == "low":
            continue
        key = (r["server"], r.get("alg") or "-", r["tls"], r["path"], r.get("log", "-"), r.get("kx", "x25519"), r.get("flow", ""))
        groups.setdefault(key, {})[r["kind"]] = r
    for key, g in groups.items():
        server, alg, tls, path, log, kx, flow = key
        if flow:
            path = f"{path}, {flow}"
        mx, rt = g.get("max"), g.get("rate")
        lat = rt["loadgen"]["latency_ms"] if rt else {}
        errors = sum(x["loadgen"]["errors"] for x in g.values())
        noise = " / ".join(f"{x['other_cores']:.2f}" if "other_cores" in x else "?" for x in (mx, rt) if x)
        label_tls = f"{tls}" + ("" if kx == "x25519" else f" ({kx} kx)")
        out.append(
            f"| {server} | {alg} | {label_tls} | {path} | {log} | "
            f"{fmt(mx['loadgen']['rps']) if mx else '-'} | "
            f"{fmt(mx['cpu_per_req_us'], 1) if mx else '-'} | "
            f"{fmt(rt['loadgen']['target_rate']) if rt else '-'} | "
            f"{fmt(lat.get('p50'), 2) if rt else '-'} | {fmt(lat.get('p90'), 2) if rt else '-'} | "
            f"{fmt(lat.get('p99'), 2) if rt else '-'} | {errors} | {noise} |"
        )
    out.append("")
    out.append(
        "CPU µs/req: server utime+stime (/proc/<pid>/stat) during the maximum-throughput run "
        "divided by requests. Latency: at a fixed rate of 50% of the measured maximum. Other load: "
        "CPU used by everything but the server and the load generator during the max / rate runs "
        "(/proc/stat), in cores; above ~0.15 the run shared the machine and its numbers are noisy."
    )
    out.append("")

    low = [r for r in runs if r["kind"] == "low"]
    if low:
        out.append("### Latency at fixed low rates (TLS 1.3, far from saturation)")
        out.append("")
        out.append("| server | signing | path | rate req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU µs/req | errors | other load (cores) |")
        out.append("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in low:
            lat = r["loadgen"]["latency_ms"]
            path = r["path"] + (f", {r['flow']}" if r.get("flow") else "")
            noise = f"{r['other_cores']:.2f}" if "other_cores" in r else "?"
            out.append(
                f"| {r['server']} | {r.get('alg') or '-'} | {path} | {fmt(r['loadgen']['target_rate'])} | "
                f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} | "
                f"{fmt(r['cpu_per_req_us'], 1)} | {r['loadgen']['errors']} | {noise} |"
            )
        out.append("")

    pairs = {}
    for r in recs:
        if r.get("kind") == "pair" and r.get("cpu_per_req_us"):
            pairs.setdefault(r["pair"], {}).setdefault(r["side"], {})[r["round"]] = r
    paired = {}
    if pairs:
        out.append("### Paired comparisons (sides measured alternately, round after round)")
        out.append("")
        out.append(
            "| comparison | side A | A server CPU µs/req, median (min-max) | side B | B server CPU µs/req, median (min-max) "
            "| A / B per round, median (min-max) | rounds | other load max (cores) |"
        )
        out.append("|---|---|--:|---|--:|--:|--:|--:|")
        for pair, sides in pairs.items():
            names = list(sides)
            if len(names) != 2:
                continue
            a, b = names
            rounds = sorted(set(sides[a]) & set(sides[b]))
            va = [sides[a][i]["cpu_per_req_us"] for i in rounds]
            vb = [sides[b][i]["cpu_per_req_us"] for i in rounds]
            ratios = [x / y for x, y in zip(va, vb)]
            noise = max(
                (sides[s][i].get("other_cores", 0) for s in (a, b) for i in rounds), default=0
            )
            paired[pair] = {"a": a, "b": b, "ma": median(va), "mb": median(vb), "ratio": median(ratios), "lo": min(ratios), "hi": max(ratios)}
            out.append(
                f"| {pair} | {a} | {fmt(median(va), 1)} ({fmt(min(va), 0)}-{fmt(max(va), 0)}) | {b} | "
                f"{fmt(median(vb), 1)} ({fmt(min(vb), 0)}-{fmt(max(vb), 0)}) | "
                f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {len(rounds)} | {noise:.2f} |"
            )
        out.append("")

    mem = [r for r in recs if r.get("name", "").startswith("memory-")]
    if mem:
        out.append("### Memory (RSS)")
        out.append("")
        out.append("| server | connections | RSS idle MiB | RSS with connections MiB | bytes per connection |")
        out.append("|---|--:|--:|--:|--:|")
        for r in mem:
            for point in r["points"]:
                out.append(
                    f"| {r['server']}{' (after one token request each)' if r.get('idle_request') else ''} | "
                    f"{point['connections']:,} | {r['rss_idle_kb'] / 1024:.1f} | {point['rss_kb'] / 1024:.1f} | "
                    f"{fmt(point['bytes_per_conn'])} |"
                )
        out.append("")

    speed_rec = by_name.get("openssl-speed")
    if speed_rec:
        out.append("### openssl speed (one core)")
        out.append("")
        out.append("| operation | per second |")
        out.append("|---|--:|")
        out.append(f"| ECDSA P-256 sign (ES256 floor) | {fmt(speed_rec['ecdsap256_sign_per_s'])} |")
        out.append(f"| ECDSA P-256 verify | {fmt(speed_rec['ecdsap256_verify_per_s'])} |")
        out.append(f"| RSA-2048 sign (RS256 floor) | {fmt(speed_rec['rsa2048_sign_per_s'])} |")
        out.append(f"| RSA-2048 verify | {fmt(speed_rec['rsa2048_verify_per_s'])} |")
        out.append("")

    out.append("### Ratios against the targets")
    out.append("")
    out.append("| ratio | signing | TLS | value | target | met |")
    out.append("|---|---|---|--:|--:|---|")

    def find(server, alg, tls, path, kind="max", log="info", kx="x25519", flow=""):
        for r in runs:
            if (
                r.get("flow", "") == flow
                and r["server"] == server
                and (r.get("alg") or "-") == alg
                and r["tls"] == tls
                and r["path"] == path
                and r["kind"] == kind
                and r.get("log", "-") == log
                and r.get("kx", "x25519") == kx
            ):
                return r
        return None

    for tls in ("1.3", "1.2"):
        for pair, what in (
            ("newconn", "a device seen before (verified-chain cache hit)"),
            ("newconn-validated", "every chain validated (verified_chain_cache = 0)"),
        ):
            p = paired.get(f"{pair}-tls{tls}")
            if p:
                out.append(
                    f"| broker CPU per new-connection token / nginx CPU per mTLS handshake, paired rounds, {what} "
                    f"({fmt(p['ma'], 1)} / {fmt(p['mb'], 1)} µs; rounds {p['lo']:.2f}-{p['hi']:.2f}) | ES256 | {tls} | "
                    f"{p['ratio']:.2f}x | <= 0.5x | {'yes' if p['ratio'] <= 0.5 else 'no'} |"
                )
    for tls in ("1.3", "1.2"):
        ng = find("nginx", "-", tls, "new-conn", log="-")
        for alg in ("ES256", "RS256"):
            br = find("broker", alg, tls, "new-conn")
            if br and ng and ng["cpu_per_req_us"]:
                ratio = br["cpu_per_req_us"] / ng["cpu_per_req_us"]
                out.append(
                    f"| same, from the matrix runs "
                    f"({fmt(br['cpu_per_req_us'], 1)} / {fmt(ng['cpu_per_req_us'], 1)} µs) | {alg} | {tls} | "
                    f"{ratio:.2f}x | <= 0.5x | {'yes' if ratio <= 0.5 else 'no'} |"
                )
    if speed_rec:
        floors = {"ES256": speed_rec["ecdsap256_sign_per_s"], "RS256": speed_rec["rsa2048_sign_per_s"]}
        for tls in ("1.3", "1.2"):
            for alg in ("ES256", "RS256"):
                br = find("broker", alg, tls, "keep-alive")
                if not br:
                    continue
                floor = floors[alg]
                measured = br["loadgen"]["rps"] / floor
                per_core = (1e6 / br["cpu_per_req_us"]) / floor if br["cpu_per_req_us"] else None
                out.append(
                    f"| keep-alive tokens/s / {alg} sign floor ({fmt(br['loadgen']['rps'])} / {fmt(floor)}) | "
                    f"{alg} | {tls} | {measured:.2f} | >= 0.5 | {'yes' if measured >= 0.5 else 'no'} |"
                )
                if per_core is not None:
                    out.append(
                        f"| per server core: (1 / CPU per token) / {alg} sign floor "
                        f"({fmt(1e6 / br['cpu_per_req_us'])} / {fmt(floor)}) | {alg} | {tls} | "
                        f"{per_core:.2f} | >= 0.5 | {'yes' if per_core >= 0.5 else 'no'} |"
                    )
    for r in mem:
        if r["server"] != "broker" or r.get("idle_request"):
            continue
        for point in r["points"]:
            b = point["bytes_per_conn"]
            out.append(
                f"| broker bytes per idle mTLS connection ({point['connections']:,} connections) | - | 1.3 | "
                f"{fmt(b)} B | <= 40,000 B | {'yes' if b <= 40000 else 'no'} |"
            )
    for path in ("keep-alive", "new-conn"):
        p = paired.get(f"logging-{path}")
        if p:
            out.append(
                f"| (no target) audit log line at info: share of server CPU per token, {path}, paired rounds "
                f"(1 - {fmt(p['mb'], 1)} / {fmt(p['ma'], 1)} µs) | ES256 | 1.3 | {1 - 1 / p['ratio']:.0%} | - | - |"
            )
    hits = [
        h for h in (
            find("broker", "ES256", "1.3", "keep-alive", kind="low", flow="sts-exchange cache hit"),
            find("broker", "ES256", "1.3", "keep-alive", kind="rate", flow="sts-exchange cache hit"),
        ) if h
    ]
    for hit in hits:
        p99 = hit["loadgen"]["latency_ms"]["p99"]
        out.append(
            f"| cache-hit Google path (sts-exchange) p99 at {fmt(hit['loadgen']['target_rate'])}/s"
            f"{' (50% of max)' if hit['kind'] == 'rate' else ''}, keep-alive "
            f"(fake STS behind the first miss only) | ES256 | 1.3 | {p99:.2f} ms | <= 1 ms | {'yes' if p99 <= 1 else 'no'} |"
        )
    if not hits:
        out.append("| cache-hit Google path p99 | - | - | not measured | <= 1 ms | - |")
    out.append("")

    text = "\n".join(out)
    print(text)
    if markdown_out:
        with open(markdown_out, "w") as f:
            f.write(text + "\n")


# Cost centres: (label, regex on the function name). Inclusive cost; indented ones are parts
# of the line above. The regexes match both perf's and callgrind's (demangled) names.
COST_CENTRES = [
    ("TLS handshake, all of it (rustls server)", r"MidHandshake<.*> as core::future::future::Future>::poll"),
    ("  ECDHE key exchange (X25519 keygen + agree)", r"rustls::crypto::SupportedKxGroup::start_and_complete"),
    ("  server CertificateVerify signature (ECDSA P-256)", r"rustls::crypto::aws_lc_rs::sign::EcdsaSigner as rustls::crypto::signer::Signer>::sign"),
    ("  client CertificateVerify check (ECDSA verify)", r"PossessionOnly as rustls::verify::ClientCertVerifier>::verify_tls1[23]_signature"),
    ("  TLS 1.3 key schedule (HKDF)", r"aws_lc_rs::hkdf::Okm<.*>::fill"),
    ("authenticate: chain, CRL, rules (per token request)", r"token_broker::broker::Broker::authenticate_with"),
    ("  chain validation (webpki, incl. CRL)", r"token_broker::trust::TrustStore::verify"),
    ("    CRL signature check", r"CertRevocationList::verify_signature"),
    ("JWT signing (signer::local)", r"LocalSigner as token_broker::signer::Signer>::sign|token_broker::signer::local::SigningKey::sign"),
    # The aws-lc-rs signature call is shared with the handshake's CertificateVerify: subtract it.
    ("  ECDSA/RSA signature (aws-lc)", r"^aws_lc_0_\d+_0_(EVP_DigestSign|EVP_DigestSignFinal|ECDSA_sign|RSA_sign)$|^pkey_(ec|rsa)_sign$",
     r"rustls::crypto::aws_lc_rs::sign::(Ecdsa|Rsa)Signer as rustls::crypto::signer::Signer>::sign"),
    ("  OpenSSL via josekit (before aws-lc-rs signing)", r"openssl::sign::Signer::sign_to_vec|josekit::jws::alg::.*JwsSigner>::sign"),
    ("claims JSON (serde_json)", r"token_broker::claims::id_token_claims"),
    ("response body JSON", r"token_broker::http::token::success"),
    ("audit log line (tracing JSON -> stderr)", r"token_broker::http::token::log_decision"),
    ("jti (uuid v4 via getrandom)", r"uuid::v4::<impl uuid::Uuid>::new_v4"),
    ("metrics (prometheus)", r"^prometheus::"),
    ("HTTP/1 request parsing (hyper)", r"hyper::proto::h1::io::Buffered<T,B>::parse"),
    ("TLS record encryption + send (incl. writev)", r"rustls::vecbuf::ChunkVecBuffer::write_to"),
]
ALLOC_RE = re.compile(
    r"^(_int_malloc|_int_free|_int_realloc|malloc|free|cfree.*|realloc|malloc_consolidate|unlink_chunk.*"
    r"|__GI___libc_malloc|__GI___libc_free|__libc_malloc|__libc_free|tcache_.*|__rustc::__rdl_.*|__rdl_.*|__rust_alloc|__rust_dealloc)$"
)


def centres_table(inclusive, per_request_unit, per_request_total):
    """inclusive: list of (pct, name). Returns lines with the max matching pct per centre."""
    lines = []
    for label, pattern, *minus in COST_CENTRES:
        rx = re.compile(pattern)
        pct = max((p for p, n in inclusive if rx.search(n)), default=0.0)
        if minus:
            rx_minus = re.compile(minus[0])
            pct = max(0.0, pct - max((p for p, n in inclusive if rx_minus.search(n)), default=0.0))
        per_req = pct / 100 * per_request_total if per_request_total else None
        lines.append(f"  {label:<56} {pct:6.1f}%  {fmt(per_req, 1):>9} {per_request_unit}")
    return lines


def perf_summary(data, path, load_json, out_txt, cpu_seconds=None):
    run = json.loads(open(load_json).read().strip().splitlines()[-1])
    base = ["perf", "report", "-i", data, "--stdio", "--percent-limit", "0.05"]
    children = subprocess.run(
        base + ["--children", "--sort", "sym", "--no-call-graph"], capture_output=True, text=True, check=True
    ).stdout
    dsos = subprocess.run(base + ["--no-children", "--sort", "dso", "-g", "none"], capture_output=True, text=True, check=True).stdout
    line_re = re.compile(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[(.)\]\s+(.*?)\s*$")
    inclusive, selfs = [], {}
    for line in children.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        name = re.sub(r" \(inlined\)$", "", m.group(4))
        inclusive.append((float(m.group(1)), name))
        if m.group(3) in ".k":
            selfs[(m.group(3), name)] = selfs.get((m.group(3), name), 0.0) + float(m.group(2))
    per_req = None
    if cpu_seconds not in (None, "") and run.get("requests"):
        per_req = float(cpu_seconds) / run["requests"] * 1e6
    out = [
        f"perf (cpu-clock sampling, DWARF call graphs), {path} path, TLS 1.3, ES256, log level info:",
        f"  {run['requests']:,} requests at {run['rps']:,.0f}/s"
        + (f", {per_req:,.1f} µs server CPU per request" if per_req else ""),
        "",
        f"  {'cost centre (inclusive; indented = part of the line above)':<56} {'share':>7}  {'µs/req':>9}",
    ]
    out += centres_table(inclusive, "µs", per_req)
    alloc = sum(v for (kind, n), v in selfs.items() if ALLOC_RE.match(n))
    dso_shares = []
    for line in dsos.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(\S.*?)\s*$", line)
        if m:
            dso_shares.append((float(m.group(1)), m.group(2)))
    kernel = sum(p for p, d in dso_shares if d.startswith("[kernel"))
    out.append(f"  {'allocation: malloc/free self time':<56} {alloc:6.1f}%  {fmt(alloc / 100 * per_req if per_req else None, 1):>9} µs")
    out.append(f"  {'kernel self time (TCP, syscalls, scheduling)':<56} {kernel:6.1f}%  {fmt(kernel / 100 * per_req if per_req else None, 1):>9} µs")
    out += ["", "  by object (self; libcrypto.so.3 is OpenSSL, used by josekit):"]
    for p, d in dso_shares:
        if p >= 0.5:
            out.append(f"    {p:5.1f}%  {d}")
    out += ["", "  top functions (self):"]
    for (kind, name), v in sorted(selfs.items(), key=lambda kv: -kv[1])[:25]:
        out.append(f"    {v:5.2f}%  {name[:150]}")
    text = "\n".join(out)
    print(text)
    with open(out_txt, "w") as f:
        f.write(text + "\n")


def callgrind_summary(dump, path, load_json, out_txt):
    run = json.loads(open(load_json).read().strip().splitlines()[-1])

    def annotate(inclusive):
        text = subprocess.run(
            ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", "--auto=no", dump],
            capture_output=True, text=True, check=True,
        ).stdout
        total, rows = None, []
        for line in text.splitlines():
            m = re.match(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)$", line)
            if not m:
                continue
            count = int(m.group(1).replace(",", ""))
            what = m.group(3)
            if what.startswith("PROGRAM TOTALS"):
                total = count
                continue
            what = re.sub(r" \[[^\]]*\]$", "", what)
            fn = what.split(":", 1)[1] if ":" in what else what
            rows.append((float(m.group(2)), count, fn))
        return total, rows

    total, inclusive = annotate(True)
    _, selfs = annotate(False)
    # Functions still on a thread's stack when the dump is taken (thread entry, runtime
    # loop) show their inclusive cost in the self listing too; leave them out.
    selfs = [r for r in selfs if r[0] < 95.0]
    requests = run.get("requests") or 0
    per_req = total / requests if requests and total else None
    out = [
        f"callgrind (instructions), {path} path, TLS 1.3, ES256, log level info:",
        f"  {requests:,} requests, {fmt(per_req / 1000 if per_req else None, 0)} k instructions per request (whole process)",
        "",
        f"  {'cost centre (inclusive; indented = part of the line above)':<56} {'share':>7}  {'kIr/req':>9}",
    ]
    out += centres_table([(p, n) for p, _, n in inclusive], "kIr", per_req / 1000 if per_req else None)
    alloc = sum(p for p, _, n in selfs if ALLOC_RE.match(n))
    out.append(f"  {'allocation: malloc/free self':<56} {alloc:6.1f}%  {fmt(alloc / 100 * per_req / 1000 if per_req else None, 1):>9} kIr")
    libcrypto = sum(p for p, _, n in selfs if n.startswith("0x") or n.startswith("OPENSSL") or n.startswith("EVP_") or n.startswith("BN_") or n.startswith("ossl_"))
    out.append(f"  {'OpenSSL libcrypto self (exported + unnamed functions)':<56} {libcrypto:6.1f}%")
    out += ["", "  top functions (self):"]
    for p, count, name in sorted(selfs, key=lambda r: -r[0])[:25]:
        out.append(f"    {p:5.2f}%  {name[:150]}")
    text = "\n".join(out)
    print(text)
    with open(out_txt, "w") as f:
        f.write(text + "\n")


def paired_rounds(recs, ref):
    """(comparison, side, [(side µs, ref µs, other load)] per round) of bench/floor.sh's pairs."""
    groups = {}
    for r in recs:
        if r.get("kind") == "pair" and r.get("cpu_per_req_us"):
            groups.setdefault(r["pair"], {}).setdefault(r["side"], {})[r["round"]] = r
    for pair, sides in groups.items():
        base = sides.get(ref)
        if not base:
            continue
        for side, by_round in sides.items():
            if side == ref:
                continue
            rounds = sorted(set(by_round) & set(base))
            if rounds:
                yield pair, side, [
                    (by_round[i]["cpu_per_req_us"], base[i]["cpu_per_req_us"],
                     max(by_round[i].get("other_cores", 0), base[i].get("other_cores", 0)))
                    for i in rounds
                ]


def pairs_against(results, ref, markdown_out=None):
    """Paired rounds with several sides measured against one reference side (bench/floor.sh)."""
    out = [
        f"| comparison | side | server CPU µs/req, median (min-max) | {ref} µs/req, median | "
        f"side / {ref} per round, median (min-max) | rounds | other load max (cores) |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for pair, side, rounds in paired_rounds(load(results), ref):
        values = [v for v, _, _ in rounds]
        refs = [b for _, b, _ in rounds]
        ratios = [v / b for v, b, _ in rounds]
        noise = max(n for _, _, n in rounds)
        out.append(
            f"| {pair} | {side} | {median(values):.1f} ({min(values):.0f}-{max(values):.0f}) | "
            f"{median(refs):.1f} | **{median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{len(rounds)} | {noise:.2f} |"
        )
    text = "\n".join(out)
    print(text)
    if markdown_out:
        with open(markdown_out, "w") as f:
            f.write(text + "\n")


def pool(ref, *results):
    """The per-round ratios of several bench/floor.sh runs together: their median and a 95%
    bootstrap interval of that median (10,000 resamples, fixed seed), and the share of rounds at
    or under 0.9 and 1.0. One run's rounds are too few to tell 0.88 from 0.92 on a noisy machine."""
    import random

    pooled = {}
    for path in results:
        for pair, side, rounds in paired_rounds(load(path), ref):
            pooled.setdefault((pair, side), []).extend(v / b for v, b, _ in rounds)
    print(f"| comparison | side | side / {ref}, median of all rounds | 95% interval of the median "
          f"| rounds at most 0.9 | at most 1.0 | rounds |")
    print("|---|---|--:|--:|--:|--:|--:|")
    rng = random.Random(16)
    for (pair, side), ratios in pooled.items():
        medians = sorted(median(rng.choices(ratios, k=len(ratios))) for _ in range(10000))
        print(f"| {pair} | {side} | **{median(ratios):.3f}** | {medians[250]:.3f}-{medians[9749]:.3f} | "
              f"{sum(x <= 0.9 for x in ratios)} | {sum(x <= 1.0 for x in ratios)} | {len(ratios)} |")


def conns_report(results):
    """Idle connections (bench/conns.sh): RSS per connection and the active client's latency."""
    recs = load(results)
    machine = next((r for r in recs if r.get("name") == "machine"), {})
    print(f"held {machine.get('held')} of {machine.get('requested')} requested "
          f"(fd limit {machine.get('fd_limit')}), load {machine.get('loadavg_start')}, "
          f"active client: {machine.get('active')}\n")
    print("| server | idle connections | RSS MiB | bytes per connection | active p50 ms | p99 ms | p99.9 ms | active errors | idle open errors | loadavg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in recs:
        if not r.get("name", "").startswith("memory-"):
            continue
        alone = r.get("active_alone") or {}
        lat = alone.get("latency_ms", {})
        if lat:
            print(f"| {r['name'][len('memory-'):]} | 0 | {r['rss_idle_kb'] / 1024:.1f} | - | {lat['p50']:.2f} | "
                  f"{lat['p99']:.2f} | {lat['p999']:.2f} | {alone['errors']} | - | - |")
        for point in r["points"]:
            active = point.get("active") or {}
            lat = active.get("latency_ms", {})
            cells = (f"{lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p999']:.2f} | {active['errors']}"
                     if lat else "- | - | - | -")
            print(f"| {r['name'][len('memory-'):]} | {point['connections']:,} | {point['rss_kb'] / 1024:.1f} | "
                  f"{point['bytes_per_conn']:,} | {cells} | {point['load']['errors']} | {point.get('loadavg', '-')} |")


def latency_report(results):
    """Pinned latency (bench/latency.sh): p50/p99/p99.9 at fractions of the measured maximum."""
    recs = load(results)
    machine = next((r for r in recs if r.get("name") == "machine"), {})
    print(f"load generator: {machine.get('loadgen_cpus')}, server: {machine.get('server_cpus')}, "
          f"load at start {machine.get('loadavg_start')}\n")
    print("| path | round | of max | rate req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms | server CPU us/req | errors | other load (cores) | stolen by the host (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in recs:
        if r.get("kind") != "pinned":
            continue
        run = r["loadgen"]
        lat = run["latency_ms"]
        frac = r["fraction"]
        print(f"| {r['path']} | {r['round']} | {'max' if frac == 1 else f'{frac:.0%}'} | "
              f"{fmt(run.get('target_rate'))} | {run['rps']:,.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
              f"{lat['p999']:.2f} | {lat['max']:.2f} | {fmt(r.get('cpu_per_req_us'), 1)} | {run['errors']} | "
              f"{r.get('other_cores', 0):.2f} | {fmt_steal(r)} |")


def fmt_steal(r):
    """Cores' worth of time the hypervisor ran something else while ours were runnable."""
    window = r.get("window_s")
    return f"{r['steal_s'] / window:.2f}" if window and "steal_s" in r else "-"


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    commands = {
        "free-ports": free_ports,
        "wait-http": wait_http,
        "wait-tcp": wait_tcp,
        "metric": metric,
        "wait-line": wait_line,
        "record": record,
        "add": lambda results, rec: append(results, json.loads(rec)),
        "get": get,
        "half-rate": half_rate,
        "rate-at": rate_at,
        "latency-report": latency_report,
        "speed": speed,
        "report": report,
        "pairs": pairs_against,
        "pool": pool,
        "conns-report": conns_report,
        "perf-summary": perf_summary,
        "callgrind-summary": callgrind_summary,
    }
    if cmd not in commands:
        sys.exit(__doc__)
    commands[cmd](*args)


if __name__ == "__main__":
    main(sys.argv)
