"""The codec-aware fit (``wsi_norm.stain.codec``) against the plain fit, on slides whose truth is known.

Two sets, each fitted through ``wsi_norm.pipeline.fit_slide`` twice (``codec_correction`` off
and on), Macenko and Vahadane, stain-vector error against the truth (deg):

1. the seeded cases of ``wsi_norm.testing.stain_cases`` whose source is JPEG (204 of 240), each
   written as a scanner writes a slide: a tiled TIFF of 256-px JPEG tiles at the case's quality
   and chroma subsampling (so the library reads the coding from the file, as it does for SVS);
2. whole generated slides (``wsi_norm.testing.synthetic.generate_slide``, real texture,
   4096 x 4096 px, 256- or 512-px tiles, 4:2:0), stains turned 0-12 deg from Ruifrok's,
   JPEG q75-95, white points 225-252 per channel, H and E strengths 0.6-1.65: slides the
   correction was not designed on.

    python bench/codec_fit.py --cases 240 --slides 8 --workers 2 --json bench-out/codec-fit.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("macenko", "vahadane")


def _angles(a: Any, b: Any) -> list[float]:
    cos = np.clip(np.abs(np.sum(np.asarray(a) * np.asarray(b), axis=1)), 0.0, 1.0)
    return [float(x) for x in np.degrees(np.arccos(cos))]


def _fits(path: Path, truth: np.ndarray, methods: tuple[str, ...], n_pixels: int) -> dict[str, Any]:
    from wsi_norm.pipeline import fit_slide

    out: dict[str, Any] = {}
    for method in methods:
        for on in (False, True):
            fit = fit_slide(path, method=method, params={"codec_correction": on}, n_pixels=n_pixels)
            out[f"{method}-{'on' if on else 'off'}"] = _angles(fit.stats.stain_matrix, truth)
            if on:
                out[f"{method}-record"] = fit.codec
    return out


def run_case(index: int, methods: tuple[str, ...], n_pixels: int) -> dict[str, Any] | None:
    from wsi_norm.testing.stain_cases import draw_case, render, write_jpeg_tiff

    case = draw_case(index)
    if case.quality is None:
        return None
    with tempfile.TemporaryDirectory(prefix="wsi-norm-codec-") as tmp:
        path = Path(tmp) / "source.tiff"
        write_jpeg_tiff(render(case.conc, case.source, residual=case.residual), path,
                        quality=case.quality, subsampling=case.subsampling)
        fits = _fits(path, case.source.stain_matrix, methods, n_pixels)
    group = f"{'4:2:0' if case.subsampling == '420' else '4:4:4'} q{'>=' if case.quality >= 80 else '<'}80"
    return {"index": index, "texture": case.texture, "composition": case.composition,
            "quality": case.quality, "group": group, **fits}


def run_slide(index: int, methods: tuple[str, ...], n_pixels: int) -> dict[str, Any]:
    from wsi_norm.stain.base import RUIFROK_HE
    from wsi_norm.testing.synthetic import generate_slide, rotate_stain_matrix

    rng = np.random.default_rng(1000 + index)
    h_deg, e_deg = rng.uniform(0, 12, size=2)
    matrix = rotate_stain_matrix(RUIFROK_HE, float(h_deg), float(e_deg), seed=int(rng.integers(1 << 30)))
    quality = int(rng.integers(75, 96))
    white = tuple(float(x) for x in rng.uniform(225, 252, 3))
    scale = tuple(float(np.exp(x)) for x in rng.uniform(-0.5, 0.5, 2))
    with tempfile.TemporaryDirectory(prefix="wsi-norm-codec-") as tmp:
        path = Path(tmp) / "slide.tiff"
        generate_slide(path, width=4096, height=4096, stain_matrix=matrix, seed=2000 + index,
                       tile_px=256 if index % 2 else 512, quality=quality, io=white,
                       conc_scale=(scale[0], scale[1]), tissue_fraction=float(rng.uniform(0.2, 0.7)), workers=1)
        fits = _fits(path, matrix, methods, n_pixels)
    return {"index": index, "quality": quality, "white": white, "conc_scale": scale, **fits}


def _row(name: str, errs: np.ndarray) -> str:
    h, e, worse = errs[:, 0], errs[:, 1], errs.max(axis=1)
    def f(x: np.ndarray) -> str:
        return f"{np.median(x):.2f} / {np.percentile(x, 95):.2f} / {x.max():.2f}"
    return f"| {name} | {len(errs)} | {f(h)} | {f(e)} | {np.percentile(worse, 95):.2f} / {worse.max():.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=240)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-pixels", type=int, default=200_000, help="per case (the fidelity benchmark's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    methods = tuple(args.methods.split(","))
    with ProcessPoolExecutor(args.workers) as pool:
        cases = [r for r in pool.map(run_case, range(args.cases), [methods] * args.cases,
                                     [args.n_pixels] * args.cases) if r is not None]
        slides = list(pool.map(run_slide, range(args.slides), [methods] * args.slides,
                               [1_000_000] * args.slides))
    header = "| set | n | H median / p95 / worst | E median / p95 / worst | worse of two p95 / worst |\n|---|---|---|---|---|"
    for method in methods:
        print(f"\n{method}: stain-vector error (deg), codec correction off -> on\n{header}")
        groups = sorted({c["group"] for c in cases})
        for group in [*groups, "all JPEG cases", "q >= 80"]:
            rows = [c for c in cases if c["group"] == group or group == "all JPEG cases"
                    or (group == "q >= 80" and c["quality"] >= 80)]
            for state in ("off", "on"):
                print(_row(f"{group}, {state}", np.array([c[f"{method}-{state}"] for c in rows])))
        for state in ("off", "on"):
            print(_row(f"whole slides, {state}", np.array([s[f"{method}-{state}"] for s in slides])))
        for s in slides:
            print(f"  slide {s['index']} q{s['quality']}: off H {s[f'{method}-off'][0]:.2f} E {s[f'{method}-off'][1]:.2f}"
                  f" -> on H {s[f'{method}-on'][0]:.2f} E {s[f'{method}-on'][1]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cases": cases, "slides": slides}, indent=1))


if __name__ == "__main__":
    main()
