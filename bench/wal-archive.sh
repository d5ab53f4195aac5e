#!/usr/bin/env bash
# Benchmark: sustained WAL archiving, wal-push alone and with --ahead, in one run.
#
#   bench/wal-archive.sh [SCALE] [AHEAD]      (defaults 60 and 8; run as root)
#
# For each run a PostgreSQL server writes `pgbench -i -s SCALE` while its archive_command
# fails, so a backlog of ready segments builds up; then the real archive_command
# (`exclave-agent wal-push`, plain or `--ahead AHEAD --spool DIR`) drains it into one node on
# loopback. Each run has a tenant key of its own, so no run deduplicates against another's
# chunks. Prints the drain time, MiB/s of WAL and how many calls a push ahead answered.
# With pgbackrest installed, the same backlog is also drained by `pgbackrest archive-push`
# (encrypted repository, zstd, as in bench/postgres.sh), synchronous and with `archive-async`
# and process-max 2, in the same run. Runs alternate plain / ahead / pgbackrest /
# pgbackrest-async, twice.
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
SCALE=${1:-60}
AHEAD=${2:-8}
[ "$(id -u)" = 0 ] || die "run as root (the servers run as postgres)"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
B=$(mktemp -d /tmp/exclave-wal-archive-bin.XXXXXX)
private_binaries "$B"
chmod 755 "$B"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
W=$(mktemp -d /tmp/arch.XXXXXX); chmod 755 $W
trap 'kill $NODE 2>/dev/null; for d in $W/pg*; do runuser -u postgres -- $PGBIN/pg_ctl -D $d/data -m immediate stop >/dev/null 2>&1 || true; done; rm -rf $W $B' EXIT
$B/exclave-replicator pki init --dir $W/pki >/dev/null
$B/exclave-replicator pki issue --dir $W/pki --role node --name n1 --host 127.0.0.1 >/dev/null
$B/exclave-replicator pki issue --dir $W/pki --role agent --name pg --tenant lux >/dev/null
$B/exclave-agent keys init --tenant lux --out $W/lux.key >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$B/exclave-replicator run --name n1 --data $W/n1 --listen 127.0.0.1:$PORT --pki $W/pki > $W/n1.log 2>&1 &
NODE=$!; sleep 1.5
printf 'node = ["127.0.0.1:%s"]\npki = "%s/pki"\nidentity = "pg"\nkey-file = "%s/lux.key"\n' $PORT $W $W > $W/agent.toml
chown -R postgres $W/pki $W/lux.key $W/agent.toml
run() {
  local label=$1 extra=$2 src=$3 tool=${4:-exclave}
  local D=$W/pg$label; mkdir -p $D/ahead
  # A key of its own: no run deduplicates against another's chunks.
  $B/exclave-agent keys init --tenant lux --out $D/lux.key >/dev/null
  printf 'node = ["127.0.0.1:%s"]\npki = "%s/pki"\nidentity = "pg"\nkey-file = "%s/lux.key"\n' $PORT $W $D > $D/agent.toml
  chown -R postgres $D
  local PGP=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  runuser -u postgres -- $PGBIN/initdb -U postgres --auth=trust -D $D/data >/dev/null
  printf "port = $PGP\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '$D'\nwal_level = replica\narchive_mode = on\nmax_wal_size = 4GB\narchive_command = '/bin/false'\n" >> $D/data/postgresql.conf
  runuser -u postgres -- $PGBIN/pg_ctl -D $D/data -l $D/log -w start >/dev/null
  local C="host=127.0.0.1 port=$PGP user=postgres dbname=postgres"
  # A backlog: WAL written while archiving fails, then the real command drains it.
  $PGBIN/pgbench -i -q -s $SCALE "$C" >/dev/null 2>&1
  local last=$(psql -X -At "$C" -c "SELECT pg_walfile_name(pg_switch_wal())")
  local backlog=$(ls $D/data/pg_wal/archive_status | grep -c ready)
  local cmd="$B/exclave-agent wal-push --config $D/agent.toml --source $src $extra %p"
  if [ "$tool" = pgbackrest ]; then
    # The same repository settings as bench/postgres.sh; `extra` holds the async options.
    mkdir -p $D/pgbr-spool
    pgbackrest_conf $D $D/data $PGP $D "$(printf 'spool-path=%s/pgbr-spool\n%s' $D "$extra")"
    chown -R postgres $D
    runuser -u postgres -- pgbackrest --config $D/pgbackrest.conf --stanza=bench stanza-create >/dev/null
    cmd="pgbackrest --config $D/pgbackrest.conf --stanza=bench archive-push %p"
  fi
  sync
  psql -X -q "$C" -c "ALTER SYSTEM SET archive_command = '$cmd'" -c "SELECT pg_reload_conf()" >/dev/null
  local t0=$(date +%s.%N)
  local t1=$t0
  until [ "$(psql -X -At "$C" -c "SELECT coalesce(last_archived_wal,'') >= '$last' FROM pg_stat_archiver")" = t ]; do sleep 0.1; done
  local t2=$(date +%s.%N)
  local n=$backlog
  local ahead=$(grep -c "pushed ahead, unchanged" $D/log || true)
  local note="; $ahead calls answered from pushes ahead"
  [ "$tool" = exclave ] || note=""
  python3 -c "print(f'$label: backlog of {$n} segments drained in {$t2-$t0:.1f} s = {$n*16/($t2-$t0):.0f} MiB/s of WAL, {($t2-$t0)*1000/$n:.0f} ms per segment$note')"
  runuser -u postgres -- $PGBIN/pg_ctl -D $D/data -m immediate stop >/dev/null
}
run plain "" a
run ahead "--ahead $AHEAD --spool $W/pgahead/ahead" b
if command -v pgbackrest >/dev/null; then
  run pgbackrest "" - pgbackrest
  run pgbackrest-async "$(printf 'archive-async=y\nprocess-max=2')" - pgbackrest
fi
run plain2 "" c
run ahead2 "--ahead $AHEAD --spool $W/pgahead2/ahead" d
if command -v pgbackrest >/dev/null; then
  run pgbackrest2 "" - pgbackrest
  run pgbackrest-async2 "$(printf 'archive-async=y\nprocess-max=2')" - pgbackrest
fi
