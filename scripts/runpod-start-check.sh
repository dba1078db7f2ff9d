#!/usr/bin/env bash
# Supervision of config/runpod/start.sh, run as shipped with the real podproxy and a stand-in
# `uvicorn` on PATH (the mlnode image cannot be pulled here): the stand-in runs the testkit
# mlnode simulator on the port start.sh gives it and records the signals it gets. Checks:
# 1. the PoC port is taken: the script exits non-zero naming the busy address, and no mlnode
#    is left running;
# 2. podproxy dies (SIGKILL): the mlnode gets SIGTERM, the script exits with podproxy's
#    status (137);
# 3. the mlnode dies (SIGKILL) during a stream: podproxy is stopped with SIGTERM, the stream
#    still finishes (drain), the script exits with the mlnode's status (137);
# 4. SIGTERM to the script during a stream: it reaches both, the stream finishes, the script
#    exits 0.
# Every wait is bounded; every process it starts is killed by pid at the end.
# Usage: scripts/runpod-start-check.sh <podproxy binary> <podproxy-sim binary>
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/containers-lib.sh
bin=$(realpath "${1:?podproxy binary}")
sim=$(realpath "${2:?podproxy-sim binary}")
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -f "$work/standin.pid" ] && kill -9 "$(cat "$work/standin.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM
fail() {
  echo "runpod start.sh check FAILED: $*"
  echo "--- start.sh output"; tail -n 30 "$work/out" 2>/dev/null || true
  exit 1
}

