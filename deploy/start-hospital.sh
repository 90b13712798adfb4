#!/usr/bin/env bash
# Start a hospital's node: a Flower SuperNode that signs every request with the hospital's
# registered key, and beside it an nginx sidecar that carries those requests to the coordinator over
# TLS with the hospital's client certificate. Nothing listens for inbound connections from outside:
# the two ports this script opens (the sidecar's and the SuperNode's local Runtime API, which the
# node's own ClientApp processes call) are bound to 127.0.0.1 only.
#
# Usage:
#   deploy/start-hospital.sh --coordinator HOST:PORT --ca ca.crt --key SITE.key \
#       --client-cert SITE.crt --client-key SITE.tls.key --state DIR \
#       (--site-config site.yaml | --node-config "partition-id=0 num-partitions=3") \
#       [--coordinator-name NAME] [--trusted-entities FILE] [--port PORT] [--proxy-port PORT] [--no-check]
#
#   --coordinator  the coordinator's address and hospital port (9093)
#   --coordinator-name
#                  a DNS name in the coordinator's certificate (default: the host of --coordinator;
#                  needed when that is an IP address: nginx checks certificates by name only)
#   --ca           the federation's CA certificate (from the administrator)
#   --key          this hospital's private node key (`medflower deploy node-key`)
#   --client-cert  this hospital's client certificate (the administrator signs its .csr)
#   --client-key   its key, <site>.tls.key (`medflower deploy node-key`)
#   --state DIR    this node's state folder: passed to the ClientApp as node config state-dir (its
#                  privacy ledger and audit log), FLWR_HOME (DIR/flwr-home) and the sidecar (DIR/proxy)
#   --site-config  this hospital's site YAML (its data, on this machine only)
#   --node-config  raw Flower node config instead (e.g. a simulated partition, for rehearsals)
#   --trusted-entities FILE
#                  run only app bundles signed by a publisher listed in FILE (Flower's
#                  `flower-supernode --trusted-entities`); empty or absent: run the bundle the
#                  coordinator sends (deploy/README.md, "Which code runs at your hospital")
#   --port         the SuperNode's local Runtime API port on 127.0.0.1 (`flower-supernode --port`),
#                  which its ClientApp processes connect to (default: a free port, printed)
#   --proxy-port   the sidecar's port on 127.0.0.1, which the SuperNode dials (default: a free port,
#                  printed); give both to run several hospitals' nodes on one host with fixed ports
#   --no-check     skip `medflower node check` before starting
#
# Why the sidecar: flower-supernode cannot present a TLS client certificate, which the coordinator's
# proxy requires (medflower/deploy/proxy.py). If the SuperNode or the sidecar exits, the other is
# stopped and the script exits with its status; when the SuperNode exits because the coordinator
# refused its key (not registered, or unregistered), the script says so and what to do.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

COORD="" COORD_NAME="" CA="" KEY="" CCERT="" CKEY="" SITE="" NODECFG="" STATE="" TRUST="" CHECK=1 PPORT="" NPORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) COORD="$2"; shift 2 ;;
    --coordinator-name) COORD_NAME="$2"; shift 2 ;;
    --ca) CA="$2"; shift 2 ;;
    --key) KEY="$2"; shift 2 ;;
    --client-cert) CCERT="$2"; shift 2 ;;
    --client-key) CKEY="$2"; shift 2 ;;
    --site-config) SITE="$2"; shift 2 ;;
    --node-config) NODECFG="$2"; shift 2 ;;
    --state) STATE="$2"; shift 2 ;;
    --trusted-entities) TRUST="$2"; shift 2 ;;
    --proxy-port) PPORT="$2"; shift 2 ;;
    --port) NPORT="$2"; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    *) echo "start-hospital.sh: unknown argument '$1' (valid: --coordinator --coordinator-name --ca --key --client-cert --client-key --state --site-config --node-config --trusted-entities --port --proxy-port --no-check)" >&2; exit 2 ;;
  esac
done
[ -n "$COORD" ] || { echo "start-hospital.sh: --coordinator HOST:PORT is required" >&2; exit 2; }
[ -n "$CA" ] || { echo "start-hospital.sh: --ca ca.crt is required" >&2; exit 2; }
[ -n "$KEY" ] || { echo "start-hospital.sh: --key SITE.key is required" >&2; exit 2; }
[ -n "$CCERT" ] || { echo "start-hospital.sh: --client-cert SITE.crt is required (the administrator signs your .csr)" >&2; exit 2; }
[ -n "$CKEY" ] || { echo "start-hospital.sh: --client-key SITE.tls.key is required" >&2; exit 2; }
[ -n "$STATE" ] || { echo "start-hospital.sh: --state DIR is required (this node's ledger, audit log and Flower state)" >&2; exit 2; }
if [ -n "$SITE" ] && [ -n "$NODECFG" ]; then
  echo "start-hospital.sh: give --site-config or --node-config, not both" >&2; exit 2
fi
case "$NODECFG" in *state-dir=*) echo "start-hospital.sh: --node-config must not set state-dir: give --state DIR" >&2; exit 2 ;; esac
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"  # absolute: the ClientApp runs elsewhere
case "$STATE" in *"'"*) echo "start-hospital.sh: --state $STATE: a quote in the path cannot go into the node config" >&2; exit 2 ;; esac
if [ -n "$SITE" ]; then
  [ -f "$SITE" ] || { echo "start-hospital.sh: --site-config $SITE: file not found" >&2; exit 2; }
  SITE="$(cd "$(dirname "$SITE")" && pwd)/$(basename "$SITE")"
  NODECFG="site-config='$SITE'"
