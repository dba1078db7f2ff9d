#!/usr/bin/env python3
"""LLM-aware balancing benchmark: a multi-turn chat workload over four GPU-like
simulated vLLM replicas per arm, one interleaved run of five arms:

  lo        podproxy, least outstanding requests (balance off: today's policy)
  signals   podproxy, balance.signals (vLLM /metrics scraped every 250 ms)
  affinity  podproxy, balance.signals + balance.affinity
  haproxy   haproxy `balance leastconn`
  nginx     nginx `least_conn` (HTTP/1.1 keepalive upstream, buffering off)

Each arm has its own four replicas (so caches never leak between arms) and its own users;
the arms run in turns of SLICE_S seconds, ROUNDS times, in a rotating order, so machine
noise falls on all of them. Called by benches/llm/run.sh. Everything listens on 127.0.0.1;
every process started here is killed on exit.

Workload: TENANTS tenants, each with a system prompt of SYSTEM_WORDS words; USERS users per
tenant; each user runs conversations of TURNS turns (a new conversation afterwards), each
turn a user message of USER_WORDS words (a pasted document), a streamed answer of
ANSWER_TOKENS tokens appended to the history, then think time (exponential, mean THINK_S).
Measured per request: TTFT (request written → first content event), end to end (→ [DONE]).
From the replicas' /metrics: prefix-cache hit rate (hit tokens / queried tokens) and
requests per replica.
"""
import asyncio, json, os, random, re, socket, statistics, subprocess, sys, time

QUICK = os.environ.get("QUICK", "") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "benches", "llm")
PODPROXY = os.environ["PODPROXY_BIN"]
SIM = os.environ["SIM_BIN"]
ARMS = os.environ.get("ARMS", "lo,signals,affinity,haproxy,nginx").split(",")

REPLICAS = 4
TENANTS, USERS = 6, 8
SYSTEM_WORDS, USER_WORDS, ANSWER_TOKENS, TURNS = 400, 300, 48, 10
THINK_S = 2.0
ROUNDS = 2 if QUICK else 3
SLICE_S = 15 if QUICK else 40
# Engine: 8 decode slots, 48K-token KV budget, 100 us prefill per uncached token, 10 ms/token.
SIM_FLAGS = ["--gpu-slots", "8", "--kv-tokens", "49152", "--prefill-us-per-token", "100",
             "--token-interval-ms", "10"]
RSS_PREFIXES = int(os.environ.get("RSS_PREFIXES", "20000" if QUICK else "100000"))

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # benches/
import procs  # noqa: E402
from procs import children, cleanup, free_port, log, spawn  # noqa: E402

work = procs.start("podproxy-llm-")


def rss_kb(pid, key="VmRSS"):
    return procs.own_status_kb(pid, key)


# ---------------------------------------------------------------- simulators
def start_sims(n, flags):
    argv = [SIM] + sum([["--vllm", "127.0.0.1:0"] for _ in range(n)], []) + flags
    p = spawn(argv, f"sim-{len(children)}", stdout=subprocess.PIPE)
    ports = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = p.stdout.readline().decode().strip()
        if line.startswith("vllm "):
            ports.append(int(line.rsplit(":", 1)[1]))
        if line == "ready" or not line and p.poll() is not None:
            break
    if len(ports) != n:
        raise SystemExit(f"simulator did not start ({ports})")
    return p, ports


