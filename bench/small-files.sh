#!/usr/bin/env bash
# Benchmark: restoring many small files (a document store), Exclave against restic, in one run.
#
#   bench/small-files.sh [TREE] [ROUNDS]     (defaults /usr/share/doc, 3; root: it mounts a
#                                            fresh ext4 file system for the restores)
#
# Both tools back up TREE once (one node on loopback for Exclave, a local repository for
# restic), then restore it ROUNDS times each, alternated, into new directories on a fresh ext4
# file system (a 3 GiB image in /dev/shm, loop-mounted): on a file system aged by millions of
# files created and deleted, both spend their time in ext4's inode allocation and the figures
# say nothing about the tools. Prints seconds per restore and the ratio.
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
TREE=${1:-/usr/share/doc}
ROUNDS=${2:-3}
[ -d "$TREE" ] || die "usage: bench/small-files.sh [TREE] [ROUNDS]"
[ "$(id -u)" = 0 ] || die "run as root (mounts a fresh file system)"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/exclave-target}
command -v restic >/dev/null || apt-get install -y -q restic >/dev/null
# shellcheck source=bench/harness.sh
. "$HERE/harness.sh"
workdir exclave-small-files
MNT=$W/fresh
IMG=$(mktemp /dev/shm/exclave-small-files.XXXXXX)
cleanup() { umount -l "$MNT" 2>/dev/null || true; rm -f "$IMG"; workdir_cleanup; }
trap cleanup EXIT
truncate -s 3G "$IMG" && mkfs.ext4 -q -F "$IMG" && mkdir -p "$MNT" && mount -o loop "$IMG" "$MNT"

B=$W/bin
private_binaries "$B"
"$B/exclave-replicator" pki init --dir "$W/pki" >/dev/null
"$B/exclave-replicator" pki issue --dir "$W/pki" --role node --name n1 --host 127.0.0.1 >/dev/null
"$B/exclave-replicator" pki issue --dir "$W/pki" --role agent --name a --tenant lux >/dev/null
"$B/exclave-replicator" pki issue --dir "$W/pki" --role restore --name dr --tenant lux >/dev/null
"$B/exclave-agent" keys init --tenant lux --out "$W/lux.key" >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$B/exclave-replicator" run --name n1 --data "$W/n1" --listen "127.0.0.1:$PORT" --pki "$W/pki" >"$W/n1.log" 2>&1 &
NODE_PID=$!
sleep 1.5
"$B/exclave-agent" backup --node "127.0.0.1:$PORT" --pki "$W/pki" --identity a --key-file "$W/lux.key" --source tree "$TREE" >/dev/null
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$W/restic
restic init -q >/dev/null
restic backup -q "$TREE" >/dev/null
echo "tree $TREE: $(find "$TREE" -type f | wc -l) files, $(find "$TREE" -type d | wc -l) directories, $(du -sh "$TREE" | cut -f1)"
secs() { local t0; t0=$(date +%s.%N); "$@" >/dev/null; python3 -c "print($(date +%s.%N) - $t0)"; }
for i in $(seq 1 "$ROUNDS"); do
  sync
  ex=$(secs "$B/exclave-restore" restore --node "127.0.0.1:$PORT" --pki "$W/pki" --identity dr --key-file "$W/lux.key" --source tree --to "$MNT/ex$i")
  sync
  rs=$(secs restic restore -q latest --target "$MNT/rs$i")
  python3 -c "print(f'round $i: exclave {$ex:.2f} s, restic {$rs:.2f} s, ratio (restic / exclave) {$rs / $ex:.2f}')"
  rm -rf "$MNT/ex$i" "$MNT/rs$i"
done
