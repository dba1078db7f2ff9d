#!/usr/bin/env bash
# Runs every cargo-fuzz target (`cargo fuzz list`) for FUZZ_SECONDS (default 60) each.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# The committed corpus under fuzz/corpus/<target>/ is the seed; new inputs are collected in
# a scratch directory (the committed corpus stays small). A crash stops the script with the
# reproducer under fuzz/artifacts/<target>/ (replay: cargo +nightly fuzz run <target> <file>).
# Usage: scripts/fuzz.sh [target...]     FUZZ_SECONDS=300 scripts/fuzz.sh route
#        SAVE_CORPUS=1 also adds the 30 smallest new inputs per target to fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${FUZZ_SECONDS:-60}
targets=("$@")
# cargo-fuzz's own list: the [[bin]] targets of fuzz/Cargo.toml
[ ${#targets[@]} -eq 0 ] && mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "$scratch/$t"
  echo "== $t for ${SECS}s"
  # -timeout: one input taking over 10 s is a finding (hang); -rss_limit_mb bounds memory.
  rc=0
  cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|stat::new_units_added|==[0-9]+==|SUMMARY|artifact_prefix)' "$scratch/$t.log" || true
  if [ "$rc" != 0 ]; then
    grep -E 'panicked|assertion|left:|right:' "$scratch/$t.log" | head -5
    echo "FUZZ FAILED: $t (reproducer in fuzz/artifacts/$t/)"
    exit 1
  fi
  if [ "${SAVE_CORPUS:-0}" = 1 ]; then
    # Keep the committed corpus small: add the 30 smallest new inputs.
    for f in $(ls -S -r "$scratch/$t" | head -n 30); do cp "$scratch/$t/$f" "corpus/$t/"; done
  fi
done
echo "fuzz OK: ${targets[*]} (${SECS}s each)"
