"""Time ``--method gmm``: the slide-wide fit (s/slide) and the apply against ``--method none``.

On one slide (default CMU-1-Small-Region), in one process, for ``--rounds`` rounds after a
warm-up: the gmm fit (tissue sampling + EM for K = 2..8, BIC), then ``normalize_slide`` with that
fit and a template (the torchstain target patch) for ``gmm`` and for ``none``. Prints the median
of each phase; the apply ratio is gmm's map-and-write phase (``write_s``: the colour map applied
over every chunk, then encoded and written) over none's, both as the pipeline runs this slide
(under 256^3 px: ``GmmMap.evaluate_direct``, each distinct colour evaluated once into the map's
memo table) and with the map's table built (what a larger slide gets: a gather; Reinhard's map,
gathered alike, beside it). The LUT compile (16.7 M colours evaluated once per map) is timed
separately.

    python bench/bench_gmm.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from wsi_norm.colormap import clear_lut_cache, compile_colormap
from wsi_norm.pipeline import fit_slide, normalize_slide, template_from_fits
from wsi_norm.writers import WriterOptions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(DATA / "slides" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--reference", default=str(DATA / "he" / "torchstain-target.png"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    template = template_from_fits([fit_slide(args.reference, method="gmm")])
    reinhard_template = template_from_fits([fit_slide(args.reference, method="reinhard")])
    reinhard_fit = fit_slide(args.slide, method="reinhard")
    writer = WriterOptions(compression="jpeg")
    times: dict[str, list[float]] = {"sample_s": [], "fit_s": [], "gmm_write_s": [], "none_write_s": [],
                                     "gmm_total_s": [], "none_total_s": [], "lut_s": [], "lut_write_s": [],
                                     "reinhard_lut_write_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):
            fit = fit_slide(args.slide, method="gmm")
            clear_lut_cache()  # a slide under 256^3 px: each pixel evaluated directly
            gmm = normalize_slide(args.slide, Path(tmp) / f"gmm{r}.tiff", method="gmm", target=template,
                                  source_fit=fit, writer=writer)
            none = normalize_slide(args.slide, Path(tmp) / f"none{r}.tiff", method="none", writer=writer)
            cmap = compile_colormap("gmm", fit.stats, template.stats, source_white=fit.white.array,
                                    target_white=template.white.array)
            start = time.perf_counter()
            cmap.lut()
            lut_s = time.perf_counter() - start
            # with the table built (what a slide over 256^3 px gets): the gather
            gathered = normalize_slide(args.slide, Path(tmp) / f"lut{r}.tiff", method="gmm", target=template,
                                       source_fit=fit, writer=writer)
            compile_colormap("reinhard", reinhard_fit.stats, reinhard_template.stats,
                             source_white=reinhard_fit.white.array, target_white=reinhard_template.white.array).lut()
            reinhard = normalize_slide(args.slide, Path(tmp) / f"reinhard{r}.tiff", method="reinhard",
                                       target=reinhard_template, source_fit=reinhard_fit, writer=writer)
            if r == 0:
                continue  # warm-up: numba, imports, page cache
            times["sample_s"].append(fit.timings["sample_s"])
            times["fit_s"].append(fit.timings["fit_s"])
            times["gmm_write_s"].append(gmm.timings["write_s"])
            times["none_write_s"].append(none.timings["write_s"])
            times["gmm_total_s"].append(gmm.timings["total_s"])
            times["none_total_s"].append(none.timings["total_s"])
            times["lut_s"].append(lut_s)
            times["lut_write_s"].append(gathered.timings["write_s"])
            times["reinhard_lut_write_s"].append(reinhard.timings["write_s"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"slide {Path(args.slide).name}, {args.rounds} rounds (median), template {Path(args.reference).name}, "
          f"{template.stats.n_components} target components, {fit.stats.n_components} source components")
    print(f"fit: sample {med['sample_s']:.2f} s + EM/BIC {med['fit_s']:.2f} s = "
          f"{med['sample_s'] + med['fit_s']:.2f} s/slide")
    print(f"apply (map + write), direct evaluation (slides under 256^3 px): gmm {med['gmm_write_s']:.2f} s, "
          f"none {med['none_write_s']:.2f} s, ratio {med['gmm_write_s'] / med['none_write_s']:.2f} x")
    print(f"apply (map + write), LUT gather (larger slides, table built): gmm {med['lut_write_s']:.2f} s, "
          f"ratio {med['lut_write_s'] / med['none_write_s']:.2f} x (reinhard, the same gather: "
          f"{med['reinhard_lut_write_s']:.2f} s, {med['reinhard_lut_write_s'] / med['none_write_s']:.2f} x)")
    print(f"normalize total (gmm: source fit given, map compiled): gmm {med['gmm_total_s']:.2f} s, "
          f"none {med['none_total_s']:.2f} s")
    print(f"LUT compile (256^3 colours): {med['lut_s']:.2f} s")


if __name__ == "__main__":
    main()