def http_get(port, path, timeout=2.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")
    finally:
        s.close()


def replica_counters(port):
    text = http_get(port, "/metrics")
    def val(name):
        m = re.search(r"^" + re.escape(name) + r"\{[^}]*\} ([0-9.eE+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0
    return {"queries": val("vllm:prefix_cache_queries_total"), "hits": val("vllm:prefix_cache_hits_total"),
            "requests": val("vllm:request_success_total")}


# ---------------------------------------------------------------- proxies
def podproxy_conf(port, replicas, balance, admin_port):
    urls = ",".join(f"http://127.0.0.1:{p}" for p in replicas)
    return f"""[server]
log_level = "warn"
[listeners.main]
bind = "127.0.0.1:{port}"
routes = [{{ prefix = "/", upstream = "vllm" }}]
[upstreams.vllm]
urls = "{urls}"
{balance}
[admin]
bind = "127.0.0.1:{admin_port}"
"""


def haproxy_conf(d, port, replicas):
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p} maxconn 9000" for i, p in enumerate(replicas))
    return f"""global
    maxconn 9000
    nbthread 2
    pidfile {d}/haproxy.pid
defaults
    mode http
    option http-keep-alive
    option http-no-delay
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-request 10s
frontend fe
    bind 127.0.0.1:{port}
    default_backend vllm
backend vllm
    balance leastconn
    http-reuse always
{servers}
"""


def nginx_conf(d, port, replicas):
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in replicas)
    return f"""user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    tcp_nodelay on;
    upstream vllm {{
        least_conn;
{servers}
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://vllm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


BALANCE = {
    "lo": "",
    "signals": "balance = { signals = true }",
    "affinity": "balance = { signals = true, affinity = true }",
}


def start_arm(name, replicas):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    port = free_port()
    admin = None
    if name in BALANCE:
        admin = free_port()
        cfg = os.path.join(d, "podproxy.toml")
        open(cfg, "w").write(podproxy_conf(port, replicas, BALANCE[name], admin))
        argv = [PODPROXY, "--config", cfg]
    elif name == "haproxy":
        cfg = os.path.join(d, "haproxy.cfg")
        open(cfg, "w").write(haproxy_conf(d, port, replicas))
        argv = ["haproxy", "-db", "-f", cfg]
    elif name == "nginx":
        cfg = os.path.join(d, "nginx.conf")
        open(cfg, "w").write(nginx_conf(d, port, replicas))
        argv = ["nginx", "-p", d, "-c", cfg, "-g", "daemon off;"]
    else:
        raise SystemExit(f"unknown arm {name}")
    p = spawn(argv, name)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if "200 OK" in http_get(port, "/health", 0.5).split("\r\n", 1)[0]:
                return p, port, admin
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{name} did not start; see {d}")


# ---------------------------------------------------------------- client
def words(rng, n, tag):
    return " ".join(f"{tag}{rng.randrange(100000)}" for _ in range(n))


class User:
    def __init__(self, rng, system, uid):
        self.rng, self.system, self.uid = rng, system, uid
        self.new_conversation()

    def new_conversation(self):
        self.messages = [{"role": "system", "content": self.system}]
        self.turn = 0

    def next_body(self):
        if self.turn >= TURNS:
            self.new_conversation()
        self.turn += 1
        self.messages.append({"role": "user", "content": words(self.rng, USER_WORDS, f"u{self.uid}w")})
        return json.dumps({"model": "Qwen/Qwen3-32B-FP8", "stream": True, "max_tokens": ANSWER_TOKENS,
                           "messages": self.messages}).encode()

    def answered(self, text):
        self.messages.append({"role": "assistant", "content": text})


async def stream_request(port, body):
    """One streamed chat completion on a fresh connection: (ttft_s, e2e_s, answer text)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        t0 = time.monotonic()
        writer.write(head + body)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"status {status!r}")
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        ttft, parts, buf = None, [], b""
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                buf += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if not ev.startswith(b"data: "):
                    continue
                payload = ev[6:]
                if payload == b"[DONE]":
                    return ttft, time.monotonic() - t0, "".join(parts)
                if ttft is None:
                    ttft = time.monotonic() - t0
                try:
                    delta = json.loads(payload)["choices"][0].get("delta", {})
                    parts.append(delta.get("content") or "")
                except Exception:
                    pass
        raise RuntimeError("stream ended without [DONE]")
    finally:
        writer.close()


async def user_loop(user, port, until, results, rng):
    # Stagger the start so a slice does not begin with one burst.
    await asyncio.sleep(rng.uniform(0, THINK_S))
    while time.monotonic() < until:
        body = user.next_body()
        try:
            ttft, e2e, text = await asyncio.wait_for(stream_request(port, body), 60)
            results.append((ttft, e2e))
            user.answered(text)
        except Exception as e:
            results.append(None)
            user.messages.pop()
            user.turn -= 1
            log(f"   request failed: {e}")
        await asyncio.sleep(min(rng.expovariate(1 / THINK_S), 4 * THINK_S))


