#!/usr/bin/env python3
"""podproxy vs direct / nginx (Gonka stock) / nginx (tuned) / haproxy, one interleaved run.

Called by benches/compare/run.sh (which checks prerequisites and builds). Every target is
started fresh for every (workload, target) pair, on a free loopback port, with configs, pid
files and logs in a temp dir; the peak RSS figures are VmHWM of that fresh process (summed
over nginx master + workers), CPU figures utime + stime from /proc/<pid>/stat (same sum;
the quiet workload's, too small for clock ticks, from every thread's schedstat).
Every proxy writes an access log to a file, as a host runs it (see RESULTS.md). Everything
is bounded in time; every process started here is killed on exit (also on SIGINT/SIGTERM).
Exit status: 0, also when targets are missed, unless STRICT=1 (then 3 when one is missed).
"""
import json, os, socket, statistics, subprocess, sys, time, re

QUICK = os.environ.get("QUICK", "") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "benches", "compare")
PODPROXY = os.environ["PODPROXY_BIN"]
SIM = os.environ["SIM_BIN"]
SSELOAD = os.environ["SSELOAD_BIN"]
STRICT = os.environ.get("STRICT", "") not in ("", "0")
TARGETS = os.environ.get("TARGETS", "direct,podproxy,podproxy-logs-off,nginx-gonka,nginx-tuned,haproxy").split(",")
# WORKLOADS=small,sse runs a subset (for optimisation loops; the README table is a full run)
WORKLOADS = os.environ.get("WORKLOADS", "small,sse,quiet,burst,idle,large").split(",")
# podproxy-b: a second build (PODPROXY_B_BIN) at its defaults, for A/B runs between builds;
# podproxy-named: podproxy with its upstreams named (`localhost`) as the compose layout
# names them, so new connections go through its resolver (opt-in, not in the default run)
PODPROXIES = ("podproxy", "podproxy-logs-off", "podproxy-b", "podproxy-named")
PODPROXY_B = os.environ.get("PODPROXY_B_BIN")
if "podproxy-b" in TARGETS and not PODPROXY_B:
    raise SystemExit("TARGETS names podproxy-b: set PODPROXY_B_BIN to the podproxy build to compare with")

SMALL_S = 3 if QUICK else 6
# small requests and large bodies: interleaved rounds, median of rounds (one run of either
# swung by a quarter between runs of one build here)
SMALL_ROUNDS = 1 if QUICK else 3
SSE_ROUNDS = 1 if QUICK else 3
SSE_STREAMS, SSE_TOKENS, SSE_INTERVAL = 200, 64, 5
# quiet: one stream on an otherwise idle target, 2.5 s after its start, when podproxy's
# health checks (every 2 s) have run and parked a connection the stream may be served over
QUIET_TOKENS, QUIET_INTERVAL, QUIET_WAIT_S = (100 if QUICK else 400), 5, 2.5
QUIET_ROUNDS = 1 if QUICK else 3
IDLE_STREAMS, IDLE_INTERVAL = 2000, 500
IDLE_TOKENS = 6 if QUICK else 40           # 3 s / 20 s per stream
LARGE = (256 << 20) if QUICK else (1 << 30)
LARGE_ROUNDS = 1 if QUICK else 3
# bursts: N new streams opened at once (sseload's barrier), 10 tokens @ 50 ms each; a fresh
# target per size and round. QUICK keeps the sizes (a burst takes ~1 s) and runs one round.
# Five rounds: ten bursts of 2,000 against one build here spread TTFT p99 over 110-184 ms,
# wider than most gaps between targets, and a median of three moved with it.
BURST_SIZES = [int(x) for x in os.environ.get("BURST_SIZES", "1000,2000").split(",")]
BURST_TOKENS, BURST_INTERVAL = 10, 50
BURST_ROUNDS = 1 if QUICK else 5
LARGE_FLAT_MB = 32   # "large-body peak RSS flat": below this at 1 GiB (256 MiB in QUICK)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# podproxy's log settings come from its config: the environment must not override them
CHILD_ENV = {k: v for k, v in os.environ.items()
             if k not in ("RUST_LOG", "PODPROXY_LOG_LEVEL", "PODPROXY_LOG_FORMAT", "NO_COLOR")}

sys.path.insert(0, os.path.dirname(OUT))   # benches/, for procs
import procs  # noqa: E402
from procs import children, cleanup, free_port, log, proc_tree, status_kb  # noqa: E402

work = procs.start("podproxy-compare-")


# ---------------------------------------------------------------- simulators
def spawn(argv, name):
    return procs.spawn(argv, name, env=CHILD_ENV)


def stop(p):
    try:
        p.terminate()
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)
    if p in children:
        children.remove(p)


def cpu_ticks(pid):
    """utime + stime (clock ticks) of pid and its direct children; a process's stat counts
    all its threads, live and exited."""
    tot = 0
    for q in proc_tree(pid):
        try:
            with open(f"/proc/{q}/stat") as f:
                st = f.read()
            fields = st[st.rfind(")") + 2:].split()
            tot += int(fields[11]) + int(fields[12])   # fields 14, 15 of stat(5)
        except Exception:
            pass
    return tot


