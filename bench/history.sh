#!/usr/bin/env bash
# Benchmark: `exclave-restore history verify` over a tenant's long history.
#
#   bench/history.sh [SNAPSHOTS] [REFS]     (defaults 10000 and 16)
#
# One storage node (release build) on loopback. exclave-scale-load commits SNAPSHOTS snapshots
# of REFS tiny chunks each through the real protocol: every commit is an event of the tenant's
# hash chain. Then `history verify` runs three times as the tenant's restore identity (each
# run is itself an audited session, so the chain grows by one event per run): wall time, the
# verifier's CPU seconds and peak RSS, the node's CPU seconds for the run, events checked.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
SNAPSHOTS=${1:-10000}
REFS=${2:-16}
for v in "$SNAPSHOTS" "$REFS"; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "usage: bench/history.sh [SNAPSHOTS] [REFS]"; done
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
[ -x /usr/bin/time ] || die "GNU time is needed (apt-get install time)"

workdir exclave-history-bench
step "build"
B=$W/bin
private_binaries "$B"
tool_binary exclave-scale-load "$B"
R=$B/exclave-replicator
"$R" pki init --dir "$W/pki" >/dev/null
"$R" pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
"$R" pki issue --dir "$W/pki" --role agent --name load --tenant scale >/dev/null
"$R" pki issue --dir "$W/pki" --role restore --name dr --tenant scale >/dev/null
"$R" pki issue --dir "$W/pki" --role admin --name admin >/dev/null
ADDR=127.0.0.1:$((20000 + RANDOM % 20000))
"$R" run --name n1 --data "$W/n1" --listen "$ADDR" --pki "$W/pki" --min-free-mib 256 2>>"$W/n1.log" &
NODE_PID=$!
for _ in $(seq 200); do grep -q "storage node ready" "$W/n1.log" && break; sleep 0.1; done
grep -q "storage node ready" "$W/n1.log" || die "the node did not start: $(tail -5 "$W/n1.log")"

step "load: $SNAPSHOTS snapshots of $REFS chunks"
t0=$(date +%s.%N)
"$B/exclave-scale-load" "$ADDR" "$W/pki" load "$REFS" "$SNAPSHOTS" "$REFS" >"$W/load.log"
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v n="$SNAPSHOTS" 'BEGIN { printf "load: %.1f s (%.0f commits/s)\n", b - a, n / (b - a) }'

step "history verify, three runs"
for run in 1 2 3; do
  c0=$(cpu_seconds "$NODE_PID")
  /usr/bin/time -f "%e %U %S %M" -o "$W/time" \
    "$B/exclave-restore" history verify --node "$ADDR" --pki "$W/pki" --identity dr --json >"$W/verify.json"
  c1=$(cpu_seconds "$NODE_PID")
  python3 - "$W/verify.json" "$W/time" "$c0" "$c1" "$run" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
wall, user, sys_, rss = open(sys.argv[2]).read().split()
node = float(sys.argv[4]) - float(sys.argv[3])
assert v["ok"], v
print(f"run {sys.argv[5]}: {v['events']} events, {v['snapshots_checked']} snapshots checked: {float(wall):.2f} s; "
      f"verifier {float(user) + float(sys_):.2f} CPU s, peak RSS {int(rss) / 1024:.0f} MiB; node {node:.2f} CPU s")
PY
done
