#!/usr/bin/env bash
# Start a local wsi-norm stack on 127.0.0.1: Prefect server + UI, a process work pool with
# both deployments and a worker, and a dask scheduler with workers.
#
#   deploy/start_stack.sh [RUN_DIR]        (default RUN_DIR: .stack/ in the repository)
#   deploy/stop_stack.sh  [RUN_DIR]
#
# Environment: PREFECT_PORT (4200), DASK_PORT (8786), DASK_WORKERS (1), DASK_THREADS (cores),
# PYTHON (the venv's python). PIDs go to RUN_DIR/pids/, logs to RUN_DIR/logs/, and
# RUN_DIR/env holds the variables a shell needs to use the stack (source it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$(mkdir -p "${1:-$REPO/.stack}" && cd "${1:-$REPO/.stack}" && pwd)"
PREFECT_PORT="${PREFECT_PORT:-4200}"
DASK_PORT="${DASK_PORT:-8786}"
DASK_WORKERS="${DASK_WORKERS:-1}"
DASK_THREADS="${DASK_THREADS:-$(nproc)}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
BIN="$(dirname "$PYTHON")"
mkdir -p "$RUN_DIR/pids" "$RUN_DIR/logs" "$RUN_DIR/prefect-home"

export PREFECT_HOME="$RUN_DIR/prefect-home"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_UI_API_URL="$PREFECT_API_URL"          # else the UI calls port 4200
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export WSI_NORM_SCHEDULER="tcp://127.0.0.1:$DASK_PORT"
export WSI_NORM_ROOT="$REPO"

start() {  # start NAME CMD...: run in the background, own session, PID to pids/NAME.pid
  local name="$1"; shift
  if [[ -f "$RUN_DIR/pids/$name.pid" ]] && kill -0 "$(cat "$RUN_DIR/pids/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$RUN_DIR/pids/$name.pid"))"; return
  fi
  setsid "$@" >"$RUN_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/pids/$name.pid"
  echo "started $name (pid $!), log $RUN_DIR/logs/$name.log"
}

wait_for() {  # wait_for WHAT CMD...: retry CMD for up to 120 s
  local what="$1"; shift
  for _ in $(seq 240); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "timed out waiting for $what" >&2; exit 1
}

start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_for "Prefect API" "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)"

start dask-scheduler "$BIN/dask" scheduler --host 127.0.0.1 --port "$DASK_PORT" --dashboard-address 127.0.0.1:0
wait_for "dask scheduler" "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $DASK_PORT), 2)"
for i in $(seq "$DASK_WORKERS"); do
  start "dask-worker-$i" "$BIN/dask" worker "$WSI_NORM_SCHEDULER" --host 127.0.0.1 \
    --nworkers 1 --nthreads "$DASK_THREADS" --dashboard-address 127.0.0.1:0 --name "cpu-$i"
done

cd "$REPO"
"$BIN/prefect" work-pool inspect wsi-norm-process >/dev/null 2>&1 \
  || "$BIN/prefect" work-pool create wsi-norm-process --type process >"$RUN_DIR/logs/work-pool.log" 2>&1
# prefect 3.8.8's CLI, after creating a deployment, lists the pool's workers with a null
# `limit` that the server (fastapi < 0.155, which prefect 3.8.8 needs here) rejects with 422;
# the deployment exists by then. So deploy one at a time, ignore that exit status, and check
# through the REST API (with an explicit limit) that both deployments exist.
for name in nightly on-demand; do
  "$BIN/prefect" --no-prompt deploy --name "$name" --prefect-file deploy/prefect.yaml \
    >>"$RUN_DIR/logs/deploy.log" 2>&1 || true
done
"$PYTHON" - "$PREFECT_API_URL" <<'PY' || { echo "deployments missing: see $RUN_DIR/logs/deploy.log" >&2; exit 1; }
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/deployments/filter", method="POST",
                             data=json.dumps({"limit": 50, "sort": "NAME_ASC"}).encode(),
                             headers={"Content-Type": "application/json"})
names = {d["name"] for d in json.load(urllib.request.urlopen(req, timeout=10))}
missing = {"nightly", "on-demand"} - names
print("deployments:", ", ".join(sorted(names)))
sys.exit(1 if missing else 0)
PY
start prefect-worker "$BIN/prefect" worker start --pool wsi-norm-process --name "wsi-norm-$(hostname)"

cat >"$RUN_DIR/env" <<ENV
export PREFECT_HOME="$PREFECT_HOME"
export PREFECT_API_URL="$PREFECT_API_URL"
export PREFECT_UI_API_URL="$PREFECT_UI_API_URL"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export WSI_NORM_SCHEDULER="$WSI_NORM_SCHEDULER"
ENV
echo
echo "Prefect UI:      http://127.0.0.1:$PREFECT_PORT"
echo "dask scheduler:  $WSI_NORM_SCHEDULER"
echo "use it:          source $RUN_DIR/env"
echo "run now:         prefect deployment run normalize-archive/nightly"
echo "stop:            deploy/stop_stack.sh $RUN_DIR"
