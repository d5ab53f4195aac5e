#!/usr/bin/env bash
# Builds the images the compose stack runs, from our own binaries and Debian's Prometheus,
# with no registry: each is `FROM scratch` plus the program and the shared libraries `ldd`
# names.
#
#   deploy/images/build.sh                 # release build, then images exclave:local, exclave-prometheus:local
#   PROFILE=debug NO_BUILD=1 deploy/images/build.sh    # the binaries already built (the tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-target}
BIN="$TARGET/$PROFILE"
if [ -z "${NO_BUILD:-}" ]; then
  if [ "$PROFILE" = release ]; then cargo build --release --bins; else cargo build --bins; fi
fi
command -v docker >/dev/null || { echo "docker is needed" >&2; exit 1; }
PROMETHEUS=$(command -v prometheus || echo /usr/bin/prometheus)
[ -x "$PROMETHEUS" ] || { echo "prometheus is needed (apt-get install prometheus)" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# rootfs DIR FILE...: the files, stripped, and every library they load, at their paths.
rootfs() {
  local dir=$1; shift
  mkdir -p "$dir/usr/local/bin" "$dir/tmp" "$dir/etc" "$(dirname "$dir")/data"
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0::/:/nonexistent\nexclave:x:10001:10001::/data:/nonexistent\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nexclave:x:10001:\n' > "$dir/etc/group"
  for f in "$@"; do
    strip -o "$dir/usr/local/bin/$(basename "$f")" "$f"
    ldd "$f" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
      cp --parents -L -n "$lib" "$dir/"
    done
  done
}

rootfs "$ctx/exclave/rootfs" "$BIN/exclave-replicator" "$BIN/exclave-agent" "$BIN/exclave-restore" \
  "$BIN/exclave-sample-register"
cat > "$ctx/exclave/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
# The data directory belongs to the programs' user; a named volume mounted there inherits it.
COPY --chown=10001:10001 data /data
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/exclave-replicator"]
DOCKERFILE
docker build -q -t exclave:local "$ctx/exclave" >/dev/null

rootfs "$ctx/prometheus/rootfs" "$PROMETHEUS"
mkdir -p "$ctx/prometheus/rootfs/etc/prometheus"
cp deploy/prometheus/alerts.yml "$ctx/prometheus/rootfs/etc/prometheus/"
cat > "$ctx/prometheus/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data /prometheus
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=:9090"]
DOCKERFILE
docker build -q -t exclave-prometheus:local "$ctx/prometheus" >/dev/null
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^exclave(-prometheus)?:local '