def cpu_ns(pid):
    """{(pid, tid): ns on CPU} for every thread of pid and its direct children, from
    schedstat (exact, where stat's clock ticks are 10 ms); see cpu_ns_delta."""
    out = {}
    for q in proc_tree(pid):
        try:
            tids = os.listdir(f"/proc/{q}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{q}/task/{tid}/schedstat") as f:
                    out[(q, tid)] = int(f.read().split()[0])
            except Exception:
                pass   # exited meanwhile
    return out


def cpu_ns_delta(a, b):
    """ns on CPU between two cpu_ns readings: tasks gone by the second are left out (their
    figure is gone with them), tasks new in it count in full."""
    return sum(v - a.get(k, 0) for k, v in b.items())


def http_get_once(port, path="/bench/small-response", timeout=0.5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(4096)
        return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    finally:
        s.close()


def wait_ready(port, limit_s=10.0):
    """Polls every ~1 ms until a proxied GET returns 200; returns seconds waited or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            if http_get_once(port):
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.001)
    return None


# ---------------------------------------------------------------- targets
class Sim:
    def __init__(self):
        self.vllm, self.echo = free_port(), free_port()
        self.p = spawn([SIM, "--vllm", f"127.0.0.1:{self.vllm}", "--echo", f"127.0.0.1:{self.echo}",
                        "--token-interval-ms", "5", "--tokens", "64"], "sim")
        if wait_ready(self.echo) is None:
            raise SystemExit("podproxy-sim did not start")


HDRS = """proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;"""


def nginx_conf(d, port, sim, tuned):
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    # access log on, as hosts run nginx: stock (unbuffered, one write per request) for
    # nginx-gonka, buffered as production configs do for nginx-tuned
    alog = f"{d}/logs/access.log combined" + (" buffer=64k flush=1s" if tuned else "")
    common = f"""
    access_log {alog};
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 0;   # harness: allow the 1 GiB upload (stock would answer 413)
"""
    if not tuned:
        # Gonka deploy/join/nginx.conf semantics: everything default (1 worker,
        # worker_connections 512, HTTP/1.0 upstream without keepalive, proxy_buffering on,
        # proxy_request_buffering on), plain proxy_pass per location.
        return f"""user root;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{}}
http {{{common}
    server {{
        listen 127.0.0.1:{port};
        location /v1/ {{
            proxy_pass http://127.0.0.1:{sim.vllm};
            {HDRS}
        }}
        location / {{
            proxy_pass http://127.0.0.1:{sim.echo};
            {HDRS}
        }}
    }}
}}
"""
    loc = """proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;"""
    return f"""user root;
worker_processes auto;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{{common}
    tcp_nodelay on;
    keepalive_requests 1000000;
    upstream vllm {{ server 127.0.0.1:{sim.vllm}; keepalive 512; }}
    upstream echo {{ server 127.0.0.1:{sim.echo}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /v1/ {{
            proxy_pass http://vllm;
            {loc}
            {HDRS}
        }}
        location / {{
            proxy_pass http://echo;
            {loc}
            {HDRS}
        }}
    }}
}}
"""


def haproxy_conf(d, port, sim):
    # Logs nothing without a log target. As haproxy's container setup does: the HTTP log
    # format on stdout (one unbuffered writev per line), which the harness sends to a file.
    return f"""global
    log stdout format raw local0 info
    maxconn 9000
    nbthread 2
    pidfile {d}/haproxy.pid
    tune.bufsize 16384
defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    option http-no-delay      # without it haproxy corks (MSG_MORE) and delivers SSE in bursts
    option forwardfor
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-request 10s
    maxconn 9000
frontend fe
    bind 127.0.0.1:{port} backlog 4096
    use_backend vllm if {{ path_beg /v1/ }}
    default_backend echo
backend vllm
    http-reuse always
    server s1 127.0.0.1:{sim.vllm} maxconn 9000
backend echo
    http-reuse always
    server s1 127.0.0.1:{sim.echo} maxconn 9000
"""


def podproxy_conf(port, sim, logs=True, host="127.0.0.1"):
    # podproxy defaults: only ports and upstreams (access log on: its lines are INFO, the
    # default level). podproxy-logs-off adds log_level = "warn", which turns it off.
    server = "" if logs else '[server]\nlog_level = "warn"\n'
    return f"""{server}[listeners.main]
