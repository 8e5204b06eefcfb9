"""Benchmark the pyramid writers against ``vips tiffsave --pyramid`` on the same slide.

What it measures, in one run:

* wall time of reading alone (``read``: decode level 0 block by block and build the
  lower levels, spilled to raw files, no encoding), to separate the reader's cost
  from the writer's;
* wall time of a ``--method none``-style copy: read the slide with tiffslide into a
  dask array (``wsi_norm.slide.open_slide(...).to_dask(0)``) and ``write_pyramid`` it
  to pyramidal TIFF (JPEG q90, 256-px tiles) and to OME-Zarr;
* wall time of ``vips tiffsave SLIDE OUT --tile --pyramid --compression jpeg --Q 90
  --tile-width 256 --tile-height 256 --bigtiff`` (libvips-tools);
* peak RSS (``/usr/bin/time -v``) of every run, and of the copies of a slide
  with half the side (a quarter of the pixels), to show memory does not grow with
  the slide.

Each timed run is its own subprocess, so imports and RSS are counted the same
way for all of them.  Without ``--slide`` a synthetic Beer-Lambert slide is
generated (``wsi_norm.testing.synthetic.generate_slide``) and cached in ``--workdir``.

Example::

    python bench/bench_writers.py --size 32768 --workdir /tmp/wsi-bench
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _generate(size: int, workdir: Path) -> Path:
    path = workdir / f"synthetic-{size}.tif"
    if not path.exists():
        from wsi_norm.testing.synthetic import generate_slide

        t0 = time.perf_counter()
        generate_slide(path, width=size, height=size, seed=1, tile_px=256, mpp=0.25)
        sys.stderr.write(f"generated {path} in {time.perf_counter() - t0:.1f} s\n")
    return path


def _child(fmt: Any, slide_path: str, out: str) -> None:
    """Run one copy in this process and print its timings as JSON."""
    t0 = time.perf_counter()
    from wsi_norm.runtime import return_freed_memory
    from wsi_norm.slide import open_slide
    from wsi_norm.writers import write_pyramid

    return_freed_memory()  # as the wsi-norm command and the flows do

    slide = open_slide(slide_path, backend="tiffslide")
    array = slide.to_dask(0)
    t1 = time.perf_counter()
    if fmt == "read":  # read + decode + downsample (lower levels spilled), no encoding
        import tempfile

        from wsi_norm.pyramid import LevelStore, block_edges, iter_blocks, pyramid_shapes

        edges = [
            block_edges(c, target=1024, align=256) for c in array.chunks[:2]
        ]  # as the TIFF writer
        with (
            tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp,
            LevelStore(Path(tmp) / "levels", pyramid_shapes(*array.shape[:2]), *edges) as store,
        ):
            for _ in iter_blocks(array, store):
                pass
        print(json.dumps({"setup_s": t1 - t0, "write_s": time.perf_counter() - t1}))
        return
    write_pyramid(
        array,
        out,
        mpp=slide.mpp,
        provenance={"method": "none", "bench": True},
        fmt=fmt,
        overwrite=True,
    )
    t2 = time.perf_counter()
    print(json.dumps({"setup_s": t1 - t0, "write_s": t2 - t1, "chunks": list(array.chunksize)}))


def _timed(cmd: list[str]) -> dict[str, float | str]:
    """Run ``cmd`` under /usr/bin/time -v; return wall seconds, peak RSS (MiB) and stdout."""
    t0 = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True, cwd=REPO
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {
        "wall_s": wall,
        "peak_rss_mib": int(rss.group(1)) / 1024 if rss else float("nan"),
        "stdout": done.stdout,
    }


def _copy(fmt: str, slide: Path, out: Path) -> dict[str, float | str]:
    result = _timed([sys.executable, __file__, "--child", fmt, str(slide), str(out)])
    result.update(json.loads(str(result["stdout"]).strip().splitlines()[-1]))
    return result


def _vips(slide: Path, out: Path) -> dict[str, float | str]:
    return _timed(
        [
            "vips",
            "tiffsave",
            str(slide),
            str(out),
            "--tile",
            "--pyramid",
            "--compression",
            "jpeg",
            "--Q",
            "90",
            "--tile-width",
            "256",
            "--tile-height",
            "256",
            "--bigtiff",
        ]
    )


def _size_mib(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    return path.stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, help="tiled TIFF/SVS to copy (default: generate one)")
    parser.add_argument(
        "--size",
        type=int,
        default=32768,
        help="side of the generated slide, px (default 32768: 1.07 GP)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-norm-bench"))
    parser.add_argument(
        "--formats", default="tiff,ome-zarr", help="comma-separated: tiff, ome-zarr"
    )
    parser.add_argument("--no-vips", action="store_true", help="skip the libvips baseline")
    parser.add_argument(
        "--no-rss", action="store_true", help="skip the quarter-size slide RSS comparison"
    )
    parser.add_argument(
        "--small-slide",
        type=Path,
        help="slide with half the side for the RSS comparison (default: generate one)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each timing; the best is reported"
    )
    parser.add_argument("--child", nargs=3, metavar=("FMT", "SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.slide or _generate(args.size, args.workdir)
    from wsi_norm.slide import open_slide

    width, height = open_slide(slide, backend="tiffslide").dimensions
    mp = width * height / 1e6
    print(f"slide {slide}: {width} x {height} = {mp:.0f} MP")
    results: dict[str, dict[str, float | str]] = {}
    suffix = {"tiff": ".tif", "ome-zarr": ".ome.zarr"}
    runs: list[tuple[str, object]] = [(f, f) for f in ["read", *args.formats.split(",")]]
    if not args.no_vips and shutil.which("vips"):
        runs.append(("vips", "vips"))
    elif not args.no_vips:
        print("vips not found (apt-get install libvips-tools); skipping the baseline")
    for name, _ in runs:
        out = args.workdir / f"out-{name}{suffix.get(name, '.tif')}"
        best: dict[str, float | str] | None = None
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            result = _vips(slide, out) if name == "vips" else _copy(name, slide, out)
            if name == "read":
                out = slide
            if best is None or float(result["wall_s"]) < float(best["wall_s"]):
                best = result
        assert best is not None
        best["size_mib"] = _size_mib(out)
        results[name] = best
        extra = f" (write {float(best['write_s']):.2f} s)" if "write_s" in best else ""
        print(
            f"{name:9s} wall {float(best['wall_s']):7.2f} s{extra}, {mp / float(best['wall_s']):6.1f} MP/s, "
            f"peak RSS {float(best['peak_rss_mib']):7.0f} MiB, output {float(best['size_mib']):8.1f} MiB"
        )
    if "vips" in results:
        for name in results:
            if name not in ("vips", "read"):
                print(
                    f"ratio {name} / vips: {float(results[name]['wall_s']) / float(results['vips']['wall_s']):.2f}"
                )
    if not args.no_rss:
        small = args.small_slide or _generate(args.size // 2, args.workdir)
        sw, sh = open_slide(small, backend="tiffslide").dimensions
        for name in results:
            if name in ("read", "vips"):
                continue
            res = _copy(name, small, args.workdir / f"out-small{suffix[name]}")
            big, little = float(results[name]["peak_rss_mib"]), float(res["peak_rss_mib"])
            print(
                f"peak RSS, {name} copy: {sw} x {sh} slide {little:.0f} MiB, "
                f"{width} x {height} slide ({width * height / (sw * sh):.1f}x pixels) {big:.0f} MiB: "
                f"{100 * (big / little - 1):+.0f}%"
            )


if __name__ == "__main__":
    main()
