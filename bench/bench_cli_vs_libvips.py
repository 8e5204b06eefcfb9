"""``wsi-norm normalize`` against libvips' plain pyramid copy, on the same slide and cores (issue 15).

Each round runs, as separate processes and in an order that rotates between rounds:

* ``vips tiffsave SLIDE OUT --tile --pyramid --compression jpeg --Q 90 --tile-width 256
  --tile-height 256 --bigtiff`` (the yardstick: decode, shrink, encode, nothing else);
* ``wsi-norm normalize SLIDE --method none -o OUT.tiff -q`` (the same copy through the CLI);
* ``wsi-norm normalize SLIDE --method M --target TEMPLATE -o OUT.tiff -q`` for each ``--methods``
  (fit included: slide-wide sampling, the fit, the QC gate, the map, the pyramid).

Per process: wall seconds, CPU seconds (user + system, from ``wait4``) and peak RSS. Printed:
medians over rounds and, per command, the median of its per-round ratio to libvips' wall time
(pairing within a round keeps the ratio meaningful when the machine's speed drifts).

Slides are generated once into ``--workdir`` (the project's Beer-Lambert generator with real
texture from the shared H&E patches when present, else procedural; 256-px JPEG q90 tiles, the
layout of an Aperio scan). Each method's target template is fitted once from the torchstain
target patch, or from a generated slide of other stains without the shared data. Also printed:
each method's wall time over the plain copy's (``--method none``) in the same round, the cost of
normalizing.

    python bench/bench_cli_vs_libvips.py --sizes 16384 32768 --rounds 3 --workdir bench-out-cli
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _generate(size: int, workdir: Path) -> Path:
    from wsi_norm.testing.data import data_dir

    path = workdir / f"slide-{size}.tiff"
    if not path.exists():
        texture = "real" if data_dir() is not None else "procedural"
        cmd = ["wsi-norm", "generate", str(path), "--width", str(size), "--height", str(size), "--seed", "1",
               "--tile-px", "256", "--texture", texture, "--stains", "site-b"]
        subprocess.run(cmd, check=True, capture_output=True)
    return path


def _template(workdir: Path, method: str) -> Path:
    from wsi_norm.testing.data import data_dir

    path = workdir / f"target-{method}.json"
    if not path.exists():
        data = data_dir()
        ref = data / "he" / "torchstain-target.png" if data is not None else _generate(2048, workdir)
        subprocess.run(["wsi-norm", "fit", str(ref), "--method", method, "-o", str(path), "-q"],
                       check=True, capture_output=True)
    return path


def _run(cmd: list[str]) -> dict[str, float]:
    """Run one process; its wall, CPU (user + system) and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768], help="slide sides in px")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=["macenko"], help="fitted methods besides none")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out-cli"))
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args()
    if shutil.which("vips") is None:
        raise SystemExit("vips not found: apt-get install libvips-tools")
    args.workdir.mkdir(parents=True, exist_ok=True)
    templates = {method: _template(args.workdir, method) for method in args.methods}
    runs: list[dict[str, Any]] = []
    for size in args.sizes:
        slide = _generate(size, args.workdir)
        out = args.workdir / "out"
        commands: dict[str, list[str]] = {
            "libvips": ["vips", "tiffsave", str(slide), f"{out}-vips.tif", "--tile", "--pyramid",
                        "--compression", "jpeg", "--Q", "90", "--tile-width", "256", "--tile-height", "256",
                        "--bigtiff"],
            "none": ["wsi-norm", "normalize", str(slide), "--method", "none", "-o", f"{out}-none.tiff",
                     "--overwrite", "-q"],
        }
        for method in args.methods:
            commands[method] = ["wsi-norm", "normalize", str(slide), "--method", method, "--target", str(templates[method]),
                                "-o", f"{out}-{method}.tiff", "--overwrite", "-q"]
        names = list(commands)
        _run(commands["libvips"])  # warm the page cache
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                result = _run(commands[name])
                runs.append({"size": size, "round": r, "command": name, **result})
                print(f"{size}px round {r} {name:9s} wall {result['wall_s']:6.1f} s  cpu {result['cpu_s']:6.1f} s  "
                      f"peak {result['peak_mib']:5.0f} MiB", file=sys.stderr, flush=True)
        for name in names:
            mine = [x for x in runs if x["size"] == size and x["command"] == name]
            ratios = [x["wall_s"] / next(v["wall_s"] for v in runs if v["size"] == size and v["round"] == x["round"]
                                         and v["command"] == "libvips") for x in mine]
            cpu_ratios = [x["cpu_s"] / next(v["cpu_s"] for v in runs if v["size"] == size and v["round"] == x["round"]
                                            and v["command"] == "libvips") for x in mine]
            print(f"{size}px {name:9s} wall {statistics.median(x['wall_s'] for x in mine):6.1f} s  "
                  f"cpu {statistics.median(x['cpu_s'] for x in mine):6.1f} s  "
                  f"peak {max(x['peak_mib'] for x in mine):5.0f} MiB  "
                  f"x libvips wall {statistics.median(ratios):.2f} (rounds {', '.join(f'{v:.2f}' for v in ratios)})  "
                  f"cpu {statistics.median(cpu_ratios):.2f}")
        for name in args.methods:  # the cost of normalizing: each round's run over that round's plain copy
            over = [x["wall_s"] / next(v["wall_s"] for v in runs if v["size"] == size and v["round"] == x["round"]
                                       and v["command"] == "none")
                    for x in runs if x["size"] == size and x["command"] == name]
            print(f"{size}px {name:9s} x none wall {statistics.median(over):.2f} "
                  f"(rounds {', '.join(f'{v:.2f}' for v in over)})")
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
