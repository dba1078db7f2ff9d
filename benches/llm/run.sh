#!/usr/bin/env bash
# LLM-aware balancing benchmark (issue 21): podproxy least outstanding vs signals vs
# signals + affinity vs haproxy leastconn vs nginx least_conn, one interleaved run over
# GPU-like simulated vLLM replicas (testkit::gpu). See docs/balancing.md.
#
#   benches/llm/run.sh                    # full run, about 12 minutes (3 rounds x 5 arms x 40 s + memory phase)
#   QUICK=1 benches/llm/run.sh            # about 4 minutes
#   ARMS=lo,affinity QUICK=1 benches/llm/run.sh
#
# Needs nginx, haproxy, python3 and cargo (installs nothing):
#   apt-get update && apt-get install -y nginx haproxy python3
# Writes benches/llm/results.json and benches/llm/last-table.md and prints the table; exits
# 1 when a target of the issue is not met.
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
for t in nginx haproxy python3 cargo; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2
  echo "install with: apt-get update && apt-get install -y nginx haproxy python3" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

child=
stop_child() { if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi; }
trap stop_child EXIT
trap 'stop_child; exit 143' INT TERM

echo "building release podproxy and podproxy-sim..." >&2
cargo build --release -q --bin podproxy -p podproxy
cargo build --release -q -p podproxy-testkit --bin podproxy-sim
export PODPROXY_BIN="$PWD/target/release/podproxy" SIM_BIN="$PWD/target/release/podproxy-sim"
echo "machine: $(nproc) cores, $(uname -r), load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 benches/llm/harness.py &
child=$!
wait "$child"
