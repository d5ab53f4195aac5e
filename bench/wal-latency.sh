#!/usr/bin/env bash
# Benchmark: one isolated archive_command / restore_command call, Exclave against pgBackRest,
# in one run.
#
#   bench/wal-latency.sh [SEGMENTS] [SCALE]     (defaults 40 and 60; run as root)
#
# A PostgreSQL server writes `pgbench -i -s SCALE` while its archive_command fails, so its
# segments stay in pg_wal; SEGMENTS of them are then archived one call at a time, by hand, as
# PostgreSQL's archiver would: `exclave-agent wal-push` into one node on loopback and
# `pgbackrest archive-push` into an encrypted, zstd repository (the same settings as
# bench/postgres.sh), alternating which goes first. Every segment is fresh to both. Then each is
# fetched back one call at a time (`exclave-restore wal-fetch` against `pgbackrest
# archive-get`, no prefetching: an isolated call). Prints p50 / p90 / max of each call in ms,
# and the ratios of the p50s.
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
N=${1:-40}
SCALE=${2:-60}
[[ $N =~ ^[1-9][0-9]*$ && $SCALE =~ ^[1-9][0-9]*$ ]] || die "usage: bench/wal-latency.sh [SEGMENTS] [SCALE]"
[ "$(id -u)" = 0 ] || die "run as root (the server and both tools run as postgres)"
command -v pgbackrest >/dev/null || die "pgbackrest is missing (apt-get install pgbackrest)"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
B=$(mktemp -d /tmp/exclave-wal-latency-bin.XXXXXX)
private_binaries "$B"
chmod 755 "$B"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
W=$(mktemp -d /tmp/wal-latency.XXXXXX)
chmod 755 "$W"
NODE=""
trap 'kill $NODE 2>/dev/null; runuser -u postgres -- $PGBIN/pg_ctl -D $W/data -m immediate stop >/dev/null 2>&1 || true; rm -rf $W $B' EXIT
free_port() { python3 -c 'import socket, sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }

echo "== one node on loopback, a PostgreSQL server with $N segments ready"
$B/exclave-replicator pki init --dir $W/pki >/dev/null
$B/exclave-replicator pki issue --dir $W/pki --role node --name n1 --host 127.0.0.1 >/dev/null
$B/exclave-replicator pki issue --dir $W/pki --role agent --name pg --tenant lux >/dev/null
$B/exclave-replicator pki issue --dir $W/pki --role restore --name dr --tenant lux >/dev/null
$B/exclave-agent keys init --tenant lux --out $W/lux.key >/dev/null
PORT=$(free_port udp)
$B/exclave-replicator run --name n1 --data $W/n1 --listen 127.0.0.1:$PORT --pki $W/pki >$W/n1.log 2>&1 &
NODE=$!
printf 'node = ["127.0.0.1:%s"]\npki = "%s/pki"\nidentity = "pg"\nkey-file = "%s/lux.key"\n' $PORT $W $W >$W/agent.toml
PGP=$(free_port tcp)
mkdir $W/data && chown postgres $W && chmod 700 $W/data && chown postgres $W/data
runuser -u postgres -- $PGBIN/initdb -U postgres --auth=trust -D $W/data >/dev/null
printf "port = $PGP\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '$W'\nwal_level = replica\narchive_mode = on\nmax_wal_size = 4GB\narchive_command = '/bin/false'\n" >>$W/data/postgresql.conf
runuser -u postgres -- $PGBIN/pg_ctl -D $W/data -l $W/pg.log -w start >/dev/null
C="host=127.0.0.1 port=$PGP user=postgres dbname=postgres"
$PGBIN/pgbench -i -q -s $SCALE "$C" >/dev/null 2>&1
psql -X -At "$C" -c "SELECT pg_switch_wal()" >/dev/null
READY=$(ls $W/data/pg_wal/archive_status | sed -n 's/\.ready$//p' | grep -E '^[0-9A-F]{24}$' | sort | head -n "$N")
[ "$(echo "$READY" | wc -l)" -ge "$N" ] || die "only $(echo "$READY" | wc -l) segments were written; raise SCALE"
mkdir -p $W/fetched
pgbackrest_conf $W $W/data $PGP $W
chown -R postgres $W/pki $W/lux.key $W/agent.toml $W/pgbr $W/pgbr-log $W/pgbr-lock $W/pgbackrest.conf $W/fetched
runuser -u postgres -- pgbackrest --config $W/pgbackrest.conf --stanza=bench stanza-create >/dev/null
sync

echo "== $N isolated calls of each, alternating which goes first"
# The timing loop runs as postgres, as the archiver does: one process per call.
cat >$W/calls.py <<'PY'
import json, subprocess, sys, time
w, b, port, segs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
pg_wal = f"{w}/data/pg_wal"
cmds = {
    "push": {
        "exclave": lambda s: [f"{b}/exclave-agent", "wal-push", "--config", f"{w}/agent.toml", "--source", "pg", f"{pg_wal}/{s}"],
        "pgbackrest": lambda s: ["pgbackrest", "--config", f"{w}/pgbackrest.conf", "--stanza=bench", "archive-push", f"{pg_wal}/{s}"],
    },
    "fetch": {
        "exclave": lambda s: [f"{b}/exclave-restore", "wal-fetch", "--node", f"127.0.0.1:{port}", "--pki", f"{w}/pki",
                              "--identity", "dr", "--key-file", f"{w}/lux.key", "--source", "pg", s, f"{w}/fetched/{s}.ex"],
        "pgbackrest": lambda s: ["pgbackrest", "--config", f"{w}/pgbackrest.conf", "--stanza=bench", "archive-get", s,
                                 f"{w}/fetched/{s}.br"],
    },
}
ms = {op: {tool: [] for tool in cmds[op]} for op in cmds}
for op in ("push", "fetch"):
    for i, s in enumerate(segs):
        order = ["exclave", "pgbackrest"] if i % 2 == 0 else ["pgbackrest", "exclave"]
        for tool in order:
            t = time.perf_counter()
            r = subprocess.run(cmds[op][tool](s), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            ms[op][tool].append((time.perf_counter() - t) * 1000)
            if r.returncode != 0:
                sys.exit(f"{tool} {op} of {s} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
for s in segs:
    a, bb = (open(f"{w}/fetched/{s}.{x}", "rb").read() for x in ("ex", "br"))
    if a != bb or a != open(f"{pg_wal}/{s}", "rb").read():
        sys.exit(f"{s}: a fetched copy differs from the segment")
json.dump(ms, open(f"{w}/calls.json", "w"))
PY
runuser -u postgres -- python3 $W/calls.py $W $B $PORT "$(echo $READY)"
python3 - $W/calls.json $N <<'PY'
import json, statistics, sys
ms, n = json.load(open(sys.argv[1])), sys.argv[2]
def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
names = {"push": ("wal-push", "archive-push"), "fetch": ("wal-fetch", "archive-get")}
for op in ("push", "fetch"):
    ex, br = ms[op]["exclave"], ms[op]["pgbackrest"]
    print(f"{op:5}: exclave {names[op][0]:9} p50 {q(ex, .5):5.1f} ms, p90 {q(ex, .9):5.1f}, max {max(ex):5.1f}; "
          f"pgbackrest {names[op][1]:12} p50 {q(br, .5):5.1f} ms, p90 {q(br, .9):5.1f}, max {max(br):5.1f}; "
          f"p50 ratio (exclave / pgbackrest) {q(ex, .5) / q(br, .5):.2f}  [{n} fresh 16 MiB segments each]")
print("every fetched segment is byte-identical to the one archived, from both tools")
PY
