#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: one head and N worker nodes, each a separate
# `ray start` with its own temp dir and its share of the CPUs, token authentication on, and the
# dashboard / job server bound to 127.0.0.1.
#
#   cluster/local.sh start [WORKERS]   # default 1 worker node
#   cluster/local.sh env               # the exports a shell needs to talk to it (eval "$(...)")
#   cluster/local.sh status
#   cluster/local.sh kill-node I       # SIGKILL worker node I as a crash would: its raylet, agents and
#                                      # every process they started (a lost node, for fault tests)
#   cluster/local.sh stop              # stops this cluster's nodes (other Rays of the machine keep running)
#
# Settings (environment): GRAFIT_CLUSTER_DIR (state: node temp dirs, token, storage; default
# runs/cluster), RAY_PORT (GCS, 6379), DASHBOARD_PORT (8265), AGENT_PORT (52365: node I's dashboard
# agent, which runs submitted jobs, listens on AGENT_PORT + I, so that another Ray of the machine does
# not hold it), HEAD_CPUS / WORKER_CPUS (default: the cores split evenly over the nodes: logical CPUs of
# nodes on one machine add up), DASHBOARD_HOST
# (127.0.0.1; anything else exposes the job server, which runs arbitrary code, to the network).
# The nodes start with MLFLOW_TRACKING_URI (default http://127.0.0.1:$MLFLOW_PORT, the server of
# cluster/mlflow_server.sh) and GRAFIT_STORAGE ($GRAFIT_CLUSTER_DIR/storage): every job inherits
# them, so `ray job submit ... -- grafit train ...` records its run and checkpoints there; and
# GRAFIT_MLFLOW_CREDENTIALS, the credentials file of that server ($GRAFIT_MLFLOW_DIR/credentials).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$(realpath -m "${GRAFIT_CLUSTER_DIR:-$ROOT/runs/cluster}")"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
AGENT_PORT="${AGENT_PORT:-52365}"
# jobs run with the `python` of whoever started the nodes: start them inside the project's venv
if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/ray" ]]; then
  export PATH="$ROOT/.venv/bin:$PATH" VIRTUAL_ENV="$ROOT/.venv"
fi
export RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
# token authentication: every node, job and client must present this token
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$STATE/auth_token}"
# where every job on these nodes records its runs and checkpoints (not its temporary working dir)
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://127.0.0.1:${MLFLOW_PORT:-5000}}"
export GRAFIT_STORAGE="${GRAFIT_STORAGE:-$STATE/storage}"
# the file of MLflow credentials cluster/mlflow_server.sh writes (a path: the password stays in it)
MLFLOW_STATE="$(realpath -m "${GRAFIT_MLFLOW_DIR:-$ROOT/runs/mlflow-server}")"
export GRAFIT_MLFLOW_CREDENTIALS="${GRAFIT_MLFLOW_CREDENTIALS-$MLFLOW_STATE/credentials}"   # empty: none

print_env() {
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT   # job server, for grafit submit / ray job"
  echo "export GRAFIT_STORAGE=$GRAFIT_STORAGE                   # checkpoints: every node reaches it"
  echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI          # the nodes' tracking server"
  echo "export GRAFIT_MLFLOW_CREDENTIALS=$GRAFIT_MLFLOW_CREDENTIALS   # its credentials file"
}

