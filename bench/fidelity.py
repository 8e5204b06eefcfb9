"""Colour fidelity over a seeded family of cases with known truth: stain estimation and normalization.

For every case of :mod:`wsi_norm.testing.stain_cases` (stain vectors up to 15 deg from Ruifrok's,
strength ratios 0.5-2, densities 0.6-1.6, white points 220-255 per channel, JPEG q70-95 in 4:2:0
and 4:4:4, six tissue compositions, the generator's texture and real texture re-rendered), the
source is written as a scanner writes a slide (a tiled TIFF of 256-px JPEG tiles at the case's
quality and chroma subsampling, so the library reads the coding from the file, as it does for
SVS; lossless cases as PNG) and the truth as PNG; both go through the library's own path: slide-wide
sampling, white point, fit (``wsi_norm.pipeline.fit_slide``), template from the truth (the
registered reference: same tissue, target staining), the QC gate and the compiled map
(``wsi_norm.pipeline.compile_checked``, forced so every case is measured).

Printed (and written as JSON with ``--json``):

1. **Stain estimation**: median, 95th percentile and worst angle (deg) between each estimator's
   hematoxylin / eosin vector and the truth, over all cases and over the JPEG q >= 80 cases;
   estimators: Macenko (default ``strong``), Macenko ``textbook``, Vahadane (default), and
   torchstain's numpy Macenko (fixed Io = 240).
2. **White point**: error of the measured white point (grey levels, worst channel), and how many
   glass-free cases fell back.
3. **Fidelity per method**: PSNR (dB), SSIM and CIEDE2000 against the truth, over tissue and over
   the whole image (medians, and 5th percentile of PSNR), beside the un-normalized source and a
   torchstain-style textbook Macenko (torchstain's numpy normalizer: fixed Io 240, every pixel
   mapped, fitted on the truth and the source).
4. **QC measures**: the distribution of every number the QC gate checks, against a single global
   template (one target slide for all cases, as an archive uses it): what the gate's bounds were
   set from.

    python bench/fidelity.py --cases 240 --workers 2 --json bench-out/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("macenko", "vahadane", "reinhard", "histmatch")
ESTIMATORS = ("macenko", "macenko-codec", "macenko-textbook", "vahadane", "vahadane-codec", "torchstain")
#: fitted with the (opt-in) codec-aware correction (``codec_correction: true``): its effect, case by case
CODEC = ("macenko-codec", "vahadane-codec")


def _save_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, compress_level=1)
    return path


def _metrics(out: np.ndarray, truth: np.ndarray, tissue: np.ndarray) -> dict[str, float]:
    from skimage.color import deltaE_ciede2000

    from wsi_norm.color import rgb_to_lab
    from wsi_norm.metrics import psnr, ssim

    lab_out = np.asarray(rgb_to_lab(out), dtype=np.float64)
    lab_truth = np.asarray(rgb_to_lab(truth), dtype=np.float64)
    de = deltaE_ciede2000(lab_truth, lab_out)
    return {
        "psnr_tissue": psnr(out, truth, mask=tissue),
        "psnr_all": psnr(out, truth),
        "ssim_tissue": ssim(out, truth, mask=tissue),
        "ssim_all": ssim(out, truth),
        "de2000_tissue": float(de[tissue].mean()),
        "de2000_all": float(de.mean()),
    }


_GLOBAL: dict[str, Any] = {}


def _global_templates(work: Path, n_pixels: int) -> dict[str, Any]:
    """One template per method from a 2048^2 target-site slide (generated texture, mixed)."""
    from wsi_norm.pipeline import fit_template
    from wsi_norm.testing.stain_cases import TARGET, render
    from wsi_norm.testing.synthetic import SyntheticParams, concentrations

    if not _GLOBAL:
        params = SyntheticParams(2048, 2048, seed=987654, tissue_fraction=0.5, texture="real")
        conc = concentrations(params, x=0, y=0, width=2048, height=2048)
        path = _save_png(render(conc, TARGET), work / f"global-target-{os.getpid()}.png")
        for method in METHODS:
            _GLOBAL[method] = fit_template([path], method=method, n_pixels=n_pixels, force=True)
    return _GLOBAL


def run_case(index: int, *, size: int, n_pixels: int, residual: bool) -> dict[str, Any]:
    """Every measurement of one case (run in a worker process)."""
    import torchstain

    from wsi_norm.metrics import stain_matrix_angles_deg
    from wsi_norm.pipeline import compile_checked, fit_slide, template_from_fits
    from wsi_norm.slide import open_slide
    from wsi_norm.testing.stain_cases import TARGET, draw_case, render, write_jpeg_tiff

    case = draw_case(index, size=size, residual=residual)
    truth, tissue = case.truth_rgb(), case.tissue()
    record: dict[str, Any] = {
        "index": index, "texture": case.texture, "composition": case.composition,
        "quality": case.quality, "subsampling": case.subsampling,
        "truth_white": list(case.source.white),
        "truth_separation_deg": float(stain_matrix_angles_deg(case.source.stain_matrix[:1], case.source.stain_matrix[1:])[0]),
        "estimation": {}, "fidelity": {}, "qc": {},
    }
    with tempfile.TemporaryDirectory(prefix="wsi-norm-fidelity-") as tmp:
        work = Path(tmp)
        if case.quality is None:
            src = case.source_rgb()
            src_path = _save_png(src, work / "source.png")
        else:  # JPEG tiles, as scanned: the pixels are what the slide decodes to
            src_path = work / "source.tiff"
            write_jpeg_tiff(render(case.conc, case.source, residual=case.residual), src_path,
                            quality=case.quality, subsampling=case.subsampling)
            with open_slide(src_path) as slide:
                src = slide.read_region(0, x=0, y=0, width=slide.dimensions[0], height=slide.dimensions[1])
        truth_path = _save_png(truth, work / "truth.png")
        globals_ = _global_templates(Path(tempfile.gettempdir()), n_pixels)
        record["fidelity"]["none"] = _metrics(src, truth, tissue)
        for method, params in (("macenko", None), ("macenko-codec", {"codec_correction": True}),
                               ("macenko-textbook", {"macenko_variant": "textbook"}),
                               ("vahadane", None), ("vahadane-codec", {"codec_correction": True}),
                               ("reinhard", None), ("histmatch", None)):
            base = method.split("-")[0]
            try:
                fit = fit_slide(src_path, method=base, params=params, n_pixels=n_pixels)
            except Exception as exc:  # noqa: BLE001 - a failed fit is a finding of the benchmark
                record["estimation"][method] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            if base in ("macenko", "vahadane"):
                angles = stain_matrix_angles_deg(fit.stats.stain_matrix, case.source.stain_matrix)
                record["estimation"][method] = {"h_deg": float(angles[0]), "e_deg": float(angles[1])}
            if method == "macenko":
                record["white"] = {"rgb": list(fit.white.rgb), "source": fit.white.source,
                                   "error": float(np.abs(fit.white.array - case.source.white).max())}
            if method == "macenko-textbook":
                continue
            template = template_from_fits([fit_slide(truth_path, method=base, params=params, n_pixels=n_pixels)],
                                          params=params)
            cmap, _ = compile_checked(fit, template, params, force=True, what=f"case {index}")
            record["fidelity"][method] = _metrics(cmap.evaluate_numpy(src), truth, tissue)
            if method in CODEC:
                continue
            _, report = compile_checked(fit, globals_[base], params, force=True, what=f"case {index}")
            record["qc"][method] = {"passed": report.passed, "problems": report.problems, **report.measures}
        # torchstain's own Macenko (numpy backend): fixed Io = 240, every pixel mapped
        norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        try:
            norm.fit(truth)
            out, _, _ = norm.normalize(I=src, stains=False)
            record["fidelity"]["torchstain"] = _metrics(np.clip(out, 0, 255).astype(np.uint8), truth, tissue)
            probe = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
            probe.fit(src)
            he = np.asarray(probe.HERef, dtype=np.float64).T  # (2, 3): H, E
            angles = stain_matrix_angles_deg(he, case.source.stain_matrix)
            record["estimation"]["torchstain"] = {"h_deg": float(angles[0]), "e_deg": float(angles[1])}
        except Exception as exc:  # noqa: BLE001 - torchstain fails on some images; recorded
            record["estimation"]["torchstain"] = {"error": f"{type(exc).__name__}: {exc}"}
    record["target_white"] = list(TARGET.white)
    return record


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records: list[dict[str, Any]]) -> str:
    """The tables BENCHMARKS.md quotes."""
    lines = [(f"{len(records)} cases ({sum(r['quality'] is not None for r in records)} JPEG, "
              f"{sum(r['quality'] is not None and r['quality'] >= 80 for r in records)} with q >= 80; "
              f"{sum(r['subsampling'] == '420' and r['quality'] is not None for r in records)} JPEG 4:2:0)"), ""]
    lines += ["## Stain-vector error (deg): median / 95th percentile / worst",
              "", "| estimator | cases | H all | E all | H q>=80 | E q>=80 | failed fits |", "|---|---|---|---|---|---|---|"]
    for est in ESTIMATORS:
        rows = [r["estimation"].get(est, {}) for r in records]
        ok = [(r, e) for r, e in zip(records, rows, strict=True) if "h_deg" in e]
        q80 = [(r, e) for r, e in ok if r["quality"] is not None and r["quality"] >= 80]

        def cell(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> str:
            v = [e[key] for _, e in pairs]
            return f"{np.median(v):.2f} / {_pct(v, 95):.2f} / {max(v):.2f}" if v else "-"

        lines.append(f"| {est} | {len(ok)} | {cell(ok, 'h_deg')} | {cell(ok, 'e_deg')} | {cell(q80, 'h_deg')} | "
                     f"{cell(q80, 'e_deg')} | {len(rows) - len(ok)} |")
    whites = [r["white"] for r in records if "white" in r]
    measured = [w["error"] for w in whites if w["source"] == "glass"]
    lines += ["", "## White point", "",
              (f"measured from glass in {len(measured)} cases: error (worst channel, grey levels) median "
               f"{np.median(measured):.2f}, 95th percentile {_pct(measured, 95):.2f}, worst {max(measured):.2f}; "
               f"fallback in {len(whites) - len(measured)} cases (textures: "
               f"{sorted({r['texture'] for r in records if r.get('white', {}).get('source') == 'fallback'})})")]
    lines += ["", "## Fidelity against the truth (median over cases; PSNR also 5th percentile)", "",
              "| method | PSNR tissue dB | PSNR p5 | PSNR whole dB | SSIM tissue | SSIM whole | dE2000 tissue | dE2000 whole |",
              "|---|---|---|---|---|---|---|---|"]
    for method in ("none", "torchstain", *METHODS, *CODEC):
        vals = [r["fidelity"][method] for r in records if method in r["fidelity"]]
        if not vals:
            continue

        def med(key: str, vals: list[dict[str, float]] = vals) -> float:
            return float(np.median([v[key] for v in vals]))

        lines.append(f"| {method if method != 'none' else 'un-normalized'} | {med('psnr_tissue'):.2f} | "
                     f"{_pct([v['psnr_tissue'] for v in vals], 5):.2f} | {med('psnr_all'):.2f} | "
                     f"{med('ssim_tissue'):.4f} | {med('ssim_all'):.4f} | {med('de2000_tissue'):.2f} | {med('de2000_all'):.2f} |")
    lines += ["", "## QC measures against one global template (min / 50 / 99 / max); cases the gate refused", ""]
    for method in METHODS:
        qcs = [r["qc"][method] for r in records if method in r["qc"]]
        if not qcs:
            continue
        refused = [r["index"] for r in records if method in r["qc"] and not r["qc"][method]["passed"]]

        def dist(key: str, idx: int | None = None, qcs: list[dict[str, Any]] = qcs) -> str:
            v = [q[key] if idx is None else q[key][idx] for q in qcs if key in q]
            if not v:
                return "-"
            return f"{min(v):.2f} / {np.median(v):.2f} / {_pct(v, 99):.2f} / {max(v):.2f}"

        lines.append(f"- {method}: source angle to Ruifrok H {dist('source_stain_angles_to_ruifrok_deg', 0)}, "
                     f"E {dist('source_stain_angles_to_ruifrok_deg', 1)}; separation {dist('source_stain_separation_deg')}; "
                     f"mapped Lab distance {dist('mapped_lab_distance')}; overshoot past the target's H "
                     f"{dist('mapped_overshoot_deg', 0)}, E {dist('mapped_overshoot_deg', 1)}; "
                     f"max concentrations H {dist('source_max_concentrations', 0)}, E {dist('source_max_concentrations', 1)}; "
                     f"refused: {len(refused)} {refused[:12]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=240)
    parser.add_argument("--first", type=int, default=0, help="index of the first case")
    parser.add_argument("--size", type=int, default=1024, help="case side in px")
    parser.add_argument("--n-pixels", type=int, default=200_000, help="tissue pixels sampled per fit")
    parser.add_argument("--residual", action="store_true", help="add the real texture's off-plane residual")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    indices = range(args.first, args.first + args.cases)
    kwargs = {"size": args.size, "n_pixels": args.n_pixels, "residual": args.residual}
    records: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_case, i, **kwargs) for i in indices]
        for n, future in enumerate(futures, 1):
            records.append(future.result())
            if n % 20 == 0:
                print(f"  {n}/{len(futures)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, default=float), encoding="utf-8")
    print(f"# bench/fidelity.py --cases {args.cases} --size {args.size}{' --residual' if args.residual else ''}"
          f" ({time.perf_counter() - start:.0f} s)\n")
    print(summarize(records))
    return 0 if all(math.isfinite(r["fidelity"]["none"]["psnr_all"]) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
