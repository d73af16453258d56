#!/usr/bin/env bash
# The quiet run of 2026-11-30 (BENCHMARKS.md, "Scale: where we stand"): every scale row,
# one after the other, nothing else running. Run from the repository root under
# `flock /work/bench.lock` on a shared machine.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
R=bench/results/quiet-2026-11-30
mkdir -p $R
t0=$SECONDS
stamp() { echo "== $(date -u +%H:%M:%S) [$((SECONDS - t0))s] $* (load $(cut -d' ' -f1-3 /proc/loadavg))"; }
stamp floor;      bash bench/floor.sh --no-build --rounds 5 --seconds 2 --out $R/floor > $R/floor.log 2>&1
stamp devices;    bash bench/devices.sh --no-build --rounds 5 --seconds 2 --out $R/devices > $R/devices.log 2>&1
stamp cachemem;   for n in 100000 1000000; do target/release/examples/chain_cache_memory --devices target/bench-devices/100000/devices.pem --entries $n; done > $R/chain_cache_memory.jsonl 2>&1
stamp crl;        bash bench/crl.sh --no-build --out $R/crl > $R/crl.log 2>&1
stamp conns;      bash bench/conns.sh --no-build --out $R/conns > $R/conns.log 2>&1
stamp latency;    bash bench/latency.sh --no-build --out $R/latency > $R/latency.log 2>&1
stamp resumption; bash bench/resumption.sh --rounds 5 --seconds 2 --out $R/resumption.jsonl > $R/resumption.log 2>&1
stamp quick;      /usr/bin/time -f "%e s" bash bench/run.sh --quick --no-build > $R/run-quick.log 2>&1
stamp done
