#!/usr/bin/env bash
# Benchmark: the loss window (RPO) of streamed WAL (`method = "stream"`), idle and under load.
#
#   bench/wal-stream.sh [SCALE] [SECS]      (defaults 100 and 60; run as root)
#
# One node on loopback and a PostgreSQL server whose source is streamed by an agent daemon.
# `exclave_agent_wal_lag_seconds` (the age of the oldest WAL the server wrote that the cluster
# lacks) is read every second through four phases: idle, pgbench with 4 clients for SECS,
# a bulk load (`pgbench -i -s SCALE` into a second database: the heaviest WAL rate), idle
# again. Prints the lag's p50 / p99 / max per phase, the WAL rate, and the CPU seconds of the
# agent daemon and pg_receivewal. With pgbackrest installed, the same server also archives
# through `pgbackrest archive-push` (archive_timeout 30 s, encrypted repository, zstd), and its
# loss window is measured in the same run the same way: the age of the oldest server position
# past the end of the last archived segment.
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
SCALE=${1:-100}
SECS=${2:-60}
[ "$(id -u)" = 0 ] || die "run as root (the server runs as postgres)"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
B=$(mktemp -d /tmp/exclave-wal-stream-bin.XXXXXX)
private_binaries "$B"
chmod 755 "$B"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
W=$(mktemp -d /tmp/stream.XXXXXX); chmod 755 "$W"
AGENT=; NODE=
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
trap 'kill $AGENT $NODE 2>/dev/null; runuser -u postgres -- $PGBIN/pg_ctl -D $W/data -m immediate stop >/dev/null 2>&1 || true; rm -rf $W $B' EXIT
"$B"/exclave-replicator pki init --dir "$W"/pki >/dev/null
"$B"/exclave-replicator pki issue --dir "$W"/pki --role node --name n1 --host 127.0.0.1 >/dev/null
"$B"/exclave-replicator pki issue --dir "$W"/pki --role agent --name pg --tenant lux >/dev/null
"$B"/exclave-agent keys init --tenant lux --out "$W"/lux.key >/dev/null
PORT=$(freeport)
"$B"/exclave-replicator run --name n1 --data "$W"/n1 --listen 127.0.0.1:"$PORT" --pki "$W"/pki > "$W"/n1.log 2>&1 &
NODE=$!
PGP=$(freeport); MP=$(freeport)
mkdir "$W"/data "$W"/pg && chown postgres "$W"/data "$W"/pg
runuser -u postgres -- "$PGBIN"/initdb -U postgres --auth=trust -D "$W"/data >/dev/null
printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s/pg'\nwal_level = replica\nmax_wal_size = 4GB\n" "$PGP" "$W" >> "$W"/data/postgresql.conf
BR=
if command -v pgbackrest >/dev/null; then
  pgbackrest_conf "$W" "$W"/data "$PGP" "$W"/pg
  chown -R postgres "$W"/pgbr "$W"/pgbr-log "$W"/pgbr-lock "$W"/pgbackrest.conf
  BR="pgbackrest --config $W/pgbackrest.conf --stanza=bench"
  printf "archive_mode = on\narchive_timeout = 30\narchive_command = '%s archive-push %%p'\n" "$BR" >> "$W"/data/postgresql.conf
fi
runuser -u postgres -- "$PGBIN"/pg_ctl -D "$W"/data -l "$W"/pg/log -w start >/dev/null
C="host=127.0.0.1 port=$PGP user=postgres"
[ -z "$BR" ] || runuser -u postgres -- $BR stanza-create >/dev/null
psql -X -q "$C dbname=postgres" -c "CREATE DATABASE bench" -c "CREATE DATABASE bulk"
"$PGBIN"/pgbench -i -q -s 10 "$C dbname=bench" >/dev/null 2>&1
cat > "$W"/agent.toml <<EOF
node = ["127.0.0.1:$PORT"]
pki = "$W/pki"
identity = "pg"
key-file = "$W/lux.key"
state-dir = "$W/state"
metrics-listen = "127.0.0.1:$MP"

