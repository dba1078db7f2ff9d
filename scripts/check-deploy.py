#!/usr/bin/env python3
"""Checks the deployment files against each other without a container engine: the compose
file (deploy/compose/) parses, keeps Gonka's mlnode service as upstream ships it, runs podproxy
as the `inference` service with the config that sits beside it (so no working directory can
pick another file), and that config, checked by the real binary, listens on the container
ports the service publishes, reaches the mlnode container by name (API on 8080, vLLM on
5001-5008, health-checked, with the Content-Type compatibility on) and has its admin API
published on the host's loopback only. Then the mTLS overlay, the RunPod template image and
the systemd unit. Usage: scripts/check-deploy.py <podproxy binary>"""
import os, re, shutil, subprocess, sys, tempfile, tomllib
import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = sys.argv[1]
deploy = os.path.join(root, "deploy/compose")
MLNODE = "mlnode-308"


def fail(msg):
    sys.exit(f"deploy check FAILED: {msg}")


def podproxy_check(cfg, env):
    # --skip-bind: the ports are the container's, not this machine's.
    out = subprocess.run([binary, "check", "--skip-bind", "--config", cfg], capture_output=True, text=True,
                         env=dict(os.environ, **env))
    if out.returncode != 0:
        fail(f"podproxy check {cfg}: {out.stderr}")
    return tomllib.loads(out.stdout)


def env_of(service):
    env = service.get("environment", [])
    if isinstance(env, dict):
        return env
    return dict(e.split("=", 1) if "=" in e else (e, None) for e in env)


def mounted_config(service, where, cmd=None):
    """The config file `service` runs (`cmd`, default its own command): mounted read-only from
    beside the compose file."""
    cmd = cmd or service["command"]
    if cmd[:2] != ["run", "--config"]:
        fail(f"{where}: command {cmd} must be run --config <mounted file>")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    host = mounts.get(cmd[2])
    if host is None or not host.startswith("./") or "/" in host[2:]:
        fail(f"{where}: {cmd[2]} must be mounted from a file beside the compose file, not {host}")
    path = os.path.join(deploy, host[2:])
    if not os.path.isfile(path):
        fail(f"{where}: mounts {host}, which is not in deploy/compose/")
    return path, mounts


def check_layout(cfg, where):
    listeners, upstreams = cfg["listeners"], cfg["upstreams"]
    for name, lst in listeners.items():
        for r in lst["routes"]:
            if r["upstream"] in ("mlnode", "vllm") and not r.get("json_content_type"):
                fail(f"{where}: listener {name} route {r['prefix']} lacks json_content_type = true")
    if upstreams["mlnode"]["urls"] != [f"http://{MLNODE}:8080"]:
        fail(f"{where}: mlnode upstream must be http://{MLNODE}:8080, not {upstreams['mlnode']['urls']}")
    want = [f"http://{MLNODE}:{p}" for p in range(5001, 5009)]
    if upstreams["vllm"]["urls"] != want or not upstreams["vllm"]["health"]["enabled"]:
        fail(f"{where}: vllm upstream must be the health-checked {MLNODE}:5001-5008, not {upstreams['vllm']['urls']}")
    routes = {r["prefix"]: r for r in listeners["poc"]["routes"]}
    if routes.get("/v1/", {}).get("upstream") != "vllm" or routes.get("/", {}).get("upstream") != "mlnode" \
            or not routes["/"]["poc"]:
        fail(f"{where}: the PoC port must route /v1/ to vllm and / to mlnode with the PoC guard")
    if [r["upstream"] for r in listeners["inference"]["routes"]] != ["vllm"]:
        fail(f"{where}: the inference port must go to vllm only")
    if not listeners["poc"]["strip_version_prefix"] or not listeners["inference"]["strip_version_prefix"]:
        fail(f"{where}: both ports must strip the version prefix")


compose = yaml.safe_load(open(os.path.join(deploy, "docker-compose.yml")))
services = compose["services"]
inf, ml = services.get("inference"), services.get(MLNODE)
if inf is None or ml is None:
    fail(f"compose must keep the service names `inference` and `{MLNODE}`")

# The mlnode service as Gonka's deploy/join ships it.
if not ml["image"].startswith("ghcr.io/gonka-ai/mlnode:${"):
    fail(f"mlnode image must be ghcr.io/gonka-ai/mlnode with the tag as a variable, not {ml['image']}")
if ml.get("ipc") != "host" or ml["command"] != "uvicorn api.app:app --host=0.0.0.0 --port=8080":
    fail("mlnode service must keep ipc: host and uvicorn on 0.0.0.0:8080")
if "ports" in ml:
    fail("the mlnode publishes no ports; podproxy is the only way in")
devices = ml["deploy"]["resources"]["reservations"]["devices"]
if not any(d.get("capabilities") == ["gpu"] for d in devices):
    fail("mlnode service lost its GPU reservation")
if "/root/.cache" not in " ".join(ml["volumes"]) or "HF_HOME=/root/.cache" not in ml["environment"]:
    fail("mlnode service lost its model cache volume")

if MLNODE not in inf.get("depends_on", []):
    fail("inference must depend on the mlnode")
published = {}
for p in inf["ports"]:
    parts = re.sub(r"\$\{[^}]*\}", "VAR", p).split(":")
    published[int(parts[-1])] = parts[0] if len(parts) == 3 else "0.0.0.0"