async def run_slice(users, port, seconds, rng):
    results = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(user_loop(u, port, until, results, rng) for u in users))
    return results


# ---------------------------------------------------------------- RSS phase
async def distinct_prefixes(port, n, conc=32):
    """n non-streamed requests, each with a different prompt opening."""
    done = [0]
    async def worker(w):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while done[0] < n:
                i = done[0]
                done[0] += 1
                body = json.dumps({"model": "m", "max_tokens": 1, "messages": [
                    {"role": "system", "content": f"distinct prefix {i} " + "x " * 200},
                    {"role": "user", "content": "hi"}]}).encode()
                writer.write((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
                await writer.drain()
                await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
        finally:
            writer.close()
    await asyncio.gather(*(worker(w) for w in range(conc)))


def rss_phase():
    sim, ports = start_sims(REPLICAS, ["--tokens", "1", "--token-interval-ms", "0"])
    p, port, _ = start_arm("affinity", ports)
    samples = []
    step = RSS_PREFIXES // 5
    for k in range(5):
        asyncio.run(distinct_prefixes(port, step))
        samples.append(((k + 1) * step, rss_kb(p.pid)))
        log(f"   rss after {(k + 1) * step} distinct prefixes: {samples[-1][1]} KiB")
    peak = rss_kb(p.pid, "VmHWM")
    p.kill()
    sim.kill()
    return {"samples": samples, "hwm_kb": peak}


# ---------------------------------------------------------------- report
def pct(vals, q):
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))]


