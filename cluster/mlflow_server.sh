#!/usr/bin/env bash
# A shared MLflow tracking server: sqlite (or PostgreSQL) backend, artifacts served through the
# server (clients upload over HTTP, so nodes need no shared disk for artifacts), bound to 127.0.0.1.
#
#   cluster/mlflow_server.sh start     # prints the MLFLOW_TRACKING_URI workers and submitters use
#   cluster/mlflow_server.sh stop      # kills the server's whole process group
#
# Settings (environment): GRAFIT_MLFLOW_DIR (default runs/mlflow-server: database, artifacts, pid,
# log), MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1; 0.0.0.0 lets other machines log, and read, runs),
# MLFLOW_BACKEND (default sqlite:///<dir>/mlflow.db; e.g. postgresql://user:pw@db:5432/mlflow),
# MLFLOW_WORKERS (2), MLFLOW_START_TIMEOUT_S (180).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(realpath -m "${GRAFIT_MLFLOW_DIR:-$ROOT/runs/mlflow-server}")"
PORT="${MLFLOW_PORT:-5000}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
BACKEND="${MLFLOW_BACKEND:-sqlite:///$DIR/mlflow.db}"
MLFLOW="${MLFLOW:-$ROOT/.venv/bin/mlflow}"
[[ -x "$MLFLOW" ]] || MLFLOW=mlflow
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

# the address clients use: the bound one, or this machine's first address when bound to all
reach() { if [[ "$HOST" == 0.0.0.0 ]]; then hostname -I 2>/dev/null | awk '{print $1}'; else echo "$HOST"; fi; }
# never print a database password
shown_backend() { sed -E 's#//([^:/@]+):[^@]*@#//\1:***@#' <<< "$BACKEND"; }

start() {
  mkdir -p "$DIR/artifacts"
  if [[ -f "$DIR/pid" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
    echo "already running (pid $(cat "$DIR/pid"))"; exit 1
  fi
  # setsid: the server and its workers form one process group, stopped together
  setsid "$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$DIR/artifacts" \
    --host "$HOST" --port "$PORT" --workers "${MLFLOW_WORKERS:-2}" >"$DIR/server.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pid"
  local wait_s="${MLFLOW_START_TIMEOUT_S:-180}"      # a loaded machine takes a while to import the workers
  for _ in $(seq 1 $((wait_s * 2))); do
    if curl -sf "http://$(reach):$PORT/health" >/dev/null; then
      echo "MLflow server on http://$HOST:$PORT (pid $(cat "$DIR/pid"), backend $(shown_backend))"
      echo "export MLFLOW_TRACKING_URI=http://$(reach):$PORT"
      return 0
    fi
    kill -0 "$(cat "$DIR/pid")" 2>/dev/null || { cat "$DIR/server.log"; exit 1; }
    sleep 0.5
  done
  echo "MLflow server did not answer on :$PORT within $wait_s s; see $DIR/server.log"; stop; exit 1
}

stop() {
  [[ -f "$DIR/pid" ]] || { echo "not running"; return 0; }
  local pid; pid="$(cat "$DIR/pid")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/pid"; echo "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