if set(published) != {8080, 5000, 9901}:
    fail(f"inference must publish container ports 8080, 5000 and 9901 (admin), not {sorted(published)}")
if published[9901] != "127.0.0.1" or published[8080] != "0.0.0.0" or published[5000] != "0.0.0.0":
    fail(f"the admin port must be published on the host's loopback only, the others on all: {published}")
env = env_of(inf)
if "POC_CALLBACK_URL" not in env:
    fail("inference must pass POC_CALLBACK_URL through")

cfg_path, _ = mounted_config(inf, "inference")
cfg = podproxy_check(cfg_path, {"POC_CALLBACK_URL": "http://203.0.113.7:9100"})
binds = {name: lst["bind"] for name, lst in cfg["listeners"].items()}
if binds != {"poc": "0.0.0.0:8080", "inference": "0.0.0.0:5000"}:
    fail(f"config binds {binds}, compose publishes 8080 (poc) and 5000 (inference)")
check_layout(cfg, os.path.basename(cfg_path))
if cfg["poc"].get("callback_origin") != "http://203.0.113.7:9100":
    fail("the config must take the callback origin from POC_CALLBACK_URL")
raw = tomllib.load(open(cfg_path, "rb"))
if raw.get("admin", {}).get("bind") != "0.0.0.0:9901":
    fail("the config's admin API must listen on 0.0.0.0:9901 (published on the host's loopback)")

# The mTLS overlay: it runs the config beside it, which podproxy accepts with the certificates
# where the overlay mounts them (made here by openssl exactly as Gonka does).
overlay = yaml.safe_load(open(os.path.join(deploy, "docker-compose.mtls.yml")))["services"]["inference"]
if "command" in overlay:
    fail("the mTLS overlay must not set command (podman-compose 1.0 appends it to the base one)")
mtls_path, omounts = mounted_config(overlay, "mTLS overlay", inf["command"])
if os.path.basename(mtls_path) != "podproxy-mtls.toml":
    fail(f"the mTLS overlay must mount podproxy-mtls.toml over the base config, not {mtls_path}")
oenv = env_of(overlay)
if oenv.get("CERT_DIR") not in omounts or omounts[oenv["CERT_DIR"]] != "./certs":
    fail("overlay CERT_DIR must be the certificate folder mounted from ./certs")
with tempfile.TemporaryDirectory() as certs:
    for name in ("dapi", "mlnode"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "36500", "-subj", f"/CN=gonka-{name}",
                        "-addext", "subjectAltName=DNS:api,DNS:localhost,IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:TRUE",
                        "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                        "-addext", "extendedKeyUsage=serverAuth,clientAuth",
                        "-keyout", f"{certs}/{name}.key", "-out", f"{certs}/{name}.crt"],
                       check=True, capture_output=True)
    mcfg = podproxy_check(mtls_path, {"CERT_DIR": certs, "NETWORK_NODE": "203.0.113.7"})
where = os.path.basename(mtls_path)
check_layout(mcfg, where)
for name in ("poc", "inference"):
    lst = mcfg["listeners"][name]
    if lst.get("tls", {}).get("client_auth") != "pin":
        fail(f"{where}: listener {name} must pin the DAPI's client certificate")
relay = mcfg["listeners"].get("callback_relay")
if relay is None or relay["bind"] != "0.0.0.0:9100":
    fail(f"{where}: the callback relay must listen on the compose network (0.0.0.0:9100): the mlnode is another container")
if mcfg["poc"].get("callback_origin") != "http://inference:9100":
    fail(f"{where}: PoC callbacks must point at the relay by the service name (http://inference:9100)")
if mcfg["upstreams"]["network_node"]["urls"] != ["https://203.0.113.7:9100"]:
    fail(f"{where}: the relay must reach https://$NETWORK_NODE:9100")

# The RunPod template image: Gonka's mlnode image, tag as a build argument, plus start.sh.
rp = open(os.path.join(root, "config/runpod/Dockerfile")).read()
if "ARG MLNODE_TAG=" not in rp or "FROM ghcr.io/gonka-ai/mlnode:${MLNODE_TAG}" not in rp:
    fail("config/runpod/Dockerfile must build FROM ghcr.io/gonka-ai/mlnode:${MLNODE_TAG} (ARG MLNODE_TAG)")

# The systemd unit: systemd's own verifier, with the binary where the unit expects it.
unit = open(os.path.join(root, "config/podproxy.service")).read()
if "DynamicUser=yes" not in unit or "NoNewPrivileges=yes" not in unit or "ProtectSystem=strict" not in unit:
    fail("systemd unit lost its hardening")
if shutil.which("systemd-analyze"):
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "podproxy")
        shutil.copy(binary, exe)
        path = os.path.join(d, "podproxy.service")
        open(path, "w").write(unit.replace("/usr/local/bin/podproxy", exe))
        v = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
        if v.returncode != 0 or v.stderr.strip():
            fail(f"systemd-analyze verify: {v.stderr}")
print("deploy check: compose (mlnode as Gonka ships it, podproxy with the config beside it), mTLS overlay, "
      "ports, upstreams, admin on loopback, RunPod image base and systemd unit agree")
