#!/usr/bin/env bash
# Start the federation's coordinator: a Flower SuperLink with TLS and SuperNode authentication on.
#
# Usage:
#   deploy/start-coordinator.sh --certs DIR --state DIR [--host 0.0.0.0] [--port 9093]
#
#   --certs DIR   folder with ca.crt, coordinator.crt, coordinator.key (`medflower deploy certs`)
#   --state DIR   where the SuperLink keeps its database (registered hospitals, runs) and FLWR_HOME
#   --host/--port the address the SuperLink listens on; Fleet (hospitals), Control (`flwr` CLI)
#                 and Runtime (the ServerApp) APIs all share this one HTTPS port in Flower 1.42
#
# The ServerApp (medflower.server.app:app) runs in a subprocess that Flower starts for every `flwr run`.
# Runtime installation of the app's dependencies is switched off: the image/venv already has them,
# and `uv sync` at run time would pull a different (CUDA) torch from the internet.
set -euo pipefail

CERTS="" STATE="" HOST="0.0.0.0" PORT="9093"
while [ $# -gt 0 ]; do
  case "$1" in
    --certs) CERTS="$2"; shift 2 ;;
    --state) STATE="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "start-coordinator.sh: unknown argument '$1' (valid: --certs --state --host --port)" >&2; exit 2 ;;
  esac
done
[ -n "$CERTS" ] || { echo "start-coordinator.sh: --certs DIR is required" >&2; exit 2; }
[ -n "$STATE" ] || { echo "start-coordinator.sh: --state DIR is required" >&2; exit 2; }
for f in ca.crt coordinator.crt coordinator.key; do
  [ -r "$CERTS/$f" ] || { echo "start-coordinator.sh: $CERTS/$f is missing or unreadable (run \`medflower deploy certs\`)" >&2; exit 2; }
done
mkdir -p "$STATE"

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"

exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" \
  --ssl-certfile "$CERTS/coordinator.crt" \
  --ssl-keyfile "$CERTS/coordinator.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$STATE/superlink.db" \
  --host "$HOST" --port "$PORT"
