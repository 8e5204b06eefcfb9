"""Reading level 0 of a slide: each backend's own reads against the direct JPEG-tile reads.

For each backend (OpenSlide, tiffslide) the slide's level 0 is computed chunk by chunk
(``Slide.to_dask(0)``, 1024-px chunks, dask's threaded scheduler on every core, nothing kept),
once through the backend's own region reads and once through :mod:`wsi_norm.tiffjpeg`, in
alternating order; printed: wall and CPU seconds and MP/s, median over rounds, and whether the
two reads gave the same pixels (a SHA-256 of every chunk).

    python bench/bench_read.py SLIDE --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _read(path: Path, backend: str, direct: bool) -> tuple[float, float, str]:
    import dask
    import dask.threaded

    from wsi_norm.slide import open_slide

    with open_slide(path, backend=backend) as slide:  # type: ignore[arg-type]
        reader: Any = slide._reader
        saved = reader._tiles
        if not direct:
            reader._tiles = None
        elif saved is None:
            raise SystemExit(f"{path}: no level is read directly by {backend}")
        digests: dict[tuple[int, ...], str] = {}

        def digest(chunk: np.ndarray, block_info: Any = None) -> np.ndarray:
            digests[tuple(block_info[0]["chunk-location"])] = hashlib.sha256(chunk.tobytes()).hexdigest()
            return np.zeros((1, 1, 1), np.uint8)

        array = slide.to_dask(0)
        start, cpu = time.perf_counter(), time.process_time()
        with dask.config.set(scheduler=dask.threaded.get):
            array.map_blocks(digest, chunks=(1, 1, 1), dtype=np.uint8).compute()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        reader._tiles = saved
    whole = hashlib.sha256("".join(digests[k] for k in sorted(digests)).encode()).hexdigest()
    return wall, cpu, whole


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["openslide", "tiffslide"])
    args = parser.parse_args()
    from wsi_norm.slide import open_slide

    with open_slide(args.slide) as slide:
        mp = slide.dimensions[0] * slide.dimensions[1] / 1e6
    print(f"{args.slide}: {mp:.0f} MP at level 0")
    for backend in args.backends:
        runs: dict[bool, list[tuple[float, float, str]]] = {False: [], True: []}
        for r in range(args.rounds):
            for direct in (r % 2 == 0, r % 2 == 1):
                runs[direct].append(_read(args.slide, backend, direct))
        same = {d for _, _, d in runs[False] + runs[True]}
        for direct in (False, True):
            wall = statistics.median(w for w, _, _ in runs[direct])
            cpu = statistics.median(c for _, c, _ in runs[direct])
            label = "direct JPEG tiles" if direct else "backend's own reads"
            print(f"{backend:9s} {label:20s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  {mp / wall:6.0f} MP/s")
        print(f"{backend:9s} same pixels: {'yes' if len(same) == 1 else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