[sources.reg]
kind = "postgres"
method = "stream"
connection = "$C dbname=postgres"
pg-bin = "$PGBIN"
EOF
RUST_LOG="info,exclave_agent::stream=debug" "$B"/exclave-agent run --config "$W"/agent.toml 2> "$W"/agent.log &
AGENT=$!
sleep 3
"$B"/exclave-agent backup --config "$W"/agent.toml --source reg --quiet >/dev/null
lsn() { psql -X -At "$C dbname=postgres" -c "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"; }
sample() { # phase seconds
  local end=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    curl -s "http://127.0.0.1:$MP/metrics" | awk -v p="$1" '/^exclave_agent_wal_lag_seconds\{source="reg"\}/ {print p, $2}' >> "$W"/lag
    [ -z "$BR" ] || echo "$1 $(date +%s.%N) $(psql -X -At -F ' ' "$C dbname=postgres" -c "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, coalesce(last_archived_wal, '-') FROM pg_stat_archiver")" >> "$W"/archived
    sleep 1
  done
}
phase() { # name, then the command that makes the load (runs while sampled)
  local name=$1; shift
  local l0; l0=$(lsn); local t0; t0=$(date +%s.%N)
  if [ $# -gt 0 ]; then
    "$@" >/dev/null 2>&1 &
    local pid=$!
    while kill -0 $pid 2>/dev/null; do sample "$name" 1; done
    wait $pid
  else
    sample "$name" $((SECS / 2))
  fi
  local l1; l1=$(lsn); local t1; t1=$(date +%s.%N)
  echo "$name $(python3 -c "print(f'{($l1-$l0)/1048576/($t1-$t0):.1f}')")" >> "$W"/rate
}
phase idle
phase pgbench "$PGBIN"/pgbench -n -c 4 -j 2 -T "$SECS" "$C dbname=bench"
phase bulk-load "$PGBIN"/pgbench -i -q -s "$SCALE" "$C dbname=bulk"
phase idle-after
sleep 5

RECV=$(pgrep -P $AGENT pg_receivewal || true)
echo "agent daemon CPU $(cpu_seconds $AGENT) s, peak RSS $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$AGENT/status); pg_receivewal CPU $( [ -n "$RECV" ] && cpu_seconds "$RECV" || echo "?") s"
python3 - "$W"/lag "$W"/rate <<'EOF'
import sys, collections
lag = collections.defaultdict(list)
for line in open(sys.argv[1]):
    p, v = line.split()
    lag[p].append(float(v))
rate = dict(l.split() for l in open(sys.argv[2]))
def q(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(f * len(xs)))]
print(f"{'phase':<12} {'WAL MiB/s':>9} {'samples':>7} {'lag p50':>8} {'p99':>6} {'max':>6}")
for p in ["idle", "pgbench", "bulk-load", "idle-after"]:
    xs = lag.get(p, [0.0])
    print(f"{p:<12} {rate.get(p, '?'):>9} {len(xs):>7} {q(xs, .5):>7.1f}s {q(xs, .99):>5.1f}s {max(xs):>5.1f}s")
EOF
# pgBackRest's loss window from the same samples: the age of the oldest server position past
# the end of the last segment it archived.
[ -z "$BR" ] || python3 - "$W"/archived <<'EOF'
import collections, sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 4]
seen, lag, end = [], collections.defaultdict(list), 0
for phase, t, server, archived in rows:
    t, server = float(t), int(server)
    seen.append((t, server))
    if len(archived) == 24:  # a segment, not a history file
        end = max(end, (int(archived[8:16], 16) << 32) + (int(archived[16:24], 16) + 1) * (16 << 20))
    first = next((st for st, sl in seen if sl > end), None)
    lag[phase].append(0.0 if first is None else t - first)
def q(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(f * len(xs)))]
print("pgBackRest archive-push (archive_timeout 30 s), the same server and load:")
for p in ["idle", "pgbench", "bulk-load", "idle-after"]:
    xs = lag.get(p, [0.0])
    print(f"{p:<12} {'':>9} {len(xs):>7} {q(xs, .5):>7.1f}s {q(xs, .99):>5.1f}s {max(xs):>5.1f}s")
EOF
# How long one archive commit took, from the daemon's debug log.
python3 - "$W"/agent.log <<'EOF'
import re, sys
t = {"segment": [], "partial": []}
for line in open(sys.argv[1]):
    m = re.search(r"(archived streamed WAL|archived the segment being written).* secs=([0-9.]+)", line)
    if m:
        t["segment" if m.group(1) == "archived streamed WAL" else "partial"].append(float(m.group(2)) * 1000)
for k, xs in t.items():
    xs.sort()
    if xs:
        print(f"{k:<8} pushes {len(xs):>4}: p50 {xs[len(xs)//2]:.0f} ms, p90 {xs[int(len(xs)*.9)]:.0f} ms")
EOF
"$B"/exclave-agent status --config "$W"/agent.toml | tail -3
