"""``wsi-norm normalize`` on an existing multi-process dask cluster against the same command alone.

Starts a ``dask scheduler`` and two ``dask worker`` processes (one thread each, ``--nworkers 1``)
on 127.0.0.1, then, alternating over ``--rounds``:

* **local**: ``wsi-norm normalize SLIDE --method M --target T -o local.tiff`` (dask's threaded
  scheduler in the command's own process, as by default);
* **cluster**: the same with ``--scheduler tcp://127.0.0.1:PORT``: each level-0 block is one task
  on a worker, which reads and maps its chunks, encodes its level-0 tiles and builds its lower
  levels; the tiles and those levels travel to the command's process, which encodes the lower
  levels and writes the file. Joining, the command gives each worker its malloc settings
  (``wsi_norm.worker_setup.WorkerMalloc``); the workers start with glibc's defaults.

Printed: wall and CPU seconds of the command, and of the two workers (CPU from ``psutil``, read
before the cluster stops), the ratio cluster / local, and whether the decoded levels of both
outputs are identical (SHA-256 per level, ``bench/level_digests.py``'s reading).

    python bench/bench_cluster.py --slide bench-out-cli/slide-16384.tiff --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _level_digests(path: Path) -> list[str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [hashlib.sha256(np.ascontiguousarray(page.asarray()).tobytes()).hexdigest() for page in tif.pages]


def _timed(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def main() -> int:
    import psutil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--method", default="macenko")
    parser.add_argument("--target", type=Path, default=None, help="template JSON (fitted methods)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out-cluster"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the workers' malloc settings are wsi-norm's own: the command registers a worker plugin
    # (wsi_norm.worker_setup.WorkerMalloc) that applies them in each worker process
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    scheduler = subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
    workers = [subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                 "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", "--no-nanny"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for _ in range(2)]
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:  # type: ignore[no-untyped-call]
            client.wait_for_workers(2, timeout=60)
        target = ["--target", str(args.target)] if args.target else []
        base = [str(bindir / "wsi-norm"), "normalize", str(args.slide), "--method", args.method, *target,
                "--overwrite", "-q"]
        out = {"local": args.workdir / "local.tiff", "cluster": args.workdir / "cluster.tiff"}
        commands = {"local": [*base, "-o", str(out["local"])],
                    "cluster": [*base, "-o", str(out["cluster"]), "--scheduler", address]}
        procs = [psutil.Process(w.pid) for w in workers]
        times: dict[str, list[tuple[float, float, float]]] = {"local": [], "cluster": []}
        for r in range(args.rounds):
            for name in (("local", "cluster") if r % 2 == 0 else ("cluster", "local")):
                before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
                wall, cpu = _timed(commands[name])
                worker_cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs) - before
                times[name].append((wall, cpu, worker_cpu))
                print(f"round {r} {name:8s} wall {wall:6.1f} s  command cpu {cpu:6.1f} s  workers cpu "
                      f"{worker_cpu:6.1f} s", file=sys.stderr, flush=True)
        for name, rows in times.items():
            print(f"{name:8s} wall {statistics.median(w for w, _, _ in rows):6.1f} s  "
                  f"cpu (command + workers) {statistics.median(c + k for _, c, k in rows):6.1f} s")
        ratios = [c[0] / loc[0] for c, loc in zip(times["cluster"], times["local"], strict=True)]
        print(f"cluster / local wall: {statistics.median(ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
        same = _level_digests(out["local"]) == _level_digests(out["cluster"])
        print(f"decoded levels identical: {'yes' if same else 'NO'}")
    finally:
        for proc in (*workers, scheduler):
            proc.terminate()
        for proc in (*workers, scheduler):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a worker still closing: the figures are printed
                print(f"pid {proc.pid} did not stop within 30 s of SIGTERM: killed", file=sys.stderr)
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