start() {
  local workers="${1:-1}" nodes cores
  nodes=$((workers + 1)); cores="$(nproc)"
  local share=$((cores / nodes)); ((share >= 1)) || share=1
  local head_cpus="${HEAD_CPUS:-$share}" worker_cpus="${WORKER_CPUS:-$share}"
  if [[ -n "$(temp_root)" && -n "$(node_pids "$(temp_root)/n")" ]]; then
    echo "start: a cluster of $STATE is running (temp $(temp_root)): cluster/local.sh stop first" >&2; exit 2
  fi
  mkdir -p "$STATE/storage"
  [[ "$GRAFIT_STORAGE" == *://* ]] || mkdir -p "$GRAFIT_STORAGE"
  if [[ "$RAY_AUTH_MODE" == token && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
  fi
  # Ray keeps unix sockets under the temp dir (107-byte path limit): keep node dirs short
  local tmp; tmp="$(mktemp -d /tmp/grafit-ray-XXXXXX)"; echo "$tmp" > "$STATE/temp_root"
  echo "head: $head_cpus CPUs, GCS :$RAY_PORT, dashboard http://$DASHBOARD_HOST:$DASHBOARD_PORT (temp $tmp/n0)"
  ray start --head --port="$RAY_PORT" --num-cpus="$head_cpus" --num-gpus=0 \
    --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
    --temp-dir="$tmp/n0" --disable-usage-stats >"$STATE/head.log" 2>&1 \
    || { cat "$STATE/head.log"; exit 1; }
  for i in $(seq 1 "$workers"); do
    echo "worker node $i: $worker_cpus CPUs (temp $tmp/n$i)"
    ray start --address="127.0.0.1:$RAY_PORT" --num-cpus="$worker_cpus" --num-gpus=0 \
      --dashboard-agent-listen-port="$((AGENT_PORT + i))" \
      --temp-dir="$tmp/n$i" --disable-usage-stats >"$STATE/worker$i.log" 2>&1 \
      || { cat "$STATE/worker$i.log"; exit 1; }
  done
  print_env
}

temp_root() {  # this cluster's node temp root, only if it is one that start made (never a bare pattern)
  local tmp
  tmp="$(cat "$STATE/temp_root" 2>/dev/null || true)"
  if [[ "$tmp" =~ ^/tmp/grafit-ray-[A-Za-z0-9]{6}$ ]]; then echo "$tmp"; fi
}

node_pids() {  # node_pids PATTERN: the processes naming PATTERN and every process they started
  local pids frontier
  pids="$(pgrep -f -- "$1" | tr '\n' ' ' || true)"
  frontier="$pids"
  # workers the raylet forks rename themselves (ray::...): they are found as descendants
  while [[ -n "${frontier// /}" ]]; do
    frontier="$(pgrep -P "$(echo $frontier | tr ' ' ',')" | tr '\n' ' ' || true)"
    pids="$pids $frontier"
  done
  echo $pids
}

kill_node() {
  local i="${1:?usage: cluster/local.sh kill-node I (a worker node, 1..N)}" pids
  [[ "$i" =~ ^[1-9][0-9]*$ ]] || { echo "kill-node: $i is not a worker node number (1..N)" >&2; exit 2; }
  [[ -n "$(temp_root)" ]] || { echo "kill-node: no cluster started from $STATE" >&2; exit 2; }
  pids="$(node_pids "$(temp_root)/n$i/")"
  [[ -n "$pids" ]] || { echo "kill-node: worker node $i has no process" >&2; exit 1; }
  kill -9 $pids 2>/dev/null || true
  echo "worker node $i killed: $(echo $pids | wc -w) processes (SIGKILL)"
}

stop() {  # this cluster's nodes only (their temp dirs), not other Rays of the machine
  local tmp pids
  tmp="$(temp_root)"
  if [[ -n "$tmp" ]]; then
    pids="$(node_pids "$tmp/n")"
    if [[ -n "$pids" ]]; then
      kill $pids 2>/dev/null || true
      for _ in $(seq 20); do sleep 0.5; pgrep -f -- "$tmp/n" >/dev/null || break; done
      pids="$(node_pids "$tmp/n")"      # what is left now (a pid collected before may be reused)
      [[ -z "$pids" ]] || kill -9 $pids 2>/dev/null || true
    fi
    rm -rf "$tmp"
  fi
  rm -f "$STATE/temp_root"
  echo "stopped"
}

case "${1:-}" in
  start) start "${2:-1}" ;;
  kill-node) kill_node "${2:-}" ;;
  stop) stop ;;
  status) ray status --address="127.0.0.1:$RAY_PORT" ;;
  env) print_env ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
