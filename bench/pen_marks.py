"""How far pen-ink strokes on tissue move the default Macenko fit, and whether the QC gate
notices: a known gap, measured.

Seeded strokes of four ink colours (blue, green, black, red; 18 px wide, 3 or 10 polylines,
brightness jittered 3 % per pixel) are drawn over the real CMU-1-Small-Region slide (read in
place from ``../shared/data``), saved as a lossless PNG, sampled and fitted as a slide is
(``sample_tissue_pixels``, ``fit_macenko`` on the 2 x 2 blocks). Prints, per ink and amount, the
inked share of the image, each stain vector's angle to the clean slide's fit, the ratio of the
maximum concentrations, and the QC gate's verdict on the fit (:func:`wsi_norm.stain.qc.check_fit`).

    python bench/pen_marks.py [--strokes 3 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.slide import open_slide
from wsi_norm.stain.macenko import MacenkoStats, fit_macenko
from wsi_norm.stain.qc import check_fit
from wsi_norm.tissue.sampling import sample_tissue_pixels
from wsi_norm.tissue.whitepoint import WhitePoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INKS = {"blue": (40, 60, 160), "green": (40, 130, 80), "black": (35, 35, 40), "red": (190, 40, 50)}


def _fit(rgb: NDArray[np.uint8], path: Path) -> tuple[MacenkoStats, WhitePoint]:
    Image.fromarray(rgb).save(path)
    with open_slide(path) as slide:
        sample = sample_tissue_pixels(slide)
    return fit_macenko(sample.blocks, white=sample.white.array), sample.white


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strokes", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pen-marks-"))
    work.mkdir(parents=True, exist_ok=True)
    with open_slide(DATA / "slides" / "CMU-1-Small-Region.svs") as slide:
        width, height = slide.dimensions
        clean = slide.read_region(0, x=0, y=0, width=width, height=height)
    base, _ = _fit(clean, work / "clean.png")
    rng = np.random.default_rng(args.seed)
    print(f"{'ink':6s} {'strokes':>7s} {'inked':>6s} {'H (deg)':>8s} {'E (deg)':>8s} "
          f"{'max conc H, E':>14s}  QC gate")
    for name, colour in INKS.items():
        for n in args.strokes:
            image = Image.fromarray(clean.copy())
            draw = ImageDraw.Draw(image)
            for _ in range(n):
                points = [(int(rng.uniform(200, width - 200)), int(rng.uniform(200, height - 200)))
                          for _ in range(4)]
                draw.line(points, fill=colour, width=18)
            jitter = 1 + rng.normal(0, 0.03, clean.shape[:2])[..., None]
            inked = np.clip(np.asarray(image).astype(np.float32) * jitter, 0, 255).astype(np.uint8)
            share = float((np.abs(inked.astype(int) - clean.astype(int)).sum(-1) > 60).mean())
            fit, white = _fit(inked, work / f"{name}-{n}.png")
            h, e = stain_matrix_angles_deg(fit.stain_matrix, base.stain_matrix)
            conc = fit.max_conc / base.max_conc
            report = check_fit(fit.stain_matrix, white=white, max_conc=fit.max_conc)
            verdict = "passes" if report.passed else "refuses: " + "; ".join(report.problems)
            print(f"{name:6s} {n:7d} {share:6.3f} {h:8.2f} {e:8.2f} {conc[0]:6.2f}, {conc[1]:5.2f}  {verdict}")


if __name__ == "__main__":
    main()
