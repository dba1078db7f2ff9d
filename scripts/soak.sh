#!/usr/bin/env bash
# Bounded soak of the release podproxy binary.
#
# Runs podproxy (target/release/podproxy) in front of two simulated vLLM backends and an
# echo server (target/release/podproxy-sim), drives mixed traffic for SOAK_DURATION seconds
# (default 600) with a Python 3 stdlib load client (asyncio + raw sockets):
#   - SSE streams read to the end (`/v1/chat/completions`, stream=true),
#   - cancellations (a stream closed after its first event),
#   - large uploads (/sink, 1-8 MiB, sha256 checked), round trips (/echo, sha256 checked)
#     and downloads (/bytes/N, length checked),
#   - health flaps: the second vLLM backend is killed and restarted every FLAP_SECONDS.
# Every 5 s it records podproxy's RSS and open fd count. It fails when
#   - RSS at the end > 2 x RSS after warm-up + 16 MiB, or
#   - open fds at the end > fds after warm-up + 50, or
#   - any integrity check failed (hash/length mismatch on the echo backend, which never
#     flaps), or any request hung past its bound, or podproxy died.
# Requests routed to the flapping backend may get 502/503 while it is down, or be aborted
# (a stream cut mid-body, or a connection closed with no bytes when the backend died right
# after its response head): they are counted (flap_errors, aborted_before_head), not
# failures. Everything on the echo backend, which never flaps, must succeed and match. Warm-up = the first max(30 s, 20 %) of the run.
#
# Usage: scripts/soak.sh            (SOAK_DURATION=60 for a quick run; BUILD=0 skips cargo)
#        PODPROXY_BIG=1 scripts/soak.sh  also runs the 256 MiB integrity tests first.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${SOAK_DURATION:-${DURATION:-600}}
FLAP_SECONDS=${FLAP_SECONDS:-15}
CONCURRENCY=${SOAK_CONCURRENCY:-16}
BUILD=${BUILD:-1}

if [ "$BUILD" = 1 ]; then
  cargo build --release --bin podproxy
  cargo build --release -p podproxy-testkit --bin podproxy-sim
fi
if [ "${PODPROXY_BIG:-0}" = 1 ]; then
  cargo test --release --test integrity huge_bodies_256_mib -- --ignored --nocapture
