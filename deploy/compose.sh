#!/usr/bin/env bash
# The compose stack of deploy/compose.yaml:
#
#   deploy/compose.sh up      # build the images, make the PKI, a tenant key, a sample register
#                             # and the agent's configuration in $EXCLAVE_STACK, start the stack
#   deploy/compose.sh down    # stop it and remove its volumes
#
# Environment: EXCLAVE_STACK (default deploy/.stack), COMPOSE_PROJECT_NAME (default exclave),
# PROFILE/NO_BUILD as for deploy/images/build.sh, SIZE (MiB of sample register, default 8).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export EXCLAVE_STACK=${EXCLAVE_STACK:-$here/.stack}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-exclave}
compose() { docker-compose -f "$here/compose.yaml" "$@"; }

case "${1:-}" in
  up)
    "$here/images/build.sh"
    PROFILE=${PROFILE:-release}
    BIN=${CARGO_TARGET_DIR:-$here/../target}/$PROFILE
    S=$EXCLAVE_STACK
    if [ ! -f "$S/pki/ca.crt" ]; then
      mkdir -p "$S"
      R="$BIN/exclave-replicator"
      "$R" pki init --dir "$S/pki" >/dev/null
      for i in 1 2 3; do
        "$R" pki issue --dir "$S/pki" --role node --name "n$i" --host "172.31.213.1$i" >/dev/null
      done
      "$R" pki issue --dir "$S/pki" --role agent --name rnpp --tenant lux >/dev/null
      "$R" pki issue --dir "$S/pki" --role restore --name dr --tenant lux >/dev/null
      "$R" pki issue --dir "$S/pki" --role admin --name admin >/dev/null
      "$BIN/exclave-agent" keys init --tenant lux --out "$S/lux.key" >/dev/null
      "$BIN/exclave-sample-register" "$S/register" "${SIZE:-8}" >/dev/null
      cat > "$S/agent.toml" <<TOML
node = ["172.31.213.11:7401", "172.31.213.12:7401", "172.31.213.13:7401"]
pki = "/stack/pki"
identity = "rnpp"
key-file = "/stack/lux.key"
state-dir = "/data/state"
metrics-listen = "0.0.0.0:9465"
retry-secs = 5

[sources.register]
kind = "path"
paths = ["/stack/register"]
schedule = "*/30 * * * * *"
TOML
      # The programs run as uid 10001 in the images; the stack is theirs to read.
      chown -R 10001:10001 "$S"
      echo "stack state in $S (PKI, lux.key, register/, agent.toml)"
    fi
    compose up -d
    echo "Prometheus on http://127.0.0.1:9090; nodes at 172.31.213.11-13:7401"
    echo "restore: $BIN/exclave-restore snapshots --node 172.31.213.11:7401 --pki $S/pki --identity dr --key-file $S/lux.key"
    ;;
  down)
    compose down -v --remove-orphans
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
