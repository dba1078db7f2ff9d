#!/usr/bin/env bash
# Slow and idle clients against the RELEASE podproxy binary (issue item "slow and idle
# clients"; the bounded in-process tests are tests/slow_clients.rs).
#
# Starts target/release/podproxy-sim (echo + vLLM simulators) and target/release/podproxy on
# free loopback ports (routes /v1/ -> vllm, / -> echo; header_timeout = HEADER_TIMEOUT), then:
#   1. slowloris   slowhttptest -H  (request headers trickled)     GET  /bytes/100
#   2. slow body   slowhttptest -B  (R-U-Dead-Yet, body trickled)  POST /sink
#   3. slow read   slowhttptest -X  (tiny window, slow reads)      GET  /bytes/1048576
#      each with CONNS connections at RATE/s for up to LENGTH s, while a legit client runs
#      curl every 200 ms (fresh connection, GET /bytes/100) and counts successes, failures
#      and the slowest answer;
#   4. idle        a python3 stdlib client opens IDLE_COUNTS (default "1000 5000") idle
#      keep-alive connections (one request each, then silent), samples podproxy's VmRSS
#      (KiB per idle connection), checks a fresh request, then counts how many the proxy
#      closes within header_timeout + 5 s.
# podproxy's VmRSS / VmHWM / open fds are sampled during and after every phase; a summary
# table is printed at the end. Exit status is non-zero when a legit request failed in any
# phase, an idle-phase check failed, or podproxy died.
#
# Needs: curl, python3, slowhttptest (Debian/Ubuntu: apt-get install -y slowhttptest).
# Usage: scripts/slow_clients.sh        (BUILD=0 skips cargo; CONNS, RATE, LENGTH,
#        HEADER_TIMEOUT, IDLE_COUNTS override the defaults below)
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-1}
CONNS=${CONNS:-1000}
RATE=${RATE:-200}
LENGTH=${LENGTH:-30}
HEADER_TIMEOUT=${HEADER_TIMEOUT:-10}
IDLE_COUNTS=${IDLE_COUNTS:-"1000 5000"}

