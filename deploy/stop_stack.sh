#!/usr/bin/env bash
# Stop what start_stack.sh started: each process group whose PID it recorded, newest first.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${1:-$REPO/.stack}"
[[ -d "$RUN_DIR/pids" ]] || { echo "no stack recorded in $RUN_DIR"; exit 0; }
shopt -s nullglob
for pidfile in "$RUN_DIR"/pids/prefect-worker.pid "$RUN_DIR"/pids/dask-worker-*.pid \
               "$RUN_DIR"/pids/dask-scheduler.pid "$RUN_DIR"/pids/prefect-server.pid; do
  name="$(basename "$pidfile" .pid)"
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true   # setsid: group id == pid
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
