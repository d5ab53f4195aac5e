#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder target, SECONDS each (default 20; CI runs this).
#
#   chaos-tests/fuzz/run.sh [SECONDS]
#
# libFuzzer needs the nightly toolchain and cargo-fuzz: both are installed when missing. A
# crash or a leak fails the run and leaves its input in chaos-tests/fuzz/artifacts/TARGET/;
# what each target found is kept in chaos-tests/fuzz/corpus/ for the next run.
set -euo pipefail
SECS=${1:-20}
[[ $SECS =~ ^[1-9][0-9]*$ ]] || { echo "usage: chaos-tests/fuzz/run.sh [SECONDS]" >&2; exit 2; }
cd "$(dirname "$0")/../.."
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/exclave-fuzz-target}
for t in $(cargo +nightly fuzz list --fuzz-dir chaos-tests/fuzz); do
  printf '== fuzz %s, %s s: ' "$t" "$SECS"
  log=$(mktemp)
  if ! cargo +nightly fuzz run --fuzz-dir chaos-tests/fuzz --target-dir "$TARGET_DIR" "$t" -- \
      -max_total_time="$SECS" >"$log" 2>&1; then
    echo "FAILED"
    tail -n 60 "$log"
    rm -f "$log"
    exit 1
  fi
  grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log" | tail -n 1
  rm -f "$log"
done
