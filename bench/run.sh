#!/usr/bin/env bash
# Benchmark: Exclave against restic and borg on the shared synthetic register.
#
#   bench/run.sh [SIZE_MIB]        (default 1024; everything lives in a temporary directory)
#
# BENCH_DATA=DIR keeps the generated register in DIR (generated there on the first run, reused
# by later runs of the same size), since generating 1 GiB takes minutes. BENCH_SEALED_KEY=1
# runs Exclave with a key file sealed under a passphrase. VYKAR_BIN_DIR=DIR (holding `vykar`
# and `vykar-server`, built by you from github.com/borgbase/vykar) adds vykar backing up through
# its REST server on loopback, the closest peer to Exclave's client and storage node.
# BENCH_NO_DELTAS=1 runs Exclave's day 2 with changed chunks sent whole (no delta cache).
#
# 1. builds the release binaries and the stage benchmark (benches/stages.rs) and runs private
#    copies of them;
# 2. generates day 1 and day 2 of the register with ../shared/bench/gen_register.py;
# 3. measures the single-thread stage throughputs on day 1 and the resulting stage limit;
# 4. copies day 1 to a stable path, backs it up with each tool, brings the same path to day 2
#    (changed files rewritten and renamed as a dump job would, unchanged files left alone),
#    backs it up again, restores the latest snapshot and compares it with `diff -r`;
# 5. prints MB/s (10^6 bytes per second of wall time), day-2 upload, peak RSS and the ratios
#    against the targets.
#
# Exclave runs one storage node on loopback (QUIC, mutual TLS); restic and borg write local
# repositories on the same disk. Needs restic, borgbackup and GNU time (installed when run as
# root and missing).
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

SIZE=${1:-1024}
[[ $SIZE =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer (got '$SIZE')"
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
GEN=$HERE/../../shared/bench/gen_register.py
[ -f "$GEN" ] || die "data generator not found: $GEN (expected ../shared/bench/gen_register.py beside the repository)"
GEN=$(cd "$(dirname "$GEN")" && pwd)/$(basename "$GEN")
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}

missing=()
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: apt-get install ${missing[*]}"
  echo "installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v python3 >/dev/null || die "python3 is needed"

step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"

workdir exclave-bench

step "build (release binaries and the stage benchmark)"
B=$W/bin
private_binaries "$B"
STAGES=$(cargo bench --bench stages --no-run --quiet --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "stages" and m.get("executable"):
        print(m["executable"])')
[ -x "$STAGES" ] || die "stage benchmark executable not found"
cp "$STAGES" "$B/"
STAGES=$B/$(basename "$STAGES")

# timed LABEL CMD...: runs CMD under GNU time; records wall seconds and peak RSS (KiB) and
# reports them on fd 3 (the script's stdout), so CMD's own stdout can be redirected.
exec 3>&1
declare -A WALL RSS CPU NODECPU
# The server a tool's timed run talks to: its CPU is counted apart.
server_pid() { case $1 in exclave*) echo "$NODE_PID" ;; vykar*) echo "$SERVER_PID" ;; esac; }
timed() {
  local label=$1 t0 t1 rc=0 n0=
  shift
  # Each run starts with nothing dirty in the page cache: what an earlier step wrote (the
  # copy of the data, another tool's repository) is not flushed on this run's time.
  sync
  local spid
  spid=$(server_pid "$label")
  [ -n "$spid" ] && n0=$(cpu_seconds "$spid")
  t0=$(date +%s%N)
  /usr/bin/time -v -o "$W/time.$label" "$@" || rc=$?
  t1=$(date +%s%N)
  if [ "$rc" != 0 ]; then
    tail -n 30 "$W/time.$label" >&2
    if [[ $label == exclave* ]] && [ -f "$W/node.log" ]; then echo "-- node log (last 30 lines):" >&2; tail -n 30 "$W/node.log" >&2; fi
    die "$label failed (exit $rc): $*"
  fi
  WALL[$label]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  RSS[$label]=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$W/time.$label")
  CPU[$label]=$(awk -F': ' '/(User|System) time \(seconds\)/ { s += $2 } END { printf "%.2f", s }' "$W/time.$label")
  local extra=
  if [ -n "$n0" ]; then
    NODECPU[$label]=$(awk -v a="$n0" -v b="$(cpu_seconds "$spid")" 'BEGIN { printf "%.2f", b - a }')
    extra="  CPU ${CPU[$label]} s + server ${NODECPU[$label]} s"
  else
    extra="  CPU ${CPU[$label]} s"
  fi
  printf '   %-16s %8.2f s  peak RSS %6.1f MiB%s\n' "$label" "${WALL[$label]}" "$(awk -v k="${RSS[$label]}" 'BEGIN { print k / 1024 }')" "$extra" >&3
}
bytes() { du -sb "$1" | cut -f1; }

