"""The archive flow against the CLI on the same slides: ``normalize-archive`` over an N-slide
manifest versus the sum of N ``wsi-norm normalize`` runs (issue 15's goal: within 1.10 x).

Slides are generated (``--slide-px`` square, procedural texture, JPEG; seeds 0..N-1, stain presets in
turn, half in each of two sites). One template is fitted once from the first slide
(``wsi-norm fit``, not timed) and used by both sides: the manifest names it by path. Each round
times, alternating which side goes first:

* **flow**: ``python -m flows.normalize_archive --manifest M`` (process start, Prefect's
  ephemeral API or the server of ``--api-url``, the embedded dask cluster, every slide's fit,
  write and QC report, the summary), outputs removed before the round;
* **cli**: ``wsi-norm normalize SLIDE --method METHOD --target template.json -o OUT -q`` for
  every slide, one process each, wall times summed.

Prints the median of each side over ``--rounds`` and the ratio flow / cli per round.

    python bench/bench_flow_vs_cli.py --slides 20 --slide-px 2048 --rounds 3
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_archive_scale import SITES, generate_slides


def _timed(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=20)
    ap.add_argument("--slide-px", type=int, default=2048)
    ap.add_argument("--tile-px", type=int, default=None,
                    help="store the slides in tiles of this size, with a pyramid (default: one tile, one level)")
    ap.add_argument("--method", default="macenko")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/flow-vs-cli"))
    ap.add_argument("--api-url", default=None, help="a running Prefect server (default: the ephemeral API)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    slides = generate_slides(work / "slides", args.slides, slide_px=args.slide_px, tile_px=args.tile_px)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    if args.api_url:
        env["PREFECT_API_URL"] = args.api_url
    template = work / "template.json"
    if not template.exists():
        _timed([sys.executable, "-m", "wsi_norm.cli", "fit", str(slides[0]), "--method", args.method,
                "-o", str(template)], cwd=work, env=env)
    sites: dict[str, list[str]] = {site: [] for site in SITES}
    for i, path in enumerate(slides):
        sites[SITES[i % len(SITES)]].append(os.path.relpath(path, work))
    manifest = work / "manifest.yaml"
    manifest.write_text(json.dumps({
        "version": 1, "roots": {"slides": "slides"}, "output_root": "out-flow", "method": args.method,
        "formats": ["tiff"], "templates": {"ref": {"path": "template.json"}}, "target": "ref",
        "sites": {site: {"slides": paths} for site, paths in sites.items() if paths},
    }, indent=1), encoding="utf-8")

    def flow() -> float:
        shutil.rmtree(work / "out-flow", ignore_errors=True)
        return _timed([sys.executable, "-m", "flows.normalize_archive", "--manifest", str(manifest)], cwd=work, env=env)

    def cli() -> float:
        out = work / "out-cli"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return sum(_timed([sys.executable, "-m", "wsi_norm.cli", "normalize", str(s), "--method", args.method,
                           "--target", str(template), "-o", str(out / s.name), "-q"], cwd=work, env=env)
                   for s in slides)

    rounds = []
    for r in range(args.rounds):
        order = (("flow", flow), ("cli", cli)) if r % 2 == 0 else (("cli", cli), ("flow", flow))
        times = {name: fn() for name, fn in order}
        rounds.append(times)
        print(f"round {r + 1}: flow {times['flow']:.1f} s, cli {times['cli']:.1f} s "
              f"({args.slides} runs), flow / cli {times['flow'] / times['cli']:.3f}", flush=True)
    flow_med = statistics.median(t["flow"] for t in rounds)
    cli_med = statistics.median(t["cli"] for t in rounds)
    ratios = [t["flow"] / t["cli"] for t in rounds]
    print(f"{args.slides} slides of {args.slide_px}^2, method {args.method}: flow median {flow_med:.1f} s, "
          f"sum of CLI runs median {cli_med:.1f} s; flow / cli median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rounds": rounds}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
