#!/usr/bin/env bash
# Benchmark: what the audit log costs a restore, and a short session.
#
#   bench/audit.sh [SIZE_MIB] [SESSIONS] [ROUNDS]     (defaults 512, 200 and 3)
#
# One storage node on loopback (release build) holding one backup of a SIZE_MIB sample
# register. The node runs alternately as the real binary (every restore or administrator
# session recorded through Raft) and as a build without the audit log (cargo feature
# `bench-unaudited`, never in a release), on the same data directory, ROUNDS times each,
# the order swapped every round. Each time: the whole snapshot restored (MB/s, the node's CPU
# seconds), then SESSIONS short sessions one after another (`exclave-restore snapshots`: one
# connection, one listing, one audit record each; wall time and node CPU per session).
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
SIZE=${1:-512}
SESSIONS=${2:-200}
ROUNDS=${3:-3}
for v in "$SIZE" "$SESSIONS" "$ROUNDS"; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "usage: bench/audit.sh [SIZE_MIB] [SESSIONS] [ROUNDS]"; done
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
step() { printf '\n== %s\n' "$*"; }
workdir exclave-audit-bench
B=$W/bin

step "build (and the node without the audit log)"
cargo build --release -p exclave-replicator --features bench-unaudited --quiet
mkdir -p "$B"
cp "$CARGO_TARGET_DIR/release/exclave-replicator" "$B/exclave-replicator-unaudited"
private_binaries "$B"
tool_binary exclave-sample-register "$B"

step "data: a ${SIZE} MiB sample register, backed up once"
"$B/exclave-sample-register" "$W/register" "$SIZE" >/dev/null
BYTES=$(du -sb "$W/register" | cut -f1)
R=$B/exclave-replicator
$R pki init --dir "$W/pki" >/dev/null
$R pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
$R pki issue --dir "$W/pki" --role agent --name reg --tenant bench >/dev/null
$R pki issue --dir "$W/pki" --role restore --name dr --tenant bench >/dev/null
$B/exclave-agent keys init --tenant bench --out "$W/bench.key" >/dev/null
NODE=127.0.0.1:$((20000 + RANDOM % 20000))
start_node() { # BINARY
  "$1" run --name n1 --data "$W/node" --listen "$NODE" --pki "$W/pki" --min-free-mib 64 2>>"$W/node.log" &
  NODE_PID=$!
  local before
  before=$(grep -c "storage node ready" "$W/node.log" || true)
  for _ in $(seq 300); do
    [ "$(grep -c "storage node ready" "$W/node.log" || true)" -gt "$before" ] && return
    sleep 0.1
  done
  die "the node did not start: $(tail -5 "$W/node.log")"
}
stop_node() { kill "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=; }
start_node "$R"
$B/exclave-agent backup --node "$NODE" --pki "$W/pki" --identity reg --key-file "$W/bench.key" \
  --source reg --json "$W/register" >"$W/backup.json"
stop_node

one() { # NAME BINARY ROUND
  start_node "$2"
  sync
  local c0 t0 t1 c1 t2 c2
  c0=$(cpu_seconds "$NODE_PID")
  t0=$(date +%s.%N)
  $B/exclave-restore restore --node "$NODE" --pki "$W/pki" --identity dr --key-file "$W/bench.key" \
    --source reg --snapshot latest --to "$W/out" >/dev/null
  t1=$(date +%s.%N)
  c1=$(cpu_seconds "$NODE_PID")
  rm -rf "$W/out"
  for _ in $(seq "$SESSIONS"); do
    $B/exclave-restore snapshots --node "$NODE" --pki "$W/pki" --identity dr >/dev/null
  done
  t2=$(date +%s.%N)
  c2=$(cpu_seconds "$NODE_PID")
  # Records are proposed when sessions end: let the last ones apply before the node stops.
  sleep 1
  stop_node
  python3 - "$1" "$3" "$BYTES" "$t0" "$t1" "$t2" "$c0" "$c1" "$c2" "$SESSIONS" <<'PY'
import sys
name, rnd, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0, t1, t2, c0, c1, c2 = map(float, sys.argv[4:10])
n = int(sys.argv[10])
print(f"round {rnd} {name:10} restore {size / (t1 - t0) / 1e6:6.1f} MB/s, node {c1 - c0:5.2f} CPU s;"
      f"  {n} sessions {1000 * (t2 - t1) / n:5.1f} ms each, node {1000 * (c2 - c1) / n:5.2f} CPU ms each")
PY
}

step "restore and short sessions, audited and unaudited, alternated"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then
    one audited "$R" "$round"
    one unaudited "$B/exclave-replicator-unaudited" "$round"
  else
    one unaudited "$B/exclave-replicator-unaudited" "$round"
    one audited "$R" "$round"
  fi
done
grep -c "session recorded in the audit log" "$W/node.log" | awk '{ print "audit records written by the audited runs: " $1 }'