bind = "127.0.0.1:{port}"
routes = [{{ prefix = "/v1/", upstream = "vllm" }}, {{ prefix = "/", upstream = "echo" }}]
[upstreams.echo]
urls = "http://{host}:{sim.echo}"
[upstreams.vllm]
urls = "http://{host}:{sim.vllm}"
"""


class Running:
    def __init__(self, name, port, proc, cold_s, idle_kb, direct_ports=None, access_log=None, started=None):
        self.name, self.port, self.proc, self.cold_s, self.idle_kb = name, port, proc, cold_s, idle_kb
        # when the process was spawned (direct: when this was made), time.monotonic()
        self.started = time.monotonic() if started is None else started
        self.direct_ports = direct_ports  # (vllm, echo) for "direct"
        self.access_log = access_log      # the file its access log lines go to

    def log_lines(self):
        """Lines in the access-log file (podproxy and haproxy: their stderr/stdout file)."""
        try:
            with open(self.access_log, "rb") as f:
                return sum(1 for _ in f)
        except Exception:
            return None

    def addr(self, kind):
        if self.direct_ports:
            return self.direct_ports[0] if kind == "vllm" else self.direct_ports[1]
        return self.port

    def hwm_kb(self):
        return None if self.proc is None else status_kb(self.proc.pid, "VmHWM")

    def cpu_ticks(self):
        return None if self.proc is None else cpu_ticks(self.proc.pid)

    def cpu_ns(self):
        return None if self.proc is None else cpu_ns(self.proc.pid)

    def stop(self):
        if self.proc is not None:
            stop(self.proc)


START_SEQ = [0]


def start_target(name, sim):
    if name == "direct":
        return Running(name, None, None, None, None, (sim.vllm, sim.echo))
    START_SEQ[0] += 1
    d = os.path.join(work, f"{name}-{START_SEQ[0]}")
    os.makedirs(d)
    port = free_port()
    if name in PODPROXIES:
        cfg = os.path.join(d, "podproxy.toml")
        host = "localhost" if name == "podproxy-named" else "127.0.0.1"
        open(cfg, "w").write(podproxy_conf(port, sim, logs=name != "podproxy-logs-off", host=host))
        argv = [PODPROXY_B if name == "podproxy-b" else PODPROXY, "--config", cfg]
    elif name in ("nginx-gonka", "nginx-tuned"):
        cfg = os.path.join(d, "nginx.conf")
        open(cfg, "w").write(nginx_conf(d, port, sim, name == "nginx-tuned"))
        argv = ["nginx", "-p", d, "-c", cfg, "-g", "daemon off;"]
    elif name == "haproxy":
        cfg = os.path.join(d, "haproxy.cfg")
        open(cfg, "w").write(haproxy_conf(d, port, sim))
        argv = ["haproxy", "-db", "-f", cfg]
    else:
        raise SystemExit(f"unknown target {name}")
    t0 = time.monotonic()
    p = spawn(argv, f"{name}-{START_SEQ[0]}")
    cold = None
    while time.monotonic() - t0 < 10:
        try:
            if http_get_once(port):
                cold = time.monotonic() - t0
                break
        except OSError:
            pass
        if p.poll() is not None:
            break
        time.sleep(0.001)
    if cold is None:
        log(f"!! {name} did not start; log:")
        try:
            log(open(os.path.join(work, f"{name}-{START_SEQ[0]}.log")).read()[-2000:])
        except Exception:
            pass
        stop(p)
        return None
    time.sleep(0.3)  # let workers settle before reading idle RSS
    alog = os.path.join(d, "logs", "access.log") if name.startswith("nginx") else os.path.join(work, f"{name}-{START_SEQ[0]}.log")
    return Running(name, port, p, cold, status_kb(p.pid, "VmRSS"), access_log=alog, started=t0)


def run(argv, timeout):
    """Runs a load generator (tracked, so a signal kills it too); bounded by timeout."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
        return out, err
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return "", "timeout"
    finally:
        if p in children:
            children.remove(p)


