#!/usr/bin/env bash
# Starts `alexnet-mp serve` in the background on a Ray head node: the one way every config in
# deploy/ (cluster.yaml, onprem.yaml, kuberay.yaml) starts the server, so that they cannot drift.
#
#   deploy/start-server.sh          start (stopping the server this script started before, if any)
#   deploy/start-server.sh stop     stop the server this script started
#   deploy/start-server.sh -- ARGS  start, passing ARGS on to `alexnet-mp serve`
#
# Settings, from the environment (defaults are the safe ones: loopback, no token needed):
#   ALEXNET_MP_HOST             127.0.0.1; any other address needs ALEXNET_MP_AUTH_TOKEN_FILE
#                               (the server refuses to start without it: README, "Running it on a network")
#   ALEXNET_MP_PORT             50051 (gRPC)          ALEXNET_MP_METRICS_PORT  9464 (-1: none)
#   ALEXNET_MP_AUTH_TOKEN_FILE  tokens clients must send (none: no authentication)
#   ALEXNET_MP_TLS_CERT, ALEXNET_MP_TLS_KEY, ALEXNET_MP_TLS_CLIENT_CA   TLS, and mutual TLS
#   ALEXNET_MP_DATA_ROOTS, ALEXNET_MP_CHECKPOINT_ROOTS  folders requests may use, ':'-separated
#   ALEXNET_MP_RAY_ADDRESS      auto (the Ray cluster on this node)
#   ALEXNET_MP_WAIT_FOR_RAY     seconds to wait for that Ray to answer first (0; KubeRay starts
#                               this script beside `ray start`, so it waits there)
#   ALEXNET_MP_RUN_DIR          ~/.alexnet-mp: serve.pid and serve.log
#   ALEXNET_MP_BIN              alexnet-mp (on PATH)
set -euo pipefail

run_dir="${ALEXNET_MP_RUN_DIR:-$HOME/.alexnet-mp}"
pid_file="$run_dir/serve.pid"
log_file="$run_dir/serve.log"
mkdir -p "$run_dir"

# Stops only the process this script started: the pid file's, and only while it still runs
# alexnet-mp (a reused pid belongs to someone else).
stop_previous() {
    [[ -f "$pid_file" ]] || return 0
    local pid
    pid="$(cat "$pid_file")"
    if [[ -n "$pid" ]] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "alexnet-mp serve"; then
        kill -TERM "$pid"  # the server stops its jobs at a step boundary, keeping checkpoints
        # Gone, or a zombie: exited, waiting for whoever adopted it to reap it.
        for _ in $(seq 600); do [[ "$(ps -o stat= -p "$pid")" == [^Z]* ]] || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        echo "stopped the server (pid $pid)"
    fi
    rm -f "$pid_file"
}

case "${1:-start}" in
    stop) stop_previous; exit 0 ;;
    start) shift || true ;;
    --) ;;
    *) echo "usage: $0 [start|stop] [-- SERVE ARGS]" >&2; exit 2 ;;
esac
[[ "${1:-}" == "--" ]] && shift
stop_previous

args=(serve --ray-address "${ALEXNET_MP_RAY_ADDRESS:-auto}" --host "${ALEXNET_MP_HOST:-127.0.0.1}"
      --port "${ALEXNET_MP_PORT:-50051}" --metrics-port "${ALEXNET_MP_METRICS_PORT:-9464}")
[[ -n "${ALEXNET_MP_AUTH_TOKEN_FILE:-}" ]] && args+=(--auth-token-file "$ALEXNET_MP_AUTH_TOKEN_FILE")
[[ -n "${ALEXNET_MP_TLS_CERT:-}" ]] && args+=(--tls-cert "$ALEXNET_MP_TLS_CERT" --tls-key "${ALEXNET_MP_TLS_KEY:?needs ALEXNET_MP_TLS_KEY}")
[[ -n "${ALEXNET_MP_TLS_CLIENT_CA:-}" ]] && args+=(--tls-client-ca "$ALEXNET_MP_TLS_CLIENT_CA")
IFS=: read -ra roots <<< "${ALEXNET_MP_DATA_ROOTS:-}"
for root in "${roots[@]}"; do args+=(--data-root "$root"); done
IFS=: read -ra roots <<< "${ALEXNET_MP_CHECKPOINT_ROOTS:-}"
for root in "${roots[@]}"; do args+=(--checkpoint-root "$root"); done
args+=("$@")

bin="${ALEXNET_MP_BIN:-alexnet-mp}"
wait_s="${ALEXNET_MP_WAIT_FOR_RAY:-0}"
# Detached (setsid, nohup): the server outlives the SSH session or hook that ran this script.
# With a wait, the same detached shell first polls Ray, so the caller never blocks on it.
setsid nohup bash -c '
    wait_s=$1; shift
    for _ in $(seq "$wait_s"); do ray health-check >/dev/null 2>&1 && break; sleep 1; done
    exec "$@"' start-server "$wait_s" "$bin" "${args[@]}" >> "$log_file" 2>&1 < /dev/null &
echo $! > "$pid_file"
echo "alexnet-mp serve started (pid $!), log: $log_file"
