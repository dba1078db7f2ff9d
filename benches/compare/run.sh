#!/usr/bin/env bash
# One-command comparison: direct vs podproxy (defaults, access log on) vs podproxy-logs-off
# vs nginx (Gonka stock semantics) vs nginx (tuned) vs haproxy (tuned), one interleaved run
# on this machine. Every proxy writes an access log to a file, as a host runs it.
#
#   benches/compare/run.sh            # full run, about 8 minutes plus the build (run 6)
#   QUICK=1 benches/compare/run.sh    # about 1.5 minutes (shorter wrk, 1 SSE and 1 burst round, 256 MiB bodies)
#   TARGETS=direct,podproxy QUICK=1 benches/compare/run.sh   # a subset
#   WORKLOADS=small,sse TARGETS=podproxy,nginx-tuned QUICK=1 benches/compare/run.sh
#   WORKLOADS=burst QUICK=1 benches/compare/run.sh           # bursts of 1,000 and 2,000 new streams
#   STRICT=1 benches/compare/run.sh   # exit status 3 when a target is missed
#
# Workloads: small, sse, burst, idle (2,000 slow streams), large. The targets (MET / MISSED)
# are printed at the end and written to last-table.md; the script exits 0 when targets are
# missed unless STRICT=1 (non-zero then). It exits non-zero on errors (a tool missing, the
# simulator not starting) either way.
#
# Needs nginx, haproxy, wrk, curl, python3 and rustc (installs nothing):
#   apt-get update && apt-get install -y nginx haproxy wrk curl python3
# Writes benches/compare/results.json, benches/compare/chart.svg, benches/compare/last-table.md
# and prints the Markdown table. Everything listens on 127.0.0.1 only; every process this
# script starts is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
for t in nginx haproxy wrk curl python3 rustc cargo; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2
  echo "install with: apt-get update && apt-get install -y nginx haproxy wrk curl python3 (rustc/cargo: rustup)" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin"
# every stream holds two sockets in a proxy; 2,000 streams need more than the usual 1024
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

child=
stop_child() { if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi; }
trap stop_child EXIT
trap 'stop_child; exit 143' INT TERM

echo "building release podproxy and podproxy-sim..." >&2
cargo build --release -q --bin podproxy -p podproxy
cargo build --release -q -p podproxy-testkit --bin podproxy-sim
mkdir -p target/bench-compare
rustc -O --edition 2021 benches/compare/sseload.rs -o target/bench-compare/sseload

export PODPROXY_BIN="$PWD/target/release/podproxy" SIM_BIN="$PWD/target/release/podproxy-sim" \
       SSELOAD_BIN="$PWD/target/bench-compare/sseload"
echo "machine: $(nproc) cores, $(uname -r), load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 benches/compare/harness.py &
child=$!
wait "$child"