# ---------------------------------------------------------------- workloads
def w_small(t):
    out, err = run(["wrk", "-t1", "-c64", f"-d{SMALL_S}s", "--latency",
                    f"http://127.0.0.1:{t.addr('echo')}/bench/small-response"], SMALL_S + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    def lat(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
    reqs = re.search(r"(\d+) requests in", out)
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(rps.group(1)) if rps else None, "p50_ms": lat(50), "p99_ms": lat(99),
            "requests": int(reqs.group(1)) if reqs else None,
            "non2xx": int(errs.group(1)) if errs else 0, "socket_errors": sock.group(1) if sock else None}


def sseload(t, streams, tokens, interval, timeout):
    out, err = run([SSELOAD, f"127.0.0.1:{t.addr('vllm')}", str(streams), str(tokens), str(interval),
                    str(timeout)], timeout + 30)
    try:
        return json.loads(out)
    except Exception:
        return {"error": (err or out)[-500:]}


def w_sse(t):
    return sseload(t, SSE_STREAMS, SSE_TOKENS, SSE_INTERVAL, 30)


def w_quiet(t):
    # measured from the spawn (t.started), not from readiness: podproxy's health-check timer
    # starts with the process
    time.sleep(max(0.0, t.started + QUIET_WAIT_S - time.monotonic()))
    c0 = t.cpu_ns()
    r = sseload(t, 1, QUIET_TOKENS, QUIET_INTERVAL, 30)
    c1 = t.cpu_ns()
    if c0 is not None and c1 is not None:
        ns = cpu_ns_delta(c0, c1)
        r["cpu_ms"] = round(ns / 1e6, 3)
        if r.get("events"):
            r["cpu_us_per_token"] = round(ns / 1e3 / r["events"], 2)
    return r


def with_cpu(t, fn):
    """fn()'s result plus the target's CPU (utime + stime) spent while it ran."""
    c0 = t.cpu_ticks()
    r = fn()
    c1 = t.cpu_ticks()
    if c0 is not None and c1 is not None:
        r["cpu_ms"] = round((c1 - c0) * 1000 / CLK_TCK, 1)
        if r.get("events"):
            r["cpu_us_per_token"] = round((c1 - c0) * 1e6 / CLK_TCK / r["events"], 2)
    return r


def w_idle(t):
    dur = IDLE_TOKENS * IDLE_INTERVAL / 1000
    r = with_cpu(t, lambda: sseload(t, IDLE_STREAMS, IDLE_TOKENS, IDLE_INTERVAL, int(dur + 25)))
    r["peak_rss_kb"] = t.hwm_kb()
    return r


def w_burst(t, n):
    # n streams connect together (sseload's barrier); TTFT = request write -> first token
    # event. The simulator sends the first token one interval (50 ms) after the request.
    return with_cpu(t, lambda: sseload(t, n, BURST_TOKENS, BURST_INTERVAL, 30))


def curl_speed(argv, timeout):
    out, err = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download} %{speed_upload} %{time_total}",
                    "--max-time", str(timeout)] + argv, timeout + 10)
    try:
        code, down, up, total = out.split()
        return {"status": int(code), "down_Bps": float(down), "up_Bps": float(up), "time_s": float(total)}
    except Exception:
        return {"status": 0, "error": (err or out)[-300:]}


def w_large(t, upload_file):
    port = t.addr("echo")
    d = curl_speed([f"http://127.0.0.1:{port}/bytes/{LARGE}"], 120)
    dl = {"status": d.get("status"), "MBps": round(LARGE / d["time_s"] / 1e6, 1) if d.get("status") == 200 else None}
    u = curl_speed(["-X", "POST", "-H", "Content-Type: application/octet-stream", "-H", "Expect:", "-T", upload_file,
                    f"http://127.0.0.1:{port}/sink"], 120)
    ul = {"status": u.get("status"), "MBps": round(LARGE / u["time_s"] / 1e6, 1) if u.get("status") == 200 else None}
    return {"bytes": LARGE, "download": dl, "upload": ul, "peak_rss_kb": t.hwm_kb()}


# ---------------------------------------------------------------- main
def main():
    sim = Sim()
    upload_file = os.path.join(work, "upload.bin")
    with open(upload_file, "wb") as f:
        f.truncate(LARGE)  # sparse: no disk I/O on read
    res = {"quick": QUICK, "targets": TARGETS, "params": {
        "small": {"wrk_threads": 1, "connections": 64, "duration_s": SMALL_S, "rounds": SMALL_ROUNDS, "response": "~29-byte JSON body"},
        "sse": {"streams": SSE_STREAMS, "tokens": SSE_TOKENS, "interval_ms": SSE_INTERVAL, "rounds": SSE_ROUNDS},
        "quiet": {"streams": 1, "tokens": QUIET_TOKENS, "interval_ms": QUIET_INTERVAL, "after_start_s": QUIET_WAIT_S,
                  "rounds": QUIET_ROUNDS},
        "idle": {"streams": IDLE_STREAMS, "tokens": IDLE_TOKENS, "interval_ms": IDLE_INTERVAL},
        "burst": {"sizes": BURST_SIZES, "tokens": BURST_TOKENS, "interval_ms": BURST_INTERVAL, "rounds": BURST_ROUNDS},
        "large": {"bytes": LARGE, "rounds": LARGE_ROUNDS}},
        "per_target": {n: {"cold_start_ms": [], "idle_rss_kb": []} for n in TARGETS}}
    pt = res["per_target"]

    def each(workload, fn, rounds=1):
        for r in range(rounds):
            for name in TARGETS:
                t = start_target(name, sim)
                if t is None:
                    pt[name].setdefault(workload, []).append({"error": "did not start"})
                    continue
                if t.cold_s is not None:
                    pt[name]["cold_start_ms"].append(round(t.cold_s * 1000, 2))
                    pt[name]["idle_rss_kb"].append(t.idle_kb)
                log(f"-- {workload} round {r + 1}/{rounds}: {name}")
                try:
                    v = fn(t)
                finally:
                    if workload != "idle" and t.proc is not None:
                        v_hwm = t.hwm_kb()
                    t.stop()
                if workload != "idle" and isinstance(v, dict) and "peak_rss_kb" not in v and t.proc is not None:
                    v["peak_rss_kb"] = v_hwm
                if workload == "small" and isinstance(v, dict) and t.access_log:
                    # proof the access log was on: lines written (after stop, so buffers are flushed)
                    v["log_lines"] = t.log_lines()
                log(f"   {json.dumps(v)[:400]}")
                pt[name].setdefault(workload, []).append(v)
                time.sleep(0.5)  # let TIME_WAIT / backend settle a little

    if "small" in WORKLOADS:
        each("small", w_small, SMALL_ROUNDS)
    if "sse" in WORKLOADS:
        each("sse", w_sse, SSE_ROUNDS)
    if "quiet" in WORKLOADS:
        each("quiet", w_quiet, QUIET_ROUNDS)
    if "burst" in WORKLOADS:
        for n in BURST_SIZES:
            each(f"burst{n}", lambda t, n=n: w_burst(t, n), BURST_ROUNDS)
    if "idle" in WORKLOADS:
        each("idle", w_idle)
    if "large" in WORKLOADS:
        each("large", lambda t: w_large(t, upload_file), LARGE_ROUNDS)
    stop(sim.p)
    return summarize(res)


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return round(statistics.median(vals), 3) if vals else None


