# Shared by the container-stage scripts (sourced, not run).

# build_image TAG CONTEXT [podman build args...]: builds TAG quietly within 5 minutes and
# appends the IDs of the intermediate (untagged) images the build left to $work/built, so
# remove_built can remove exactly those and TAG, by ID and by name.
build_image() {
  local tag=$1 ctx=$2
  shift 2
  podman images -q -a --no-trunc --filter dangling=true | sort >"$work/dangling.before"
  echo "$tag" >>"$work/built"
  timeout 300 podman build -q -t "$tag" "$@" "$ctx" >"$work/build.log" 2>&1 || {
    cat "$work/build.log"
    return 1
  }
  podman images -q -a --no-trunc --filter dangling=true | sort | comm -13 "$work/dangling.before" - >>"$work/built"
}

# remove_built: removes every image build_image made (newest first).
remove_built() {
  [ -f "$work/built" ] || return 0
  tac "$work/built" | while read -r img; do podman rmi -f "$img" >/dev/null 2>&1 || true; done
}

# free_port: a free TCP port on the host's loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# static_or_fail BINARY: fails unless BINARY is statically linked.
static_or_fail() {
  if ldd "$1" >/dev/null 2>&1 && ! ldd "$1" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
    fail "$1 is dynamically linked"
  fi
}
