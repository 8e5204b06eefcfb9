"""Time a small slide end to end, process start included: wsi-norm against a plain torchstain script.

Each command runs as its own process, in turn within a round (wsi-norm, the torchstain script,
and optionally an earlier wsi-norm checkout given by ``--before``), for ``--rounds`` rounds after
one warm-up round; so a machine whose speed drifts slows every command of a round alike. Prints,
per method and command, the median wall and CPU (user + system of the child) seconds over the
rounds, and the median over rounds of each round's wall ratio to the torchstain script and to
``--before``.

    python bench/bench_small_slide.py --slide ../shared/data/slides/CMU-1-Small-Region.svs \\
        --reference ../shared/data/he/torchstain-target.png --rounds 5 [--before /path/to/old/checkout]

The torchstain side is ``bench/small_slide_torchstain.py`` (see its docstring for what it does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one child process."""
    start = time.perf_counter()
    # cwd outside any checkout: ``python -m`` puts the working folder before PYTHONPATH
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(DATA / "slides" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--reference", default=str(DATA / "he" / "torchstain-target.png"))
    ap.add_argument("--methods", default="macenko,none")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", help="an earlier wsi-norm checkout to time as well (its root folder)")
    ap.add_argument("--workdir", default="bench-out-small")
    args = ap.parse_args()

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.slide, args.reference = str(Path(args.slide).resolve()), str(Path(args.reference).resolve())
    py = sys.executable
    base_env = {k: v for k, v in os.environ.items() if k != "WSI_NORM_SCHEDULER"}

    def wsi_norm(root: Path, method: str, tag: str) -> tuple[list[str], dict[str, str]]:
        target = ["--reference", args.reference] if method != "none" else []
        command = [py, "-m", "wsi_norm.cli", "normalize", args.slide, "--method", method, *target,
                   "-o", str(work / f"{tag}-{method}.tiff"), "-q", "--overwrite"]
        return command, {**base_env, "PYTHONPATH": str(root.resolve())}

    for method in args.methods.split(","):
        commands: dict[str, tuple[list[str], dict[str, str]]] = {"wsi-norm": wsi_norm(REPO, method, "now")}
        ts = [py, str(REPO / "bench" / "small_slide_torchstain.py"), args.slide]
        ts += [args.reference] if method != "none" else []
        commands["torchstain script"] = ([*ts, "--method", method, "-o", str(work / f"ts-{method}.tiff")], base_env)
        if args.before:
            commands["wsi-norm --before"] = wsi_norm(Path(args.before), method, "before")
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for round_ in range(args.rounds + 1):
            for name, (command, env) in commands.items():
                result = _run(command, env, work)
                if round_:  # round 0 warms the file cache and numba's
                    runs[name].append(result)
        print(f"\n{method}: {Path(args.slide).name}, {args.rounds} rounds after one warm-up")
        print(f"{'command':<20} {'wall median (s)':>15} {'cpu median (s)':>15} "
              f"{'/ torchstain (wall)':>20} {'/ before (wall)':>16}")
        for name, results in runs.items():
            walls = [w for w, _ in results]
            ratio_ts = statistics.median(w / t for (w, _), (t, _) in zip(results, runs["torchstain script"], strict=True))
            ratio_before = (statistics.median(w / b for (w, _), (b, _) in zip(results, runs["wsi-norm --before"],
                                                                            strict=True))
                            if args.before else float("nan"))
            print(f"{name:<20} {statistics.median(walls):15.3f} {statistics.median(c for _, c in results):15.3f} "
                  f"{ratio_ts:20.3f} {ratio_before:16.3f}")
            print(f"{'':<20} walls: {', '.join(f'{w:.2f}' for w in walls)}")


if __name__ == "__main__":
    main()
