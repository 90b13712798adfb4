#!/usr/bin/env bash
# Start a hospital's node: a Flower SuperNode that dials the coordinator over TLS and signs every
# request with the hospital's registered key. Nothing listens for inbound connections.
#
# Usage:
#   deploy/start-hospital.sh --coordinator HOST:PORT --ca ca.crt --key SITE.key \
#       (--site-config site.yaml | --node-config "partition-id=0 num-partitions=3") \
#       [--state DIR] [--trusted-entities FILE] [--no-check]
#
#   --coordinator  the address in the coordinator's certificate (a name or IP it lists) and port
#   --ca           the federation's CA certificate (from the administrator)
#   --key          this hospital's private node key (`medflower deploy node-key`)
#   --site-config  this hospital's site YAML (its data, on this machine only)
#   --node-config  raw Flower node config instead (e.g. a simulated partition, for rehearsals)
#   --state DIR    FLWR_HOME for this node (default: ~/.flwr)
#   --trusted-entities FILE
#                  run only app bundles signed by a publisher listed in FILE (Flower's
#                  `flower-supernode --trusted-entities`); empty or absent: run the bundle the
#                  coordinator sends (deploy/README.md, "Which code runs at your hospital")
#   --no-check     skip `medflower node check` before starting
set -euo pipefail

COORD="" CA="" KEY="" SITE="" NODECFG="" STATE="" TRUST="" CHECK=1
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) COORD="$2"; shift 2 ;;
    --ca) CA="$2"; shift 2 ;;
    --key) KEY="$2"; shift 2 ;;
    --site-config) SITE="$2"; shift 2 ;;
    --node-config) NODECFG="$2"; shift 2 ;;
    --state) STATE="$2"; shift 2 ;;
    --trusted-entities) TRUST="$2"; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "start-hospital.sh: unknown argument '$1' (valid: --coordinator --ca --key --site-config --node-config --state --trusted-entities --no-check)" >&2; exit 2 ;;
  esac
done
[ -n "$COORD" ] || { echo "start-hospital.sh: --coordinator HOST:PORT is required" >&2; exit 2; }
[ -n "$CA" ] || { echo "start-hospital.sh: --ca ca.crt is required" >&2; exit 2; }
[ -n "$KEY" ] || { echo "start-hospital.sh: --key SITE.key is required" >&2; exit 2; }
if [ -n "$SITE" ] && [ -n "$NODECFG" ]; then
  echo "start-hospital.sh: give --site-config or --node-config, not both" >&2; exit 2
fi
if [ -n "$SITE" ]; then
  [ -f "$SITE" ] || { echo "start-hospital.sh: --site-config $SITE: file not found" >&2; exit 2; }
  SITE="$(cd "$(dirname "$SITE")" && pwd)/$(basename "$SITE")"  # the ClientApp runs elsewhere
  NODECFG="site-config='$SITE'"
fi
[ -n "$NODECFG" ] || { echo "start-hospital.sh: --site-config site.yaml (or --node-config) is required" >&2; exit 2; }
SUPERNODE_ARGS=(--superlink "$COORD" --root-certificates "$CA" --auth-supernode-private-key "$KEY" --node-config "$NODECFG")
if [ -n "$TRUST" ]; then
  [ -f "$TRUST" ] || { echo "start-hospital.sh: --trusted-entities $TRUST: file not found" >&2; exit 2; }
  SUPERNODE_ARGS+=(--trusted-entities "$(cd "$(dirname "$TRUST")" && pwd)/$(basename "$TRUST")")
fi

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
if [ -n "$STATE" ]; then mkdir -p "$STATE"; export FLWR_HOME="$STATE"; fi

if [ "$CHECK" = 1 ]; then
  medflower node check --coordinator "$COORD" --ca "$CA" --key "$KEY" --node-config "$NODECFG"
fi

exec flower-supernode "${SUPERNODE_ARGS[@]}"
