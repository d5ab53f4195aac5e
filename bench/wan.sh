#!/usr/bin/env bash
# Benchmark: day 1, day 2 and a restore over an emulated embassy link, Exclave against restic
# and borg writing over SSH to a server at the embassy.
#
#   bench/wan.sh [SIZE_MIB] [RATE_MBIT] [DELAY_MS] [LOSS_PERCENT]     (default 256 100 20 0.1)
#
# BENCH_DATA=DIR keeps the generated register in DIR (as for bench/run.sh). Needs root
# (network namespaces, tc), restic, borgbackup, openssh-server and GNU time (installed when
# missing).
#
#   ns exwan-a (home: agent, restic, borg)            ns exwan-e (embassy)
#     relays 10.98.0.1:7001/udp, :2222/tcp  ──veth──  10.98.0.2: exclave-replicator :7001, sshd :22
#     (RATE_MBIT token bucket on both ends of the veth; LOSS_PERCENT of the packets dropped
#      at random each way by iptables' statistic match; DELAY_MS each way added by
#      chaos-tests' exclave-wan-relay: this kernel has no netem)
#
# Every tool crosses the same link: Exclave's QUIC through the UDP relay, restic's SFTP and
# borg's SSH through the TCP relay, every packet of each through the same token bucket and the
# same random loss. Bytes on the wire are the veth's counters, both directions. Day 2 deduplicates against day 1 on the same path; each restore is compared with
# `diff -r`.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