fi
BIN=target/release/podproxy
SIM=target/release/podproxy-sim
[ -x "$BIN" ] && [ -x "$SIM" ] || { echo "missing $BIN or $SIM"; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${flap_pid:-}" ] && kill "$flap_pid" 2>/dev/null || true
  [ -n "${simb_pid:-}" ] && kill "$simb_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PA=$(free_port); PB=$(free_port); PE=$(free_port); PP=$(free_port)

wait_ready() { # file
  for _ in $(seq 1 100); do grep -q '^ready' "$1" && return 0; sleep 0.1; done
  cat "$1"; echo "simulator did not start"; exit 1
}

"$SIM" --vllm "127.0.0.1:$PA" --echo "127.0.0.1:$PE" --token-interval-ms 5 --tokens 40 >"$work/sima.log" 2>&1 &
pids+=($!)
wait_ready "$work/sima.log"
start_simb() {
  "$SIM" --vllm "127.0.0.1:$PB" --token-interval-ms 5 --tokens 40 >"$work/simb.log" 2>&1 &
  simb_pid=$!
}
start_simb
wait_ready "$work/simb.log"

cat >"$work/podproxy.toml" <<EOF
[listeners.main]
bind = "127.0.0.1:$PP"
routes = [
  { prefix = "/v1/", upstream = "vllm" },
  { prefix = "/", upstream = "echo" },
]

[upstreams.vllm]
urls = "http://127.0.0.1:$PA, http://127.0.0.1:$PB"
[upstreams.vllm.health]
interval = "1s"
timeout = "1s"
failures = 2

[upstreams.echo]
urls = "http://127.0.0.1:$PE"
EOF
"$BIN" --config "$work/podproxy.toml" >"$work/podproxy.log" 2>&1 &
PPID_=$!
pids+=($PPID_)
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$PP/up" && break
  kill -0 $PPID_ 2>/dev/null || { cat "$work/podproxy.log"; echo "podproxy exited"; exit 1; }
  sleep 0.1
done

# Health flaps: kill and restart backend B, bounded by the soak duration.
(
  trap 'kill "$simb_pid" 2>/dev/null; exit 0' TERM
  end=$((SECONDS + DURATION))
  while [ $SECONDS -lt $end ]; do
    sleep "$FLAP_SECONDS" & wait $!
    kill "$simb_pid" 2>/dev/null || true
    wait "$simb_pid" 2>/dev/null || true
    sleep 3 & wait $!
    start_simb
    echo "flap at ${SECONDS}s" >>"$work/flaps.log"
  done
  kill "$simb_pid" 2>/dev/null || true
) &
flap_pid=$!

cat >"$work/load.py" <<'PY'
import asyncio, hashlib, json, os, random, sys, time

PORT = int(sys.argv[1]); DURATION = float(sys.argv[2]); CONC = int(sys.argv[3])
BOUND = 60.0  # no single exchange may take longer
stats = {"ok": 0, "stream_ok": 0, "cancelled": 0, "flap_errors": 0, "aborted_before_head": 0, "bytes": 0}
failures = []

async def read_head(r):
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {}
    for l in lines[1:]:
        if ":" in l:
            k, v = l.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return status, hdrs

async def read_body(r, hdrs, sink):
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            sink(await r.readexactly(size))
            await r.readexactly(2)
    elif "content-length" in hdrs:
        left = int(hdrs["content-length"])
        while left:
            chunk = await r.read(min(left, 1 << 16))
            if not chunk:
                raise EOFError("short body")
            sink(chunk); left -= len(chunk)

async def exchange(head, body_iter=None):
    r, w = await asyncio.open_connection("127.0.0.1", PORT)
    try:
        w.write(head)
        if body_iter:
            for part in body_iter:
                w.write(part)
                await w.drain()
        await w.drain()
        return r, w
    except Exception:
        w.close(); raise

async def stream(cancel):
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 40,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    r, w = await exchange(head)
    try:
        try:
            status, hdrs = await read_head(r)
        except (asyncio.IncompleteReadError, ConnectionError):
            # The backend was killed (flap) right after sending its head: podproxy had
            # committed to a 200 and its body failed before the first byte, so the client
            # sees a closed connection with no bytes: an abort, not a hang (see
            # tests/faults.rs backend_dies_between_head_and_body). Counted separately.
            stats["aborted_before_head"] += 1; return
        if status in (502, 503, 504):
            stats["flap_errors"] += 1; return
        if status != 200:
            failures.append(f"stream status {status}"); return
        if cancel:
            try:
                await r.readuntil(b"\n\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                stats["flap_errors"] += 1; return
            stats["cancelled"] += 1; return
        got = bytearray()
        try:
            await read_body(r, hdrs, got.extend)
        except (asyncio.IncompleteReadError, EOFError, ConnectionError):
            # A stream cut when its backend is killed by a flap is an abort, as designed.
            stats["flap_errors"] += 1; return
        if b"[DONE]" not in got:
            failures.append("stream ended without [DONE]"); return
        stats["stream_ok"] += 1
    finally:
        w.close()

def chunks(seed, n):
    rnd = random.Random(seed); left = n
    while left:
        k = min(left, 1 << 16); left -= k
        yield rnd.randbytes(k)

async def upload(path, n):
    seed = random.getrandbits(32)
    want = hashlib.sha256()
    for c in chunks(seed, n):
        want.update(c)
    head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode()
    r, w = await exchange(head)
    try:
        send = asyncio.create_task(_send(w, chunks(seed, n)))
        status, hdrs = await read_head(r)
        got = hashlib.sha256(); size = [0]
        buf = bytearray()
        def sink(b):
            size[0] += len(b)
            if path == "/echo": got.update(b)
            else: buf.extend(b)
        await read_body(r, hdrs, sink)
        await send
        if status != 200:
            failures.append(f"{path} status {status}"); return
        if path == "/echo":
            if size[0] != n or got.hexdigest() != want.hexdigest():
                failures.append(f"/echo mismatch {n} B"); return
        else:
            v = json.loads(bytes(buf))
            if v["len"] != n or v["sha256"] != want.hexdigest():
                failures.append(f"/sink mismatch {n} B: {v}"); return
        stats["ok"] += 1; stats["bytes"] += n
    finally:
        w.close()

async def _send(w, it):
    for c in it:
        w.write(c); await w.drain()

async def download(n):
    r, w = await exchange(f"GET /bytes/{n} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
    try:
        status, hdrs = await read_head(r)
        size = [0]
        await read_body(r, hdrs, lambda b: size.__setitem__(0, size[0] + len(b)))
        if status != 200 or size[0] != n:
            failures.append(f"/bytes/{n}: status {status}, {size[0]} B"); return
        stats["ok"] += 1; stats["bytes"] += n
    finally:
        w.close()

async def worker(i, end):
    rnd = random.Random(i)
    while time.monotonic() < end:
        kind = rnd.random()
        try:
            if kind < 0.35: job = stream(False)
            elif kind < 0.50: job = stream(True)
            elif kind < 0.65: job = upload("/sink", rnd.choice([0, 1, 4096, 1 << 20, 8 << 20]))
            elif kind < 0.85: job = upload("/echo", rnd.choice([1, 65537, 1 << 20, 3 << 20]))
            else: job = download(rnd.choice([0, 1000, 1 << 20, 16 << 20]))
            await asyncio.wait_for(job, BOUND)
        except asyncio.TimeoutError:
            failures.append("exchange hung past the bound")
        except Exception as e:
            failures.append(f"{job.__name__ if hasattr(job, '__name__') else job}: {type(e).__name__}: {e}")

async def main():
    end = time.monotonic() + DURATION
    await asyncio.gather(*(worker(i, end) for i in range(CONC)))
    print(json.dumps({"stats": stats, "failures": len(failures), "first_failures": failures[:10]}))
    sys.exit(1 if failures else 0)

asyncio.run(main())
PY

python3 "$work/load.py" "$PP" "$DURATION" "$CONCURRENCY" >"$work/load.out" 2>&1 &
load_pid=$!

sample() { # prints "rss_kb fds"
  local rss fds
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$PPID_/status")
  fds=$(ls "/proc/$PPID_/fd" | wc -l)
  echo "$rss $fds"
}
warm_at=$(( DURATION / 5 > 30 ? DURATION / 5 : 30 ))
[ "$warm_at" -ge "$DURATION" ] && warm_at=$(( DURATION / 2 ))
start=$SECONDS
warm_rss=""; warm_fds=""; max_rss=0
echo "t_s rss_kb fds" >"$work/samples.txt"
# Sampling loop: bounded by the duration plus a grace for the load client to finish.
while kill -0 $load_pid 2>/dev/null && [ $((SECONDS - start)) -lt $((DURATION + 90)) ]; do
  kill -0 $PPID_ 2>/dev/null || { cat "$work/podproxy.log" | tail -20; echo "SOAK FAILED: podproxy died"; exit 1; }
  read -r rss fds < <(sample)
  t=$((SECONDS - start))
  echo "$t $rss $fds" | tee -a "$work/samples.txt"
  [ "$rss" -gt "$max_rss" ] && max_rss=$rss
  if [ -z "$warm_rss" ] && [ "$t" -ge "$warm_at" ]; then warm_rss=$rss; warm_fds=$fds; fi
  sleep 5
done
if kill -0 $load_pid 2>/dev/null; then kill $load_pid; echo "SOAK FAILED: load client did not finish"; exit 1; fi
load_rc=0; wait $load_pid || load_rc=$?
kill "$flap_pid" 2>/dev/null || true
# Let closing connections settle (bounded), then the final sample.
for _ in $(seq 1 20); do
  read -r rss fds < <(sample)
  [ -n "$warm_fds" ] && [ "$fds" -le $((warm_fds + 50)) ] && break
  sleep 0.25
done
read -r final_rss final_fds < <(sample)
[ -z "$warm_rss" ] && { warm_rss=$final_rss; warm_fds=$final_fds; }
flaps=$(wc -l <"$work/flaps.log" 2>/dev/null || echo 0)
rss_bound=$((2 * warm_rss + 16384))
fd_bound=$((warm_fds + 50))
echo "load: $(cat "$work/load.out")"
echo "flaps: $flaps"
echo "rss_kb: warm-up $warm_rss, max $max_rss, final $final_rss (bound $rss_bound)"
echo "fds: warm-up $warm_fds, final $final_fds (bound $fd_bound)"
status=0
[ "$final_rss" -le "$rss_bound" ] || { echo "SOAK FAILED: RSS grew beyond the bound"; status=1; }
[ "$final_fds" -le "$fd_bound" ] || { echo "SOAK FAILED: fd leak"; status=1; }
[ "$load_rc" = 0 ] || { echo "SOAK FAILED: load client reported failures"; status=1; }
[ "$status" = 0 ] && echo "SOAK OK (${DURATION}s)"
exit $status
