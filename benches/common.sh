# Sourced by benches/*/run.sh: prerequisites, the open-file limit, the release builds and
# the harness as a child process that is stopped when the script exits or is interrupted.

# require "PACKAGES TO SUGGEST" TOOL...: exits 1 naming every tool that is missing.
require() {
  local hint=$1 missing=() t
  shift
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]}" >&2
    echo "install with: apt-get update && apt-get install -y $hint" >&2
    exit 1
  fi
  export PATH="$PATH:/usr/sbin"
  # every stream holds two sockets in a proxy; 2,000 streams need more than the usual 1024
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

# podproxy as hosts run it (the static musl binary the image holds, release profile) and the
# release podproxy-sim, exported as PODPROXY_BIN and SIM_BIN. The musl build needs the Rust
# target and musl-gcc (ring and jemalloc compile C).
MUSL_TARGET=x86_64-unknown-linux-musl
build_release() {
  if ! rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET" || ! command -v musl-gcc >/dev/null; then
    echo "podproxy is measured as the static musl binary hosts run; it needs:" >&2
    echo "  rustup target add $MUSL_TARGET && apt-get install -y musl-tools" >&2
    exit 1
  fi
  echo "building podproxy (static, $MUSL_TARGET) and podproxy-sim (release)..." >&2
  cargo build --release -q --target "$MUSL_TARGET" --bin podproxy -p podproxy
  cargo build --release -q -p podproxy-testkit --bin podproxy-sim
  export PODPROXY_BIN="$PWD/target/$MUSL_TARGET/release/podproxy" SIM_BIN="$PWD/target/release/podproxy-sim"
}

# run_harness SCRIPT: runs it under python3 and returns its exit status; the script's own
# cleanup runs on TERM, which it gets when this shell exits or is interrupted.
harness_child=
stop_harness() {
  if [ -n "$harness_child" ]; then
    kill -TERM "$harness_child" 2>/dev/null || true
    wait "$harness_child" 2>/dev/null || true
  fi
}
run_harness() {
  trap stop_harness EXIT
  trap 'stop_harness; exit 143' INT TERM
  echo "machine: $(nproc) cores, $(uname -r), load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  python3 "$1" &
  harness_child=$!
  wait "$harness_child"
}