step "data: ${SIZE} MiB register, day 1 and day 2 ($GEN)"
DATA=${BENCH_DATA:-$W/data}
register "$DATA" "$SIZE" "$GEN" "$W/gen.log"

step "stage throughputs on day 1 (single thread, MB/s)"
"$STAGES" "$DATA/day1" | tee "$W/stages.txt"       # = cargo bench --bench stages -- DIR
LIMIT=$(awk '$1 == "limit_mbps" { print $2 }' "$W/stages.txt")
CORES=$(awk '$1 == "limit_mbps" { print $4 }' "$W/stages.txt")
[ -n "$LIMIT" ] || die "stage benchmark printed no limit"

# One stable path for every tool and both days: day 2 must deduplicate against day 1.
SRC=$W/src/register
mkdir -p "$W/src"
cp -a "$DATA/day1" "$SRC"
D1=$(bytes "$SRC")

step "Exclave: PKI, tenant key, one storage node"
$B/exclave-replicator pki init --dir "$W/pki" --cluster bench >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role agent --name reg --tenant bench >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role restore --name drteam --tenant bench >/dev/null
if [ -n "${BENCH_SEALED_KEY:-}" ]; then
  # BENCH_SEALED_KEY=1: the agent and the restore open a key sealed under a passphrase
  # (Argon2id, default parameters) on every run, as a key a person holds would be.
  printf 'bench passphrase\n' >"$W/pass"; chmod 600 "$W/pass"
  export EXCLAVE_PASSPHRASE_FILE=$W/pass
  $B/exclave-agent keys init --tenant bench --out "$W/bench.key" --passphrase-file "$W/pass" >/dev/null
else
  $B/exclave-agent keys init --tenant bench --out "$W/bench.key" >/dev/null
fi
PORT=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
NODE=127.0.0.1:$PORT
$B/exclave-replicator run --name n1 --data "$W/node" --listen "$NODE" --pki "$W/pki" 2>"$W/node.log" &
NODE_PID=$!
for _ in $(seq 200); do grep -q "storage node ready" "$W/node.log" && break; sleep 0.1; done
grep -q "storage node ready" "$W/node.log" || { cat "$W/node.log" >&2; die "storage node did not start"; }
echo "   node on $NODE"
AGENT=(--node "$NODE" --pki "$W/pki" --identity reg --key-file "$W/bench.key")
RESTORE=(--node "$NODE" --pki "$W/pki" --identity drteam --key-file "$W/bench.key")
# Changed chunks go as deltas on the chunks they replaced (agent/src/deltas.rs).
if [ -n "${BENCH_NO_DELTAS:-}" ]; then DELTAS=(--no-deltas); else DELTAS=(--delta-cache "$W/delta-cache"); fi

VYKAR=
if [ -n "${VYKAR_BIN_DIR:-}" ]; then
  [ -x "$VYKAR_BIN_DIR/vykar" ] && [ -x "$VYKAR_BIN_DIR/vykar-server" ] || die "VYKAR_BIN_DIR must hold vykar and vykar-server"
  VYKAR=$VYKAR_BIN_DIR
  VPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$W/vykar-data"
  VYKAR_TOKEN=bench "$VYKAR/vykar-server" -l "127.0.0.1:$VPORT" -d "$W/vykar-data" >"$W/vykar-server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$VPORT" 2>/dev/null && break; sleep 0.1; done
  cat >"$W/vykar.yaml" <<VYKAR_CONFIG
