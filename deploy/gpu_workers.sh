#!/usr/bin/env bash
# One dask worker per GPU, each pinned to its device and declaring the resource GPU=1, so
# GPU-annotated work (StainNet, torch colour maps) is scheduled one task per device.
#
#   deploy/gpu_workers.sh tcp://SCHEDULER:8786 [THREADS_PER_WORKER]
#
# PIDs and logs go to ${RUN_DIR:-.stack}/; stop them with deploy/stop_stack.sh (same RUN_DIR).
set -euo pipefail
SCHEDULER="${1:?usage: gpu_workers.sh tcp://host:8786 [threads]}"
THREADS="${2:-4}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RUN_DIR:-$REPO/.stack}"
mkdir -p "$RUN_DIR/pids" "$RUN_DIR/logs"
N_GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)"
[[ "$N_GPUS" -gt 0 ]] || { echo "no GPU found by nvidia-smi" >&2; exit 1; }
for ((i = 0; i < N_GPUS; i++)); do
  CUDA_VISIBLE_DEVICES="$i" setsid dask worker "$SCHEDULER" \
    --nworkers 1 --nthreads "$THREADS" --resources "GPU=1" --name "gpu-$i" \
    --dashboard-address 127.0.0.1:0 >"$RUN_DIR/logs/dask-worker-gpu-$i.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/pids/dask-worker-gpu-$i.pid"
  echo "started dask worker gpu-$i (pid $!) on CUDA device $i"
done
