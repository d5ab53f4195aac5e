#!/usr/bin/env bash
# Benchmark: the catalog at national scale, then a node joining it.
#
#   [GC=1] [JOIN=0] bench/scale.sh [CHUNKS] [SNAPSHOTS] [REFS]     (defaults 10000000, 30 and CHUNKS/10)
#
# 1. starts three nodes on loopback (release binaries) and fills their catalog through the
#    real protocol with exclave-scale-load: CHUNKS tiny chunks, then SNAPSHOTS snapshots of
#    REFS references each (overlapping windows);
# 2. starts a fourth node and adds it (`cluster add-node`): it catches up through a streamed
#    catalog snapshot and anti-entropy, then is promoted;
# 3. prints the load's duration, the join's duration (snapshot streamed, backfill done),
#    the peak RSS of every node (VmHWM), and the data directories' sizes;
# 4. with GC=1: garbage collection at that scale. An administrator keeps only the newest
#    snapshot (protection window 0), then two `gc` passes from n1 (the first condemns, the
#    second sweeps on every node and gives the space back); prints each pass's duration,
#    what it condemned and swept, n1's CPU seconds, and every node's peak RSS after.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
CHUNKS=${1:-10000000}
SNAPSHOTS=${2:-30}
REFS=${3:-$((CHUNKS / 10))}
for v in "$CHUNKS" "$SNAPSHOTS" "$REFS"; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "usage: bench/scale.sh [CHUNKS] [SNAPSHOTS] [REFS]"; done
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"

W=$(mktemp -d "${TMPDIR:-/tmp}/exclave-scale-bench.XXXXXX")
declare -A PID
cleanup() { for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

step "build"
B=$W/bin
private_binaries "$B"
tool_binary exclave-scale-load "$B"
R=$B/exclave-replicator
"$R" pki init --dir "$W/pki" >/dev/null
for n in n1 n2 n3 n4; do "$R" pki issue --dir "$W/pki" --role node --name "$n" --host 127.0.0.1 >/dev/null; done
"$R" pki issue --dir "$W/pki" --role agent --name load --tenant scale >/dev/null
"$R" pki issue --dir "$W/pki" --role admin --name admin >/dev/null
BASE=$((20000 + RANDOM % 20000))
declare -A ADDR=([n1]=127.0.0.1:$BASE [n2]=127.0.0.1:$((BASE + 1)) [n3]=127.0.0.1:$((BASE + 2)) [n4]=127.0.0.1:$((BASE + 3)))
start() { # start NAME [extra args]
  local n=$1
  shift
  "$R" run --name "$n" --data "$W/$n" --listen "${ADDR[$n]}" --pki "$W/pki" --min-free-mib 256 "$@" 2>>"$W/$n.log" &
  PID[$n]=$!
  for _ in $(seq 200); do grep -q "storage node ready" "$W/$n.log" && return; sleep 0.1; done
  die "$n did not start: $(tail -5 "$W/$n.log")"
}
for n in n1 n2 n3; do
  peers=()
  for m in n1 n2 n3; do [ "$m" != "$n" ] && peers+=(--peer "$m=${ADDR[$m]}"); done
  start "$n" "${peers[@]}"
done
ADMIN=(--node "${ADDR[n1]}" --pki "$W/pki")
for _ in $(seq 100); do "$R" cluster status "${ADMIN[@]}" --json 2>/dev/null | grep -q '"leader": "n' && break; sleep 0.2; done

step "load: $CHUNKS chunks, $SNAPSHOTS snapshots of $REFS references"
t0=$(date +%s.%N)
"$B/exclave-scale-load" "${ADDR[n1]}" "$W/pki" load "$CHUNKS" "$SNAPSHOTS" "$REFS" | tee "$W/load.log"
t1=$(date +%s.%N)
"$R" cluster status "${ADMIN[@]}"

if [ "${JOIN:-1}" = 0 ]; then
  step "results (JOIN=0: no fourth node)"
else
step "n4 joins"
peers=()
for m in n1 n2 n3; do peers+=(--peer "$m=${ADDR[$m]}"); done
start n4 --join "${peers[@]}"
t2=$(date +%s.%N)
"$R" cluster add-node "${ADMIN[@]}" --name n4 --addr "${ADDR[n4]}"
t3=$(date +%s.%N)
grep -h "catalog snapshot streamed\|catalog checkpoint taken" "$W"/n*.log | sed 's/^[^ ]* *//' || true

step "results"
fi
hwm() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "load              %.1f s\n", b - a }'
[ "${JOIN:-1}" = 0 ] || awk -v a="$t2" -v b="$t3" 'BEGIN { printf "join (add-node: snapshot, backfill, promotion)  %.1f s\n", b - a }'
for n in "${!PID[@]}"; do
  printf '%-4s peak RSS %5s MiB   CPU %6s s   data %s\n' "$n" "$(hwm "${PID[$n]}")" "$(cpu_seconds "${PID[$n]}")" \
    "$(du -sh "$W/$n" | cut -f1)"
done

[ "${GC:-0}" = 1 ] || exit 0
step "garbage collection: keep the newest snapshot only, then two passes from n1"
"$R" retention protect "${ADMIN[@]}" --tenant scale --days 0 >/dev/null
"$R" retention set "${ADMIN[@]}" --tenant scale --source scale --keep-last 1
for pass in 1 2; do
  c0=$(cpu_seconds "${PID[n1]}")
  g0=$(date +%s.%N)
  "$R" gc "${ADMIN[@]}" --json >"$W/gc$pass.json"
  g1=$(date +%s.%N)
  c1=$(cpu_seconds "${PID[n1]}")
  python3 - "$W/gc$pass.json" "$g0" "$g1" "$c0" "$c1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, l = r["cluster"], r["local"]
secs, cpu = float(sys.argv[3]) - float(sys.argv[2]), float(sys.argv[5]) - float(sys.argv[4])
print(f"pass {c['pass']}: {secs:.1f} s, n1 {cpu:.1f} CPU s; examined {c['examined']} chunks "
      f"({c['examined'] / secs:,.0f}/s), condemned {c['condemned_chunks']}, swept {c['swept_chunks']}; "
      f"n1 packs {l['pack_bytes_before'] / 2**20:.1f} -> {l['pack_bytes_after'] / 2**20:.1f} MiB")
PY
done
sleep 10 # the other nodes reclaim once they applied the sweep
for n in "${!PID[@]}"; do
  printf '%-4s peak RSS %5s MiB   CPU %6s s   data %s\n' "$n" "$(hwm "${PID[$n]}")" "$(cpu_seconds "${PID[$n]}")" \
    "$(du -sh "$W/$n" | cut -f1)"
done