repositories:
  - label: server
    url: "http://127.0.0.1:$VPORT"
    access_token: "bench"
    allow_insecure_http: true
sources:
  - "$SRC"
cache_dir: "$W/vykar-cache"
VYKAR_CONFIG
  export VYKAR_PASSPHRASE=bench
  "$VYKAR/vykar" --config "$W/vykar.yaml" init >"$W/vykar-init.log" 2>&1 || { cat "$W/vykar-init.log" >&2; die "vykar init failed"; }
  echo "   vykar-server on 127.0.0.1:$VPORT"
fi

export RESTIC_REPOSITORY=$W/restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache
restic init --repository-version 2 >"$W/restic-init.log" 2>&1 || { cat "$W/restic-init.log" >&2; die "restic init failed"; }
export BORG_REPO=$W/borg BORG_PASSPHRASE=bench BORG_BASE_DIR=$W/borg-home
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
borg init --encryption=repokey-blake2 >"$W/borg-init.log" 2>&1 || { cat "$W/borg-init.log" >&2; die "borg init failed"; }

step "day 1 backups ($D1 bytes)"
timed exclave_day1 $B/exclave-agent backup "${AGENT[@]}" "${DELTAS[@]}" --source reg --json "$SRC" >"$W/exclave_day1.json"
timed restic_day1 restic backup --quiet --compression auto "$SRC"
timed borg_day1 borg create --compression zstd,3 ::day1 "$SRC"
[ -z "$VYKAR" ] || timed vykar_day1 "$VYKAR/vykar" --config "$W/vykar.yaml" backup >>"$W/vykar.log" 2>&1

step "day 2: bring $SRC to day 2"
python3 - "$DATA/day2" "$SRC" <<'PY'
import filecmp, os, shutil, sys
new, dst = sys.argv[1], sys.argv[2]
for d, dirs, files in os.walk(dst, topdown=False):          # what day 2 no longer has
    rel = os.path.relpath(d, dst)
    for f in files:
        if not os.path.lexists(os.path.join(new, rel, f)):
            os.remove(os.path.join(d, f))
    for x in dirs:
        if not os.path.isdir(os.path.join(new, rel, x)):
            shutil.rmtree(os.path.join(d, x))
changed = 0
for d, dirs, files in os.walk(new):                          # what is new or changed
    t = os.path.join(dst, os.path.relpath(d, new))
    os.makedirs(t, exist_ok=True)
    for f in files:
        s, o = os.path.join(d, f), os.path.join(t, f)
        if (os.path.exists(o) and os.stat(s).st_mtime_ns == os.stat(o).st_mtime_ns
                and filecmp.cmp(s, o, shallow=False)):
            continue
        shutil.copy2(s, o + ".tmp")                          # a new file renamed into place
        os.replace(o + ".tmp", o)
        changed += 1
print(f"   {changed} files written")
PY
diff -r "$DATA/day2" "$SRC" >/dev/null || die "$SRC differs from day 2 after the update"
D2=$(bytes "$SRC")

step "day 2 backups ($D2 bytes)"
NODE0=$(bytes "$W/node"); RESTIC0=$(bytes "$W/restic"); BORG0=$(bytes "$W/borg"); VYKAR0=$(bytes "$W/vykar-data" 2>/dev/null || echo 0)
timed exclave_day2 $B/exclave-agent backup "${AGENT[@]}" "${DELTAS[@]}" --source reg --json "$SRC" >"$W/exclave_day2.json"
timed restic_day2 restic backup --quiet --compression auto "$SRC"
timed borg_day2 borg create --compression zstd,3 ::day2 "$SRC"
[ -z "$VYKAR" ] || timed vykar_day2 "$VYKAR/vykar" --config "$W/vykar.yaml" backup >>"$W/vykar.log" 2>&1
NODE1=$(bytes "$W/node"); RESTIC1=$(bytes "$W/restic"); BORG1=$(bytes "$W/borg"); VYKAR1=$(bytes "$W/vykar-data" 2>/dev/null || echo 0)
EX_UP=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["uploaded_bytes"])' "$W/exclave_day2.json")

