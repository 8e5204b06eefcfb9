"""Known-truth checks of ``--method gmm`` against Reinhard, Macenko and histogram matching.

Two registered pairs per texture (the same concentration maps rendered twice by Beer-Lambert,
lossless, white point 240), for the fidelity benchmark's textures (``draw_case``: the generator
with real and procedural texture, and the real slide and patches re-rendered):

* **stroma eosin**: the source's eosin is scaled by ``--eosin`` where hematoxylin is weak
  (stroma: weight ``clip(1 - h / h50, 0, 1)``, ``h50`` the median hematoxylin of tissue), nuclei
  untouched; the truth is the tissue as it was. A global method moves nuclei with the stroma;
  a per-class one need not.
* **stain vectors**: the source's stain vectors are turned ``--degrees`` from the target's (both
  stains, seeded directions), strengths and composition the same: Macenko's home ground.

Each method is fitted on the source and on the truth (the template) and maps the source; PSNR
(dB) and mean CIEDE2000 over tissue against the truth. Prints one line per case and method and
the medians.

Then gmm's own noise floor: each case's truth mapped to itself, the template fitted with the default
seed and the "source" (the same pixels) with seeds 1 and 2: the moment match then differs from
the identity only by the two EM fits' differences.

Then the torchstain pair (``he/torchstain-source.png`` to ``he/torchstain-target.png``, white
240, no truth): per method, the CIEDE2000 between the tissue's mean colour of the output and of
the target, and the largest difference of the tissue's Lab standard deviations.

    python bench/gmm_fidelity.py --cases 6
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from numpy.typing import NDArray
from skimage.color import deltaE_ciede2000, rgb2lab

from wsi_norm.colormap import GmmMap, compile_colormap
from wsi_norm.metrics import psnr
from wsi_norm.stain import fit_stats
from wsi_norm.stain.base import order_stains
from wsi_norm.stain.gmm import GmmStats
from wsi_norm.testing.stain_cases import TARGET, draw_case
from wsi_norm.testing.synthetic import render_beer_lambert, rotate_stain_matrix

METHODS = ("gmm", "reinhard", "macenko", "histmatch")
WHITE = 240.0


def _scores(out: NDArray[np.uint8], truth: NDArray[np.uint8], tissue: NDArray[np.bool_]) -> tuple[float, float]:
    de = deltaE_ciede2000(rgb2lab(truth), rgb2lab(out))
    return psnr(out, truth, mask=tissue), float(de[tissue].mean())


def _normalize(method: str, src: NDArray[np.uint8], truth: NDArray[np.uint8]) -> dict[str, NDArray[np.uint8]]:
    """The method's output; for gmm also ``gmm-indep``: the map with independently fitted
    components paired by mean colour (``components="independent"``), for comparison."""
    s = fit_stats(method, src.reshape(-1, 3), white=WHITE)
    t = fit_stats(method, truth.reshape(-1, 3), white=WHITE)
    out = {method: compile_colormap(method, s, t, source_white=WHITE, target_white=WHITE).evaluate_numpy(src)}
    if method == "gmm":
        assert isinstance(s, GmmStats) and isinstance(t, GmmStats)
        indep = GmmMap(s, t, source_white=WHITE, target_white=WHITE, components="independent")
        out["gmm-indep"] = indep.evaluate_numpy(src)
    return out


def _self_map(truth: NDArray[np.uint8], tissue: NDArray[np.bool_], seed: int) -> tuple[float, float]:
    """gmm from the image to itself, the two fits differing only in their seed."""
    from wsi_norm.stain.base import StainParams

    t = fit_stats("gmm", truth.reshape(-1, 3), white=WHITE)
    s = fit_stats("gmm", truth.reshape(-1, 3), white=WHITE, params=StainParams(seed=seed))
    out = compile_colormap("gmm", s, t, source_white=WHITE, target_white=WHITE).evaluate_numpy(truth)
    return _scores(out, truth, tissue)


def _torchstain_pair() -> None:
    from PIL import Image

    from wsi_norm.testing.data import data_dir

    he = data_dir() / "he"
    src = np.array(Image.open(he / "torchstain-source.png").convert("RGB"))
    tgt = np.array(Image.open(he / "torchstain-target.png").convert("RGB"))
    tgt_lab = rgb2lab(tgt)[np.asarray(tgt, np.float64) @ [0.299, 0.587, 0.114] <= 200]
    print("\ntorchstain pair (source -> target, no truth): tissue mean-colour CIEDE2000 to the target, "
          "largest |std L*a*b* - target's|")
    for method in ("none", *METHODS):
        outs = {"none": src} if method == "none" else _normalize(method, src, tgt)
        for label, out in outs.items():
            lab = rgb2lab(out)[np.asarray(out, np.float64) @ [0.299, 0.587, 0.114] <= 200]
            de = float(deltaE_ciede2000(lab.mean(axis=0)[None], tgt_lab.mean(axis=0)[None])[0])
            print(f"  {label:10s} {de:5.2f}  {np.abs(lab.std(axis=0) - tgt_lab.std(axis=0)).max():5.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--eosin", type=float, default=1.6, help="factor on stroma eosin in the source")
    ap.add_argument("--degrees", type=float, default=12.0, help="turn of both stain vectors in the source")
    args = ap.parse_args()

    stains = order_stains(TARGET.stain_matrix)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {"stroma-eosin": {}, "stain-vectors": {},
                                                                 "self-map": {}}
    for index in range(args.cases):
        case = draw_case(index, size=args.size)
        conc = case.conc.astype(np.float64)
        h, e = conc[..., 0], conc[..., 1]
        truth = render_beer_lambert(conc, stains, io=WHITE)
        tissue = case.tissue() & (np.asarray(truth, np.float64) @ [0.299, 0.587, 0.114] <= 200)
        h50 = float(np.median(h[tissue])) if tissue.any() else 1.0
        stroma = np.clip(1.0 - h / max(h50, 1e-6), 0.0, 1.0)
        eosin_src = render_beer_lambert(np.stack([h, e * (1.0 + (args.eosin - 1.0) * stroma)], -1), stains, io=WHITE)
        turned = rotate_stain_matrix(stains, args.degrees, args.degrees, seed=index)
        vector_src = render_beer_lambert(conc, turned, io=WHITE)
        for name, src in (("stroma-eosin", eosin_src), ("stain-vectors", vector_src)):
            before = _scores(src, truth, tissue)
            line = [f"case {index} ({case.texture}/{case.composition}) {name:13s} none {before[0]:5.1f} dB {before[1]:5.2f}"]
            for method in METHODS:
                for label, out in _normalize(method, src, truth).items():
                    score = _scores(out, truth, tissue)
                    results[name].setdefault(label, []).append(score)
                    line.append(f"{label} {score[0]:5.1f} dB {score[1]:5.2f}")
            print(" | ".join(line), flush=True)
        for seed in (1, 2):
            score = _self_map(truth, tissue, seed)
            results["self-map"].setdefault(f"gmm seed {seed}", []).append(score)
            print(f"case {index} self-map, gmm with seed {seed} against seed 0: {score[0]:5.1f} dB {score[1]:5.2f}",
                  flush=True)
    _torchstain_pair()
    for name, per_method in results.items():
        print(f"\n{name}: median over {args.cases} cases (PSNR dB on tissue, mean CIEDE2000 on tissue)")
        for method, scores in per_method.items():
            print(f"  {method:10s} {statistics.median(s[0] for s in scores):6.2f} dB  "
                  f"{statistics.median(s[1] for s in scores):5.2f}")


if __name__ == "__main__":
    main()
