"""Time the slide-wide tissue sample (``sample_tissue_pixels``) of one slide, or the QC report's
colour measurement of it (``--stage measure``), optionally against an earlier checkout's,
alternating in separate processes.

Each round runs one process per checkout (this one, and ``--before`` when given) that opens the
slide, computes its coarse mask, samples once to warm up and then times ``--repeats`` samples on
dask's threaded scheduler; the round's figure is the median. With ``--stage measure`` the process
reads the level the QC report measures (``flows._common.read_source_for_qc``) and times
``flows._common.colour_stats`` of it instead. The result's SHA-256 is printed too, so a change
meant to keep the sample (or the measurement) can be checked to keep it.

    python bench/bench_sampling.py SLIDE --rounds 4 [--stage measure] [--before /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import hashlib, json, statistics, sys, time
import dask, dask.threaded
import numpy as np
from wsi_norm.slide import open_slide
from wsi_norm.tissue.mask import coarse_mask
from wsi_norm.tissue.sampling import sample_tissue_pixels

path, repeats = sys.argv[1], int(sys.argv[2])
with dask.config.set(scheduler=dask.threaded.get), open_slide(path) as slide:
    coarse = coarse_mask(slide)
    sample = sample_tissue_pixels(slide, coarse=coarse)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_tissue_pixels(slide, coarse=coarse)
        times.append(time.perf_counter() - t0)
digest = hashlib.sha256()
for part in (sample.pixels, sample.blocks, np.asarray(sample.white.rgb), sample.windows):
    digest.update(np.ascontiguousarray(part).tobytes())
print(json.dumps({"median_s": statistics.median(times), "sha256": digest.hexdigest()}))
"""


_MEASURE_CHILD = """
import dataclasses, hashlib, json, statistics, sys, time
from flows._common import colour_stats, read_source_for_qc

path, repeats = sys.argv[1], int(sys.argv[2])
level, _ = read_source_for_qc(path)
stats = colour_stats(level)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    colour_stats(level)
    times.append(time.perf_counter() - t0)
digest = hashlib.sha256(json.dumps(dataclasses.asdict(stats), sort_keys=True).encode())
print(json.dumps({"median_s": statistics.median(times), "sha256": digest.hexdigest()}))
"""


def _run(checkout: Path, slide: str, repeats: int, child: str = _CHILD) -> dict[str, object]:
    # cwd outside any checkout: ``python -c`` puts the working folder before PYTHONPATH
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", child, slide, str(repeats)], env=env, cwd=cwd,
                             capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed samples per process")
    ap.add_argument("--before", help="an earlier wsi-norm checkout to time as well (its root folder)")
    ap.add_argument("--stage", choices=("sample", "measure"), default="sample",
                    help="the fit's tissue sample, or the QC report's colour measurement")
    args = ap.parse_args()
    slide = str(Path(args.slide).resolve())
    checkouts = {"this": ROOT}
    if args.before:
        checkouts["before"] = Path(args.before).resolve()
    runs: dict[str, list[float]] = {name: [] for name in checkouts}
    digests: dict[str, str] = {}
    for r in range(args.rounds):
        order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
        for name in order:
            result = _run(checkouts[name], slide, args.repeats, _CHILD if args.stage == "sample" else _MEASURE_CHILD)
            runs[name].append(float(str(result["median_s"])))
            digests[name] = str(result["sha256"])
    for name, times in runs.items():
        print(f"{name:7s} median {statistics.median(times):.3f} s  rounds {[round(t, 3) for t in times]}  "
              f"{args.stage} sha256 {digests[name][:16]}")
    if args.before:
        ratios = [a / b for a, b in zip(runs["this"], runs["before"], strict=True)]
        same = "the same result" if digests["this"] == digests["before"] else "DIFFERENT results"
        print(f"this / before: {statistics.median(ratios):.3f} (median of rounds), {same}")


if __name__ == "__main__":
    main()