SIZE=${1:-256}
RATE=${2:-100}
DELAY=${3:-20}
LOSS=${4:-0.1}
[[ $SIZE =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer (got '$SIZE')"
[[ $RATE =~ ^[1-9][0-9]*$ ]] || die "RATE_MBIT must be a positive integer (got '$RATE')"
[[ $DELAY =~ ^[0-9]+$ ]] || die "DELAY_MS must be an integer (got '$DELAY')"
[ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc)"
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
GEN=$HERE/../../shared/bench/gen_register.py
[ -f "$GEN" ] || die "data generator not found: $GEN"
GEN=$(cd "$(dirname "$GEN")" && pwd)/$(basename "$GEN")
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}

missing=()
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
workdir exclave-wan

A=exwan-a E=exwan-e
PIDS=()
in_namespaces() { ip netns pids $A 2>/dev/null; ip netns pids $E 2>/dev/null; }
net_cleanup() {
  local p
  # The PIDs above are those of the background subshells running `inA` / `inE`, not of the
  # programs inside, which outlive them: stop whatever runs in the two namespaces.
  for p in $(in_namespaces); do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do [ -z "$(in_namespaces)" ] && break; sleep 0.1; done
  for p in $(in_namespaces); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del $A 2>/dev/null || true
  ip netns del $E 2>/dev/null || true
  workdir_cleanup
}
trap net_cleanup EXIT

step "build (release binaries and the link relay)"
B=$W/bin
private_binaries "$B"
tool_binary exclave-wan-relay "$B"

step "data: ${SIZE} MiB register, day 1 and day 2"
DATA=${BENCH_DATA:-$W/data}
register "$DATA" "$SIZE" "$GEN" "$W/gen.log"
SRC=$W/src/register
mkdir -p "$W/src"
cp -a "$DATA/day1" "$SRC"

step "link: ${RATE} Mbit/s token bucket, ${DELAY} ms each way, ${LOSS} % loss each way"
ip netns del $A 2>/dev/null || true
ip netns del $E 2>/dev/null || true
ip netns add $A
ip netns add $E
ip link add exwan0 type veth peer name exwan1
ip link set exwan0 netns $A
ip link set exwan1 netns $E
ip -n $A addr add 10.98.0.1/30 dev exwan0
ip -n $E addr add 10.98.0.2/30 dev exwan1
for ns in $A $E; do ip -n $ns link set lo up; done
# The relays are reached over loopback: at its 64 KiB MTU, QUIC's path MTU discovery finds
# 16 KiB datagrams that the relay then cannot send over the link's 1500, and the losses it
# takes for congestion cut Exclave's upload to a tenth. The home's path MTU is Ethernet's.
ip -n $A link set lo mtu 1500
ip -n $A link set exwan0 up
ip -n $E link set exwan1 up
# A queue of 50 ms at the rate, as a provider's shaper would keep.
BURST=$((RATE * 1000000 / 8 / 250))
LIMIT=$((RATE * 1000000 / 8 / 20))
tc -n $A qdisc add dev exwan0 root tbf rate "${RATE}mbit" burst "$BURST" limit "$LIMIT"
tc -n $E qdisc add dev exwan1 root tbf rate "${RATE}mbit" burst "$BURST" limit "$LIMIT"
if [ "$LOSS" != 0 ]; then
  P=$(awk -v l="$LOSS" 'BEGIN { printf "%.6f", l / 100 }')
  ip netns exec $A iptables -A INPUT -i exwan0 -m statistic --mode random --probability "$P" -j DROP
  ip netns exec $E iptables -A INPUT -i exwan1 -m statistic --mode random --probability "$P" -j DROP
fi
inA() { ip netns exec $A "$@"; }
inE() { ip netns exec $E "$@"; }
wire() { inA cat /sys/class/net/exwan0/statistics/tx_bytes /sys/class/net/exwan0/statistics/rx_bytes | paste -sd+ | bc; }

step "embassy: one Exclave storage node and an SSH server"
$B/exclave-replicator pki init --dir "$W/pki" --cluster wan >/dev/null
# Agents dial the relay's address: that is the name the node's certificate must carry.
$B/exclave-replicator pki issue --dir "$W/pki" --role node --name n1 --host 10.98.0.1 >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role agent --name reg --tenant bench >/dev/null
$B/exclave-replicator pki issue --dir "$W/pki" --role restore --name drteam --tenant bench >/dev/null
$B/exclave-agent keys init --tenant bench --out "$W/bench.key" >/dev/null
inE $B/exclave-replicator run --name n1 --data "$W/node" --listen 10.98.0.2:7001 --pki "$W/pki" 2>"$W/node.log" &
NODE_PID=$!
PIDS+=("$NODE_PID")
for _ in $(seq 200); do grep -q "storage node ready" "$W/node.log" && break; sleep 0.1; done
grep -q "storage node ready" "$W/node.log" || { cat "$W/node.log" >&2; die "storage node did not start"; }

mkdir -p /run/sshd "$W/ssh"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/host" >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/client" >/dev/null
cp "$W/ssh/client.pub" "$W/ssh/authorized_keys"
chmod 700 "$W/ssh"; chmod 600 "$W/ssh/authorized_keys"
cat >"$W/ssh/sshd_config" <<EOF
ListenAddress 10.98.0.2:22
HostKey $W/ssh/host
AuthorizedKeysFile $W/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
EOF
inE /usr/sbin/sshd -D -e -f "$W/ssh/sshd_config" 2>"$W/sshd.log" &
PIDS+=($!)
cat >"$W/ssh/config" <<EOF
Host embassy
  HostName 10.98.0.1
  Port 2222
  User root
  IdentityFile $W/ssh/client
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF

inA $B/exclave-wan-relay --udp --listen 10.98.0.1:7001 --to 10.98.0.2:7001 --delay-ms "$DELAY" 2>"$W/relay-udp.log" &
PIDS+=($!)
inA $B/exclave-wan-relay --tcp --listen 10.98.0.1:2222 --to 10.98.0.2:22 --delay-ms "$DELAY" 2>"$W/relay-tcp.log" &
PIDS+=($!)
for _ in $(seq 50); do inA ssh -F "$W/ssh/config" embassy true 2>/dev/null && break; sleep 0.2; done
inA ssh -F "$W/ssh/config" embassy true || { cat "$W/sshd.log" >&2; die "ssh over the relay does not work"; }
echo "   node and sshd at 10.98.0.2, reached through the relays at 10.98.0.1"

AGENT=(--node 10.98.0.1:7001 --pki "$W/pki" --identity reg --key-file "$W/bench.key" --delta-cache "$W/delta-cache")
RESTORE=(--node 10.98.0.1:7001 --pki "$W/pki" --identity drteam --key-file "$W/bench.key")
export RESTIC_REPOSITORY=sftp:embassy:$W/restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache
RESTIC_SFTP=(-o "sftp.command=ssh -F $W/ssh/config embassy -s sftp")
export BORG_REPO=ssh://embassy$W/borg BORG_PASSPHRASE=bench BORG_BASE_DIR=$W/borg-home
export BORG_RSH="ssh -F $W/ssh/config" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
inA restic "${RESTIC_SFTP[@]}" init --repository-version 2 >"$W/restic-init.log" 2>&1 || { cat "$W/restic-init.log" >&2; die "restic init failed"; }
inA borg init --encryption=repokey-blake2 >"$W/borg-init.log" 2>&1 || { cat "$W/borg-init.log" >&2; die "borg init failed"; }

declare -A WALL WIRE
run_timed() {
  local label=$1 t0 t1 b0 rc=0
  shift
  sync
  b0=$(wire)
  t0=$(date +%s%N)
  inA "$@" >"$W/out.$label" 2>&1 || rc=$?
  t1=$(date +%s%N)
  if [ "$rc" != 0 ]; then tail -n 30 "$W/out.$label" >&2; die "$label failed (exit $rc)"; fi
  WALL[$label]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  WIRE[$label]=$(($(wire) - b0))
  printf '   %-16s %8.2f s  %10.2f MB on the wire\n' "$label" "${WALL[$label]}" "$(awk -v b="${WIRE[$label]}" 'BEGIN { print b / 1e6 }')"
}

step "day 1 backups"
run_timed exclave_day1 $B/exclave-agent backup "${AGENT[@]}" --source reg --json "$SRC"
run_timed restic_day1 restic "${RESTIC_SFTP[@]}" backup --quiet --compression auto "$SRC"
run_timed borg_day1 borg create --compression zstd,3 ::day1 "$SRC"

step "day 2 backups"
python3 - "$DATA/day2" "$SRC" <<'PY'
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for d, dirs, files in os.walk(dst, topdown=False):
    rel = os.path.relpath(d, dst)
    for f in files:
        if not os.path.exists(os.path.join(src, rel, f)):
            os.remove(os.path.join(d, f))
    if not os.path.exists(os.path.join(src, rel)):
        os.rmdir(d)
for d, dirs, files in os.walk(src):
    rel = os.path.relpath(d, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for f in files:
        a, b = os.path.join(d, f), os.path.join(dst, rel, f)
        if not os.path.exists(b) or open(a, 'rb').read() != open(b, 'rb').read():
            shutil.copy2(a, b + '.tmp'); os.replace(b + '.tmp', b)
PY
diff -r "$DATA/day2" "$SRC" >/dev/null || die "$SRC differs from day 2 after the update"
run_timed exclave_day2 $B/exclave-agent backup "${AGENT[@]}" --source reg --json "$SRC"
run_timed restic_day2 restic "${RESTIC_SFTP[@]}" backup --quiet --compression auto "$SRC"
run_timed borg_day2 borg create --compression zstd,3 ::day2 "$SRC"

step "restores of day 2 over the link, each compared with diff -r"
run_timed exclave_restore $B/exclave-restore restore "${RESTORE[@]}" --source reg --snapshot latest --to "$W/r-exclave"
diff -r "$SRC" "$W/r-exclave/register" >/dev/null || die "Exclave restore differs from the source"
run_timed restic_restore restic "${RESTIC_SFTP[@]}" restore --quiet latest --target "$W/r-restic"
diff -r "$SRC" "$W/r-restic$SRC" >/dev/null || die "restic restore differs from the source"
mkdir -p "$W/r-borg"
run_timed borg_restore bash -c 'cd "$1" && exec borg extract ::day2' _ "$W/r-borg"
diff -r "$SRC" "$W/r-borg/${SRC#/}" >/dev/null || die "borg restore differs from the source"
echo "   every restore identical to the source"

step "results (${SIZE} MiB register over ${RATE} Mbit/s, ${DELAY} ms each way, ${LOSS} % loss each way; MB = 10^6 bytes)"
{
  for k in "${!WALL[@]}"; do echo "wall_$k ${WALL[$k]}"; echo "wire_$k ${WIRE[$k]}"; done
} >"$W/results"
python3 - "$W/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    r[k] = float(v)
print(f"{'tool':<8} {'day1 s':>8} {'day1 MB':>9} {'day2 s':>8} {'day2 MB':>9} {'restore s':>10} {'restore MB':>11}")
for t in ("exclave", "restic", "borg"):
    print(f"{t:<8} {r[f'wall_{t}_day1']:>8.2f} {r[f'wire_{t}_day1'] / 1e6:>9.2f} {r[f'wall_{t}_day2']:>8.2f} "
          f"{r[f'wire_{t}_day2'] / 1e6:>9.2f} {r[f'wall_{t}_restore']:>10.2f} {r[f'wire_{t}_restore'] / 1e6:>11.2f}")
print()
checks = [
    ("restic day2 time / exclave day2 time", r["wall_restic_day2"] / r["wall_exclave_day2"], 5.0),
    ("borg day2 time / exclave day2 time", r["wall_borg_day2"] / r["wall_exclave_day2"], 5.0),
]
failed = 0
for name, value, target in checks:
    ok = value >= target
    failed += not ok
    print(f"{name:<40} {value:>8.2f}   target >= {target:<4g} {'PASS' if ok else 'FAIL'}")
print(f"\n{len(checks) - failed} of {len(checks)} targets met")
PY
