#!/usr/bin/env bash
# Benchmark: the embassy cluster against a single node, in one run on this machine.
#
#   bench/cluster.sh [SIZE_MIB] [COMMITS]     (defaults 512 and 40; all in a temporary directory)
#
# BENCH_DATA=DIR keeps the generated register in DIR between runs (see bench/harness.sh).
#
# 1. builds the release binaries and generates day 1 of ../shared/bench/gen_register.py;
# 2. day-1 backup into one node, then into a cluster of three nodes on loopback (Raft
#    catalog, write quorum of two): MB/s of each and the ratio (target: cluster >= 0.70);
# 3. commit latency: COMMITS small backups into each, the agent's `commit_secs` (p50, p99);
# 4. backfill: a fourth node that missed day 1 joins with `cluster add-node`; the time until
#    it holds every chunk and is promoted to voter.
# All processes share this machine's cores: compare the ratios, not the absolute figures.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

SIZE=${1:-512}
COMMITS=${2:-40}
[[ $SIZE =~ ^[1-9][0-9]*$ && $COMMITS =~ ^[1-9][0-9]*$ ]] || die "usage: bench/cluster.sh [SIZE_MIB] [COMMITS]"
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
GEN=$HERE/../../shared/bench/gen_register.py
[ -f "$GEN" ] || die "data generator not found: $GEN"
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
[ -x /usr/bin/time ] || die "GNU time is needed (apt-get install time)"
step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"