step "restores of the latest snapshot, each compared with diff -r"
timed exclave_restore $B/exclave-restore restore "${RESTORE[@]}" --source reg --snapshot latest --to "$W/r-exclave" >"$W/exclave_restore.log"
diff -r "$SRC" "$W/r-exclave/register" >/dev/null || die "Exclave restore differs from the source"
rm -rf "$W/r-exclave"
timed restic_restore restic restore --quiet latest --target "$W/r-restic"
diff -r "$SRC" "$W/r-restic$SRC" >/dev/null || die "restic restore differs from the source"
rm -rf "$W/r-restic"
mkdir "$W/r-borg"
timed borg_restore bash -c 'cd "$1" && exec borg extract ::day2' _ "$W/r-borg"
diff -r "$SRC" "$W/r-borg/${SRC#/}" >/dev/null || die "borg restore differs from the source"
rm -rf "$W/r-borg"
if [ -n "$VYKAR" ]; then
  timed vykar_restore "$VYKAR/vykar" --config "$W/vykar.yaml" restore latest "$W/r-vykar" >>"$W/vykar.log" 2>&1
  # vykar restores a source's files at the top of the target.
  diff -r "$SRC" "$W/r-vykar" >/dev/null || die "vykar restore differs from the source"
  rm -rf "$W/r-vykar"
fi
echo "   every restore identical to the source"

step "results (${SIZE} MiB register; MB = 10^6 bytes; day-1 MB/s on $D1 bytes, day-2 and restore on $D2)"
{
  echo "d1 $D1"; echo "d2 $D2"; echo "limit $LIMIT"; echo "cores $CORES"
  for k in "${!WALL[@]}"; do echo "wall_$k ${WALL[$k]}"; echo "rss_$k ${RSS[$k]}"; echo "cpu_$k ${CPU[$k]}"; done
  for k in "${!NODECPU[@]}"; do echo "nodecpu_$k ${NODECPU[$k]}"; done
  echo "up_exclave $EX_UP"; echo "up_restic $((RESTIC1 - RESTIC0))"; echo "up_borg $((BORG1 - BORG0))"
  [ -z "$VYKAR" ] || echo "up_vykar $((VYKAR1 - VYKAR0))"
  echo "node_growth $((NODE1 - NODE0))"
  echo "store_exclave $NODE1"; echo "store_restic $RESTIC1"; echo "store_borg $BORG1"
  # The node's ballast is free space it keeps in reserve for a full disk (a constant 64 MiB),
  # not stored data.
  echo "ballast_exclave $(bytes "$W/node/ballast" 2>/dev/null || echo 0)"
  echo "delta_cache $(bytes "$W/delta-cache" 2>/dev/null || echo 0)"
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print("delta_chunks", d["delta_chunks"]); print("delta_bytes", d["delta_bytes"])' "$W/exclave_day2.json"
} >"$W/results"
python3 - "$W/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    r[k] = float(v)
MiB = 1024 * 1024
def mbps(tool, phase):
    return (r["d1"] if phase == "day1" else r["d2"]) / r[f"wall_{tool}_{phase}"] / 1e6
print(f"{'tool':<8} {'day1 MB/s':>10} {'day2 MB/s':>10} {'restore MB/s':>13} {'day2 upload MiB':>16} "
      f"{'backup RSS MiB':>15} {'restore RSS MiB':>16}")
