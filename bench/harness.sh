# Sourced by the benchmark scripts: what they share.
#
#   register DIR SIZE_MIB GENERATOR LOG     the shared synthetic register, generated or reused
#   private_binaries DIR                    release build, copied to DIR
#   tool_binary NAME DIR                    a release build of chaos-tests' NAME, copied to DIR
#   cpu_seconds PID                         CPU seconds (user + system) PID has used so far
#   pgbackrest_conf DIR PGDATA PORT SOCKET [EXTRA]
#                                           DIR/pgbackrest.conf: the pgBackRest every benchmark
#                                           compares with (encrypted repository in DIR/pgbr, zstd;
#                                           stanza `bench`), EXTRA lines added to [global]
#   workdir PREFIX                          W: a temporary directory, removed on exit with the
#                                           storage node NODE_PID and another tool's server
#                                           SERVER_PID if they were started
#
# register:
#
# Generates day 1 and day 2 of a SIZE_MIB register into DIR with GENERATOR
# (../shared/bench/gen_register.py), or reuses DIR when it already holds a register of that
# size (BENCH_DATA=DIR in the scripts: generating 1 GiB takes minutes). DIR must otherwise be
# absent or empty: nothing is ever deleted.
register() {
  local dir=$1 size=$2 gen=$3 log=$4
  if [ -f "$dir/dataset.json" ] && python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["size_mib"] != float(sys.argv[2]))' "$dir/dataset.json" "$size"; then
    echo "   reusing $dir"
  else
    [ ! -e "$dir" ] || [ -z "$(ls -A "$dir")" ] || die "$dir holds something other than a ${size} MiB register; give an empty or new directory"
    python3 "$gen" --out "$dir" --size-mib "$size" >"$log" 2>&1 || { cat "$log" >&2; die "data generation failed"; }
  fi
  [ -d "$dir/day1" ] && [ -d "$dir/day2" ] || die "the generator did not write day1/ and day2/ in $dir"
  # What the generator wrote is still being flushed: no timed run should pay for it.
  sync
}

# Builds the release binaries and copies them to DIR: a later build into the shared target
# directory cannot swap them in the middle of a run.
private_binaries() {
  cargo build --release --workspace --bins --quiet
  mkdir -p "$1"
  cp "$CARGO_TARGET_DIR"/release/exclave-{agent,replicator,restore} "$1/"
}

# The benchmarks' own tools (register generator, catalog loader, link relay), like the above.
tool_binary() {
  cargo build --release -p exclave-chaos-tests --bin "$1" --quiet
  mkdir -p "$2"
  cp "$CARGO_TARGET_DIR/release/$1" "$2/"
}

cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }

workdir() {
  W=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  NODE_PID=
  SERVER_PID=
  trap workdir_cleanup EXIT
  trap 'exit 130' INT TERM
}
workdir_cleanup() {
  local p
  for p in $NODE_PID $SERVER_PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}

pgbackrest_conf() {
  local dir=$1 pgdata=$2 port=$3 socket=$4 extra=${5:-}
  mkdir -p "$dir/pgbr" "$dir/pgbr-log" "$dir/pgbr-lock"
  cat >"$dir/pgbackrest.conf" <<CONF
[global]
repo1-path=$dir/pgbr
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=bench-only-passphrase-0123456789
compress-type=zst
log-path=$dir/pgbr-log
lock-path=$dir/pgbr-lock
log-level-console=warn
$extra
[bench]
pg1-path=$pgdata
pg1-port=$port
pg1-socket-path=$socket
CONF
}
