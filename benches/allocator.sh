#!/usr/bin/env bash
# Allocator comparison for the static binary: builds of the same source with different
# allocators, same machine, interleaved runs. Workloads: keep-alive small requests (wrk, 64
# connections) and 256 concurrent SSE streams (wrk POSTing stream=true chat completions).
# Usage: benches/allocator.sh <podproxy-sim (release)> <label>=<podproxy> ...
#          [DURATION=10] [ROUNDS=2]
# e.g.   t=x86_64-unknown-linux-musl
#        cargo build --release --target $t --bin podproxy && cp target/$t/release/podproxy /tmp/pp-jemalloc
#        cargo build --release --target $t --bin podproxy --no-default-features && cp target/$t/release/podproxy /tmp/pp-musl
#        benches/allocator.sh target/release/podproxy-sim jemalloc=/tmp/pp-jemalloc musl=/tmp/pp-musl
# The fuller comparison (bursts, slow streams, RSS, CPU per token) is benches/compare.
set -euo pipefail
sim=${1:?usage: benches/allocator.sh <podproxy-sim> <label>=<podproxy> ...}; shift
[ $# -ge 1 ] || { echo "usage: benches/allocator.sh <podproxy-sim> <label>=<podproxy> ..." >&2; exit 1; }
dur=${DURATION:-10}; rounds=${ROUNDS:-2}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
work=$(mktemp -d); pids=()
trap 'for p in "${pids[@]}"; do kill -9 $p 2>/dev/null || true; done; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo_port=$(free_port); vllm_port=$(free_port)
"$sim" --echo "127.0.0.1:$echo_port" --vllm "127.0.0.1:$vllm_port" --token-interval-ms 20 --tokens 32 >"$work/sim.log" 2>&1 &
pids+=($!); disown
for _ in $(seq 1 50); do grep -q '^ready' "$work/sim.log" && break; sleep 0.1; done

cat >"$work/sse.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
LUA

run_one() { # name binary -> prints: name rps p99 streams/s idle_kb peak_kb
  local name=$1 bin=$2 port cfg pid
  port=$(free_port)
  cfg="$work/$name.toml"
  cat >"$cfg" <<TOML
[server]
log_level = "warn"
[listeners.main]
bind = "127.0.0.1:$port"
routes = [{ prefix = "/v1/", upstream = "vllm" }, { prefix = "/", upstream = "echo" }]
[upstreams.echo]
urls = "http://127.0.0.1:$echo_port"
[upstreams.vllm]
urls = "http://127.0.0.1:$vllm_port"
TOML
  "$bin" --config "$cfg" >"$work/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$port/x" && break; sleep 0.1; done
  local idle; idle=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status)
  local small; small=$(wrk -t1 -c64 -d"${dur}s" --latency "http://127.0.0.1:$port/x")
  local rps p99; rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$small"); p99=$(awk '$1=="99%" {print $2}' <<<"$small")
  local sse; sse=$(wrk -t1 -c256 -d"${dur}s" -s "$work/sse.lua" "http://127.0.0.1:$port/v1/chat/completions")
  local sps; sps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$sse")
  local peak; peak=$(awk '/^VmHWM:/ {print $2}' /proc/$pid/status)
  kill -TERM $pid; wait $pid 2>/dev/null || true
  printf '%-9s %10s %8s %10s %8s %8s\n' "$name" "$rps" "$p99" "$sps" "$idle" "$peak"
}

printf '%-9s %10s %8s %10s %8s %8s\n' allocator "req/s" p99 "streams/s" idle_kB peak_kB
for r in $(seq 1 "$rounds"); do
  for build in "$@"; do
    run_one "${build%%=*}" "${build#*=}"
  done
done
