#!/usr/bin/env bash
# The real image under a real engine (podman with runc): builds the Dockerfile's final stage
# from the static binary already built on the host (no registry, nothing pulled), prints its
# size and fails above 10 MB, runs it with the embedded default config against simulated
# backends on the host (--network host), and checks: /readyz answers; a PoC-port request and
# a stream pass (the stream without Content-Type, to a vLLM that answers such a request 422
# as current FastAPI does: the embedded default adds the header); podproxy is PID 1 with
# uid 65532; SIGTERM during a stream lets the stream finish and exits 0 within the grace
# period. Then /metrics the documented way: admin API on all interfaces inside the container
# with a token, published on the host's loopback only. Everything it creates is removed by
# name at the end, also on failure. Needs root and podman (scripts/container-setup.sh).
# Usage: scripts/container-check.sh <static podproxy-sim binary>
#   (the image is built from target/x86_64-unknown-linux-musl/release/podproxy)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/containers-lib.sh
sim=${1:?static podproxy-sim binary}
bin=target/x86_64-unknown-linux-musl/release/podproxy
image=localhost/podproxy-ci:check
name=podproxy-ci-image
admin_name=podproxy-ci-image-admin
max_bytes=10000000
work=$(mktemp -d)
simpid=""
cleanup() {
  [ -n "$simpid" ] && kill -9 "$simpid" 2>/dev/null || true
  podman rm -f -t 0 "$name" "$admin_name" >/dev/null 2>&1 || true
  remove_built
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM
fail() {
  echo "container check FAILED: $*"
  echo "--- podman logs $name"; podman logs "$name" 2>&1 | tail -n 40 || true
  exit 1
}
[ -x "$bin" ] || fail "$bin missing: cargo build --release --target x86_64-unknown-linux-musl --bin podproxy"
static_or_fail "$bin"
# Leftovers of an interrupted run.
podman rm -f -t 0 "$name" "$admin_name" >/dev/null 2>&1 || true
podman rmi -f "$image" >/dev/null 2>&1 || true

echo "-- podman build (final stage from the prebuilt static binary)"
build_image "$image" . -f Dockerfile --build-arg PODPROXY_BINARY=prebuilt \
  --build-arg PODPROXY_GIT_COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
  || fail "podman build"
size=$(podman image inspect --format '{{.Size}}' "$image")
layers=$(podman image inspect --format '{{len .RootFS.Layers}}' "$image")
printf 'image %s: %d bytes (%.2f MB), %s layers, binary %d bytes\n' "$image" "$size" \
  "$(awk -v s="$size" 'BEGIN { print s / 1000000 }')" "$layers" "$(stat -c %s "$bin")"
[ "$size" -le "$max_bytes" ] || fail "image is $size bytes, above $max_bytes"
[ "$(podman image inspect --format '{{.Config.User}}' "$image")" = "65532:65532" ] || fail "image user is not 65532:65532"

vllm=$(free_port); mlnode=$(free_port); poc=$(free_port); inf=$(free_port); admin=$(free_port)
"$sim" --vllm "127.0.0.1:$vllm" --mlnode "127.0.0.1:$mlnode" --strict-content-type >"$work/sim.log" 2>&1 &
simpid=$!
disown "$simpid"
for _ in $(seq 1 100); do grep -q '^ready' "$work/sim.log" && break; sleep 0.1; done
grep -q '^ready' "$work/sim.log" || fail "simulated backends did not start: $(cat "$work/sim.log")"

echo "-- podman run (embedded default config, --network host)"
podman run -d --name "$name" --network host \
  -e POC_PORT="$poc" -e INFERENCE_PORT="$inf" -e PODPROXY_ADMIN_BIND="127.0.0.1:$admin" \
  -e MLNODE_URL="http://127.0.0.1:$mlnode" -e VLLM_URLS="http://127.0.0.1:$vllm" \
  "$image" >/dev/null || fail "podman run"

ready=""
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$admin/readyz")" = 200 ] && { ready=1; break; }
  [ "$(podman inspect --format '{{.State.Running}}' "$name")" = true ] || fail "container exited early"
  sleep 0.1
done
[ -n "$ready" ] || fail "/readyz did not answer 200 within 10 s"

