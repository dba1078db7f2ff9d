#!/usr/bin/env bash
# Installs podman (with runc) and podman-compose on a fresh Debian machine and writes the
# engine configuration that works here: runc instead of crun (crun fails on hybrid cgroups),
# cgroupfs, no default ulimits, vfs storage. Idempotent; needs root.
set -euo pipefail
need=()
for tool in podman runc podman-compose; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
mkdir -p /etc/containers
if ! grep -qs '^runtime = "runc"' /etc/containers/containers.conf; then
  cat >/etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
fi
if ! grep -qs '^driver = "vfs"' /etc/containers/storage.conf; then
  cat >/etc/containers/storage.conf <<'CONF'
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF
fi
echo "container setup: $(podman --version), $(runc --version | head -n1), $(podman-compose --version 2>/dev/null | tail -n1)"
