#!/usr/bin/env bash
# Proves the scratch image works without a Docker engine: runs the static binary as PID 1 in
# an empty root (only the binary, etc/resolv.conf and etc/hosts, as Docker injects them), as
# an unprivileged uid with no /etc/passwd, and checks that it starts on the embedded config,
# resolves a name from /etc/hosts, proxies a request and a stream to backends outside the
# root, finds a "recreated container" at a new address after /etc/hosts changes (compose
# re-resolution), and exits 0 on SIGTERM within the grace period. Needs root (unshare, chroot).
# Usage: scripts/scratch-check.sh <static podproxy binary> <podproxy-sim binary>
set -euo pipefail
bin=${1:?static podproxy binary}
sim=${2:?podproxy-sim binary}
root=$(mktemp -d)
simlog=$(mktemp)
outlog=$(mktemp)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$root" "$simlog" "$simlog.2" "$outlog"
}
trap cleanup EXIT
fail() { echo "scratch check FAILED: $*"; echo "--- podproxy output"; cat "$outlog"; exit 1; }

if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
  fail "$bin is dynamically linked: $(ldd "$bin")"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
vllm_port=$(free_port); mlnode_port=$(free_port); poc=$(free_port); inf=$(free_port); admin=$(free_port)

"$sim" --vllm "127.0.0.1:$vllm_port" --mlnode "127.0.0.1:$mlnode_port" --token-interval-ms 20 --tokens 8 >"$simlog" 2>&1 &
pids+=($!)
disown
# The "recreated mlnode container": same port, another address, in its own process.
"$sim" --mlnode "127.0.0.2:$mlnode_port" >"$simlog.2" 2>&1 &
second=$!
pids+=($second)
disown
for _ in $(seq 1 100); do grep -q '^ready' "$simlog" && break; sleep 0.1; done
grep -q '^ready' "$simlog" || { cat "$simlog"; fail "simulated backends did not start"; }
for _ in $(seq 1 100); do grep -q '^ready' "$simlog.2" && break; sleep 0.1; done
grep -q '^ready' "$simlog.2" || { cat "$simlog.2"; fail "second mlnode did not start"; }

chmod 755 "$root"
mkdir -p "$root/etc"
cp "$bin" "$root/podproxy"
echo "nameserver 127.0.0.1" >"$root/etc/resolv.conf"
printf '127.0.0.1 localhost\n127.0.0.1 mlnode-scratch\n' >"$root/etc/hosts"
echo "root holds: $(cd "$root" && find . -mindepth 1 | sort | tr '\n' ' ')"

env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin POC_PORT="$poc" INFERENCE_PORT="$inf" PODPROXY_ADMIN_BIND="127.0.0.1:$admin" \
  MLNODE_URL="http://mlnode-scratch:$mlnode_port" VLLM_URLS="http://127.0.0.1:$vllm_port" \
  unshare --fork --pid --mount-proc chroot --userspec=65532:65532 "$root" /podproxy >"$outlog" 2>&1 &
ns=$!
pids+=($ns)
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$poc/api/v1/state" && break
  kill -0 $ns 2>/dev/null || fail "podproxy exited early"
  sleep 0.1
done
pid=$(pgrep -P "$ns" | head -n1)
[ -n "$pid" ] || fail "cannot find podproxy's pid"
nspid=$(awk '/^NSpid:/ {print $NF}' "/proc/$pid/status")
[ "$nspid" = 1 ] || fail "podproxy is pid $nspid in its namespace, expected 1"

state=$(curl -s --max-time 10 -w ' %{http_code}' "http://127.0.0.1:$poc/v3.0.8/api/v1/state")
[ "$state" = '{"state":"STOPPED"} 200' ] || fail "request via /etc/hosts name: $state"

stream=$(curl -sN --max-time 20 "http://127.0.0.1:$inf/v1/chat/completions" -d '{"stream":true,"messages":[]}')
[ "$(grep -c '^data: {' <<<"$stream")" = 8 ] && grep -q '^data: \[DONE\]' <<<"$stream" || fail "stream: $stream"

# Recreate the mlnode "container": new address in /etc/hosts, old process gone. New
# connections must resolve the name again and find it.
printf '127.0.0.1 localhost\n127.0.0.2 mlnode-scratch\n' >"$root/etc/hosts"
kill -9 "${pids[0]}"
ok=""
for _ in $(seq 1 50); do
  r=$(curl -s --max-time 5 -w ' %{http_code}' "http://127.0.0.1:$poc/api/v1/state" || true)
  [ "$r" = '{"state":"STOPPED"} 200' ] && { ok=1; break; }
  sleep 0.1
done
[ -n "$ok" ] || fail "mlnode at its new address (127.0.0.2) was not found after the hosts change: $r"

kill -TERM "$pid"
for _ in $(seq 1 100); do kill -0 "$ns" 2>/dev/null || break; sleep 0.1; done
kill -0 "$ns" 2>/dev/null && fail "no exit within 10 s of SIGTERM"
wait "$ns" || fail "exit status $? after SIGTERM"
grep -q 'SIGTERM received' "$outlog" || fail "SIGTERM was not handled by podproxy"
echo "scratch check: static binary as PID 1 (uid 65532) in an empty root: /etc/hosts name resolved and re-resolved after a change, request + stream proxied, SIGTERM -> exit 0"
