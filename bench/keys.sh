#!/usr/bin/env bash
# Benchmark: what sealed key files and key shares cost.
#
#   bench/keys.sh [SIZE_MIB] [ROUNDS]     (defaults 256 and 3; everything in a temporary directory)
#
# 1. Argon2id with the default parameters (256 MiB, 3 passes, 1 lane): the time and peak memory
#    to seal a key file (`keys init --passphrase-file`) and to open one (`keys unseal`, five
#    times: median, min, max);
# 2. `keys split` 3 of 5 and `keys combine` of three shares;
# 3. day-1 backups of the same sample register with a raw and with a sealed key file, ROUNDS
#    times each, alternated, to one storage node on loopback (each with a fresh key, so each
#    uploads everything): wall seconds, MB/s, agent CPU seconds. The sealed run includes one
#    unsealing; the difference between the two is what a sealed key costs a backup.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
SIZE=${1:-256}
ROUNDS=${2:-3}
[[ $SIZE =~ ^[1-9][0-9]*$ && $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "usage: bench/keys.sh [SIZE_MIB] [ROUNDS]"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
[ -x /usr/bin/time ] || die "GNU time is needed (apt-get install time)"
step() { printf '\n== %s\n' "$*"; }
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"

workdir exclave-keys-bench

step "build"
B=$W/bin
private_binaries "$B"
tool_binary exclave-sample-register "$B"
A=$B/exclave-agent
printf 'a passphrase for the benchmark\n' >"$W/pass"
chmod 600 "$W/pass"

# measure LABEL CMD...: wall seconds and peak RSS (MiB) of CMD.
measure() {
  local label=$1 t0 t1
  shift
  t0=$(date +%s%N)
  /usr/bin/time -f '%M' -o "$W/rss" "$@" >/dev/null
  t1=$(date +%s%N)
  printf '%s %s %s\n' "$label" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')" \
    "$(awk '{ printf "%.0f", $1 / 1024 }' "$W/rss")" >>"$W/results"
}
stats() { # stats LABEL: median min max of the wall seconds recorded under LABEL
  awk -v l="$1" '$1 == l { print $2 }' "$W/results" | sort -n |
    awk '{ v[NR] = $1 } END { printf "%.3f s (min %.3f, max %.3f, %d runs)", v[int((NR + 1) / 2)], v[1], v[NR], NR }'
}
rss() { awk -v l="$1" '$1 == l { if ($3 > m) m = $3 } END { print m }' "$W/results"; }

step "Argon2id with the default parameters"
measure seal "$A" keys init --tenant lux --out "$W/lux.key" --passphrase-file "$W/pass"
"$A" keys show "$W/lux.key" | sed -n '/sealed/p'
for i in 1 2 3 4 5; do
  cp "$W/lux.key" "$W/copy$i.key"
  measure unseal "$A" keys unseal --key-file "$W/copy$i.key" --passphrase-file "$W/pass"
done
echo "seal (keys init):     $(stats seal), peak RSS $(rss seal) MiB"
echo "unseal (keys unseal): $(stats unseal), peak RSS $(rss unseal) MiB"

step "shares: split 3 of 5, combine 3"
measure split "$A" keys split --key-file "$W/lux.key" --passphrase-file "$W/pass" --out "$W/shares"
measure combine "$B/exclave-restore" keys combine --out "$W/rebuilt.key" \
  --share "$W/shares/lux-share-1-of-5.txt" --share "$W/shares/lux-share-3-of-5.txt" --share "$W/shares/lux-share-5-of-5.txt"
echo "split (includes one unseal): $(stats split); combine: $(stats combine)"

step "day-1 backups of a ${SIZE} MiB sample register, raw and sealed key, alternated"
"$B/exclave-sample-register" "$W/register" "$SIZE" >/dev/null
sync
R=$B/exclave-replicator
"$R" pki init --dir "$W/pki" >/dev/null
"$R" pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
PORT=$((20000 + RANDOM % 20000))
"$R" run --name n1 --data "$W/node" --listen "127.0.0.1:$PORT" --pki "$W/pki" --min-free-mib 64 2>"$W/node.log" &
NODE_PID=$!
for _ in $(seq 100); do grep -q "storage node ready" "$W/node.log" && break; sleep 0.1; done
BYTES=$(du -sb "$W/register" | cut -f1)
# backup TENANT: one day-1 backup with TENANT's key; prints wall, user and system seconds.
backup() {
  /usr/bin/time -f '%e %U %S' -o "$W/t" "$A" backup --node "127.0.0.1:$PORT" --pki "$W/pki" --identity "$1" \
    --key-file "$W/$1.key" --passphrase-file "$W/pass" --source reg --quiet "$W/register" >/dev/null
  cat "$W/t"
}
# The first upload to a new store is slower (the register's pages, the store's first files):
# a warm-up round that is not counted.
"$R" pki issue --dir "$W/pki" --role agent --name warmup --tenant warmup >/dev/null
"$A" keys init --tenant warmup --out "$W/warmup.key" >/dev/null
echo "  warm-up (not counted): $(backup warmup | cut -d' ' -f1) s"
for i in $(seq "$ROUNDS"); do
  for kind in raw sealed; do
    t="$kind$i"
    "$R" pki issue --dir "$W/pki" --role agent --name "$t" --tenant "$t" >/dev/null
    if [ "$kind" = sealed ]; then
      "$A" keys init --tenant "$t" --out "$W/$t.key" --passphrase-file "$W/pass" >/dev/null
    else
      "$A" keys init --tenant "$t" --out "$W/$t.key" >/dev/null
    fi
    sync
    read -r wall user sys < <(backup "$t")
    printf '%s %s %s\n' "$kind" "$wall" "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')" >>"$W/backups"
    printf '  %-7s round %d: %6.2f s  %7.1f MB/s  agent CPU %s s\n' "$kind" "$i" "$wall" \
      "$(awk -v b="$BYTES" -v w="$wall" 'BEGIN { printf "%.1f", b / 1e6 / w }')" \
      "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')"
  done
done
median() { awk -v k="$1" -v f="$2" '$1 == k { print $f }' "$W/backups" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
RW=$(median raw 2); SW=$(median sealed 2); RC=$(median raw 3); SC=$(median sealed 3)
UNSEAL=$(awk '$1 == "unseal" { print $2 }' "$W/results" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
awk -v rw="$RW" -v sw="$SW" -v rc="$RC" -v sc="$SC" -v u="$UNSEAL" -v b="$BYTES" 'BEGIN {
  printf "median raw    %.2f s  %.1f MB/s  agent CPU %.2f s\n", rw, b / 1e6 / rw, rc
  printf "median sealed %.2f s  %.1f MB/s  agent CPU %.2f s (+%.2f s)\n", sw, b / 1e6 / sw, sc, sc - rc
  printf "sealed / raw wall time %.3f; less one unsealing (%.3f s) the sealed runs move %.1f MB/s against %.1f (ratio %.3f)\n",
    sw / rw, u, b / 1e6 / (sw - u), b / 1e6 / rw, rw / (sw - u)
}'