def summarize(res):
    S = {}
    for name, d in res["per_target"].items():
        sm = d.get("small") or []
        sse = d.get("sse") or []
        qt = d.get("quiet") or []
        idle = (d.get("idle") or [{}])[0]
        lg = d.get("large") or []
        S[name] = {
            # median over rounds of each round's figure
            "rps": med([x.get("rps") for x in sm]), "p50_ms": med([x.get("p50_ms") for x in sm]),
            "p99_ms": med([x.get("p99_ms") for x in sm]),
            "small_non2xx": sum(x.get("non2xx") or 0 for x in sm) if sm else None,
            "sse_p50_ms": med([x.get("lat_p50_us", 0) / 1000 for x in sse if "lat_p50_us" in x]),
            "sse_p99_ms": med([x.get("lat_p99_us", 0) / 1000 for x in sse if "lat_p99_us" in x]),
            "sse_max_ms": max([x["lat_max_us"] / 1000 for x in sse if "lat_max_us" in x] or [None]) if sse else None,
            "sse_batched_reads": sum(x.get("multi_event_reads", 0) for x in sse) if sse else None,
            "sse_max_events_per_read": max([x.get("max_events_per_read", 0) for x in sse] or [0]) if sse else None,
            "sse_ok_streams": sum(x.get("ok", 0) for x in sse),
            "sse_streams": sum(x.get("streams", 0) for x in sse),
            "quiet_p50_ms": med([x["lat_p50_us"] / 1000 for x in qt if "lat_p50_us" in x]),
            "quiet_p99_ms": med([x["lat_p99_us"] / 1000 for x in qt if "lat_p99_us" in x]),
            "quiet_max_ms": max([x["lat_max_us"] / 1000 for x in qt if "lat_max_us" in x] or [None]) if qt else None,
            "quiet_cpu_us_per_token": med([x.get("cpu_us_per_token") for x in qt]),
            "quiet_ok_streams": sum(x.get("ok", 0) for x in qt) if qt else None,
            "quiet_streams": sum(x.get("streams", 0) for x in qt) if qt else None,
        }
        for n in res["params"]["burst"]["sizes"]:
            b = d.get(f"burst{n}") or []
            # median over rounds of each round's percentile; only rounds where a token arrived
            S[name][f"burst{n}_ttft_p50_ms"] = med([x["ttft_p50_us"] / 1000 for x in b if x.get("ttft_p50_us", -1) >= 0])
            S[name][f"burst{n}_ttft_p99_ms"] = med([x["ttft_p99_us"] / 1000 for x in b if x.get("ttft_p99_us", -1) >= 0])
            S[name][f"burst{n}_ok_streams"] = sum(x.get("ok", 0) for x in b) if b else None
            S[name][f"burst{n}_streams"] = sum(x.get("streams", 0) for x in b) if b else None
        S[name].update({
            "idle_ok_streams": idle.get("ok"), "idle_streams": idle.get("streams"),
            "idle_errors": idle.get("errors"),
            "idle_peak_rss_mb": round(idle["peak_rss_kb"] / 1024, 1) if idle.get("peak_rss_kb") else None,
            "idle_cpu_us_per_token": idle.get("cpu_us_per_token"),
            "download_MBps": med([(x.get("download") or {}).get("MBps") for x in lg]),
            "upload_MBps": med([(x.get("upload") or {}).get("MBps") for x in lg]),
            # the highest of the rounds: "flat" must hold in every one
            "large_peak_rss_mb": round(max(rss) / 1024, 1) if (rss := [x["peak_rss_kb"] for x in lg if x.get("peak_rss_kb")]) else None,
            "idle_rss_mb": round(med(d["idle_rss_kb"]) / 1024, 1) if med(d["idle_rss_kb"]) else None,
            "cold_start_ms": med(d["cold_start_ms"]),
        })
    res["summary"] = S
    ratios = {}
    peers = ("direct", "nginx-tuned", "nginx-gonka", "haproxy")
    # podproxy (default config, access log on) is the row that counts; podproxy-logs-off
    # gets small-request ratios only, and podproxy/podproxy-logs-off shows the log's cost
    rows = [("podproxy", p, None) for p in peers] + [("podproxy-logs-off", p, ("rps", "p99_ms")) for p in peers] \
        + [("podproxy", "podproxy-logs-off", None), ("podproxy", "podproxy-b", None),
           ("podproxy", "podproxy-named", None)]
    for a, b, only in rows:
        x, y = S.get(a), S.get(b)
        if not x or not y:
            continue
        r = {}
        for k, v in x.items():
            w = y.get(k)
            if only and k not in only:
                continue
            if isinstance(v, (int, float)) and isinstance(w, (int, float)) and w:
                r[k] = round(v / w, 3)
        ratios[f"{a}/{b}"] = r
    res["ratios"] = ratios
    res["checks"] = checks(S, res["params"])
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = table(S, ratios, res["checks"], res)
    print(md)
    with open(os.path.join(OUT, "last-table.md"), "w") as f:
        f.write(md)
    chart(S, res["params"]["burst"]["sizes"])
    return res["checks"]


