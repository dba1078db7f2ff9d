#!/usr/bin/env bash
# The compose deployment for real, with podman-compose: deploy/compose/docker-compose.yml as
# shipped, with the mlnode image replaced by a simulator image (scripts/compose-sim.override.yml;
# scripts/mlnode-sim.Containerfile) and podproxy built from the static binary. Through the
# published ports only it checks: the first log lines name the mounted config; a PoC start
# without Content-Type reaches the mlnode with its callback url rewritten and the header
# added (the simulator answers 422 without it, as current FastAPI does); /v3.0.8/ is
# stripped; a streaming completion passes, on the inference port and on the PoC port's /v1/
# (both straight to the vLLM ports); /metrics answers on the host's loopback. Then it
# recreates the mlnode container (new address) while a bounded client loop runs: requests in
# the gap get 502/503 quickly, never hang, and once the new container is healthy every
# request succeeds. Last, the same stack with the mTLS overlay and Gonka-style certificates:
# both ports accept the DAPI's certificate only, and PoC callbacks point at the relay.
# Everything it creates is removed by name at the end, also on failure.
# Needs root, podman and podman-compose (scripts/container-setup.sh).
# Usage: scripts/compose-check.sh <static podproxy-sim binary>
#   (podproxy's image is built from target/x86_64-unknown-linux-musl/release/podproxy)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/containers-lib.sh
sim=${1:?static podproxy-sim binary}
bin=target/x86_64-unknown-linux-musl/release/podproxy
project=podproxy-ci
proxy_image=localhost/podproxy-ci:compose
sim_image=localhost/podproxy-ci-mlnode-sim:compose
mlnode=${project}_mlnode-308_1
inference=${project}_inference_1
network=${project}_default
work=$(mktemp -d)
client=""
files=(-f "$PWD/deploy/compose/docker-compose.yml" -f "$PWD/scripts/compose-sim.override.yml")
compose() {
  timeout 120 podman-compose -p "$project" "${files[@]}" "$@" >>"$work/compose.log" 2>&1
}
remove_stack() {
  podman rm -f -t 0 "$inference" "$mlnode" >/dev/null 2>&1 || true
  podman network rm -f "$network" >/dev/null 2>&1 || true
}
cleanup() {
  [ -n "$client" ] && kill -9 "$client" 2>/dev/null || true
  remove_stack
  remove_built
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM
fail() {
  echo "compose check FAILED: $*"
  echo "--- podman-compose output (tail)"; tail -n 20 "$work/compose.log" 2>/dev/null || true
  echo "--- podman logs $inference"; podman logs "$inference" 2>&1 | tail -n 30 || true
  echo "--- podman logs $mlnode"; podman logs "$mlnode" 2>&1 | tail -n 10 || true
  exit 1
}
[ -x "$bin" ] || fail "$bin missing"
static_or_fail "$bin"
static_or_fail "$sim"
remove_stack   # leftovers of an interrupted run
podman rmi -f "$proxy_image" "$sim_image" >/dev/null 2>&1 || true

echo "-- images: podproxy (prebuilt static binary) and the mlnode simulator"
build_image "$proxy_image" . -f Dockerfile --build-arg PODPROXY_BINARY=prebuilt || fail "podman build podproxy"
mkdir "$work/simctx" "$work/cache"
cp "$sim" "$work/simctx/podproxy-sim"
build_image "$sim_image" "$work/simctx" -f scripts/mlnode-sim.Containerfile || fail "podman build simulator"

poc=$(free_port); inf=$(free_port); admin=$(free_port)
export PORT=$poc INFERENCE_PORT=$inf ADMIN_PORT=$admin PODPROXY_IMAGE=$proxy_image \
  MLNODE_SIM_IMAGE=$sim_image MLNODE_SIM_CACHE=$work/cache POC_CALLBACK_URL=http://203.0.113.7:9100
echo "-- podman-compose up (host ports: PoC $poc, inference $inf, admin 127.0.0.1:$admin)"
compose up -d || fail "podman-compose up"

# Ready once podproxy reports every upstream ready: a backend whose container was not
# listening yet at the first probe is down until a later probe (health.interval) finds it.
wait_ready() {
  local ready=""
  for _ in $(seq 1 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$admin/readyz")" = 200 ] && { ready=1; break; }
    sleep 0.2
  done
  [ -n "$ready" ] || fail "/readyz on 127.0.0.1:$admin did not answer 200 within 30 s"
}
wait_ready
# (Output into variables before grep -q: an early exit would kill the writer, and pipefail
# would turn that into a failure.)
first_lines=$(podman logs "$inference" 2>&1 | sed -n '1,8p')
[[ "$first_lines" == *'"config":"/etc/podproxy/podproxy.toml"'* ]] \
  || fail "the first log lines do not name the mounted config /etc/podproxy/podproxy.toml"
[ "$(podman port "$inference" 9901/tcp)" = "127.0.0.1:$admin" ] || fail "admin port not published on loopback only: $(podman port "$inference")"

mlnode_requests() { podman logs "$mlnode" 2>/dev/null | sed -n 's/^request //p'; }
mlnode_received() { local r; r=$(mlnode_requests); grep -q -- "$1" <<<"$r"; }
# mlnode_saw PATTERN: waits up to 5 s for the mlnode to print a request matching it.
mlnode_saw() {
  for _ in $(seq 1 50); do
    mlnode_received "$1" && return 0
    sleep 0.1
  done
  return 1
}

# PoC v2 start the way the DAPI sends it: version prefix, JSON body, no Content-Type, and the
# Docker-internal callback url.
body='{"url":"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8","block_hash":"0xab","block_height":1234,"public_key":"pk","r_target":1.4013564660458173,"node_id":0,"node_count":1,"params":{"dim":1024}}'
r=$(curl -s --max-time 10 -H 'Content-Type:' -w ' %{http_code}' -d "$body" \
  "http://127.0.0.1:$poc/v3.0.8/api/v1/inference/pow/init/generate")
[ "$r" = '{"status":"OK"} 200' ] || fail "PoC start: $r"
mlnode_saw '"/api/v1/inference/pow/init/generate"' || fail "the mlnode did not print the PoC start"
mlnode_requests | python3 -c '
import json, sys
want = {"url": "http://203.0.113.7:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8"}
for line in sys.stdin:
    r = json.loads(line)
    if r["target"] != "/api/v1/inference/pow/init/generate":
        continue
    assert r["method"] == "POST", r
    assert r["content_type"] == "application/json", r
    sent = sys.argv[1]
    expected = sent.replace("http://api:9100", "http://203.0.113.7:9100")
    assert r["body"] == expected, ("body changed beyond the url", r["body"], expected)
    sys.exit(0)
sys.exit("no PoC start recorded")
' "$body" || fail "PoC start as the mlnode received it"

state=$(curl -s --max-time 10 -w ' %{http_code}' "http://127.0.0.1:$poc/v3.0.8/api/v1/state")
[ "$state" = '{"state":"STOPPED"} 200' ] || fail "/v3.0.8/api/v1/state: $state"
mlnode_received '"target":"/api/v1/state"' || fail "the mlnode did not receive /api/v1/state (prefix not stripped)"
mlnode_received 'v3.0.8' && fail "a /v3.0.8/ prefix reached the mlnode"

for url in "http://127.0.0.1:$inf/v1/chat/completions" "http://127.0.0.1:$poc/v3.0.8/v1/chat/completions"; do
  stream=$(curl -sN --max-time 20 -H 'Content-Type:' -d '{"stream":true,"messages":[{"role":"user","content":"hi"}]}' "$url")
  [ "$(grep -c '^data: {' <<<"$stream")" = 8 ] && grep -q '^data: \[DONE\]' <<<"$stream" || fail "stream via $url: $stream"
done

metrics=$(curl -s --max-time 5 "http://127.0.0.1:$admin/metrics")
grep -q '^podproxy_requests_total{listener="poc"' <<<"$metrics" || fail "/metrics has no PoC request counter: $(head -c 600 <<<"$metrics")"
grep -q '^podproxy_requests_total{listener="inference"' <<<"$metrics" || fail "/metrics has no inference request counter"

echo "-- recreate the mlnode container under a client loop"
old_ip=$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$mlnode")
touch "$work/client.out"
python3 - "$poc" "$inf" "$work/client.out" "$work/client.stop" <<'PY' &
import http.client, os, sys, time
poc, inf, out, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
targets = [("poc", poc, "GET", "/v3.0.8/api/v1/state", None),
           ("inference", inf, "POST", "/v1/completions", b'{"prompt":"x","max_tokens":2}')]
deadline = time.monotonic() + 120
with open(out, "a", buffering=1) as f:
    i = 0
    while not os.path.exists(stop) and time.monotonic() < deadline:
        name, port, method, path, body = targets[i % 2]
        i += 1
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request(method, path, body=body)  # no Content-Type, as the DAPI sends
            r = c.getresponse()
            r.read()
            status = str(r.status)
            c.close()
        except Exception as e:
            status = "error:" + type(e).__name__
        f.write(f"{name} {status} {(time.monotonic() - t0) * 1000:.0f}\n")
        time.sleep(0.05)
PY
client=$!
wait_lines() {  # wait_lines SECONDS PYTHON-CONDITION-ON-LINES-AFTER-MARK
  local until=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$until" ]; do
    tail -n +"$mark" "$work/client.out" | python3 -c "import sys; l=[x.split() for x in sys.stdin]; sys.exit(0 if ($2) else 1)" && return 0
    kill -0 "$client" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}
mark=1
wait_lines 20 'sum(1 for x in l if x[1] == "200") >= 10' || fail "the client loop did not get going: $(tail -n 5 "$work/client.out")"
mark=$(( $(wc -l <"$work/client.out") + 1 ))
podman rm -f -t 0 "$mlnode" >/dev/null || fail "podman rm $mlnode"
gap_mark=$mark
wait_lines 20 'all(sum(1 for x in l if x[0] == t and x[1] != "200") >= 3 for t in ("poc", "inference"))' \
  || fail "no failed requests while the mlnode was gone: $(tail -n 5 "$work/client.out")"
mark=$(( $(wc -l <"$work/client.out") + 1 ))
compose up -d --no-deps mlnode-308 || fail "podman-compose up mlnode-308"
new_ip=$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$mlnode")
[ -n "$new_ip" ] && [ "$new_ip" != "$old_ip" ] || fail "the recreated mlnode has the old address ($old_ip -> $new_ip)"
wait_lines 30 'all(any(x[0] == t and x[1] == "200" for x in l) for t in ("poc", "inference"))' \
  || fail "podproxy did not find the recreated mlnode at $new_ip: $(tail -n 5 "$work/client.out")"
wait_lines 30 'all(sum(1 for i, x in enumerate(l) if x[0] == t and x[1] == "200" and any(y[0] == t and y[1] == "200" for y in l[:i])) >= 20 for t in ("poc", "inference"))' \
  || fail "too few requests after the recreate: $(tail -n 5 "$work/client.out")"
touch "$work/client.stop"
timeout 10 tail --pid="$client" -f /dev/null || fail "the client loop did not stop"
client=""
python3 - "$work/client.out" "$gap_mark" <<'PY' || fail "client loop results"
import sys
lines = [x.split() for x in open(sys.argv[1])]
gap = int(sys.argv[2]) - 1
before, after = lines[:gap], lines[gap:]
bad = [x for x in before if x[1] != "200"]
assert not bad, f"failures before the mlnode was removed: {bad[:5]}"
for t in ("poc", "inference"):
    mine = [x for x in after if x[0] == t]
    # A request in flight when the container went away may still end 200, or be cut
    # (the client then sees the connection close: podproxy never ends a broken response
    # as if complete); at most one such cut request per target.
    first_gap = next(i for i, x in enumerate(mine) if x[1] in ("502", "503"))
    in_flight = mine[:first_gap]
    cut = [x for x in in_flight if x[1] != "200"]
    assert len(cut) <= 1 and all(x[1].startswith("error:") for x in cut), f"{t}: at the removal: {in_flight}"
    rest = mine[first_gap:]
    first_ok = next(i for i, x in enumerate(rest) if x[1] == "200")
    gap_answers, healthy = rest[:first_ok], rest[first_ok:]
    wrong = [x for x in gap_answers if x[1] not in ("502", "503")]
    assert not wrong, f"{t}: in the gap expected 502/503 only, got {wrong[:5]}"
    slow = max(int(x[2]) for x in gap_answers)
    assert slow < 3000, f"{t}: a gap answer took {slow} ms"
    failed = [x for x in healthy if x[1] != "200"]
    assert not failed, f"{t}: failures after the recreated mlnode answered: {failed[:5]}"
    codes = sorted(set(x[1] for x in gap_answers))
    ok_before = sum(1 for x in before if x[0] == t)
    print(f"  {t}: {ok_before} ok before, {len(cut)} cut at the removal, {len(gap_answers)} answered {'/'.join(codes)} in the gap (slowest {slow} ms), {len(healthy)} ok after")
PY
echo "-- the mTLS overlay (Gonka-style certificates, pinned)"
remove_stack
mkdir "$work/certs"
for n in dapi mlnode; do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 -subj "/CN=gonka-$n" \
    -addext "subjectAltName=DNS:api,DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,digitalSignature,keyCertSign" -addext "extendedKeyUsage=serverAuth,clientAuth" \
    -keyout "$work/certs/$n.key" -out "$work/certs/$n.crt" 2>/dev/null || fail "openssl req"
done
chmod 0644 "$work/certs/"*   # read by uid 65532 in the container
files+=(-f "$PWD/deploy/compose/docker-compose.mtls.yml" -f "$PWD/scripts/compose-sim.mtls.override.yml")
export MLNODE_SIM_CERTS=$work/certs NETWORK_NODE=203.0.113.7
compose up -d || fail "podman-compose up (mTLS)"
tls=(--cacert "$work/certs/mlnode.crt" --cert "$work/certs/dapi.crt" --key "$work/certs/dapi.key")
ok=""
for _ in $(seq 1 150); do
  state=$(curl -s --max-time 2 "${tls[@]}" "https://127.0.0.1:$poc/v3.0.8/api/v1/state" || true)
  [ "$state" = '{"state":"STOPPED"}' ] && { ok=1; break; }
  sleep 0.2
done
[ -n "$ok" ] || fail "https PoC port with the DAPI's certificate did not answer within 30 s: $state"
curl -s --max-time 5 --cacert "$work/certs/mlnode.crt" "https://127.0.0.1:$poc/api/v1/state" >/dev/null 2>&1 \
  && fail "the PoC port answered without a client certificate"
curl -s --max-time 5 --cacert "$work/certs/mlnode.crt" --cert "$work/certs/mlnode.crt" --key "$work/certs/mlnode.key" \
  "https://127.0.0.1:$poc/api/v1/state" >/dev/null 2>&1 && fail "the PoC port answered a certificate that is not the DAPI's"
# /readyz stays 503 here (the callback relay's Network Node is not reachable from CI), so
# wait for the vLLM backends by the stream itself: one not yet listening at the first
# probe answers 503 until a later probe (health.interval) finds it.
streamed=""
for _ in $(seq 1 100); do
  stream=$(curl -sN --max-time 20 "${tls[@]}" -H 'Content-Type:' -d '{"stream":true,"messages":[]}' "https://127.0.0.1:$inf/v1/chat/completions")
  [ "$(grep -c '^data: {' <<<"$stream")" = 8 ] && grep -q '^data: \[DONE\]' <<<"$stream" && { streamed=1; break; }
  grep -q no_healthy_backend <<<"$stream" || break
  sleep 0.3
done
[ -n "$streamed" ] || fail "https stream: $stream"
r=$(curl -s --max-time 10 "${tls[@]}" -H 'Content-Type:' -w ' %{http_code}' -d "$body" \
  "https://127.0.0.1:$poc/v3.0.8/api/v1/inference/pow/init/generate")
[ "$r" = '{"status":"OK"} 200' ] || fail "PoC start over mTLS: $r"
mlnode_saw 'http://inference:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8' || fail "the PoC start over mTLS did not reach the mlnode with its callback pointed at the relay (http://inference:9100)"

echo "compose check: podman-compose stack (podproxy + mlnode simulator): config named at start, PoC callback rewritten with Content-Type added, /v3.0.8/ stripped, streams on both ports, /metrics on 127.0.0.1:$admin, mlnode recreated at a new address ($old_ip -> $new_ip) found with only quick 502/503 in the gap; mTLS overlay: pinned client certificate on both ports, PoC callback pointed at the relay"