fi
[ -n "$NODECFG" ] || { echo "start-hospital.sh: --site-config site.yaml (or --node-config) is required" >&2; exit 2; }
NODECFG="$NODECFG state-dir='$STATE'"
command -v nginx >/dev/null || { echo "start-hospital.sh: nginx is not installed (Debian/Ubuntu: apt-get install nginx); the sidecar presents the client certificate" >&2; exit 2; }

# A port not given is one the kernel reports free on 127.0.0.1 now (two nodes on one host cannot
# collide on Flower's default 9094); it is printed so that a person can find it again.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
for p in "$PPORT" "$NPORT"; do
  [[ -z "$p" || "$p" =~ ^[0-9]+$ ]] || { echo "start-hospital.sh: --port/--proxy-port $p: expected a port number" >&2; exit 2; }
done
[ -n "$PPORT" ] || { PPORT="$(free_port)"; echo "start-hospital.sh: sidecar on 127.0.0.1:$PPORT (--proxy-port not given: a free port)"; }
if [ -z "$NPORT" ]; then
  NPORT="$(free_port)"
  while [ "$NPORT" = "$PPORT" ]; do NPORT="$(free_port)"; done
  echo "start-hospital.sh: SuperNode's local Runtime API on 127.0.0.1:$NPORT (--port not given: a free port)"
fi
[ "$PPORT" != "$NPORT" ] || { echo "start-hospital.sh: --port and --proxy-port are both $PPORT: give two different ports" >&2; exit 2; }

SUPERNODE_ARGS=(--superlink "127.0.0.1:$PPORT" --host 127.0.0.1 --port "$NPORT" --root-certificates "$STATE/proxy/loopback-ca.crt" --auth-supernode-private-key "$KEY" --node-config "$NODECFG")
if [ -n "$TRUST" ]; then
  [ -f "$TRUST" ] || { echo "start-hospital.sh: --trusted-entities $TRUST: file not found" >&2; exit 2; }
  SUPERNODE_ARGS+=(--trusted-entities "$(cd "$(dirname "$TRUST")" && pwd)/$(basename "$TRUST")")
fi

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# how often the SuperExec asks for a message to run (Flower default 1 s; 0.01-60): a round waits for it
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
export FLWR_HOME="$STATE/flwr-home"
mkdir -p "$FLWR_HOME"

if [ "$CHECK" = 1 ]; then
  medflower node check --coordinator "$COORD" --ca "$CA" --key "$KEY" --client-cert "$CCERT" --client-key "$CKEY" --node-config "$NODECFG"
fi

PROXY_ARGS=(--out "$STATE/proxy" --listen "127.0.0.1:$PPORT" --coordinator "$COORD" --ca "$CA" --client-cert "$CCERT" --client-key "$CKEY")
[ -z "$COORD_NAME" ] || PROXY_ARGS+=(--coordinator-name "$COORD_NAME")
CONF="$(medflower deploy proxy-config hospital "${PROXY_ARGS[@]}")"

nginx -p "$STATE/proxy" -c "$CONF" -e "$STATE/proxy/error.log" -g "daemon off;" &
PROXY=$!
# the SuperNode's output goes to this terminal/journal as before, and to a log this script reads
# when the node exits (Flower's own message for a refused key names no cause and no action)
NODE_LOG="$STATE/supernode.log"
: > "$NODE_LOG"
# Warm ClientApp processes: Flower starts a new `flwr-clientapp` for every message, which imported
# torch/MONAI/Opacus again each time (seconds per message); a process that imported them once forks
# each one instead (deploy/warmstart.py; deploy/bin/flwr-clientapp asks it, first on the node's PATH,
# and runs Flower's own when it does not answer). Its socket is in a private folder of this run's.
WARM_DIR="$(mktemp -d "${TMPDIR:-/tmp}/medflower-warm.XXXXXX")"
export MEDFLOWER_CLIENTAPP_SOCKET="$WARM_DIR/clientapp.sock"
python3 "$HERE/warmstart.py" serve --socket "$MEDFLOWER_CLIENTAPP_SOCKET" > >(tee -a "$NODE_LOG") 2>&1 &
WARM=$!
PATH="$HERE/bin:$PATH" flower-supernode "${SUPERNODE_ARGS[@]}" > >(tee -a "$NODE_LOG") 2>&1 &
NODE=$!

stop() { kill -TERM "$NODE" "$PROXY" "$WARM" 2>/dev/null || true; rm -rf "$WARM_DIR"; }
trap 'stop; wait; exit 143' TERM INT
set +e
wait -n "$NODE" "$PROXY"
status=$?
stop
wait
if grep -q "Failed to activate SuperNode" "$NODE_LOG" 2>/dev/null; then
  # Flower: "Exit Code: 305 ... Failed to activate SuperNode." (the process itself exits with 1)
  PUB="${KEY%.key}.pub"
  FP="$(medflower node fingerprint --key "$KEY" 2>/dev/null || echo '?')"
  echo "start-hospital.sh: the coordinator refused this node: its key is not registered there (never registered, or unregistered). Send $PUB (key sha256 $FP) to the federation's administrator, who registers it (medflower deploy register --name SITE --key $(basename "$PUB")); then start this node again." >&2
fi
exit "$status"
