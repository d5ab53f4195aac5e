#!/usr/bin/env bash
# Benchmark: the PostgreSQL source, in one run on this machine.
#
#   bench/postgres.sh [SCALE] [LOAD_SECS]     (defaults 50 and 120; run as root or as a user
#                                             that can run PostgreSQL's initdb)
#
# 1. a PostgreSQL server archiving its WAL with `exclave-agent wal-push` into one node;
#    pgbench initialised at SCALE;
# 2. logical snapshot (pg_dump -Fc -Z0 through the agent): MB/s, against pg_dump alone
#    writing to /dev/null in the same run (the ratio is what to compare);
# 3. pgbench (4 clients) for LOAD_SECS while a sampler reads, every second, how old the
#    newest archived WAL is: the time since the server's WAL position passed the end of the
#    last archived segment (the RPO at that instant). p50 / p99 / max; the issue's limit is 60 s;
# 4. day-2 snapshot after the pgbench run: bytes read, new and uploaded; with restic
#    installed, the same dump (pg_dump -Fc -Z0 to a file at one path) backed up by restic on
#    both days, and day 2 encoded by `zstd -3 --patch-from` day 1 (whole-file delta): day-2
#    bytes and the store after both days against them (issue 17's ratios);
# 5. agent peak RSS of the snapshot;
# 6. recovery drills against pgBackRest (Debian's `pgbackrest`, encrypted repository, zstd) in
#    the same run, WAL archived to both from then on: a full base backup by each (time,
#    bytes), DRILL_LOAD_SECS (default 30) more pgbench, then (a) `exclave-restore drill` of the
#    base backup: restore, replay every archived WAL file, promote, read every table back;
#    (b) `pgbackrest restore` + server start until promoted; (d) `exclave-restore pitr` +
#    server start until promoted (restore_command wal-fetch, prefetching); (c) a drill of the
#    logical dump (pg_restore into a scratch server, facts compared); (e) a second base backup
#    by each after that load (pgBackRest `--type=incr`; Exclave's deduplicates and sends deltas):
#    time and bytes. Skipped when pgbackrest is missing.
# 7. with pgbackrest installed and run as root: bench/wal-latency.sh (one isolated archive and
#    fetch call, each against pgBackRest's) and bench/wal-archive.sh 60 8 (a backlog drained:
#    sustained rate, against pgBackRest's archive-push, synchronous and async); SKIP_WAL_BENCH=1
#    leaves them out; then bench/wal-stream.sh SCALE 40: the loss window (RPO) of the streaming
#    agent idle, under pgbench and under a bulk load, against pgBackRest's archive-push.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
SCALE=${1:-50}
LOAD=${2:-120}
[[ $SCALE =~ ^[1-9][0-9]*$ && $LOAD =~ ^[1-9][0-9]*$ ]] || die "usage: bench/postgres.sh [SCALE] [LOAD_SECS]"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PGBIN/initdb" ] || die "PostgreSQL server not installed (apt-get install postgresql)"
step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"