def main():
    rng = random.Random(21)
    log(f"arms: {', '.join(ARMS)}; {ROUNDS} rounds x {SLICE_S}s slices; {TENANTS}x{USERS} users")
    sim, ports = start_sims(REPLICAS * len(ARMS), SIM_FLAGS)
    arms = {}
    for i, name in enumerate(ARMS):
        reps = ports[i * REPLICAS:(i + 1) * REPLICAS]
        proc, port, admin = start_arm(name, reps)
        # Same tenants and system prompts in every arm; separate users (own histories).
        trng = random.Random(7)
        systems = [words(trng, SYSTEM_WORDS, f"t{t}s") for t in range(TENANTS)]
        users = [User(random.Random(1000 * t + u), systems[t], f"{t}x{u}")
                 for t in range(TENANTS) for u in range(USERS)]
        arms[name] = {"proc": proc, "port": port, "admin": admin, "replicas": reps, "users": users,
                      "results": []}
    time.sleep(1.0)  # first scrapes
    for r in range(ROUNDS):
        order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
        for name in order:
            a = arms[name]
            t0 = time.monotonic()
            res = asyncio.run(run_slice(a["users"], a["port"], SLICE_S, rng))
            a["results"] += res
            ok = [x for x in res if x]
            log(f"round {r + 1} {name:9s} {len(ok):4d} requests in {time.monotonic() - t0:5.1f}s, "
                f"TTFT p50 {1000 * (pct([x[0] for x in ok], 0.5) or 0):6.1f} ms")
    summary = {}
    for name, a in arms.items():
        ok = [x for x in a["results"] if x]
        ttft = [x[0] for x in ok]
        e2e = [x[1] for x in ok]
        counters = [replica_counters(p) for p in a["replicas"]]
        q = sum(c["queries"] for c in counters)
        h = sum(c["hits"] for c in counters)
        per = [int(c["requests"]) for c in counters]
        extra = {}
        if a["admin"]:
            try:
                b = json.loads(http_get(a["admin"], "/backends").split("\r\n\r\n", 1)[1])
                extra = b["upstreams"][0].get("affinity") or {}
            except Exception:
                pass
        summary[name] = {
            "requests": len(ok), "failed": len(a["results"]) - len(ok),
            "ttft_mean_ms": 1000 * statistics.mean(ttft) if ttft else None,
            "ttft_p50_ms": 1000 * pct(ttft, 0.5) if ttft else None,
            "ttft_p90_ms": 1000 * pct(ttft, 0.9) if ttft else None,
            "ttft_p99_ms": 1000 * pct(ttft, 0.99) if ttft else None,
            "e2e_p50_ms": 1000 * pct(e2e, 0.5) if e2e else None,
            "e2e_p99_ms": 1000 * pct(e2e, 0.99) if e2e else None,
            "hit_rate": h / q if q else None,
            "per_replica": per,
            "affinity": extra,
        }
        a["proc"].kill()
    sim.kill()
    log("memory phase: podproxy signals+affinity, distinct prompt openings...")
    rss = rss_phase() if "affinity" in ARMS and RSS_PREFIXES > 0 else None

    checks = {}
    S = summary
    peers = [S[n] for n in ("haproxy", "nginx") if n in S and S[n]["ttft_mean_ms"]]
    if "affinity" in S and peers:
        best_mean = min(p["ttft_mean_ms"] for p in peers)
        best_p90 = min(p["ttft_p90_ms"] for p in peers)
        checks["affinity TTFT mean <= 0.75x best of haproxy/nginx"] = (
            S["affinity"]["ttft_mean_ms"] <= 0.75 * best_mean, f"{S['affinity']['ttft_mean_ms'] / best_mean:.2f}x")
        checks["affinity TTFT p90 <= 0.85x best of haproxy/nginx"] = (
            S["affinity"]["ttft_p90_ms"] <= 0.85 * best_p90, f"{S['affinity']['ttft_p90_ms'] / best_p90:.2f}x")
    if "affinity" in S and "lo" in S and S["lo"]["hit_rate"]:
        ratio = S["affinity"]["hit_rate"] / S["lo"]["hit_rate"]
        checks["affinity prefix-cache hit rate >= 1.6x least outstanding"] = (ratio >= 1.6, f"{ratio:.2f}x")
    if "affinity" in S:
        per = S["affinity"]["per_replica"]
        mean = sum(per) / len(per) if per else 0
        worst = max(per) / mean if mean else 0
        checks["affinity: no replica above 1.5x the mean requests"] = (worst <= 1.5, f"max {worst:.2f}x mean")
    if rss:
        first, last = rss["samples"][0][1], rss["samples"][-1][1]
        grow = (last - first) / first if first else 0
        checks[f"RSS flat over {RSS_PREFIXES} distinct prefixes (growth <= 10% after the first fifth)"] = (
            grow <= 0.10, f"{first} -> {last} KiB ({100 * grow:+.1f}%)")

    out = {"summary": summary, "rss": rss, "checks": {k: {"pass": v[0], "value": v[1]} for k, v in checks.items()},
           "params": {"replicas": REPLICAS, "tenants": TENANTS, "users": USERS, "system_words": SYSTEM_WORDS,
                      "user_words": USER_WORDS, "answer_tokens": ANSWER_TOKENS, "turns": TURNS, "think_s": THINK_S,
                      "rounds": ROUNDS, "slice_s": SLICE_S, "sim": SIM_FLAGS}}
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = ["| arm | requests | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | e2e p99 | prefix-cache hit rate | requests per replica |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    label = {"lo": "podproxy least outstanding", "signals": "podproxy signals",
             "affinity": "podproxy signals + affinity", "haproxy": "haproxy leastconn", "nginx": "nginx least_conn"}
    f = lambda v: "–" if v is None else f"{v:.0f} ms"
    for name in ARMS:
        s = S[name]
        fail = f" ({s['failed']} failed)" if s["failed"] else ""
        hr = "–" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f} %"
        lines.append(f"| {label[name]} | {s['requests']}{fail} | {f(s['ttft_mean_ms'])} | {f(s['ttft_p50_ms'])} | "
                     f"{f(s['ttft_p90_ms'])} | {f(s['ttft_p99_ms'])} | {f(s['e2e_p50_ms'])} | {f(s['e2e_p99_ms'])} | "
                     f"{hr} | "
                     f"{' / '.join(map(str, s['per_replica']))} |")
    lines.append("")
    lines.append("| target | result | value |")
    lines.append("|---|---|---|")
    for k, (ok, v) in checks.items():
        lines.append(f"| {k} | {'met' if ok else 'NOT met'} | {v} |")
    table = "\n".join(lines)
    open(os.path.join(OUT, "last-table.md"), "w").write(table + "\n")
    print(table)
    return 0 if all(v[0] for v in checks.values()) else 1


if __name__ == "__main__":
    try:
        code = main()
    finally:
        cleanup()
    sys.exit(code)
