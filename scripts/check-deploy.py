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
print("deploy check: compose service, mounted config, ports, upstream names and systemd unit agree")
