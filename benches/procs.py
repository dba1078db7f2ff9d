"""Process bookkeeping shared by the benchmark harnesses (benches/compare, benches/llm): a
temp dir for configs and logs, every process they start tracked and killed on exit or on
SIGINT/SIGTERM, free loopback ports, and /proc readings."""
import os, shutil, signal, socket, subprocess, sys, tempfile

children = []   # Popen objects, killed by cleanup()
work = None     # the temp dir, made by start()


def start(prefix):
    """Makes the temp dir and installs the signal handlers; returns the dir."""
    global work
    work = tempfile.mkdtemp(prefix=prefix)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return work


def cleanup(*_):
    for p in children:
        try:
            p.kill()
        except Exception:
            pass
    for p in children:
        try:
            p.wait(timeout=5)
        except Exception:
            pass
    if work:
        shutil.rmtree(work, ignore_errors=True)


def _on_signal(sig, _frame):
    cleanup()
    sys.exit(128 + sig)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(argv, name, stdout=None, env=None):
    """Starts a tracked process; stderr (and stdout, unless given) go to <work>/<name>.log."""
    f = open(os.path.join(work, name + ".log"), "ab")
    p = subprocess.Popen(argv, stdout=stdout or f, stderr=f, stdin=subprocess.DEVNULL, env=env)
    children.append(p)
    return p


def own_status_kb(pid, key):
    """A /proc/<pid>/status figure in kB (VmRSS, VmHWM, ...); None when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except Exception:
        pass
    return None


def proc_tree(pid):
    """pid and its direct children (nginx workers)."""
    pids = [pid]
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rfind(")") + 2:].split()[1])
            if ppid == pid:
                pids.append(int(d))
        except Exception:
            pass
    return pids


def status_kb(pid, key):
    """own_status_kb summed over pid and its direct children (0 when none is readable)."""
    return sum(own_status_kb(q, key) or 0 for q in proc_tree(pid))
