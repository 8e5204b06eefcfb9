"""Continuity of ``--method gmm`` over the whole RGB cube: the largest output step of a one-level input step.

For each ordered pair of the real images (CMU-1-Small-Region and the two torchstain patches: six
directions), fits both (60 000 tissue pixels, seeded), builds the map's 256^3 table with the glass
hand-over to the target's white, and takes the largest absolute difference between neighbouring
entries along R, G and B (every one-level step of the cube, exactly), and the same over the
source's own tissue colours (every channel >= 16). Prints one line per direction and the largest.

    python bench/gmm_continuity.py
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from wsi_norm.colormap import GmmMap, clear_lut_cache
from wsi_norm.colormap.maps import GlassBlend
from wsi_norm.pipeline import SlideFit, fit_slide
from wsi_norm.testing.data import data_dir


def largest_step(lut: NDArray[np.uint8], region: NDArray[np.bool_] | None = None) -> int:
    """Largest ``|lut[c + e_i] - lut[c]|`` over the cube (or over steps whose lower end is in ``region``)."""
    worst = 0
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, 255), slice(1, 256)
        step = np.abs(lut[tuple(hi)].astype(np.int16) - lut[tuple(lo)].astype(np.int16)).max(axis=-1)
        if region is not None:
            step = np.where(region[tuple(lo)], step, 0)
        worst = max(worst, int(step.max()))
    return worst


def main() -> None:
    d = data_dir()
    paths = {"cmu": d / "slides" / "CMU-1-Small-Region.svs", "target": d / "he" / "torchstain-target.png",
             "source": d / "he" / "torchstain-source.png"}
    fits: dict[str, SlideFit] = {k: fit_slide(p, method="gmm", n_pixels=60_000) for k, p in paths.items()}
    overall = {"cube": 0, "tissue": 0}
    for a_name, a in fits.items():
        assert a.pixels is not None
        tissue = a.pixels[a.pixels.min(axis=1) >= 16]
        region = np.zeros((256, 256, 256), bool)
        region[tissue[:, 0], tissue[:, 1], tissue[:, 2]] = True
        for b_name, b in fits.items():
            if a_name == b_name:
                continue
            cmap = GmmMap(a.stats, b.stats, source_white=a.white.array, target_white=b.white.array,
                          glass=GlassBlend.for_whites("target", a.white.array, b.white.array))
            lut = cmap.lut()
            cube, on_tissue = largest_step(lut), largest_step(lut, region)
            overall = {"cube": max(overall["cube"], cube), "tissue": max(overall["tissue"], on_tissue)}
            print(f"{a_name} -> {b_name}: K {a.stats.n_components} -> {b.stats.n_components}, "
                  f"largest step over the cube {cube}, from the source's tissue colours {on_tissue}", flush=True)
            clear_lut_cache()
    print(f"largest over the six directions: cube {overall['cube']}, tissue colours {overall['tissue']}")


if __name__ == "__main__":
    main()
