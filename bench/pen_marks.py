"""How far pen-ink strokes and a scanner's black fill move the default Macenko fit, and whether
the QC gate notices.

Seeded strokes of four ink colours (blue, green, black, red; 18 px wide, 3 or 10 polylines,
brightness jittered 3 % per pixel) are drawn over the real CMU-1-Small-Region slide (read in
place from ``../shared/data``), and, as two more rows, a black (0) or dark-grey (25) fill over the
left 2 % or 5 % of the image; each is saved as a lossless PNG, sampled and fitted as a slide is
(``sample_tissue_pixels``, which leaves out what is not stain, ``fit_macenko`` on the 2 x 2
blocks). Prints, per mark and amount, the marked share of the image, the share of the sample left
out as not stain, each stain vector's angle to the clean slide's fit, the ratio of the maximum
concentrations, the QC gate's verdict on the fit (:func:`wsi_norm.stain.qc.check_fit`), and what
the fit does to the written colour: the clean slide's pixels mapped to the torchstain target patch
with the marked slide's fit against the clean slide's, mean and 99th percentile of the difference
(grey levels, mean over channels) over the tissue.

    python bench/pen_marks.py [--strokes 3 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from wsi_norm.color import is_background
from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.pipeline import SlideFit, compile_checked, fit_slide, template_from_fits
from wsi_norm.slide import open_slide
from wsi_norm.stain.qc import check_fit
from wsi_norm.stain.template import Template

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INKS = {"blue": (40, 60, 160), "green": (40, 130, 80), "black": (35, 35, 40), "red": (190, 40, 50)}


def _fit(rgb: NDArray[np.uint8], path: Path) -> SlideFit:
    Image.fromarray(rgb).save(path)
    return fit_slide(path, method="macenko")


def _mapped(fit: SlideFit, template: Template, clean: NDArray[np.uint8]) -> NDArray[np.uint8]:
    cmap, _ = compile_checked(fit, template, None, force=True, what="pen marks")
    return np.asarray(cmap.evaluate_numpy(clean))


class _Baseline:
    """The clean slide's fit and output, and the report of a marked slide against them (runs on an
    older checkout too, through PYTHONPATH: before the rules, "left out" prints nan)."""

    def __init__(self, clean: NDArray[np.uint8], work: Path) -> None:
        self.clean = clean
        self.fit = _fit(clean, work / "clean.png")
        self.template = template_from_fits([fit_slide(DATA / "he" / "torchstain-target.png", method="macenko")])
        self.mapped = _mapped(self.fit, self.template, clean).astype(np.int16)
        self.tissue = ~is_background(clean)

    def report(self, name: str, n: int, marked: NDArray[np.uint8], fit: SlideFit) -> None:
        share = float((np.abs(marked.astype(int) - self.clean.astype(int)).sum(-1) > 60).mean())
        h, e = stain_matrix_angles_deg(fit.stats.stain_matrix, self.fit.stats.stain_matrix)
        conc = fit.stats.max_conc / self.fit.stats.max_conc
        report = check_fit(fit.stats.stain_matrix, white=fit.white, max_conc=fit.stats.max_conc)
        verdict = "passes" if report.passed else "refuses: " + "; ".join(report.problems)
        diff = np.abs(_mapped(fit, self.template, self.clean) - self.mapped).mean(-1)[self.tissue]
        print(f"{name:10s} {n:7d} {share:6.3f} {getattr(fit, 'non_stain_fraction', float('nan')):8.3f} {h:8.2f} {e:8.2f} "
              f"{conc[0]:6.2f}, {conc[1]:5.2f} {diff.mean():6.2f} / {np.percentile(diff, 99):5.1f}  {verdict}")


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
    base = _Baseline(clean, work)
    rng = np.random.default_rng(args.seed)
    print(f"{'mark':10s} {'strokes':>7s} {'marked':>6s} {'left out':>8s} {'H (deg)':>8s} {'E (deg)':>8s} "
          f"{'max conc H, E':>14s} {'output':>14s}  QC gate")
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
            base.report(name, n, inked, _fit(inked, work / f"{name}-{n}.png"))
    for value in (0, 25):  # a scanner's fill beside the scanned area (strokes column: percent)
        for percent in (2, 5):
            filled = clean.copy()
            filled[:, : width * percent // 100] = value
            base.report(f"fill {value}", percent, filled, _fit(filled, work / f"fill-{value}-{percent}.png"))


if __name__ == "__main__":
    main()