mkdir "$work/bin"
ln -s "$bin" "$work/bin/podproxy"
cat >"$work/bin/uvicorn" <<STANDIN
#!/usr/bin/env bash
# stand-in for: uvicorn api.app:app --host=127.0.0.1 --port=N
port=""
for a in "\$@"; do case "\$a" in --port=*) port=\${a#--port=} ;; esac; done
[ "\$1 \$2" = "api.app:app --host=127.0.0.1" ] && [ -n "\$port" ] || { echo "stand-in: unexpected args \$*" >&2; exit 64; }
child=""
trap 'echo TERM >>"$work/standin.signals"; [ -n "\$child" ] && kill -TERM \$child && wait \$child; exit 0' TERM
"$sim" --mlnode "127.0.0.1:\$port" >"$work/standin.log" 2>&1 &
child=\$!
echo \$child >"$work/standin.pid"
wait \$child
exit \$?
STANDIN
chmod +x "$work/bin/uvicorn"

vllm=$(free_port)
"$sim" --vllm "127.0.0.1:$vllm" >"$work/vllm.log" 2>&1 &
pids+=($!); disown $!
for _ in $(seq 1 100); do grep -q '^ready' "$work/vllm.log" && break; sleep 0.1; done
grep -q '^ready' "$work/vllm.log" || fail "vLLM simulator did not start"

run_start() {  # starts config/runpod/start.sh in the background with fresh ports
  poc=${POC_PORT_OVERRIDE:-$(free_port)}; inf=$(free_port); mlport=$(free_port); admin=$(free_port)
  rm -f "$work/standin.signals" "$work/standin.pid" "$work/standin.log"
  env PATH="$work/bin:$PATH" POC_PORT="$poc" INFERENCE_PORT="$inf" MLNODE_PORT="$mlport" \
    PODPROXY_ADMIN_BIND="127.0.0.1:$admin" VLLM_URLS="http://127.0.0.1:$vllm" \
    bash config/runpod/start.sh >"$work/out" 2>&1 &
  script=$!
  pids+=($script)
}
wait_up() {  # both podproxy and the stand-in mlnode answer through the PoC port
  for _ in $(seq 1 100); do
    [ "$(curl -s --max-time 2 "http://127.0.0.1:$poc/api/v1/state")" = '{"state":"STOPPED"}' ] && return 0
    kill -0 "$script" 2>/dev/null || fail "start.sh exited early"
    sleep 0.1
  done
  fail "podproxy + mlnode did not answer within 10 s"
}
wait_exit() {  # wait_exit SECONDS: waits for start.sh, sets $status
  local until=$(( $(date +%s) + $1 ))
  while kill -0 "$script" 2>/dev/null; do
    [ "$(date +%s)" -lt "$until" ] || fail "start.sh still running after $1 s"
    sleep 0.1
  done
  status=0; wait "$script" || status=$?
}
start_stream() {  # a 2 s stream through podproxy's inference port
  curl -sN --max-time 30 -H 'Content-Type: application/json' -H 'x-sim-tokens: 20' -H 'x-sim-interval-ms: 100' \
    -d '{"stream":true,"messages":[]}' "http://127.0.0.1:$inf/v1/chat/completions" >"$work/stream" &
  stream=$!
  for _ in $(seq 1 50); do grep -q '^data: {' "$work/stream" 2>/dev/null && return 0; sleep 0.1; done
  fail "the stream did not start"
}
stream_complete() {
  wait "$stream" || fail "the stream failed (curl $?)"
  [ "$(grep -c '^data: {' "$work/stream")" = 20 ] && grep -q '^data: \[DONE\]' "$work/stream" \
    || fail "the stream was cut: $(tail -c 300 "$work/stream")"
}

echo "-- 1. the PoC port is taken"
blocked=$(free_port)
python3 -c 'import socket,sys,time; s=socket.socket(); s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("held", flush=True); time.sleep(60)' "$blocked" >"$work/held" &
pids+=($!); disown $!
for _ in $(seq 1 50); do grep -q held "$work/held" && break; sleep 0.1; done
grep -q held "$work/held" || fail "could not hold port $blocked"
POC_PORT_OVERRIDE=$blocked run_start
wait_exit 20
[ "$status" -ne 0 ] || fail "start.sh exited 0 although podproxy could not bind $blocked"
grep -q "0.0.0.0:$blocked" "$work/out" || fail "the output does not name the busy address 0.0.0.0:$blocked"
# start.sh checks the config (and the ports) before starting anything; should the mlnode have
# been started, it must not be left running.
for _ in $(seq 1 50); do
  [ -f "$work/standin.pid" ] && kill -0 "$(cat "$work/standin.pid")" 2>/dev/null || break
  sleep 0.1
done
[ -f "$work/standin.pid" ] && kill -0 "$(cat "$work/standin.pid")" 2>/dev/null && fail "the mlnode was left running"
echo "   exit $status, the busy address named, no mlnode left running"

echo "-- 2. podproxy dies"
run_start
wait_up
proxy=$(pgrep -P "$script" -x podproxy) || fail "cannot find podproxy under start.sh"
kill -9 "$proxy"
wait_exit 20
[ "$status" = 137 ] || fail "start.sh exited $status after podproxy was killed, expected its status 137"
grep -q "podproxy exited with status 137" "$work/out" || fail "start.sh did not report podproxy's exit"
grep -q TERM "$work/standin.signals" 2>/dev/null || fail "the mlnode was not stopped with SIGTERM"
echo "   exit 137 (podproxy's), mlnode got SIGTERM"

echo "-- 3. the mlnode dies during a stream"
run_start
wait_up
start_stream
kill -9 "$(cat "$work/standin.pid")"
wait_exit 40
stream_complete
[ "$status" = 137 ] || fail "start.sh exited $status after the mlnode was killed, expected its status 137"
grep -q 'SIGTERM received' "$work/out" || fail "podproxy did not get SIGTERM"
echo "   exit 137 (the mlnode's), podproxy drained the stream"

echo "-- 4. SIGTERM to the script during a stream"
run_start
wait_up
start_stream
kill -TERM "$script"
wait_exit 40
stream_complete
[ "$status" = 0 ] || fail "start.sh exited $status after SIGTERM, expected 0"
grep -q TERM "$work/standin.signals" 2>/dev/null || fail "the mlnode did not get SIGTERM"
grep -q 'SIGTERM received' "$work/out" || fail "podproxy did not get SIGTERM"
echo "runpod start.sh check: PoC port taken -> exit non-zero naming it; podproxy killed -> mlnode stopped, exit 137; mlnode killed -> podproxy drained, exit 137; SIGTERM -> both stopped, stream drained, exit 0"
