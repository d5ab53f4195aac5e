#!/usr/bin/env bash
# The main job on an embedded default: build, start a cluster of three embassy nodes on
# loopback, generate a sample national register, back it up (encrypted, deduplicated,
# replicated to a quorum of embassies), back it up again after a day of changes, snapshot the
# vehicle register (a SQLite database being written to) with its verification facts, then
# lose the home country: its key file is deleted and two embassies are stopped. The key holders
# abroad rebuild the tenant key from 3 of its 5 shares, and the restore drill runs from the one
# embassy left: restore, compare byte for byte, verify, check the database against its facts.
# Before the loss, routine drills (`exclave-restore drill`) prove the same with a report the
# cluster records.
#
#   deploy/demo.sh [SIZE_MIB]        (default 64; everything lives in a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-64}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
if ! ldconfig -p | grep -q librocksdb.so || [ ! -e /usr/include/sqlite3.h ]; then
  echo "installing librocksdb-dev, libclang-dev and libsqlite3-dev (needs root)"
  apt-get update -qq && apt-get install -y -qq librocksdb-dev libclang-dev libsqlite3-dev >/dev/null
fi
cargo build --release --workspace --bins --quiet
B=$CARGO_TARGET_DIR/release
W=$(mktemp -d /tmp/exclave-demo.XXXXXX)
declare -A PID
cleanup() { for p in "${PID[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
BASE=$((20000 + RANDOM % 20000))
declare -A ADDR=([embassy1]=127.0.0.1:$BASE [embassy2]=127.0.0.1:$((BASE + 1)) [embassy3]=127.0.0.1:$((BASE + 2)))
NAMES=(embassy1 embassy2 embassy3)
step() { printf '\n== %s\n' "$*"; }

step "cluster PKI and tenant key"
$B/exclave-replicator pki init --dir "$W/pki" --cluster demo >/dev/null
for n in "${NAMES[@]}"; do $B/exclave-replicator pki issue --dir "$W/pki" --role node --name "$n" --host 127.0.0.1; done
$B/exclave-replicator pki issue --dir "$W/pki" --role agent --name rnpp --tenant lux
$B/exclave-replicator pki issue --dir "$W/pki" --role restore --name drteam --tenant lux
$B/exclave-replicator pki issue --dir "$W/pki" --role admin --name admin
$B/exclave-agent keys init --tenant lux --out "$W/lux.key"
# The key leaves the home country only as shares: 3 of 5 holders rebuild it.
$B/exclave-agent keys split --key-file "$W/lux.key" --shares 5 --threshold 3 --out "$W/shares" \
  --holder "Minister of Justice" --holder "Ambassador in Luxembourg" --holder "State CIO" \
  --holder "National Archivist" --holder "Auditor General"

start() { # start NAME: a founding member that knows the two others
  local n=$1 peers=() m
  for m in "${NAMES[@]}"; do [ "$m" != "$n" ] && peers+=(--peer "$m=${ADDR[$m]}"); done
  $B/exclave-replicator run --name "$n" --data "$W/$n" --listen "${ADDR[$n]}" --pki "$W/pki" "${peers[@]}" \
    --metrics "127.0.0.1:$(( ${ADDR[$n]##*:} + 100 ))" 2>>"$W/$n.log" &
  PID[$n]=$!
}
step "three embassy nodes: ${ADDR[embassy1]}, ${ADDR[embassy2]}, ${ADDR[embassy3]}"
for n in "${NAMES[@]}"; do start "$n"; done
ADMIN=(--node "${ADDR[embassy1]}" --pki "$W/pki")
for _ in $(seq 100); do
  $B/exclave-replicator cluster status "${ADMIN[@]}" --json 2>/dev/null | grep -q '"leader": "embassy' && break; sleep 0.2
done
$B/exclave-replicator cluster status "${ADMIN[@]}"

step "sample register, ${SIZE} MiB (persons, vehicles, cadastre, scanned documents)"
$B/exclave-sample-register "$W/register" "$SIZE"

ALL=(--node "${ADDR[embassy1]}" --node "${ADDR[embassy2]}" --node "${ADDR[embassy3]}")
AGENT=("${ALL[@]}" --pki "$W/pki" --identity rnpp --key-file "$W/lux.key")
step "day 1 backup"
# The agent keeps the chunks it sent (sealed) so that tomorrow's changed chunks go as deltas.
$B/exclave-agent backup "${AGENT[@]}" --source rnpp --delta-cache "$W/deltas-rnpp" "$W/register"

step "day 2: 1% of the population register changes; backup again"
python3 - "$W/register/persons.sql" <<'PY'
import sys, random
p = sys.argv[1]; rows = open(p, encoding="utf-8").read().split("\n"); random.seed(2)
for i in random.sample(range(2, len(rows) - 2), max(1, len(rows) // 100)):
    rows[i] = rows[i].replace("single", "married")
open(p, "w", encoding="utf-8").write("\n".join(rows))
PY
$B/exclave-agent backup "${AGENT[@]}" --source rnpp --delta-cache "$W/deltas-rnpp" "$W/register"

step "the vehicle register is a SQLite database in use: an online snapshot with verification facts"
python3 - "$W/vehicles.db" <<'PY'
import random, sqlite3, sys
db = sqlite3.connect(sys.argv[1]); db.execute("PRAGMA journal_mode=WAL"); random.seed(7)
db.execute("CREATE TABLE vehicle (vin TEXT PRIMARY KEY, plate TEXT, make TEXT, owner_id INTEGER, km INTEGER)")
makes = ["Peugeot", "Renault", "Volkswagen", "Toyota", "Skoda", "BMW"]
db.executemany("INSERT INTO vehicle VALUES (?, ?, ?, ?, ?)", (
    (f"WVW{i:014d}", f"LU-{i % 100000:05d}", random.choice(makes), random.randrange(1, 10**6), random.randrange(0, 300000))
    for i in range(50000)))
db.commit()
PY
# A clerk keeps registering mileage while the snapshot is taken.
python3 - "$W/vehicles.db" <<'PY' &
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1]); end = time.time() + 3; i = 0
while time.time() < end:
    db.execute("UPDATE vehicle SET km = km + 1 WHERE vin = ?", (f"WVW{i % 50000:014d}",)); db.commit(); i += 1
PY
WRITER=$!
$B/exclave-agent backup "${AGENT[@]}" --source vehicles --sqlite "$W/vehicles.db"
wait $WRITER

step "every embassy converges to a full copy"
for _ in $(seq 150); do
  J=$($B/exclave-replicator cluster status "${ADMIN[@]}" --json)
  [ "$(grep -c '"chunks_missing": 0' <<<"$J")" = 3 ] && [ "$(grep -c '"scanned_at": [0-9]' <<<"$J")" = 3 ] && break; sleep 0.2
done
$B/exclave-replicator cluster status "${ADMIN[@]}"

step "routine drills while every embassy is up: restore, verify, database checks, RTO and RPO, a report, recorded by the cluster"
DRILL=(--node "${ADDR[embassy3]}" --pki "$W/pki" --identity drteam --key-file "$W/lux.key")
$B/exclave-restore drill "${DRILL[@]}" --source vehicles --report "$W/reports" --rto-target 300
$B/exclave-restore drill "${DRILL[@]}" --source rnpp --report "$W/reports" --rto-target 300
echo; sed -n '1,8p' "$W"/reports/drill-vehicles-*.md
echo; $B/exclave-restore drills --node "${ADDR[embassy1]}" --pki "$W/pki" --identity drteam

step "who read what, and a history no one rewrote: the audit log and the hash chain, from any embassy"
sleep 1 # a session is recorded through the cluster once its connection has ended
$B/exclave-replicator audit --node "${ADDR[embassy2]}" --pki "$W/pki" --identity drteam
$B/exclave-restore history verify --node "${ADDR[embassy2]}" --pki "$W/pki" --identity drteam

step "the home country and two embassies are lost: its key file is gone, only embassy3 remains"
kill "${PID[embassy1]}" "${PID[embassy2]}"; wait "${PID[embassy1]}" "${PID[embassy2]}" 2>/dev/null || true
unset 'PID[embassy1]' 'PID[embassy2]'
rm "$W/lux.key"
$B/exclave-restore snapshots --node "${ADDR[embassy3]}" --pki "$W/pki" --identity drteam

step "three of the five key holders abroad bring their shares: the tenant key is rebuilt"
mkdir -m 700 "$W/abroad"
$B/exclave-restore keys combine --out "$W/abroad/lux.key" \
  --share "$W/shares/lux-share-2-of-5.txt" --share "$W/shares/lux-share-4-of-5.txt" --share "$W/shares/lux-share-5-of-5.txt"
RESTORE=(--node "${ADDR[embassy3]}" --pki "$W/pki" --identity drteam --key-file "$W/abroad/lux.key")

step "restore drill from embassy3 alone: restore the latest snapshot and verify it"
$B/exclave-restore restore "${RESTORE[@]}" --source rnpp --snapshot latest --to "$W/restored"
diff -r "$W/register" "$W/restored/register" && echo "byte-for-byte comparison with the source: identical"
$B/exclave-restore verify "${RESTORE[@]}" --source rnpp --snapshot latest
$B/exclave-restore restore "${RESTORE[@]}" --source vehicles --snapshot latest --to "$W/restored-db"
$B/exclave-agent facts --sqlite "$W/restored-db/vehicles.db" --compare "$W/restored-db/vehicles.db.facts.json"
$B/exclave-restore history verify --node "${ADDR[embassy3]}" --pki "$W/pki" --identity drteam

step "embassy3 metrics (excerpt)"
exec 3<>/dev/tcp/127.0.0.1/$(( ${ADDR[embassy3]##*:} + 100 )); printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
grep -E '^exclave_(chunks_stored_total|chunks_backfilled_total|chunks_missing|raft\{|snapshot_last_time_seconds)' <&3 || true
echo; echo "demo complete"