command -v slowhttptest >/dev/null || { echo "slowhttptest not found: apt-get install -y slowhttptest"; exit 1; }
command -v curl >/dev/null || { echo "curl not found"; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found"; exit 1; }

if [ "$BUILD" = 1 ]; then
  cargo build --release --bin podproxy -p podproxy
  cargo build --release -p podproxy-testkit --bin podproxy-sim
fi
BIN=target/release/podproxy
SIM=target/release/podproxy-sim
[ -x "$BIN" ] && [ -x "$SIM" ] || { echo "missing $BIN or $SIM (run without BUILD=0)"; exit 1; }

# Attackers, idle clients and podproxy (which inherits it) need many descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need=$((CONNS * 2 + 200))
for n in $IDLE_COUNTS; do [ $((n * 2 + 200)) -gt $need ] && need=$((n * 2 + 200)); done
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need" ] ||
  { echo "open-files limit $(ulimit -n) is below the $need this run needs"; exit 1; }

work=$(mktemp -d)
pids=()
legit_pid=""
cleanup() {
  [ -n "$legit_pid" ] && kill "$legit_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PE=$(free_port); PV=$(free_port); PP=$(free_port)

"$SIM" --echo "127.0.0.1:$PE" --vllm "127.0.0.1:$PV" >"$work/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^ready' "$work/sim.log" && break; sleep 0.1; done
grep -q '^ready' "$work/sim.log" || { cat "$work/sim.log"; echo "simulator did not start"; exit 1; }

cat >"$work/podproxy.toml" <<EOF
[server]
log_level = "warn"

[listeners.main]
bind = "127.0.0.1:$PP"
header_timeout = "${HEADER_TIMEOUT}s"
routes = [
  { prefix = "/v1/", upstream = "vllm" },
  { prefix = "/", upstream = "echo" },
]

[upstreams.vllm]
urls = "http://127.0.0.1:$PV"

[upstreams.echo]
urls = "http://127.0.0.1:$PE"
EOF
# A fresh podproxy for every phase, so each phase's memory figures start from a fresh heap
# (the allocator keeps freed memory: a later phase would reuse an earlier phase's peak).
PID=""
start_proxy() { # phase
  "$BIN" --config "$work/podproxy.toml" >>"$work/podproxy.log" 2>&1 &
  PID=$!
  pids+=($PID)
  for _ in $(seq 1 100); do
    curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PP/bytes/1" && break
    kill -0 $PID 2>/dev/null || { tail -20 "$work/podproxy.log"; echo "podproxy exited at start ($1)"; exit 1; }
    sleep 0.1
  done
  curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$PP/bytes/100" || { echo "podproxy not serving ($1)"; exit 1; }
  BASE_FDS=$(fds)
}
stop_proxy() { # phase
  if ! kill -0 $PID 2>/dev/null; then
    echo "podproxy died during $1"
    DIED="$DIED $1"
    FAILED=1
    return
  fi
  kill -TERM $PID
  for _ in $(seq 1 100); do kill -0 $PID 2>/dev/null || break; sleep 0.1; done
  kill -KILL $PID 2>/dev/null || true
  wait $PID 2>/dev/null || true
}

alive() { kill -0 $PID 2>/dev/null; }
kib() { awk -v f="$1:" '$1 == f { print $2 }' /proc/$PID/status; }
fds() { ls /proc/$PID/fd 2>/dev/null | wc -l; }

# Waits (bounded) until podproxy's open descriptors are back near the baseline, i.e. the
# previous phase's connections are gone.
settle() {
  for _ in $(seq 1 150); do
    alive || return 0
    [ "$(fds)" -le $((BASE_FDS + 10)) ] && return 0
    sleep 0.2
  done
}

# Legit client: curl every 200 ms on a fresh connection; one line per request
# ("code seconds bytes") plus podproxy's VmRSS, until $work/stop appears.
legit_start() { # phase
  rm -f "$work/stop"
  : >"$work/legit.$1"
  : >"$work/rss.$1"
  (
    while [ ! -e "$work/stop" ]; do
      r=$(curl -s -o /dev/null --max-time 5 -w '%{http_code} %{time_total} %{size_download}' \
        "http://127.0.0.1:$PP/bytes/100" || true)
      echo "${r:-000 5 0}" >>"$work/legit.$1"
      kib VmRSS >>"$work/rss.$1" 2>/dev/null || true
      sleep 0.2
    done
  ) &
  legit_pid=$!
}
legit_stop() {
  touch "$work/stop"
  wait "$legit_pid" 2>/dev/null || true
  legit_pid=""
}
# "ok fail max_ms" of a phase's legit requests.
legit_stats() {
  awk '{ if ($1 == 200 && $3 == 100) ok++; else fail++; if ($2 > max) max = $2 }
       END { printf "%d %d %.0f\n", ok, fail, max * 1000 }' "$work/legit.$1"
}
max_rss() { sort -n "$work/rss.$1" | tail -1; }

FAILED=0
DIED=""
BASE_FDS=0
declare -A ROW

run_attack() { # phase mode-flag url extra-args...
  local phase=$1 flag=$2 url=$3
  shift 3
  start_proxy "$phase"
  local rss0 hwm0
  rss0=$(kib VmRSS)
  hwm0=$(kib VmHWM)
  echo "== $phase: slowhttptest $flag -c $CONNS -r $RATE -l $LENGTH $* -u $url"
  legit_start "$phase"
  # Bounded: slowhttptest stops itself after LENGTH s; the timeout is a backstop.
  timeout $((LENGTH + 60)) slowhttptest "$flag" -c "$CONNS" -r "$RATE" -l "$LENGTH" -p 3 \
    -g -o "$work/$phase" "$@" -u "$url" >"$work/$phase.out" 2>&1 || true
  local hwm_during
  hwm_during=$(kib VmHWM || echo 0)
  legit_stop
  sed 's/\x1b\[[0-9;]*m//g' "$work/$phase.out" >"$work/$phase.txt"
  # The last status block slowhttptest printed (the state when the test ended).
  # End state: connected/closed/pending from the CSV's last second, errors and the probe's
  # verdict from the last status block slowhttptest printed.
  local st last
  last=$(tail -1 "$work/$phase.csv" 2>/dev/null || echo "?,?,?,?,?")
  st=$(awk -F: -v last="$last" '/^(error|service available): /{ gsub(/ /, "", $2); v[$1] = $2 }
       END { split(last, c, ","); printf "%s %s %s %s %s", c[4], c[2], c[3], v["error"], v["service available"] }' \
    "$work/$phase.txt")
  local exit_status unavailable
  exit_status=$(sed -n 's/^Exit status: *//p' "$work/$phase.txt" | tail -1)
  unavailable=$(awk -F, 'NR > 1 && $5 == 0 { n++ } END { print n + 0 }' "$work/$phase.csv" 2>/dev/null || echo "?")
  local peak_conns
  peak_conns=$(awk -F, 'NR > 1 && $4 > m { m = $4 } END { print m + 0 }' "$work/$phase.csv" 2>/dev/null || echo 0)
  read -r ok fail max_ms < <(legit_stats "$phase")
  settle
  local rss_max rss_after hwm_after fds_after per_conn
  rss_max=$(max_rss "$phase")
  rss_after=$(kib VmRSS || echo 0)
  hwm_after=$(kib VmHWM || echo 0)
  fds_after=$(fds)
  # Peak growth over the phase's starting RSS, per attacking connection at the peak.
  per_conn=$(awk -v a="$hwm_during" -v b="$rss0" -v h="$hwm0" -v n="$peak_conns" \
    'BEGIN { base = (b > h ? b : h); d = a - base; if (d < 0) d = 0;
             if (n > 0) printf "%.1f", d / n; else print "-" }')
  echo "   slowhttptest end state (connected closed pending error available): $st; exit: $exit_status"
  echo "   seconds with service unavailable (probe): $unavailable; peak connected: $peak_conns"
  echo "   legit: $ok ok, $fail failed, slowest ${max_ms} ms"
  echo "   podproxy VmRSS: $rss0 KiB before, max $rss_max KiB during, $rss_after KiB after; VmHWM $hwm_after KiB (~$per_conn KiB per attacking connection at peak); fds after $fds_after"
  ROW[$phase]="$st|$unavailable|$ok|$fail|$max_ms|$rss0|$rss_max|$rss_after|$hwm_after|$per_conn|$fds_after"
  [ "$fail" = 0 ] || FAILED=1
  stop_proxy "$phase"
}

run_attack slowloris -H "http://127.0.0.1:$PP/bytes/100" -i 10 -x 24
run_attack slowbody -B "http://127.0.0.1:$PP/sink" -i 10 -s 8192 -x 10
run_attack slowread -X "http://127.0.0.1:$PP/bytes/1048576" -w 512 -y 1024 -n 1 -z 32 -k 3

# --- idle keep-alive connections --------------------------------------------------------
cat >"$work/idle.py" <<'PY'
import resource, selectors, socket, sys, time

PORT, PID, N, HT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < N + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def status(field):
    for line in open(f"/proc/{PID}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0

def exchange(s, path, n):
    """One keep-alive GET; True when it was answered 200 with n bytes."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: idle\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            return False
        body += chunk
    return head.startswith(b"HTTP/1.1 200") and len(body) == n and b"connection: close" not in head.lower()

rss0 = status("VmRSS")
socks, served, failed = [], [], 0
t0 = time.monotonic()
for i in range(N):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    try:
        ok = exchange(s, "/bytes/16", 16)
    except OSError:
        ok = False
    if not ok:
        failed += 1
        s.close()
        continue
    socks.append(s)
    served.append(time.monotonic())
open_s = time.monotonic() - t0
time.sleep(0.5)  # let podproxy finish any per-connection bookkeeping before sampling
rss1 = status("VmRSS")
hwm1 = status("VmHWM")

# Still open? (nothing readable yet on any of them)
sel = selectors.DefaultSelector()
for i, s in enumerate(socks):
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
early = len(sel.select(timeout=0))

# A fresh client is answered while they sit idle.
t = time.monotonic()
try:
    f = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    fresh_ok = exchange(f, "/bytes/100", 100)
    f.close()
except OSError:
    fresh_ok = False
fresh_ms = (time.monotonic() - t) * 1000

# Count closes by the proxy within header_timeout + 5 s of the last response.
deadline = (served[-1] if served else time.monotonic()) + HT + 5
closed, data, after = 0, 0, []
open_ = len(socks)
while open_ and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
        s, i = key.fileobj, key.data
        try:
            got = s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            got = b""
        if got:
            data += 1
        else:
            closed += 1
            after.append(time.monotonic() - served[i])
        sel.unregister(s)
        s.close()
        open_ -= 1
for key in list(sel.get_map().values()):
    key.fileobj.close()
time.sleep(0.5)
rss2 = status("VmRSS")
n_open = len(socks)
print(f"n={N} opened={n_open} open_failed={failed} open_s={open_s:.2f} "
      f"rss_before={rss0} rss_idle={rss1} hwm={hwm1} "
      f"kib_per_conn={(rss1 - rss0) / max(1, n_open):.1f} "
      f"closed_early={early} fresh_ok={int(fresh_ok)} fresh_ms={fresh_ms:.0f} "
      f"closed_by_proxy={closed} wrote_data={data} still_open={open_} "
      f"close_after_min_s={min(after) if after else 0:.2f} close_after_max_s={max(after) if after else 0:.2f} "
      f"rss_after_close={rss2}")
sys.exit(0 if failed == 0 and early == 0 and fresh_ok and closed == n_open else 1)
PY

for n in $IDLE_COUNTS; do
  start_proxy "idle$n"
  echo "== idle$n: $n idle keep-alive connections, header_timeout ${HEADER_TIMEOUT}s"
  legit_start "idle$n"
  rc=0
  out=$(timeout $((HEADER_TIMEOUT + 90)) python3 "$work/idle.py" "$PP" "$PID" "$n" "$HEADER_TIMEOUT") || rc=$?
  legit_stop
  read -r ok fail max_ms < <(legit_stats "idle$n")
  settle
  echo "   $out"
  echo "   legit: $ok ok, $fail failed, slowest ${max_ms} ms; podproxy VmRSS $(kib VmRSS || echo 0) KiB after, fds $(fds)"
  ROW[idle$n]="$out|$ok|$fail|$max_ms|$(max_rss "idle$n")|$(kib VmRSS || echo 0)|$(kib VmHWM || echo 0)|$(fds)"
  [ "$rc" = 0 ] || { echo "   idle phase check failed (rc $rc)"; FAILED=1; }
  [ "$fail" = 0 ] || FAILED=1
  stop_proxy "idle$n"
done

# --- summary ----------------------------------------------------------------------------
echo
echo "== summary (podproxy $(${BIN} --version 2>/dev/null || true); $CONNS attack connections at $RATE/s for up to $LENGTH s; header_timeout ${HEADER_TIMEOUT}s)"
echo "each phase runs on a fresh podproxy process; KiB/conn = (peak VmRSS - start VmRSS) / peak connections"
printf '%-10s | %-28s | %-5s | %-15s | %-32s | %-9s | %s\n' \
  phase "end: conn/closed/pend/err/avail" "unav" "legit ok/fail/ms" "VmRSS KiB before/max/after" "KiB/conn" "VmHWM/fds after"
for phase in slowloris slowbody slowread; do
  [ -n "${ROW[$phase]:-}" ] || continue
  IFS='|' read -r st unav ok fail max_ms rss0 rssmax rssafter hwm per fdsa <<<"${ROW[$phase]}"
  printf '%-10s | %-28s | %-5s | %-15s | %-32s | %-9s | %s\n' \
    "$phase" "$(tr ' ' / <<<"$st")" "${unav}s" "$ok/$fail/$max_ms" "$rss0/$rssmax/$rssafter" "$per" "$hwm/$fdsa"
done
for n in $IDLE_COUNTS; do
  [ -n "${ROW[idle$n]:-}" ] || continue
  IFS='|' read -r out ok fail max_ms rssmax rssafter hwm fdsa <<<"${ROW[idle$n]}"
  get() { tr ' ' '\n' <<<"$out" | sed -n "s/^$1=//p"; }
  printf '%-10s | %-28s | %-5s | %-15s | %-32s | %-9s | %s\n' \
    "idle$n" "open $(get opened)/closed $(get closed_by_proxy)/left $(get still_open)" "-" \
    "$ok/$fail/$max_ms" "$(get rss_before)/$(get rss_idle)/$(get rss_after_close)" "$(get kib_per_conn)" "$hwm/$fdsa"
  echo "           fresh request while idle: ok=$(get fresh_ok) in $(get fresh_ms) ms; closed $(get close_after_min_s)-$(get close_after_max_s) s after their response; opened in $(get open_s) s"
done
if [ -z "$DIED" ]; then echo "podproxy survived every phase"; else echo "podproxy DIED in:$DIED"; fi
if [ -s "$work/podproxy.log" ]; then echo "--- podproxy log (last 10 lines)"; tail -10 "$work/podproxy.log"; fi
[ "$FAILED" = 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
exit "$FAILED"