state=$(curl -s --max-time 10 -w ' %{http_code}' "http://127.0.0.1:$poc/v3.0.8/api/v1/state")
[ "$state" = '{"state":"STOPPED"} 200' ] || fail "PoC port /v3.0.8/api/v1/state: $state"
stream=$(curl -sN --max-time 20 "http://127.0.0.1:$inf/v1/chat/completions" \
  -H 'Content-Type:' -H 'x-sim-tokens: 8' -d '{"stream":true,"messages":[]}')
[ "$(grep -c '^data: {' <<<"$stream")" = 8 ] && grep -q '^data: \[DONE\]' <<<"$stream" || fail "stream: $stream"

hostpid=$(podman inspect --format '{{.State.Pid}}' "$name")
[ "$(awk '/^NSpid:/ {print $NF}' "/proc/$hostpid/status")" = 1 ] || fail "podproxy is not PID 1 in its container"
[ "$(awk '/^Uid:/ {print $2}' "/proc/$hostpid/status")" = 65532 ] || fail "podproxy does not run as uid 65532"
[ "$(awk '/^Gid:/ {print $2}' "/proc/$hostpid/status")" = 65532 ] || fail "podproxy does not run as gid 65532"
[ "$(readlink "/proc/$hostpid/exe" | xargs basename)" = podproxy ] || fail "PID 1 is not /podproxy"

# SIGTERM while a stream is in flight (2 s of tokens): the stream ends complete, exit 0,
# well within the 30 s grace period.
curl -sN --max-time 30 "http://127.0.0.1:$inf/v1/chat/completions" -H 'x-sim-tokens: 20' \
  -H 'x-sim-interval-ms: 100' -H 'Content-Type: application/json' -d '{"stream":true,"messages":[]}' >"$work/drain.out" &
client=$!
for _ in $(seq 1 50); do grep -q '^data: {' "$work/drain.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^data: {' "$work/drain.out" || fail "the stream to drain did not start"
start=$(date +%s)
podman kill --signal TERM "$name" >/dev/null
timeout 40 podman wait "$name" >/dev/null || fail "no exit within 40 s of SIGTERM"
took=$(( $(date +%s) - start ))
wait "$client" || fail "the in-flight stream failed during the drain (curl $?)"
[ "$(grep -c '^data: {' "$work/drain.out")" = 20 ] && grep -q '^data: \[DONE\]' "$work/drain.out" \
  || fail "the in-flight stream was cut by SIGTERM: $(cat "$work/drain.out")"
code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit status $code after SIGTERM"
[ "$took" -le 30 ] || fail "exit took ${took}s, longer than the 30 s grace period"
logs=$(podman logs "$name" 2>&1)
grep -q 'SIGTERM received' <<<"$logs" || fail "SIGTERM was not handled by podproxy"
# Metrics the documented way (docs/containers.md): on a bridge network, the admin API bound to
# all interfaces inside the container with a token, published on the host's loopback only.
adm=$(free_port)
tok=ci-admin-token-0123456789abcdef
podman run -d --name "$admin_name" -p "127.0.0.1:$adm:9901" \
  -e PODPROXY_ADMIN_BIND=0.0.0.0:9901 -e PODPROXY_ADMIN_TOKEN="$tok" "$image" >/dev/null || fail "podman run (admin)"
[ "$(podman port "$admin_name" 9901/tcp)" = "127.0.0.1:$adm" ] || fail "admin not published on loopback: $(podman port "$admin_name")"
code=""
for _ in $(seq 1 100); do
  code=$(curl -s -o "$work/metrics" -w '%{http_code}' --max-time 2 -H "Authorization: Bearer $tok" "http://127.0.0.1:$adm/metrics" || true)
  [ "$code" = 200 ] && break
  [ "$(podman inspect --format '{{.State.Running}}' "$admin_name")" = true ] || { name=$admin_name; fail "admin container exited"; }
  sleep 0.1
done
[ "$code" = 200 ] && grep -q '^podproxy_' "$work/metrics" || { name=$admin_name; fail "/metrics through 127.0.0.1:$adm: $code"; }
[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$adm/metrics")" = 401 ] \
  || { name=$admin_name; fail "/metrics without the admin token is not refused"; }
podman rm -f -t 0 "$admin_name" >/dev/null

echo "container check: image $size bytes (limit $max_bytes); embedded default under podman: /readyz 200, request + stream proxied, PID 1 as uid 65532, SIGTERM mid-stream -> stream complete, exit 0 in ${took}s; /metrics with the admin token on 127.0.0.1:$adm"
