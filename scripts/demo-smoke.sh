#!/usr/bin/env bash
# Runs `podproxy demo` the way the README tells a newcomer to, on spare ports, tries the
# curl commands it prints, and checks the answers. Bounded: gives up after ~30 s.
set -euo pipefail
bin=${1:-target/debug/podproxy}
poc=${POC_PORT:-18080}
inf=${INFERENCE_PORT:-15000}
log=$(mktemp)
admin=${ADMIN_PORT:-19901}
POC_PORT=$poc INFERENCE_PORT=$inf PODPROXY_ADMIN_BIND=127.0.0.1:$admin "$bin" demo >"$log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -f "$log"' EXIT

for _ in $(seq 1 150); do
  curl -s -o /dev/null "http://127.0.0.1:$poc/api/v1/state" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "demo exited early"; exit 1; }
  sleep 0.2
done

fail() { echo "demo smoke FAILED: $*"; echo "--- demo output"; cat "$log"; exit 1; }

# The demo listens on loopback only (its backends are toys): /proc/net/tcp lists the
# listening sockets (state 0A) by hex address:port.
for port in $poc $inf; do
  hex=$(printf '%04X' "$port")
  grep -q " 0100007F:$hex 00000000:0000 0A " /proc/net/tcp || fail "nothing listens on 127.0.0.1:$port"
  if grep -q " 00000000:$hex 00000000:0000 0A " /proc/net/tcp; then fail "port $port listens on every interface"; fi
done

stream=$(curl -sN --max-time 20 "http://127.0.0.1:$inf/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model":"Qwen/Qwen3-32B-FP8","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}')
events=$(grep -c '^data: {' <<<"$stream" || true)
[ "$events" = 5 ] || fail "expected 5 SSE events, got $events: $stream"
grep -q '^data: \[DONE\]' <<<"$stream" || fail "stream did not end with [DONE]"

state=$(curl -s --max-time 10 -w ' %{http_code}' "http://127.0.0.1:$poc/v3.0.8/api/v1/state")
[ "$state" = '{"state":"STOPPED"} 200' ] || fail "state through the PoC port: $state"

# As the DAPI sends it: JSON without Content-Type (the simulators answer that 422, as
# FastAPI >= 0.132 does, unless podproxy adds the header).
code=$(curl -s --max-time 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$poc/v3.0.8/api/v1/inference/pow/init/generate" \
  -H 'Content-Type:' -d '{"url":"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8","block_height":1,"r_target":1.4013564660458173}')
[ "$code" = 200 ] || fail "PoC init answered $code"
for _ in $(seq 1 50); do grep -q 'mlnode sim received POST /api/v1/inference/pow/init/generate' "$log" && break; sleep 0.1; done
grep 'mlnode sim received POST' "$log" | grep -q '"url":"http://127.0.0.1:[0-9]*/v2/poc-batches/Qwen%252FQwen3-32B-FP8","block_height":1,"r_target":1.4013564660458173' \
  || fail "PoC callback url was not rewritten as expected"

metrics=$(curl -s --max-time 10 "http://127.0.0.1:$admin/metrics")
grep -q '^podproxy_sse_events_per_stream_sum{upstream="vllm"} 6' <<<"$metrics" \
  || fail "admin /metrics lacks the stream's 6 events (5 tokens + [DONE]): $(grep sse_events <<<"$metrics")"
grep -q '^podproxy_poc_callback_rewritten_total 1' <<<"$metrics" || fail "admin /metrics lacks the PoC rewrite"

kill -TERM $pid
for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -0 $pid 2>/dev/null && fail "demo did not stop within 10 s of SIGTERM"
wait $pid || fail "demo exited non-zero after SIGTERM"
trap 'rm -f "$log"' EXIT
echo "demo smoke: loopback only, 5 SSE events, /api/v1/state 200, PoC url rewritten, metrics counted, clean exit"