W=$(mktemp -d "${TMPDIR:-/tmp}/exclave-cluster-bench.XXXXXX")
declare -A PID
cleanup() {
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "build"
B=$W/bin
private_binaries "$B"

step "data: ${SIZE} MiB register, day 1"
DATA=${BENCH_DATA:-$W/data}
register "$DATA" "$SIZE" "$GEN" "$W/gen.log"
SRC=$DATA/day1

$B/exclave-replicator pki init --dir "$W/pki" --cluster bench >/dev/null
for n in solo n1 n2 n3 n4; do $B/exclave-replicator pki issue --dir "$W/pki" --role node --name $n --host 127.0.0.1 >/dev/null; done
$B/exclave-replicator pki issue --dir "$W/pki" --role agent --name reg --tenant bench >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role admin --name admin >/dev/null
$B/exclave-agent keys init --tenant bench --out "$W/bench.key" >/dev/null
port() { python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -A ADDR
for n in solo n1 n2 n3 n4; do ADDR[$n]=127.0.0.1:$(port); done

start() { # start NAME [ARGS...]
  local n=$1
  shift
  $B/exclave-replicator run --name "$n" --data "$W/$n" --listen "${ADDR[$n]}" --pki "$W/pki" "$@" 2>>"$W/$n.log" &
  PID[$n]=$!
  for _ in $(seq 200); do grep -q "storage node ready" "$W/$n.log" && return; sleep 0.1; done
  cat "$W/$n.log" >&2
  die "$n did not start"
}
peers_of() { local m; for m in n1 n2 n3; do [ "$m" != "$1" ] && printf -- '--peer %s=%s ' "$m" "${ADDR[$m]}"; done; }
json_field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
backup() { # backup OUT_JSON NODE_NAME PATH; the agent's CPU seconds go to $W/agent.cpu
  /usr/bin/time -o "$W/agent.cpu" -f '%U %S' \
    $B/exclave-agent backup --node "${ADDR[$2]}" --pki "$W/pki" --identity reg --key-file "$W/bench.key" \
    --source "$(basename "$3")" --json "$3" >"$1"
}
node_cpu() { cpu_seconds "${PID[$1]}"; }
# day1 LABEL NODE_NAME NODES...: the timed day-1 backup through NODE_NAME; prints the CPU
# seconds of the agent and of each of NODES during it.
day1() {
  local label=$1 via=$2 n
  shift 2
  declare -A before
  sync
  for n in "$@"; do before[$n]=$(node_cpu "$n"); done
  backup "$W/$label.json" "$via" "$SRC"
  printf '   CPU seconds: agent %s' "$(awk '{ printf "%.2f", $1 + $2 }' "$W/agent.cpu")"
  for n in "$@"; do printf ', %s %s' "$n" "$(awk -v a="${before[$n]}" -v b="$(node_cpu "$n")" 'BEGIN { printf "%.2f", b - a }')"; done
  echo
}
latency() { # latency NODE_NAME: COMMITS small backups; prints p50 and p99 of commit_secs in ms
  local i
  mkdir -p "$W/small-$1"
  : >"$W/lat-$1"
  for i in $(seq "$COMMITS"); do
    echo "$1 $i $RANDOM" >"$W/small-$1/note.txt"
    backup "$W/small.json" "$1" "$W/small-$1"
    json_field "$W/small.json" commit_secs >>"$W/lat-$1"
  done
  python3 - "$W/lat-$1" <<'PY'
import sys
v = sorted(float(x) * 1000 for x in open(sys.argv[1]))
q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
print(f"{q(0.5):.1f} {q(0.99):.1f}")
PY
}

step "single node: day 1, then ${COMMITS} commits"
start solo
day1 solo solo solo
SOLO_MBPS=$(json_field "$W/solo.json" mb_per_s)
read -r SOLO_P50 SOLO_P99 < <(latency solo)
kill "${PID[solo]}"; wait "${PID[solo]}" 2>/dev/null || true; unset 'PID[solo]'

step "three-node cluster: day 1, then ${COMMITS} commits"
for n in n1 n2 n3; do
  # shellcheck disable=SC2046
  start $n $(peers_of $n)
done
ADMIN=(--node "${ADDR[n1]}" --pki "$W/pki")
for _ in $(seq 100); do
  $B/exclave-replicator cluster status "${ADMIN[@]}" --json 2>/dev/null | grep -q '"leader": "n' && break; sleep 0.2
done
day1 cluster n1 n1 n2 n3
CLUSTER_MBPS=$(json_field "$W/cluster.json" mb_per_s)
read -r CL_P50 CL_P99 < <(latency n1)

step "backfill: n4 missed day 1 and joins"
# shellcheck disable=SC2046
start n4 --join $(for m in n1 n2 n3; do printf -- '--peer %s=%s ' "$m" "${ADDR[$m]}"; done)
T0=$(date +%s%N)
$B/exclave-replicator cluster add-node "${ADMIN[@]}" --name n4 --addr "${ADDR[n4]}" 2>/dev/null
T1=$(date +%s%N)
BACKFILL=$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
$B/exclave-replicator cluster status "${ADMIN[@]}"
STORED=$(du -sb "$W/n4/packs" | cut -f1)   # the chunks themselves (not the index nor the ballast)

step "results (${SIZE} MiB day 1, $(nproc) cores shared by every process)"
python3 - "$SOLO_MBPS" "$CLUSTER_MBPS" "$SOLO_P50" "$SOLO_P99" "$CL_P50" "$CL_P99" "$BACKFILL" "$STORED" <<'PY'
import sys
solo, cl, sp50, sp99, cp50, cp99, bf, stored = (float(x) for x in sys.argv[1:])
print(f"day-1 backup, single node      {solo:8.1f} MB/s")
print(f"day-1 backup, 3-node cluster   {cl:8.1f} MB/s   ratio {cl / solo:.2f}  (target >= 0.70: {'met' if cl / solo >= 0.7 else 'NOT met'})")
print(f"commit latency, single node    p50 {sp50:6.1f} ms   p99 {sp99:6.1f} ms")
print(f"commit latency, 3-node cluster p50 {cp50:6.1f} ms   p99 {cp99:6.1f} ms")
print(f"backfill of a new node          {bf:6.2f} s for {stored / 2**20:.0f} MiB on disk ({stored / 1e6 / max(bf, 1e-9):.0f} MB/s), then promoted to voter")
PY
