#!/usr/bin/env bash
# LLM-aware balancing benchmark: podproxy least outstanding vs signals vs
# signals + affinity vs haproxy leastconn vs nginx least_conn, one interleaved run over
# GPU-like simulated vLLM replicas (testkit::gpu). See docs/balancing.md.
#
#   benches/llm/run.sh                    # full run, about 12 minutes (3 rounds x 5 arms x 40 s + memory phase)
#   QUICK=1 benches/llm/run.sh            # about 4 minutes
#   ARMS=lo,affinity QUICK=1 benches/llm/run.sh
#
# Needs nginx, haproxy, python3, cargo and the musl target (podproxy is measured as the static
# binary hosts run; installs nothing):
#   apt-get update && apt-get install -y nginx haproxy python3 musl-tools
#   rustup target add x86_64-unknown-linux-musl
# Writes benches/llm/results.json and benches/llm/last-table.md and prints the table; exits
# 1 when a target is not met.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/common.sh
require "nginx haproxy python3" nginx haproxy python3 cargo
build_release
run_harness benches/llm/harness.py
