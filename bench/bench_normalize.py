"""Normalization cost relative to a plain pyramid rewrite (``--method none``), in one run.

Generates (once) a Beer-Lambert slide of the requested size, fits a target template, then runs
``wsi-norm normalize`` as a separate process per method, rounds interleaved (none, macenko,
vahadane, ...; none, macenko, ...) so machine drift hits all alike, and prints each method's
median wall time, peak RSS and median ratio to ``none`` within the same round.

    python bench/bench_normalize.py --size 32768 --rounds 3 --format tiff

Figures go to BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("none", "macenko", "vahadane", "reinhard", "histmatch")


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process (``os.wait4``'s own rusage)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32768, help="slide side in px (32768^2 = 1.07 GP)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", choices=("tiff", "ome-zarr"), default="tiff")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="bench-out")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "wsi_norm.cli"]
    slide = work / f"bench-{args.size}.tiff"
    target = work / f"bench-{args.size}-target.tiff"
    if not slide.exists():
        subprocess.run([*exe, "generate", str(slide), "--width", str(args.size), "--height",
                        str(args.size), "--seed", "1", "--stains", "site-b"], check=True)
    if not target.exists():
        subprocess.run([*exe, "generate", str(target), "--width", "4096", "--height", "4096",
                        "--seed", "2", "--stains", "site-a"], check=True)
    templates = {}
    for method in args.methods:
        if method in ("none", "stainnet"):
            continue
        tpl = work / f"target-{method}.json"
        if not tpl.exists():
            subprocess.run([*exe, "fit", str(target), "--method", method, "-o", str(tpl)],
                           check=True)
        templates[method] = tpl

    suffix = ".tiff" if args.format == "tiff" else ".ome.zarr"
    walls: dict[str, list[float]] = {m: [] for m in args.methods}
    rss: dict[str, list[float]] = {m: [] for m in args.methods}
    ratios: dict[str, list[float]] = {m: [] for m in args.methods}
    # one untimed run first: page cache, numba's compiled-kernel cache, imports
    _run([*exe, "normalize", str(slide), "--method", "none", "-o", str(work / f"warmup{suffix}"),
          "--overwrite", "-q"])
    for _ in range(args.rounds):
        this_round = {}
        for method in args.methods:
            out = work / f"out-{method}{suffix}"
            cmd = [*exe, "normalize", str(slide), "--method", method, "-o", str(out),
                   "--overwrite", "-q", "--device", args.device]
            if method in templates:
                cmd += ["--target", str(templates[method])]
            wall, peak = _run(cmd)
            walls[method].append(wall)
            rss[method].append(peak)
            this_round[method] = wall
        for method in args.methods:
            ratios[method].append(this_round[method] / this_round["none"])

    mp = args.size * args.size / 1e6
    print(f"slide {args.size}x{args.size} ({mp:.0f} MP), format {args.format}, "
          f"device {args.device}, {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"{'method':<10} {'median s':>9} {'MP/s':>7} {'ratio to none':>14} {'peak RSS MiB':>13}")
    for method in args.methods:
        med = statistics.median(walls[method])
        print(f"{method:<10} {med:9.1f} {mp / med:7.1f} {statistics.median(ratios[method]):14.2f} "
              f"{max(rss[method]):13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
