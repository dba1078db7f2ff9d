#!/usr/bin/env python3
"""Checks the deployment files against each other without Docker: the compose file parses,
its `inference` service runs podproxy with the config it mounts, that config (checked by the
real binary) listens on the container ports the service publishes, and its upstreams name
the mlnode service. Usage: scripts/check-deploy.py <podproxy binary>"""
import os, re, subprocess, sys
import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = sys.argv[1]

def fail(msg):
    sys.exit(f"deploy check FAILED: {msg}")

compose = yaml.safe_load(open(os.path.join(root, "config/docker-compose.mlnode.yml")))
services = compose["services"]
inf, mlnode_name = services.get("inference"), "mlnode-308"
if inf is None or mlnode_name not in services:
    fail("compose must keep the service names `inference` and `mlnode-308`")
if mlnode_name not in inf.get("depends_on", []):
    fail("inference must depend on the mlnode")
container_ports = {int(p.split(":")[-1]) for p in inf["ports"]}
if container_ports != {8080, 5000}:
    fail(f"inference must publish container ports 8080 and 5000, not {container_ports}")
mount = next(v for v in inf["volumes"] if v.endswith(":ro"))
host_file, container_file = mount.split(":")[0:2]
cmd = inf["command"]
if cmd[:2] != ["run", "--config"] or cmd[2] != container_file:
    fail(f"command {cmd} must run the mounted config {container_file}")
env = dict(e.split("=", 1) for e in inf["environment"])
if env.get("MLNODE_HOST") != mlnode_name:
    fail("MLNODE_HOST must be the mlnode service name")

# The config the compose guide tells you to mount, checked by podproxy itself.
cfg = os.path.join(root, "config/examples/compose.toml")
run_env = dict(os.environ, MLNODE_HOST=env["MLNODE_HOST"])
out = subprocess.run([binary, "check", "--config", cfg], capture_output=True, text=True, env=run_env)
if out.returncode != 0:
    fail(f"podproxy check {cfg}: {out.stderr}")
binds = {int(p) for p in re.findall(r'^bind = "0\.0\.0\.0:(\d+)"', out.stdout, re.M)}
if binds != container_ports:
    fail(f"config binds {binds}, compose publishes {container_ports}")
urls = re.findall(r'"http://([^:/"]+):\d+"', out.stdout)
if not urls or any(h != mlnode_name for h in urls):
    fail(f"upstreams must point at {mlnode_name}, got {urls}")

# The mTLS overlay: it runs the mounted gonka-mtls config, which podproxy accepts with the
# certificates where the overlay mounts them (made here by openssl exactly as Gonka does).
overlay = yaml.safe_load(open(os.path.join(root, "config/docker-compose.mlnode.mtls.yml")))["services"]["inference"]
ocmd = overlay["command"]
omounts = {v.split(":")[1]: v.split(":")[0] for v in overlay["volumes"]}
if ocmd[:2] != ["run", "--config"] or ocmd[2] not in omounts:
    fail(f"overlay command {ocmd} must run a mounted config")
oenv = dict(e.split("=", 1) for e in overlay["environment"])
if oenv.get("CERT_DIR") not in omounts:
    fail("overlay CERT_DIR must be the mounted certificate folder")
import tempfile
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
    mtls_env = dict(os.environ, **{k: v for k, v in oenv.items() if not v.startswith("$")})
    mtls_env.update(CERT_DIR=certs, NETWORK_NODE="203.0.113.7")
    mtls_cfg = os.path.join(root, "config/examples/gonka-mtls.toml")
    out = subprocess.run([binary, "check", "--config", mtls_cfg], capture_output=True, text=True, env=mtls_env)
    if out.returncode != 0:
        fail(f"podproxy check {mtls_cfg} with the overlay's environment: {out.stderr}")
    if 'client_auth = "pin"' not in out.stdout or "mlnode-308" not in out.stdout:
        fail("the overlay's config must pin client certificates and reach mlnode-308")

# The systemd unit: systemd's own verifier, with the binary where the unit expects it.
unit = open(os.path.join(root, "config/podproxy.service")).read()
if "DynamicUser=yes" not in unit or "NoNewPrivileges=yes" not in unit or "ProtectSystem=strict" not in unit:
    fail("systemd unit lost its hardening")
if subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode == 0:
    import tempfile, shutil
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "podproxy")
        shutil.copy(binary, exe)
        path = os.path.join(d, "podproxy.service")
        open(path, "w").write(unit.replace("/usr/local/bin/podproxy", exe))
        v = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
        if v.returncode != 0 or v.stderr.strip():
            fail(f"systemd-analyze verify: {v.stderr}")
print("deploy check: compose service and mTLS overlay, mounted configs, ports, upstream names and systemd unit agree")
