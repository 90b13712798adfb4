#!/usr/bin/env bash
# Start the federation's coordinator: a Flower SuperLink (TLS, SuperNode authentication) bound to the
# loopback interface, behind nginx, the only thing listening on the network.
#
# Usage:
#   deploy/start-coordinator.sh --certs DIR --state DIR [--host 0.0.0.0] [--port 9093]
#       [--admin-port 9094] [--admin-network CIDR ...] [--superlink-port 9095]
#
#   --certs DIR         folder with ca.crt, coordinator.crt, coordinator.key (`medflower deploy certs`)
#   --state DIR         the SuperLink's database (registered nodes, runs), FLWR_HOME, the site
#                       directory (sites.json: `medflower deploy register`) and the proxy's files
#   --host/--port       where hospitals connect: nginx forwards only Flower's Fleet API, and only
#                       to a client certificate issued by the federation CA
#   --admin-port        where the administrator's `flwr` CLI connects (Control API only): from this
#                       host, and from each --admin-network (repeatable, e.g. 10.0.5.0/24); with no
#                       --admin-network it listens on 127.0.0.1 only
#   --superlink-port    the SuperLink's own port, on 127.0.0.1 (Fleet, Control and Runtime APIs)
#
# Flower 1.42 serves all three APIs on one port and has no account authentication on the Control
# API (`flwr run/ls/stop`, `flwr supernode register`): the proxy keeps hospitals to the Fleet API
# (medflower/deploy/proxy.py and deploy/README.md explain the design). The ServerApp
# (medflower.server.app:app) runs in a subprocess Flower starts for every `flwr run`, inherits
# MEDFLOWER_SITE_DIRECTORY and names every reply by the registered site of its node.
# Runtime installation of the app's dependencies is switched off: the image/venv already has them.
# If either the SuperLink or nginx exits, the other is stopped and the script exits with its
# status, for the service manager (systemd, compose's restart policy) to stop what is left (Flower
# runs the ServerApp in a session of its own) and restart both.
set -euo pipefail

CERTS="" STATE="" HOST="0.0.0.0" PORT="9093" ADMIN_PORT="9094" SL_PORT="9095" ADMIN_NETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --certs) CERTS="$2"; shift 2 ;;
    --state) STATE="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --admin-port) ADMIN_PORT="$2"; shift 2 ;;
    --admin-network) ADMIN_NETS+=("$2"); shift 2 ;;
    --superlink-port) SL_PORT="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "start-coordinator.sh: unknown argument '$1' (valid: --certs --state --host --port --admin-port --admin-network --superlink-port)" >&2; exit 2 ;;
  esac
done
[ -n "$CERTS" ] || { echo "start-coordinator.sh: --certs DIR is required" >&2; exit 2; }
[ -n "$STATE" ] || { echo "start-coordinator.sh: --state DIR is required" >&2; exit 2; }
for f in ca.crt coordinator.crt coordinator.key; do
  [ -r "$CERTS/$f" ] || { echo "start-coordinator.sh: $CERTS/$f is missing or unreadable (run \`medflower deploy certs\`)" >&2; exit 2; }
done
command -v nginx >/dev/null || { echo "start-coordinator.sh: nginx is not installed (Debian/Ubuntu: apt-get install nginx); it is the only process hospitals reach" >&2; exit 2; }
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# how often the SuperExec asks for a message to run (Flower default 1 s; 0.01-60): a round waits for it
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
export MEDFLOWER_SITE_DIRECTORY="${MEDFLOWER_SITE_DIRECTORY:-$STATE/sites.json}"

PROXY_ARGS=(--out "$STATE/proxy" --listen "$HOST:$PORT" --certs "$CERTS" --admin-port "$ADMIN_PORT" --superlink "127.0.0.1:$SL_PORT")
for net in ${ADMIN_NETS[@]+"${ADMIN_NETS[@]}"}; do PROXY_ARGS+=(--admin-network "$net"); done
CONF="$(medflower deploy proxy-config coordinator "${PROXY_ARGS[@]}")"

flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" \
  --ssl-certfile "$CERTS/coordinator.crt" \
  --ssl-keyfile "$CERTS/coordinator.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$STATE/superlink.db" \
  --host 127.0.0.1 --port "$SL_PORT" &
SUPERLINK=$!
nginx -p "$STATE/proxy" -c "$CONF" -e "$STATE/proxy/error.log" -g "daemon off;" &
PROXY=$!

stop() { kill -TERM "$SUPERLINK" "$PROXY" 2>/dev/null || true; }
trap 'stop; wait; exit 143' TERM INT
set +e
wait -n "$SUPERLINK" "$PROXY"
status=$?
stop
wait
exit "$status"
