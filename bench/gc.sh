#!/usr/bin/env bash
# Benchmark: garbage collection of the benchmark register's store, and a backup while a pass runs.
#
#   [BENCH_DATA=DIR] bench/gc.sh [SIZE_MIB]      (default 1024; BENCH_DATA as in bench/run.sh)
#
# One storage node on loopback (release build; GC on demand, grace 0 passes, so one pass
# condemns, sweeps and gives the space back):
# 1. day 1 of the register backed up, then the source kept to its last snapshot and day 2
#    backed up whole (no deltas): what only day 1 held is garbage;
# 2. a `gc` pass: its time, what it examined, condemned and swept, the packs before and after,
#    MB/s of store gone through and given back, the node's CPU seconds;
# 3. a backup of day 1 under a key of its own (every chunk new) alone, then the same kind of
#    backup under another key while a GC pass of the same size runs: MB/s with and without.
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
SIZE=${1:-1024}
[[ $SIZE =~ ^[1-9][0-9]*$ ]] || die "usage: bench/gc.sh [SIZE_MIB]"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
GEN=$HERE/../../shared/bench/gen_register.py
[ -f "$GEN" ] || die "data generator not found: $GEN"
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
step() { printf '\n== %s\n' "$*"; }
workdir exclave-gc-bench
B=$W/bin

step "build"
private_binaries "$B"
step "data: ${SIZE} MiB register, day 1 and day 2"
DATA=${BENCH_DATA:-$W/data}
register "$DATA" "$SIZE" "$GEN" "$W/gen.log"
D1=$(du -sb "$DATA/day1" | cut -f1)

step "one storage node"
R=$B/exclave-replicator
$R pki init --dir "$W/pki" >/dev/null
$R pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
$R pki issue --dir "$W/pki" --role agent --name reg --tenant bench >/dev/null
$R pki issue --dir "$W/pki" --role admin --name admin >/dev/null
for k in a b c; do $B/exclave-agent keys init --tenant bench --out "$W/$k.key" >/dev/null; done
PORT=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
NODE=127.0.0.1:$PORT
$R run --name n1 --data "$W/node" --listen "$NODE" --pki "$W/pki" --gc-interval-hours 0 --gc-grace-passes 0 2>"$W/node.log" &
NODE_PID=$!
for _ in $(seq 200); do grep -q "storage node ready" "$W/node.log" && break; sleep 0.1; done
grep -q "storage node ready" "$W/node.log" || { cat "$W/node.log" >&2; die "storage node did not start"; }
ADMIN=(--node "$NODE" --pki "$W/pki")
$R retention protect "${ADMIN[@]}" --tenant bench --days 0 >/dev/null
backup() { # KEY SOURCE DIR OUT
  $B/exclave-agent backup --node "$NODE" --pki "$W/pki" --identity reg --key-file "$W/$1.key" --no-deltas \
    --source "$2" --json "$3" >"$4"
}
keep_last_one() { $R retention set "${ADMIN[@]}" --tenant bench --source "$1" --new-tenant --keep-last 1 >/dev/null; }
# GC=... one pass, timed with the node's CPU; prints its JSON to $1.
gc_pass() {
  local c0 t0
  c0=$(cpu_seconds "$NODE_PID")
  t0=$(date +%s.%N)
  $R gc "${ADMIN[@]}" --json >"$1"
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f} {float(sys.argv[4]) - float(sys.argv[3]):.2f}')" \
    "$t0" "$(date +%s.%N)" "$c0" "$(cpu_seconds "$NODE_PID")" >"$1.time"
}

step "day 1, then day 2 whole, keeping the last snapshot: day 1's own chunks become garbage"
keep_last_one reg
backup a reg "$DATA/day1" "$W/day1.json"
backup a reg "$DATA/day2" "$W/day2.json"
du -sm "$W/node" | awk '{ print "   node directory " $1 " MiB" }'

step "a GC pass"
gc_pass "$W/gc1.json"

step "backup under a fresh key, alone; then garbage again, and the same backup while a GC pass runs"
backup b alone "$DATA/day1" "$W/alone.json"
keep_last_one alone
backup b alone "$DATA/day2" "$W/alone2.json"
gc_pass "$W/gc2.json" &
GC_PID=$!
sleep 0.2
backup c during "$DATA/day1" "$W/during.json"
wait "$GC_PID"

step "results"
python3 - "$W" "$D1" <<'PY'
import json, sys
w, d1 = sys.argv[1], int(sys.argv[2])
j = lambda n: json.load(open(f"{w}/{n}"))
mib = lambda b: b / 1048576
for n, label in (("gc1", "GC pass"), ("gc2", "GC pass during a backup")):
    r, (secs, cpu) = j(f"{n}.json"), map(float, open(f"{w}/{n}.json.time").read().split())
    c, l = r["cluster"], r["local"]
    before, after = l["pack_bytes_before"], l["pack_bytes_after"]
    print(f"{label:<24} {secs:6.2f} s, node {cpu:.2f} CPU s: examined {c['examined']} chunks, condemned and swept "
          f"{c['swept_chunks']} ({mib(c['swept_bytes']):.1f} MiB); packs {mib(before):.1f} -> {mib(after):.1f} MiB "
          f"({l['packs_deleted']} deleted, {l['packs_rewritten']} rewritten, {mib(l['bytes_moved']):.1f} MiB moved); "
          f"{before / 1e6 / secs:.0f} MB/s of store, {(before - after) / 1e6 / secs:.0f} MB/s given back")
alone, during = j("alone.json"), j("during.json")
gc_secs = float(open(f"{w}/gc2.json.time").read().split()[0])
print(f"backup of day 1 (fresh key) alone {alone['mb_per_s']:.1f} MB/s ({alone['duration_secs']:.1f} s); while GC runs "
      f"{during['mb_per_s']:.1f} MB/s ({during['duration_secs']:.1f} s, the pass covering {min(1, gc_secs / during['duration_secs']):.0%} "
      f"of it; ratio {during['mb_per_s'] / alone['mb_per_s']:.2f}); {mib(d1):.0f} MiB each")
PY
