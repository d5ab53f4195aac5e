#!/usr/bin/env bash
# The main job on an embedded default: build, start an embassy node on loopback, generate a
# sample national register, back it up (encrypted, deduplicated), back it up again after a
# day of changes, restore it, verify it byte for byte, and print the summaries.
#
#   deploy/demo.sh [SIZE_MIB]        (default 64; everything lives in a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-64}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
if ! ldconfig -p | grep -q librocksdb.so; then
  echo "installing librocksdb-dev and libclang-dev (needs root)"; apt-get update -qq && apt-get install -y -qq librocksdb-dev libclang-dev >/dev/null
fi
cargo build --release --workspace --bins --quiet
B=$CARGO_TARGET_DIR/release
W=$(mktemp -d /tmp/exclave-demo.XXXXXX)
NODE_PID=
cleanup() { [ -n "$NODE_PID" ] && kill "$NODE_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
PORT=$((20000 + RANDOM % 20000))
NODE=127.0.0.1:$PORT
step() { printf '\n== %s\n' "$*"; }

step "cluster PKI and tenant key"
$B/exclave-replicator pki init --dir "$W/pki" --cluster demo >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role node --name embassy1 --host 127.0.0.1
$B/exclave-replicator pki issue --dir "$W/pki" --role agent --name rnpp --tenant lux
$B/exclave-replicator pki issue --dir "$W/pki" --role restore --name drteam --tenant lux
$B/exclave-agent keys init --tenant lux --out "$W/lux.key"

step "embassy node embassy1 on $NODE"
$B/exclave-replicator run --name embassy1 --data "$W/embassy1" --listen "$NODE" --pki "$W/pki" \
  --metrics 127.0.0.1:$((PORT + 1)) 2>"$W/node.log" &
NODE_PID=$!
for _ in $(seq 100); do grep -q "storage node ready" "$W/node.log" && break; sleep 0.1; done

step "sample register, ${SIZE} MiB (persons, vehicles, cadastre, scanned documents)"
$B/exclave-sample-register "$W/register" "$SIZE"

AGENT=(--node "$NODE" --pki "$W/pki" --identity rnpp --key-file "$W/lux.key")
RESTORE=(--node "$NODE" --pki "$W/pki" --identity drteam --key-file "$W/lux.key")
step "day 1 backup"
$B/exclave-agent backup "${AGENT[@]}" --source rnpp "$W/register"

step "day 2: 1% of the population register changes; backup again"
python3 - "$W/register/persons.sql" <<'PY'
import sys, random
p = sys.argv[1]; rows = open(p, encoding="utf-8").read().split("\n"); random.seed(2)
for i in random.sample(range(2, len(rows) - 2), max(1, len(rows) // 100)):
    rows[i] = rows[i].replace("single", "married")
open(p, "w", encoding="utf-8").write("\n".join(rows))
PY
$B/exclave-agent backup "${AGENT[@]}" --source rnpp "$W/register"

step "snapshots held by the embassy"
$B/exclave-restore snapshots "${RESTORE[@]}"

step "restore drill: restore the latest snapshot and verify it"
$B/exclave-restore restore "${RESTORE[@]}" --source rnpp --snapshot latest --to "$W/restored"
diff -r "$W/register" "$W/restored/register" && echo "byte-for-byte comparison with the source: identical"
$B/exclave-restore verify "${RESTORE[@]}" --source rnpp --snapshot latest

step "node metrics (excerpt)"
exec 3<>/dev/tcp/127.0.0.1/$((PORT + 1)); printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
grep -E '^exclave_(chunks_stored_total|snapshot_last_time_seconds|requests_total\{.*commit)' <&3 || true
echo; echo "demo complete"
