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
#
# Authentication is on (MLflow's basic-auth app): without credentials the API answers 401. The
# first start writes, readable by this user only, into GRAFIT_MLFLOW_DIR: `secret_key` (Flask's
# MLFLOW_FLASK_SERVER_SECRET_KEY), `auth.ini` (the auth database auth.db beside it, the admin
# user and its generated password) and `credentials`, the file clients read: point
# GRAFIT_MLFLOW_CREDENTIALS at it (every node must reach it, like RAY_AUTH_TOKEN_PATH; never put
# the password in a job's runtime_env, which Ray stores and shows). MLFLOW_ADMIN_PASSWORD (>= 12
# characters) sets the admin password of a new auth database instead of a generated one.
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

# the secret key, the auth config and the clients' credentials file, once (0600: this user only)
auth_files() {
  (umask 077
   [[ -s "$DIR/secret_key" ]] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/secret_key"
   if [[ ! -s "$DIR/auth.ini" ]]; then
     local password="${MLFLOW_ADMIN_PASSWORD:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')}"
     if (( ${#password} < 12 )) || [[ "$password" == *%* ]]; then
       echo "MLFLOW_ADMIN_PASSWORD: at least 12 characters, no % (MLflow reads its config with interpolation)" >&2
       exit 1
     fi
     printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/auth.db\nadmin_username = admin\n%s\n%s\n' \
       "$DIR" "admin_password = $password" \
       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" > "$DIR/auth.ini"
     printf '[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = %s\n' "$password" \
       > "$DIR/credentials"
   fi
   if [[ ! -s "$DIR/credentials" ]]; then       # deleted: written again from the auth config
     printf '[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = %s\n' \
       "$(sed -n 's/^admin_password = //p' "$DIR/auth.ini")" > "$DIR/credentials"
   fi)
}

start() {
  mkdir -p "$DIR/artifacts"
  chmod 700 "$DIR"                              # the auth database, the secret key, the credentials
  auth_files
  if [[ -f "$DIR/pid" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
    echo "already running (pid $(cat "$DIR/pid"))"; exit 1
  fi
  # setsid: the server and its workers form one process group, stopped together
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$DIR/secret_key")" MLFLOW_AUTH_CONFIG_PATH="$DIR/auth.ini" \
    setsid "$MLFLOW" server --app-name basic-auth --backend-store-uri "$BACKEND" \
    --artifacts-destination "$DIR/artifacts" --host "$HOST" --port "$PORT" --workers "${MLFLOW_WORKERS:-2}" \
    >"$DIR/server.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pid"
  local wait_s="${MLFLOW_START_TIMEOUT_S:-180}"      # a loaded machine takes a while to import the workers
  for _ in $(seq 1 $((wait_s * 2))); do
    if curl -sf "http://$(reach):$PORT/health" >/dev/null; then
      echo "MLflow server on http://$HOST:$PORT (pid $(cat "$DIR/pid"), backend $(shown_backend))"
      echo "export MLFLOW_TRACKING_URI=http://$(reach):$PORT GRAFIT_MLFLOW_CREDENTIALS=$DIR/credentials"
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
