#!/usr/bin/env bash
# One-command comparison: direct vs podproxy (defaults, access log on) vs podproxy-logs-off
# vs nginx (Gonka stock semantics) vs nginx (tuned) vs haproxy (tuned), one interleaved run
# on this machine. Every proxy writes an access log to a file, as a host runs it.
#
#   benches/compare/run.sh            # full run, about 9–11 minutes plus the build (runs 17–18)
#   QUICK=1 benches/compare/run.sh    # about 2 minutes (shorter wrk, 1 SSE, quiet and burst round, 256 MiB bodies)
#   TARGETS=direct,podproxy QUICK=1 benches/compare/run.sh   # a subset
#   WORKLOADS=small,sse TARGETS=podproxy,nginx-tuned QUICK=1 benches/compare/run.sh
#   WORKLOADS=burst QUICK=1 benches/compare/run.sh           # bursts of 1,000 and 2,000 new streams
#   STRICT=1 benches/compare/run.sh   # exit status 3 when a target is missed
#   PODPROXY_B_BIN=/tmp/old-podproxy TARGETS=podproxy,podproxy-b,nginx-tuned benches/compare/run.sh
#                                     # A/B: this tree's build against another, both at their defaults
#   WORKLOADS=small,burst TARGETS=podproxy,podproxy-named benches/compare/run.sh
#                                     # upstreams named `localhost` (through podproxy's resolver)
#
# Workloads: small, sse, burst, idle (2,000 slow streams), large. The targets (MET / MISSED)
# are printed at the end and written to last-table.md; the script exits 0 when targets are
# missed unless STRICT=1 (non-zero then). It exits non-zero on errors (a tool missing, the
# simulator not starting) either way.
#
# podproxy is the static musl binary hosts run (the image's), built here in release.
# Needs nginx, haproxy, wrk, curl, python3, rustc and the musl target (installs nothing):
#   apt-get update && apt-get install -y nginx haproxy wrk curl python3 musl-tools
#   rustup target add x86_64-unknown-linux-musl
# Writes benches/compare/results.json, benches/compare/chart.svg, benches/compare/last-table.md
# and prints the Markdown table. Everything listens on 127.0.0.1 only; every process this
# script starts is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/common.sh
require "nginx haproxy wrk curl python3 (rustc/cargo: rustup)" nginx haproxy wrk curl python3 rustc cargo
build_release
mkdir -p target/bench-compare
rustc -O --edition 2021 benches/compare/sseload.rs -o target/bench-compare/sseload
export SSELOAD_BIN="$PWD/target/bench-compare/sseload"
run_harness benches/compare/harness.py