def num(d, k):
    v = (d or {}).get(k)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def checks(S, params):
    """The targets, for podproxy at its defaults (access log on). Each is
    {"target", "met": True/False/None (not measured in this run), "value"}."""
    p, tuned, direct = S.get("podproxy") or {}, S.get("nginx-tuned") or {}, S.get("direct") or {}
    out = []

    def add(target, met, value):
        out.append({"target": target, "met": met, "value": value})

    def best_peer(k, higher=False):
        """(name, value) of the better of nginx-tuned and haproxy for k, among those measured."""
        c = [(n, num(S.get(n), k)) for n in ("nginx-tuned", "haproxy")]
        c = [(n, v) for n, v in c if v is not None]
        if not c:
            return None, None
        return (max if higher else min)(c, key=lambda x: x[1])

    def vs_peer(target, k, factor=1.0, higher=False, unit="", nd=2):
        v = num(p, k)
        peer, w = best_peer(k, higher)
        if v is None or w is None:
            return add(target, None, "not measured")
        met = v >= factor * w if higher else v <= factor * w
        ratio = f"{v / w:.2f}×" if w else "–"
        add(target, met, f"{v:,.{nd}f}{unit} vs {peer} {w:,.{nd}f}{unit} ({ratio})")

    vs_peer("small requests: req/s ≥ 1.0× the better of nginx-tuned and haproxy", "rps", 1.0, True, "", 0)
    vs_peer("small requests: p99 ≤ the better peer's p99", "p99_ms", 1.0, unit=" ms")
    vs_peer("SSE: added latency p50 ≤ 0.8× the better peer's", "sse_p50_ms", 0.8, unit=" ms")
    vs_peer("SSE: added latency p99 ≤ 0.8× the better peer's", "sse_p99_ms", 0.8, unit=" ms")
    if p.get("sse_streams"):
        add("SSE: zero batched reads", p["sse_batched_reads"] == 0,
            f"{p['sse_batched_reads']} batched reads (max {p['sse_max_events_per_read']} events per read)")
    else:
        add("SSE: zero batched reads", None, "not measured")
    for n in params["burst"]["sizes"]:
        for q in ("p50", "p99"):
            vs_peer(f"burst of {n:,} new streams: TTFT {q} ≤ the better peer's", f"burst{n}_ttft_{q}_ms", unit=" ms", nd=1)

    def vs_tuned(target, k, unit, nd):
        v, w = num(p, k), num(tuned, k)
        if v is None or w is None:
            return add(target, None, "not measured")
        add(target, v <= w, f"{v:,.{nd}f}{unit} vs nginx-tuned {w:,.{nd}f}{unit} ({v / w:.2f}×)" if w else f"{v}")

    vs_tuned("2,000 slow streams: peak RSS ≤ nginx-tuned's", "idle_peak_rss_mb", " MB", 1)
    vs_tuned("2,000 slow streams: CPU µs per streamed token ≤ nginx-tuned's", "idle_cpu_us_per_token", " µs", 1)
    for k, what in (("download_MBps", "download"), ("upload_MBps", "upload")):
        v, w = num(p, k), num(direct, k)
        if v is None or w is None:
            add(f"no regression: {what} ≥ 0.9× direct", None, "not measured")
        else:
            add(f"no regression: {what} ≥ 0.9× direct", v >= 0.9 * w, f"{v:,.0f} vs {w:,.0f} MB/s ({v / w:.2f}×)")
    v = num(p, "large_peak_rss_mb")
    mib = params["large"]["bytes"] >> 20
    add(f"no regression: large-body peak RSS flat (< {LARGE_FLAT_MB} MB while moving {mib:,} MiB each way)",
        None if v is None else v < LARGE_FLAT_MB, "not measured" if v is None else f"{v:.1f} MB")
    v = num(p, "idle_rss_mb")
    add("no regression: idle RSS < 10 MB", None if v is None else v < 10, "not measured" if v is None else f"{v:.1f} MB")
    v = num(p, "cold_start_ms")
    add("no regression: cold start < 50 ms", None if v is None else v < 50,
        "not measured" if v is None else f"{v:.1f} ms (median of every start in this run)")
    # a guard, not a speed target: figures from streams that broke would not mean much
    got = [(p.get(f"{w}_ok_streams"), p.get(f"{w}_streams")) for w in
           ["sse", "idle"] + [f"burst{n}" for n in params["burst"]["sizes"]]]
    got = [(a, b) for a, b in got if b]
    if got:
        ok, tot = sum(a or 0 for a, _ in got), sum(b for _, b in got)
        add("every podproxy stream ended cleanly (SSE, bursts, slow streams)", ok == tot, f"{ok:,}/{tot:,}")
    return out