tools = ["exclave", "restic", "borg"] + (["vykar"] if "wall_vykar_day1" in r else [])
for t in tools:
    rss_b = max(r[f"rss_{t}_day1"], r[f"rss_{t}_day2"]) / 1024
    print(f"{t:<8} {mbps(t, 'day1'):>10.1f} {mbps(t, 'day2'):>10.1f} {mbps(t, 'restore'):>13.1f} "
          f"{r[f'up_{t}'] / MiB:>16.2f} {rss_b:>15.1f} {r[f'rss_{t}_restore'] / 1024:>16.1f}")
store_data = r["store_exclave"] - r["ballast_exclave"]
print(f"stage limit {r['limit']:.1f} MB/s on {int(r['cores'])} cores; "
      f"node data grew {r['node_growth'] / MiB:.2f} MiB on day 2 (restic, borg: repository growth)")
print(f"day 2 deltas: {int(r['delta_chunks'])} chunks, {r['delta_bytes'] / MiB:.2f} MiB; agent delta cache "
      f"{r['delta_cache'] / MiB:.1f} MiB; store after both days: exclave {r['store_exclave'] / MiB:.1f} MiB "
      f"({store_data / MiB:.1f} without its {r['ballast_exclave'] / MiB:.0f} MiB ballast), "
      f"restic {r['store_restic'] / MiB:.1f}, borg {r['store_borg'] / MiB:.1f}")
print()
# Every process shares this machine's cores: the CPU each one used shows where the time went,
# and what the client alone could do if the storage node ran on a machine of its own (as it
# does in a deployment).
cores = r["cores"]
print(f"{'CPU seconds':<16} {'client':>8} {'node':>8} {'node share':>11} {'client-only bound MB/s':>23}   "
      f"(restic, borg: CPU s)")
for phase, size in (("day1", r["d1"]), ("day2", r["d2"]), ("restore", r["d2"])):
    c, n = r[f"cpu_exclave_{phase}"], r[f"nodecpu_exclave_{phase}"]
    print(f"{phase:<16} {c:>8.2f} {n:>8.2f} {n / max(c + n, 1e-9):>10.0%} {size / 1e6 / max(c / cores, 1e-9):>23.1f}   "
          f"({r[f'cpu_restic_{phase}']:.2f}, {r[f'cpu_borg_{phase}']:.2f})")
print()
ex_rss = max(r["rss_exclave_day1"], r["rss_exclave_day2"]) / 1024
if "vykar" in tools:
    print(f"{'vykar (REST)':<16} " + "  ".join(
        f"{phase} client {r[f'cpu_vykar_{phase}']:.2f} + server {r[f'nodecpu_vykar_{phase}']:.2f}"
        for phase in ("day1", "day2", "restore")))
    print()
checks = [
    ("exclave day1 MB/s / restic day1 MB/s", mbps("exclave", "day1") / mbps("restic", "day1"), ">=", 2.0),
    ("exclave day1 MB/s / borg day1 MB/s", mbps("exclave", "day1") / mbps("borg", "day1"), ">=", 2.0),
    ("exclave restore MB/s / restic restore MB/s", mbps("exclave", "restore") / mbps("restic", "restore"), ">=", 2.0),
    ("exclave day1 MB/s / stage limit", mbps("exclave", "day1") / r["limit"], ">=", 0.70),
    ("exclave agent peak RSS MiB", ex_rss, "<=", 256.0),
    ("exclave day2 upload MB (10^6 bytes)", r["up_exclave"] / 1e6, "<=", 15.0),
    ("exclave store (no ballast) / restic repository, both days", store_data / r["store_restic"], "<=", 0.65),
]
if "vykar" in tools:
    checks.append(("exclave day1 MB/s / vykar (REST) day1 MB/s", mbps("exclave", "day1") / mbps("vykar", "day1"), ">=", 1.0))
failed = 0
for name, value, op, target in checks:
    ok = value >= target if op == ">=" else value <= target
    failed += not ok
    print(f"{name:<44} {value:>8.2f}   target {op} {target:<6g} {'PASS' if ok else 'FAIL'}")
print(f"\n{len(checks) - failed} of {len(checks)} targets met")
PY