W=$(mktemp -d /tmp/exclave-pg-bench.XXXXXX)
chmod 755 "$W"
AS=()
if [ "$(id -u)" = 0 ]; then AS=(runuser -u postgres --); fi
NODE_PID=""
cleanup() {
  [ -n "$NODE_PID" ] && kill "$NODE_PID" 2>/dev/null
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$W/pg/data" -m immediate stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "build"
B=$W/bin
private_binaries "$B"

step "node, PKI, key"
"$B/exclave-replicator" pki init --dir "$W/pki" >/dev/null
"$B/exclave-replicator" pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
"$B/exclave-replicator" pki issue --dir "$W/pki" --role agent --name pg --tenant lux >/dev/null
"$B/exclave-replicator" pki issue --dir "$W/pki" --role restore --name dr --tenant lux >/dev/null
"$B/exclave-agent" keys init --tenant lux --out "$W/lux.key" >/dev/null
NODE_PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$B/exclave-replicator" run --name n1 --data "$W/n1" --listen 127.0.0.1:$NODE_PORT --pki "$W/pki" >"$W/n1.log" 2>&1 &
NODE_PID=$!
cat >"$W/agent.toml" <<TOML
node = ["127.0.0.1:$NODE_PORT"]
pki = "$W/pki"
identity = "pg"
key-file = "$W/lux.key"
# The snapshots' delta cache (deltas/bench) lives here, not in the default /var/lib.
state-dir = "$W/state"
TOML
[ ${#AS[@]} -gt 0 ] && chown -R postgres "$W/pki" "$W/lux.key" "$W/agent.toml"

step "PostgreSQL (archive_command = exclave-agent wal-push), pgbench -i -s $SCALE"
# The server's own directory (data, log, socket), owned by the user it runs as.
mkdir "$W/pg" && { [ ${#AS[@]} -eq 0 ] || chown postgres "$W/pg"; }
"${AS[@]}" "$PGBIN/initdb" -U postgres --auth=trust -D "$W/pg/data" >/dev/null
cat >>"$W/pg/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$W/pg'
wal_level = replica
archive_mode = on
archive_command = '$B/exclave-agent wal-push --config $W/agent.toml --source pg %p'
archive_timeout = 30
max_wal_size = 2GB
CONF
"${AS[@]}" "$PGBIN/pg_ctl" -D "$W/pg/data" -l "$W/pg/server.log" -w start >/dev/null
CONN="host=127.0.0.1 port=$PG_PORT user=postgres dbname=bench"
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 'CREATE DATABASE bench' postgres
t0=$(date +%s.%N)
"$PGBIN/pgbench" -i -q -s "$SCALE" "$CONN" 2>&1 | tail -1
echo "pgbench -i: $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
DBSIZE=$(psql -X -At "$CONN" -c "SELECT pg_database_size('bench')")
echo "database size: $((DBSIZE / 1048576)) MiB"

step "logical snapshot, day 1"
t0=$(date +%s.%N)
"$PGBIN/pg_dump" --format=custom --compress=0 --dbname="$CONN" >/dev/null
DUMP_SECS=$(python3 -c "print($(date +%s.%N) - $t0)")
/usr/bin/time -f %M -o "$W/rss1" "$B/exclave-agent" backup --config "$W/agent.toml" --source bench --postgres "$CONN" --json >"$W/day1.json"
RSS1=$(cat "$W/rss1")
# The same dump for restic and for whole-file zstd --patch-from, at one stable path.
RESTIC_CMP=""
if command -v restic >/dev/null && command -v zstd >/dev/null; then
  RESTIC_CMP=1
  export RESTIC_REPOSITORY=$W/restic RESTIC_PASSWORD=bench
  mkdir -p "$W/dump"
  "$PGBIN/pg_dump" --format=custom --compress=0 --dbname="$CONN" >"$W/dump/bench.dump"
  restic init -q >/dev/null
  restic backup -q "$W/dump" >/dev/null
  RESTIC1=$(du -sb "$W/restic" | cut -f1)
fi

step "pgbench -c 4 -T $LOAD while WAL is archived; sampling archive lag every second"
python3 - "$CONN" "$LOAD" >"$W/lag.txt" <<'PY' &
import subprocess, sys, time
conn, load = sys.argv[1], int(sys.argv[2])
def q(sql):
    return subprocess.run(["psql", "-X", "-At", "-F", "|", conn, "-c", sql], capture_output=True, text=True).stdout.strip()
hist, lags = [], []
end = time.time() + load + 5
while time.time() < end:
    row = q("SELECT extract(epoch from now()), pg_current_wal_lsn() - '0/0', coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    try:
        now, lsn, last = row.split("|")
        now, lsn = float(now), int(float(lsn))
    except ValueError:
        time.sleep(1); continue
    hist.append((now, lsn))
    if len(last) == 24:
        seg_end = int(last[8:16], 16) * (1 << 32) + (int(last[16:24], 16) + 1) * (16 << 20)
        passed = next((t for t, l in hist if l >= seg_end), None)
        lags.append(now - passed if passed is not None and lsn > seg_end else 0.0)
    time.sleep(1)
lags.sort()
pick = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] if lags else float("nan")
print(f"{pick(0.5):.1f} {pick(0.99):.1f} {lags[-1] if lags else float('nan'):.1f} {len(lags)}")
PY
SAMPLER=$!
"$PGBIN/pgbench" -n -c 4 -j 2 -T "$LOAD" "$CONN" 2>&1 | grep -E "^(tps|number of transactions actually)" || true
wait $SAMPLER
read -r LAG50 LAG99 LAGMAX NSAMPLES <"$W/lag.txt"
ARCHIVED=$(psql -X -At "$CONN" -c "SELECT archived_count || ' archived, ' || failed_count || ' failed' FROM pg_stat_archiver")

step "logical snapshot, day 2 (after pgbench)"
"$B/exclave-agent" backup --config "$W/agent.toml" --source bench --postgres "$CONN" --json >"$W/day2.json"
CMP_ARGS=""
if [ -n "$RESTIC_CMP" ]; then
  mv "$W/dump/bench.dump" "$W/day1.dump"
  "$PGBIN/pg_dump" --format=custom --compress=0 --dbname="$CONN" >"$W/dump/bench.dump"
  restic backup -q "$W/dump" >/dev/null
  RESTIC2=$(du -sb "$W/restic" | cut -f1)
  zstd -q -3 --patch-from="$W/day1.dump" "$W/dump/bench.dump" -o "$W/patch.zst"
  PATCH=$(stat -c %s "$W/patch.zst")
  WHOLE1=$(zstd -q -3 --long=27 -c "$W/day1.dump" | wc -c)
  CMP_ARGS="$RESTIC1 $RESTIC2 $PATCH $(restic version | awk '{ print $2 }') $WHOLE1"
  rm -f "$W/day1.dump" "$W/patch.zst"
fi

DRILL=""
if command -v pgbackrest >/dev/null; then
  step "base backups and recovery drills, Exclave and pgBackRest in the same run"
  mkdir -p "$W/scratch"
  pgbackrest_conf "$W" "$W/pg/data" "$PG_PORT" "$W/pg" "$(printf 'repo1-retention-full=2\nprocess-max=2\nstart-fast=y')"
  [ ${#AS[@]} -eq 0 ] || chown -R postgres "$W/pgbr" "$W/pgbr-log" "$W/pgbr-lock" "$W/pgbackrest.conf"
  BR=("${AS[@]}" pgbackrest --config "$W/pgbackrest.conf" --stanza=bench)
  # From now on every segment goes to both archives.
  psql -X -q "$CONN" -c "ALTER SYSTEM SET archive_command = '$B/exclave-agent wal-push --config $W/agent.toml --source pg %p && pgbackrest --config $W/pgbackrest.conf --stanza=bench archive-push %p'" -c "SELECT pg_reload_conf()" >/dev/null
  "${BR[@]}" stanza-create
  t0=$(date +%s.%N)
  "${BR[@]}" backup --type=full
  BR_BACKUP_SECS=$(python3 -c "print($(date +%s.%N) - $t0)")
  BR_BYTES=$(du -sb "$W/pgbr/backup" | cut -f1)
  PG_CONN_ADMIN="host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"
  t0=$(date +%s.%N)
  "$B/exclave-agent" backup --config "$W/agent.toml" --source pg --postgres "$PG_CONN_ADMIN" --pg-base --pg-bin "$PGBIN" --json >"$W/base.json"
  EX_BACKUP_SECS=$(python3 -c "print($(date +%s.%N) - $t0)")
  DLOAD=${DRILL_LOAD_SECS:-30}
  "$PGBIN/pgbench" -n -c 4 -j 2 -T "$DLOAD" "$CONN" 2>&1 | grep -E "^tps" || true
  HISTORY=$(psql -X -At "$CONN" -c "SELECT count(*) FROM pgbench_history")
  LAST=$(psql -X -At "$CONN" -c "SELECT pg_walfile_name(pg_switch_wal())")
  for _ in $(seq 1 240); do
    A=$(psql -X -At "$CONN" -c "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    [[ "$A" > "$LAST" || "$A" == "$LAST" ]] && break
    sleep 0.5
  done
  sync
  # (a) Exclave: restore, replay, promote, read back.
  "$B/exclave-restore" drill --node 127.0.0.1:$NODE_PORT --pki "$W/pki" --identity dr --key-file "$W/lux.key" \
    --source pg --scratch "$W/scratch" --no-record --json >"$W/drill-pitr.json" || true
  # (b) pgBackRest: restore, start, wait until promoted.
  PORT2=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$W/pgr" && { [ ${#AS[@]} -eq 0 ] || chown postgres "$W/pgr"; }
  t0=$(date +%s.%N)
  "${BR[@]}" --pg1-path="$W/pgr/data" restore
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$W/pgr/data" -l "$W/pgr/server.log" -o "-p $PORT2 -k $W/pgr -c listen_addresses='' -c archive_mode=off" start >/dev/null
  until [ "$(psql -X -At -h "$W/pgr" -p "$PORT2" -U postgres -c 'SELECT NOT pg_is_in_recovery()' postgres 2>/dev/null)" = t ]; do sleep 0.1; done
  BR_RTO=$(python3 -c "print($(date +%s.%N) - $t0)")
  BR_HISTORY=$(psql -X -At -h "$W/pgr" -p "$PORT2" -U postgres -c "SELECT count(*) FROM pgbench_history" bench)
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$W/pgr/data" -m immediate stop >/dev/null
  rm -rf "$W/pgr"
  # (d) Exclave's own disaster path: pitr (restore_command wal-fetch, 8 segments per trip),
  #     start, wait until promoted.
  PORT3=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$W/pgx" && { [ ${#AS[@]} -eq 0 ] || chown postgres "$W/pgx"; }
  t0=$(date +%s.%N)
  "$B/exclave-restore" pitr --node 127.0.0.1:$NODE_PORT --pki "$W/pki" --identity dr --key-file "$W/lux.key" \
    --source pg --to "$W/pgx/data" >/dev/null
  [ ${#AS[@]} -eq 0 ] || chown -R postgres "$W/pgx"
  chmod 700 "$W/pgx/data"
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$W/pgx/data" -l "$W/pgx/server.log" -o "-p $PORT3 -k $W/pgx -c listen_addresses='' -c archive_mode=off" start >/dev/null
  until [ "$(psql -X -At -h "$W/pgx" -p "$PORT3" -U postgres -c 'SELECT NOT pg_is_in_recovery()' postgres 2>/dev/null)" = t ]; do sleep 0.1; done
  EX_RTO=$(python3 -c "print($(date +%s.%N) - $t0)")
  EX_HISTORY=$(psql -X -At -h "$W/pgx" -p "$PORT3" -U postgres -c "SELECT count(*) FROM pgbench_history" bench)
  EX_SPOOLED=$(grep -c "restored from the prefetch spool" "$W/pgx/server.log" || true)
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$W/pgx/data" -m immediate stop >/dev/null
  rm -rf "$W/pgx"
  # (c) The logical dump of day 2.
  "$B/exclave-restore" drill --node 127.0.0.1:$NODE_PORT --pki "$W/pki" --identity dr --key-file "$W/lux.key" \
    --source bench --scratch "$W/scratch" --no-record --json >"$W/drill-dump.json" || true
  # (e) Second base backups, after the drill's load: pgBackRest incremental (changed files
  #     whole) against Exclave's (unchanged chunks deduplicated, changed ones as deltas on the
  #     first backup's chunks, from the delta cache).
  t0=$(date +%s.%N)
  "${BR[@]}" backup --type=incr
  BR2_SECS=$(python3 -c "print($(date +%s.%N) - $t0)")
  BR2_BYTES=$(($(du -sb "$W/pgbr/backup" | cut -f1) - BR_BYTES))
  t0=$(date +%s.%N)
  "$B/exclave-agent" backup --config "$W/agent.toml" --source pg --postgres "$PG_CONN_ADMIN" --pg-base --pg-bin "$PGBIN" --json >"$W/base2.json"
  EX2_SECS=$(python3 -c "print($(date +%s.%N) - $t0)")
  DRILL="$W/base.json $EX_BACKUP_SECS $BR_BACKUP_SECS $BR_BYTES $W/drill-pitr.json $BR_RTO $BR_HISTORY $HISTORY $W/drill-dump.json $EX_RTO $EX_HISTORY $EX_SPOOLED $W/base2.json $EX2_SECS $BR2_SECS $BR2_BYTES"
fi

step "results"
# shellcheck disable=SC2086
python3 - "$W/day1.json" "$W/day2.json" "$DUMP_SECS" "$RSS1" "$LAG50" "$LAG99" "$LAGMAX" "$NSAMPLES" "$ARCHIVED" "$SCALE" "$LOAD" $CMP_ARGS <<'PY'
import json, sys
d1, d2 = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
dump_secs, rss = float(sys.argv[3]), int(sys.argv[4])
lag50, lag99, lagmax, n = sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8]
mib = lambda b: b / 1048576
pg_dump_mbs = d1["bytes_read"] / 1e6 / dump_secs
print(f"pgbench scale {sys.argv[10]}, load {sys.argv[11]} s, 4 clients")
print(f"snapshot day 1   {mib(d1['bytes_read']):8.1f} MiB dump in {d1['duration_secs']:.1f} s = {d1['mb_per_s']:.1f} MB/s "
      f"(pg_dump alone to /dev/null {pg_dump_mbs:.1f} MB/s; ratio {d1['mb_per_s'] / pg_dump_mbs:.2f}); "
      f"uploaded {mib(d1['uploaded_bytes']):.1f} MiB; agent peak RSS {rss / 1024:.0f} MiB; "
      f"facts of {d1['tables']} tables taken in {d1['facts_secs']:.1f} s beside the dump")
print(f"WAL archive lag  p50 {lag50} s, p99 {lag99} s, max {lagmax} s over {n} samples (limit 60 s); {sys.argv[9]}")
print(f"snapshot day 2   read {mib(d2['bytes_read']):.1f} MiB, new {mib(d2['new_bytes']):.1f} MiB "
      f"({100 * d2['new_bytes'] / max(1, d2['bytes_read']):.1f}%), uploaded {mib(d2['uploaded_bytes']):.1f} MiB "
      f"in {d2['duration_secs']:.1f} s ({d2.get('delta_chunks', 0)} chunks as deltas, {mib(d2.get('delta_bytes', 0)):.2f} MiB)")
if len(sys.argv) > 12:
    r1, r2, patch, version, whole1 = int(sys.argv[12]), int(sys.argv[13]), int(sys.argv[14]), sys.argv[15], int(sys.argv[16])
    ex2, ex = d2["uploaded_bytes"], d1["uploaded_bytes"] + d2["uploaded_bytes"]
    print(f"dump day 2       exclave uploaded {mib(ex2):.2f} MiB; restic {version} added {mib(r2 - r1):.2f} MiB; "
          f"zstd -3 --patch-from day 1 {mib(patch):.2f} MiB (exclave / patch-from {ex2 / max(patch, 1):.2f}, target <= 2)")
    print(f"dump store       exclave day 1 + day 2 uploaded {mib(ex):.1f} MiB; restic repository {mib(r2):.1f} MiB "
          f"(ratio {ex / max(r2, 1):.2f}, target <= 0.65); restic day 1 {mib(r1):.1f} MiB")
    print(f"dump whole-file  zstd -3 --long of day 1 {mib(whole1):.1f} MiB + patch-from day 2 {mib(patch):.1f} MiB = "
          f"{mib(whole1 + patch):.1f} MiB ({(whole1 + patch) / max(r2, 1):.2f} of restic's repository)")
PY

if [ -n "$DRILL" ]; then
  # shellcheck disable=SC2086
  python3 - $DRILL <<'PY'
import json, sys
base, ex_secs, br_secs, br_bytes, pitr, br_rto, br_hist, hist, dump, ex_rto, ex_hist, spooled = sys.argv[1:13]
base2, ex2_secs, br2_secs, br2_bytes = json.load(open(sys.argv[13])), float(sys.argv[14]), float(sys.argv[15]), int(sys.argv[16])
base, pitr, dump = json.load(open(base)), json.load(open(pitr)), json.load(open(dump))
mib = lambda b: b / 1048576
ex_secs, br_secs, br_rto = float(ex_secs), float(br_secs), float(br_rto)
print(f"base backup      exclave {ex_secs:.1f} s, stored {mib(base.get('uploaded_bytes', 0)):.1f} MiB; "
      f"pgbackrest full {br_secs:.1f} s, repository {mib(int(br_bytes)):.1f} MiB (ratio {br_secs / ex_secs:.2f})")
rec = pitr.get("recovery") or {}
rows = (rec.get("databases") or {}).get("bench", {}).get("public.pgbench_history")
phases = {p["name"]: p["secs"] for p in pitr.get("phases", [])}
restore = phases.get("fetch, decrypt, write and verify files", 0)
replay = rec.get("replay_secs", 0)
to_promoted = sum(s for n, s in phases.items() if not n.startswith("read every table"))
print(f"PITR drill       exclave {pitr['verdict']}: restore {restore:.1f} s + replay {rec.get('wal_files_fetched')} WAL files "
      f"and promote {replay:.1f} s = promoted after {to_promoted:.1f} s; whole drill (every table read back) "
      f"{pitr['rto_secs']:.1f} s; pgbench_history {rows} of {hist}")
print(f"                 pgbackrest restore + start until promoted {br_rto:.1f} s; pgbench_history {br_hist} of {hist}; "
      f"ratio (pgbackrest / exclave to promoted) {br_rto / max(to_promoted, 1e-9):.2f}")
phases = ", ".join("%s %.1f s" % (p["name"], p["secs"]) for p in dump["phases"])
print(f"PITR restore     exclave-restore pitr + start until promoted {float(ex_rto):.1f} s ({spooled} segments served from the "
      f"prefetch spool); pgbench_history {ex_hist} of {hist}; ratio (pgbackrest / exclave) {br_rto / float(ex_rto):.2f}")
print(f"logical drill    exclave {dump['verdict']}: RTO {dump['rto_secs']:.1f} s ({phases})")
print(f"second base      exclave {ex2_secs:.1f} s, stored {mib(base2.get('uploaded_bytes', 0)):.1f} MiB "
      f"({base2.get('delta_chunks', 0)} chunks as deltas, {mib(base2.get('delta_bytes', 0)):.2f} MiB); "
      f"pgbackrest incr {br2_secs:.1f} s, repository +{mib(br2_bytes):.1f} MiB "
      f"(bytes ratio exclave / pgbackrest {base2.get('uploaded_bytes', 0) / max(br2_bytes, 1):.2f})")
PY
fi

# The archive calls themselves against pgBackRest, each script with servers of its own:
# one isolated archive_command / restore_command call, then a backlog drained (sustained rate).
if command -v pgbackrest >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${SKIP_WAL_BENCH:-}" ]; then
  step "one isolated archive call and fetch, against pgBackRest (bench/wal-latency.sh)"
  "$HERE/wal-latency.sh" | tail -n 3
  step "a backlog drained, against pgBackRest (bench/wal-archive.sh 60 8)"
  "$HERE/wal-archive.sh" 60 8 | grep "drained"
  step "the loss window (RPO) idle and under load, against pgBackRest (bench/wal-stream.sh $SCALE 40)"
  "$HERE/wal-stream.sh" "$SCALE" 40 | sed -n '/^agent daemon CPU/,$p'
fi
