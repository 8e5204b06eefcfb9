"""Where the time of one slide's QC report goes: the steps ``flows._qc.publish_slide_qc`` runs
for a source and its written output, each timed on one thread (mean of ``--repeats``).

    python bench/bench_qc_report.py SOURCE OUTPUT [--repeats 3]

``OUTPUT`` is a ``wsi-norm normalize`` output of ``SOURCE`` (TIFF or OME-Zarr). The Prefect
artifact and the files on disk are not made (they need a flow run); the image they carry is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T = TypeVar("T")


def main() -> None:
    from flows._artifacts import png_data_uri
    from flows._common import colour_stats, read_output_for_measure, read_source_for_qc
    from flows._qc import (
        REPORT_IMAGE_BYTES,
        THUMB_PX,
        _resize,
        labelled_pair,
        read_output_thumbnail,
        ssim_source,
        stain_plot,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("output")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    seconds: dict[str, float] = {}

    def timed(step: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = fn()
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start
        return result

    def once() -> tuple[int, int]:
        measured, before = timed("read the source's measured level and thumbnail",
                                 lambda: read_source_for_qc(args.source, thumb_px=THUMB_PX))
        src = timed("colour measurement of the source", lambda: colour_stats(measured))
        after = timed("read the output's thumbnail", lambda: _resize(
            read_output_thumbnail(args.output, min_px=THUMB_PX), before.shape[:2]))
        level = timed("read the output's measured level", lambda: read_output_for_measure(args.output))
        out = timed("colour measurement of the output", lambda: colour_stats(level))
        timed("SSIM of the thumbnails", lambda: ssim_source(before, after))
        pair = timed("before/after image", lambda: labelled_pair(before, after))
        timed("its PNG within the report's budget",
              lambda: png_data_uri(pair, max_px=pair.shape[1], max_bytes=REPORT_IMAGE_BYTES))
        timed("stain-vector plot", lambda: stain_plot({"source": src, "output": out}, target=None, title="qc"))
        return measured.shape[1], measured.shape[0]

    for _ in range(args.repeats):
        width, height = once()
    print(f"{args.source}: measured level {width}x{height} px, "
          f"mean of {args.repeats} repeats")
    for step, total in seconds.items():
        print(f"  {step:48s} {1000 * total / args.repeats:8.1f} ms")
    print(f"  {'total':48s} {1000 * sum(seconds.values()) / args.repeats:8.1f} ms")


if __name__ == "__main__":
    main()
