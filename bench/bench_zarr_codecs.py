"""Benchmark the OME-Zarr compression choices (``WriterOptions.zarr_codec``) on real slides.

For each slide, a ``--method none``-style copy: the slide is opened with tiffslide, its
level 0 taken as a dask array (``open_slide(...).to_dask(0)``) and written with
``write_pyramid`` (the path of ``wsi-norm normalize --method none``, minus the embedded
cluster), once as the reference pyramidal TIFF (JPEG q90, 256-px tiles) and then as
OME-Zarr (NGFF 0.5) with every codec, over ``--rounds`` rounds in a rotated order (round r
starts at codec r), so slow drift of the shared machine falls on every codec alike.

Printed per slide and codec: output bytes (all files of the output), the ratio to the
TIFF q90 output of the same slide, the compression ratio (uncompressed pyramid bytes over
output bytes) and the median write wall time with its ratio to ``lz4:5`` (median over
rounds of the per-round ratio).  Every output is checked to hold level 0 pixel-exactly
(lossless codecs) before it is deleted.

Without ``--slide``, the real CMU-1-Small-Region slide (``wsi_norm.testing.data``) and a
generated ``--size``² slide (``generate_slide``, real H&E texture, JPEG q90, 512² tiles,
cached in ``--workdir``) are used.

Example::

    python bench/bench_zarr_codecs.py --size 8192 --rounds 3 --workdir /tmp/zarr-codecs
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CODECS = ("lz4:5", "lz4:1", "zstd:1", "zstd:3", "zstd:5", "zstd:7")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _generated(size: int, workdir: Path) -> Path:
    path = workdir / f"synthetic-real-{size}.tiff"
    if not path.exists():
        from wsi_norm.testing.synthetic import generate_slide

        t0 = time.perf_counter()
        generate_slide(path, width=size, height=size, seed=3, tile_px=512, mpp=0.25, texture="real")
        sys.stderr.write(f"generated {path} in {time.perf_counter() - t0:.1f} s\n")
    return path


def _write(slide_path: Path, out: Path, **options: Any) -> float:
    from wsi_norm.slide import open_slide
    from wsi_norm.writers import write_pyramid

    slide = open_slide(slide_path, backend="tiffslide")
    array = slide.to_dask(0)
    t0 = time.perf_counter()
    write_pyramid(array, out, mpp=slide.mpp, provenance={"method": "none", "bench": True},
                  overwrite=True, **options)
    return time.perf_counter() - t0


def _check_level0(slide_path: Path, out: Path) -> None:
    import numpy as np

    from wsi_norm.slide import open_slide
    from wsi_norm.writers import read_level

    expected = np.asarray(open_slide(slide_path, backend="tiffslide").to_dask(0).compute())  # type: ignore[no-untyped-call]
    if not np.array_equal(read_level(out, 0), expected):
        raise AssertionError(f"{out}: level 0 differs from the source: the codec is not lossless")


def bench_slide(slide_path: Path, codecs: list[str], rounds: int, workdir: Path) -> list[dict[str, Any]]:
    """Write ``slide_path`` as TIFF q90 once and as OME-Zarr with every codec ``rounds`` times."""
    from wsi_norm.slide import open_slide
    from wsi_norm.writers import pyramid_shapes

    h, w = open_slide(slide_path, backend="tiffslide").dimensions[::-1]
    raw = sum(3 * a * b for a, b in pyramid_shapes(h, w))
    tiff = workdir / f"{slide_path.stem}.q90.tiff"
    _write(slide_path, tiff)  # warm-up: file cache, imports, the LUT-free copy path
    tiff_s = _write(slide_path, tiff, quality=90, compression="jpeg", tile_px=256)
    tiff_bytes = _size(tiff)
    tiff.unlink()
    times: dict[str, list[float]] = {c: [] for c in codecs}
    sizes: dict[str, int] = {}
    for r in range(rounds):
        order = codecs[r % len(codecs):] + codecs[: r % len(codecs)]
        for codec in order:
            out = workdir / f"{slide_path.stem}.{codec.replace(':', '-')}.ome.zarr"
            times[codec].append(_write(slide_path, out, zarr_codec=codec))
            sizes[codec] = _size(out)
            if r == 0:
                _check_level0(slide_path, out)
            shutil.rmtree(out)
        sys.stderr.write(f"{slide_path.name}: round {r + 1}/{rounds} done\n")
    base = codecs[0]
    rows = [{"slide": slide_path.name, "codec": "TIFF JPEG q90 (reference)", "bytes": tiff_bytes,
             "to_tiff": 1.0, "lossless_ratio": raw / tiff_bytes, "median_s": tiff_s, "to_base": None}]
    for codec in codecs:
        per_round = [t / b for t, b in zip(times[codec], times[base], strict=True)]
        rows.append({"slide": slide_path.name, "codec": codec, "bytes": sizes[codec],
                     "to_tiff": sizes[codec] / tiff_bytes, "lossless_ratio": raw / sizes[codec],
                     "median_s": statistics.median(times[codec]), "to_base": statistics.median(per_round)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", action="append", type=Path, help="slide(s) to copy (default: CMU + generated)")
    parser.add_argument("--size", type=int, default=8192, help="side of the generated slide, px")
    parser.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS),
                        help="zarr codecs; the first is the time baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out-zarr-codecs"))
    args = parser.parse_args(argv)

    from wsi_norm.runtime import return_freed_memory
    from wsi_norm.writers import parse_zarr_codec

    return_freed_memory()  # as the wsi-norm command and the flows do
    codecs = [str(parse_zarr_codec(c)) for c in args.codecs]
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = args.slide
    if not slides:
        from wsi_norm.testing.data import data_dir

        slides = [data_dir() / "slides" / "CMU-1-Small-Region.svs", _generated(args.size, args.workdir)]
    print(f"| slide | codec | output (bytes) | × TIFF q90 | raw / output | median write (s) | × {codecs[0]} time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for slide in slides:
        for row in bench_slide(Path(slide), codecs, args.rounds, args.workdir):
            to_base = "—" if row["to_base"] is None else f"{row['to_base']:.2f}"
            print(f"| {row['slide']} | {row['codec']} | {row['bytes']:,} | {row['to_tiff']:.2f} | "
                  f"{row['lossless_ratio']:.2f} | {row['median_s']:.2f} | {to_base} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
