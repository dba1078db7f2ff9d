#!/usr/bin/env bash
# Installs podman (with runc) and podman-compose on a fresh Debian machine and writes the
# engine configuration that works here: runc instead of crun (crun fails on hybrid cgroups),
# cgroupfs, no default ulimits, vfs storage. Idempotent; needs root. A config file it
# replaces is kept beside it as <file>.before-podproxy (and named on stderr).
set -euo pipefail
need=()
for tool in podman runc podman-compose; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
mkdir -p /etc/containers
# keep_aside FILE: a file about to be replaced survives as FILE.before-podproxy.
keep_aside() {
  if [ -s "$1" ] && [ ! -e "$1.before-podproxy" ]; then
    cp -p "$1" "$1.before-podproxy"
    echo "container setup: replacing $1 (the previous one is $1.before-podproxy)" >&2
  fi
}
if ! grep -qs '^runtime = "runc"' /etc/containers/containers.conf; then
  keep_aside /etc/containers/containers.conf
  cat >/etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
fi
if ! grep -qs '^driver = "vfs"' /etc/containers/storage.conf; then
  keep_aside /etc/containers/storage.conf
  cat >/etc/containers/storage.conf <<'CONF'
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF
fi
echo "container setup: $(podman --version), $(runc --version | head -n1), $(podman-compose --version 2>/dev/null | tail -n1)"
