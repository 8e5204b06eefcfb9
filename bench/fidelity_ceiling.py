"""How much written colour better stain vectors or white points could still buy: the ceiling.

For cases of :mod:`wsi_norm.testing.stain_cases` (the fidelity benchmark's family), the default
Macenko run is scored against the truth beside three oracles that keep everything else of the
library's path (the same slide-wide sample, the 99th-percentile maximum concentrations recomputed
on it, the QC-checked compiled map, glass to the target's white point):

* ``true_vec``: the source's and the template's stain vectors replaced by the true ones (the
  white points as measured, or the fallback where there is no glass);
* ``true_vec_white``: the true stain vectors and the true white points of both;
* ``lossless``: ``true_vec_white`` applied to the source as rendered, before JPEG: what the
  coding alone costs.

The gap between the default and ``true_vec`` is all that a perfect stain estimator could add
to the written colour; the gap to ``lossless`` is the coding's, which no colour map removes.

    python bench/fidelity_ceiling.py --start 0 --step 4 --workers 2 --json bench-out/ceiling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ORACLES = ("default", "true_vec", "true_vec_white", "lossless")


def _with_truth(fit: Any, stain_matrix: Any, white: Any = None) -> Any:
    """``fit`` with the given stain vectors (and white point), max concentrations recomputed on its blocks."""
    from wsi_norm.color import rgb_to_od
    from wsi_norm.stain.base import StainParams, max_concentrations
    from wsi_norm.tissue.whitepoint import WhitePoint

    p = StainParams()
    wp = fit.white if white is None else WhitePoint.fixed(tuple(float(v) for v in white))
    od = rgb_to_od(fit.blocks.astype(np.float64), white=wp.array)
    od = od[np.linalg.norm(od, axis=1) >= p.beta_]
    max_conc = max_concentrations(od, np.asarray(stain_matrix), percentile=p.max_conc_percentile, what="oracle")
    stats = dataclasses.replace(fit.stats, stain_matrix=np.asarray(stain_matrix, dtype=np.float64), max_conc=max_conc)
    return dataclasses.replace(fit, stats=stats, white=wp)


def run_case(index: int, *, size: int, n_pixels: int) -> dict[str, Any]:
    """The default and the oracles' PSNR and mean CIEDE2000 over tissue, for one case."""
    from fidelity import _metrics, _save_png

    from wsi_norm.metrics import stain_matrix_angles_deg
    from wsi_norm.pipeline import compile_checked, fit_slide, template_from_fits
    from wsi_norm.slide import open_slide
    from wsi_norm.testing.stain_cases import TARGET, draw_case, render, write_jpeg_tiff

    case = draw_case(index, size=size)
    truth, tissue = case.truth_rgb(), case.tissue()
    record: dict[str, Any] = {"index": index, "quality": case.quality, "subsampling": case.subsampling,
                              "texture": case.texture, "composition": case.composition}
    with tempfile.TemporaryDirectory(prefix="wsi-norm-ceiling-") as tmp:
        work = Path(tmp)
        clean = render(case.conc, case.source, residual=case.residual)
        if case.quality is None:
            src, src_path = clean, _save_png(clean, work / "source.png")
        else:
            src_path = work / "source.tiff"
            write_jpeg_tiff(clean, src_path, quality=case.quality, subsampling=case.subsampling)
            with open_slide(src_path) as slide:
                src = slide.read_region(0, x=0, y=0, width=slide.dimensions[0], height=slide.dimensions[1])
        fit = fit_slide(src_path, method="macenko", n_pixels=n_pixels)
        target_fit = fit_slide(_save_png(truth, work / "truth.png"), method="macenko", n_pixels=n_pixels)
        angles = stain_matrix_angles_deg(fit.stats.stain_matrix, case.source.stain_matrix)
        record["h_deg"], record["e_deg"] = float(angles[0]), float(angles[1])

        def score(source_fit: Any, template_fit: Any, image: Any) -> dict[str, float]:
            cmap, _ = compile_checked(source_fit, template_from_fits([template_fit]), None, force=True,
                                      what=f"case {index}")
            m = _metrics(cmap.evaluate_numpy(image), truth, tissue)
            return {"psnr_tissue": m["psnr_tissue"], "de2000_tissue": m["de2000_tissue"]}

        record["default"] = score(fit, target_fit, src)
        record["true_vec"] = score(_with_truth(fit, case.source.stain_matrix),
                                   _with_truth(target_fit, TARGET.stain_matrix), src)
        fit_w = _with_truth(fit, case.source.stain_matrix, case.source.white)
        target_w = _with_truth(target_fit, TARGET.stain_matrix, TARGET.white)
        record["true_vec_white"] = score(fit_w, target_w, src)
        record["lossless"] = score(fit_w, target_w, clean)
    return record


def summarize(records: list[dict[str, Any]]) -> str:
    """Medians per group: PSNR and CIEDE2000 over tissue for the default and each oracle, and the
    gain of the true stain vectors over the default (median and 90th percentile)."""
    groups = {
        "all": records,
        "JPEG q >= 80": [r for r in records if r["quality"] is not None and r["quality"] >= 80],
        "JPEG 4:2:0": [r for r in records if r["quality"] is not None and r["subsampling"] == "420"],
        "lossless": [r for r in records if r["quality"] is None],
        "generated (glass)": [r for r in records if r["texture"].startswith("gen")],
        "real crops": [r for r in records if r["texture"].startswith("real")],
    }
    lines = ["| cases | n | " + " | ".join(f"{o} PSNR / ΔE00" for o in ORACLES)
             + " | true vectors' gain (dB): median / p90 |",
             "|---" * (len(ORACLES) + 3) + "|"]
    for name, rs in groups.items():
        if not rs:
            continue
        cells = []
        for o in ORACLES:
            psnr = np.median([r[o]["psnr_tissue"] for r in rs])
            de = np.median([r[o]["de2000_tissue"] for r in rs])
            cells.append(f"{psnr:.2f} / {de:.2f}")
        gain = np.array([r["true_vec"]["psnr_tissue"] - r["default"]["psnr_tissue"] for r in rs])
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells)
                     + f" | {np.median(gain):+.2f} / {np.percentile(gain, 90):+.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--step", type=int, default=4, help="every step-th case of the 240")
    parser.add_argument("--cases", type=int, default=240)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n-pixels", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    indices = list(range(args.start, args.cases, args.step))
    records = []
    with ProcessPoolExecutor(args.workers) as pool:
        for record in pool.map(_case_positional, indices, [args.size] * len(indices), [args.n_pixels] * len(indices)):
            records.append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)
    print(f"# bench/fidelity_ceiling.py --start {args.start} --step {args.step}: {len(records)} cases")
    print(summarize(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return 0


def _case_positional(index: int, size: int, n_pixels: int) -> dict[str, Any]:
    """``run_case`` with positional arguments (for ``ProcessPoolExecutor.map``)."""
    return run_case(index, size=size, n_pixels=n_pixels)


if __name__ == "__main__":
    raise SystemExit(main())