def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def table(S, ratios, chk, res):
    sizes = res["params"]["burst"]["sizes"]

    def ok(s, w):
        a, b = s.get(f"{w}_ok_streams"), s.get(f"{w}_streams")
        return "–" if not b else f"{a}/{b}"

    t1 = [("req/s", "rps", 0), ("p50 ms", "p50_ms", 2), ("p99 ms", "p99_ms", 2),
          ("SSE p50 ms", "sse_p50_ms", 2), ("SSE p99 ms", "sse_p99_ms", 2), ("SSE max ms", "sse_max_ms", 1),
          ("batched reads", "sse_batched_reads", 0), ("max ev/read", "sse_max_events_per_read", 0),
          ("SSE ok", "@sse", 0)]
    t2 = []
    for n in sizes:
        k = f"{n // 1000}k" if n % 1000 == 0 else str(n)
        t2 += [(f"burst {k} TTFT p50 ms", f"burst{n}_ttft_p50_ms", 1), (f"burst {k} TTFT p99 ms", f"burst{n}_ttft_p99_ms", 1),
               (f"burst {k} ok", f"@burst{n}", 0)]
    t2 += [("2k slow ok", "@idle", 0), ("2k slow peak RSS MB", "idle_peak_rss_mb", 1),
           ("2k slow CPU µs/token", "idle_cpu_us_per_token", 1),
           ("down MB/s", "download_MBps", 0), ("up MB/s", "upload_MBps", 0), ("large peak RSS MB", "large_peak_rss_mb", 1),
           ("idle RSS MB", "idle_rss_mb", 1), ("cold start ms", "cold_start_ms", 1)]
    t3 = [("quiet stream added p50 ms", "quiet_p50_ms", 2), ("p99 ms", "quiet_p99_ms", 2), ("max ms", "quiet_max_ms", 2),
          ("CPU µs/token", "quiet_cpu_us_per_token", 1), ("ok", "@quiet", 0)]
    out = []
    for cols in (t1, t2, t3):
        # a subset run (WORKLOADS=...) leaves some columns empty: drop those
        cols = [c for c in cols if any((ok(s, c[1][1:]) if c[1].startswith("@") else fmt(s.get(c[1]))) != "–"
                                       for s in S.values())]
        if not cols:
            continue
        out += ["| target | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, s in S.items():
            row = [ok(s, k[1:]) if k.startswith("@") else fmt(s.get(k), nd) for _, k, nd in cols]
            out.append(f"| {name} | " + " | ".join(row) + " |")
        out.append("")
    keys = ["rps", "p99_ms", "sse_p50_ms", "sse_p99_ms", "quiet_p50_ms", "quiet_p99_ms", "quiet_cpu_us_per_token"]
    for n in sizes:
        keys += [f"burst{n}_ttft_p50_ms", f"burst{n}_ttft_p99_ms"]
    keys += ["idle_peak_rss_mb", "idle_cpu_us_per_token", "download_MBps", "upload_MBps", "large_peak_rss_mb", "cold_start_ms"]
    keys = [k for k in keys if any(k in r for r in ratios.values())]   # measured in this run
    if keys:
        out.append("Ratios (row / column target; for latency, RSS and CPU lower is better). podproxy runs at its "
                   "defaults (access log on) and is the row that counts; podproxy-logs-off rows are small requests only:")
        out.append("")
        out.append("| ratio | " + " | ".join(keys) + " |")
        out.append("|---" * (len(keys) + 1) + "|")
        for rn, r in ratios.items():
            if any(k in r for k in keys):
                out.append(f"| {rn} | " + " | ".join(fmt(r.get(k), 2) for k in keys) + " |")
        out.append("")
    out.append("Targets (podproxy at its defaults, access log on; \"the better peer\" is the better of "
               "nginx-tuned and haproxy in this run):")
    out.append("")
    for c in chk:
        tag = {True: "MET   ", False: "MISSED", None: "n/a   "}[c["met"]]
        out.append(f"- {tag} {c['target']}: {c['value']}")
    met = sum(1 for c in chk if c["met"] is True)
    missed = sum(1 for c in chk if c["met"] is False)
    na = sum(1 for c in chk if c["met"] is None)
    out.append("")
    out.append(f"{met} met, {missed} missed, {na} not measured in this run.")
    p = res["params"]
    out.append("")
    out.append(f"Parameters: quick={res['quick']}; targets {','.join(res['targets'])}; small: wrk -t1 -c64 {p['small']['duration_s']} s, "
               f"{p['small'].get('rounds', 1)} round(s), median of rounds; "
               f"SSE: {p['sse']['streams']} streams x {p['sse']['tokens']} events @ {p['sse']['interval_ms']} ms, "
               f"{p['sse']['rounds']} round(s), median of rounds; quiet: 1 stream x {p['quiet']['tokens']} events "
               f"@ {p['quiet']['interval_ms']} ms on an otherwise idle target, {p['quiet']['after_start_s']} s after its start, "
               f"{p['quiet']['rounds']} round(s), median of rounds (CPU from schedstat); bursts: {' and '.join(str(n) for n in p['burst']['sizes'])} "
               f"streams at once x {p['burst']['tokens']} events @ {p['burst']['interval_ms']} ms, {p['burst']['rounds']} round(s), "
               f"median of rounds; slow streams: {p['idle']['streams']} x {p['idle']['tokens']} "
               f"events @ {p['idle']['interval_ms']} ms; large: {p['large']['bytes'] >> 20} MiB, "
               f"{p['large'].get('rounds', 1)} round(s), median of rounds (peak RSS: the highest).")
    return "\n".join(out) + "\n"


def chart(S, sizes):
    import math
    names = list(S.keys())
    colors = {"direct": "#888888", "podproxy": "#d9480f", "podproxy-logs-off": "#f59f00", "podproxy-b": "#862e9c", "podproxy-named": "#5c940d", "nginx-gonka": "#1c7ed6",
              "nginx-tuned": "#4dabf7", "haproxy": "#37b24d"}
    W, H = 1440, 460
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']

    def panel(x0, title, series, unit, log_scale=False, light=(), vfont=9):
        pw, ph, top = 420, 300, 66
        svg.append(f'<text x="{x0 + pw / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>')
        vals = [v for _, vs in series for v in vs if isinstance(v, (int, float)) and v > 0]
        vmax = max(vals) if vals else 1
        groups = len(series)
        gw = pw / max(groups, 1)
        nb = max(len(vs) for _, vs in series) if series else 1
        bw = gw * 0.8 / nb
        svg.append(f'<line x1="{x0}" y1="{top + ph}" x2="{x0 + pw}" y2="{top + ph}" stroke="black"/>')

        def hgt(v):
            if log_scale:
                lo = math.log10(max(min(vals), 1e-3)) - 0.3
                return ph * (math.log10(max(v, 1e-3)) - lo) / (math.log10(vmax) - lo + 1e-9)
            return ph * v / vmax
        for i, (name, vs) in enumerate(series):
            gx = x0 + i * gw + gw * 0.1
            for j, v in enumerate(vs):
                if not isinstance(v, (int, float)) or v <= 0:
                    continue
                h = max(hgt(v), 1)
                op = "0.55" if j in light else "1"
                svg.append(f'<rect x="{gx + j * bw:.1f}" y="{top + ph - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" fill="{colors.get(name, "#555")}" fill-opacity="{op}"/>')
                svg.append(f'<text x="{gx + j * bw + bw / 2:.1f}" y="{top + ph - h - 4:.1f}" text-anchor="middle" font-size="{vfont}">{v:,.{0 if v >= 10 else 1 if v >= 1 else 2}f}</text>')
            cx, cy = x0 + i * gw + gw / 2, top + ph + 14
            svg.append(f'<text x="{cx:.1f}" y="{cy}" text-anchor="end" font-size="11" transform="rotate(-25 {cx:.1f} {cy})">{name}</text>')
        svg.append(f'<text x="{x0}" y="{top - 20}" font-size="11" fill="#444">{unit}</text>')

    panel(30, "Added SSE latency (p50 solid, p99 light)",
          [(n, [S[n].get("sse_p50_ms"), S[n].get("sse_p99_ms")]) for n in names], "ms, log scale", True, (1,))
    panel(510, "Small requests: requests/s (higher is better)", [(n, [S[n].get("rps")]) for n in names], "req/s")
    bursts = " then ".join(f"{n:,}" for n in sizes)
    panel(990, "Burst TTFT (p50 solid, p99 light)",
          [(n, [S[n].get(f"burst{b}_ttft_{q}_ms") for b in sizes for q in ("p50", "p99")]) for n in names],
          f"ms; {bursts} streams; floor 50 ms (the simulator's first token)",
          False, tuple(range(1, 2 * len(sizes), 2)), vfont=8)
    svg.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" font-size="11" fill="#444">podproxy benches/compare, one interleaved run on one machine; every proxy logs access to a file (see RESULTS.md)</text>')
    svg.append("</svg>")
    with open(os.path.join(OUT, "chart.svg"), "w") as f:
        f.write("\n".join(svg))


if __name__ == "__main__":
    rc = 0
    try:
        chk = main()
        missed = [c["target"] for c in chk or [] if c["met"] is False]
        if missed:
            log(f"{len(missed)} target(s) missed" + ("; STRICT=1: exit status 3" if STRICT else " (exit status 0; STRICT=1 makes it 3)"))
            if STRICT:
                rc = 3
    finally:
        cleanup()
    sys.exit(rc)
