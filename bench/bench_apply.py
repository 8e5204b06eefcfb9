"""Time wsi-norm's per-tile apply (fit once) against torchstain's Macenko normalize.

Prints tiles/s per method on 512x512 tiles cut from the real H&E patches
(tiled to 512^2), the ratio to torchstain, LUT compile time per method and
slide-wide fit time on ~1e6 tissue pixels.  Single process.

    python bench/bench_apply.py --tiles 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_norm.color import is_background
from wsi_norm.colormap import compile_colormap
from wsi_norm.stain import METHODS, StainParams, fit_stats

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _tile(name: str, size: int) -> np.ndarray:
    img = np.asarray(Image.open(DATA / "he" / f"torchstain-{name}.png"))[..., :3]
    reps = (size // img.shape[0] + 1, size // img.shape[1] + 1, 1)
    return np.ascontiguousarray(np.tile(img, reps)[:size, :size])


def _rate(fn, tiles: list[np.ndarray]) -> float:
    fn(tiles[0])  # warm up (JIT, LUT)
    t0 = time.perf_counter()
    for t in tiles:
        fn(t)
    return len(tiles) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=20, help="tiles timed per method")
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--fit-pixels", type=int, default=1_000_000)
    args = ap.parse_args()

    src, tgt = _tile("source", args.tile_px), _tile("target", args.tile_px)
    rng = np.random.default_rng(0)
    tiles = [np.roll(src, int(rng.integers(0, args.tile_px)), axis=1) for _ in range(args.tiles)]
    pool_src = src.reshape(-1, 3)[~is_background(src.reshape(-1, 3))]
    fit_px = pool_src[rng.integers(0, len(pool_src), args.fit_pixels)]
    tgt_px = tgt.reshape(-1, 3)
    p = StainParams()

    print(f"{'method':22s} {'fit 1e6 px (s)':>14s} {'LUT (s)':>8s} {'tiles/s':>9s} {'MP/s':>8s} {'x torchstain-np':>15s}")
    rows = []
    import torchstain

    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(tgt)
    r_np = _rate(lambda t: ts.normalize(I=t, stains=False), tiles[: max(3, args.tiles // 4)])
    import torch

    tst = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    tst.fit(torch.from_numpy(tgt).permute(2, 0, 1))
    r_t = _rate(lambda t: tst.normalize(I=torch.from_numpy(t).permute(2, 0, 1), stains=False), tiles[: max(3, args.tiles // 4)])
    for method in METHODS + ("none",):
        if method == "none":
            fit_s, cmap = 0.0, compile_colormap("none")
        else:
            t0 = time.perf_counter()
            s = fit_stats(method, fit_px, p)
            fit_s = time.perf_counter() - t0
            cmap = compile_colormap(method, s, fit_stats(method, tgt_px, p), p)
        t0 = time.perf_counter()
        cmap.lut() if method != "none" else None
        lut_s = time.perf_counter() - t0
        r = _rate(cmap.apply, tiles)
        rows.append((method, fit_s, lut_s, r))
        print(f"{method:22s} {fit_s:14.2f} {lut_s:8.2f} {r:9.1f} {r * args.tile_px**2 / 1e6:8.1f} {r / r_np:15.1f}")
    for name, r in (("torchstain-macenko-np", r_np), ("torchstain-macenko-torch", r_t)):
        print(f"{name:22s} {'':14s} {'':8s} {r:9.1f} {r * args.tile_px**2 / 1e6:8.1f} {r / r_np:15.1f}")


if __name__ == "__main__":
    main()
