"""Throughput of StainNet evaluation paths on 512x512 H&E tiles (CPU; optionally CUDA).

Usage::

    python bench/bench_stainnet.py                       # CPU, published cytopathology model
    python bench/bench_stainnet.py --device cuda --batch 64

CPU rows (one thread each): torch float32 matmuls, numpy float32 reference, the compiled
per-slab module (the published Conv2d arithmetic), and the 256^3 LUT gather (numba) -- the LUT build time is reported
separately.  CUDA rows count the uint8 host->device copy, the work and the copy back, for
``--batch`` tiles at a time.  Tiles are crops of the real H&E patches in ../shared/data
(their colours, so the LUT gather sees realistic cache behaviour), tiled to 512x512.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

PAPER_FPS = 881.8  # frames per second on 512x512 tiles reported in the StainNet paper (GPU)
TILE = 512
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _tiles(n: int) -> np.ndarray:
    src = np.asarray(Image.open(DATA / "he" / "torchstain-source.png").convert("RGBA"))[..., :3]
    tgt = np.asarray(Image.open(DATA / "he" / "torchstain-target.png").convert("RGBA"))[..., :3]
    out = np.empty((n, TILE, TILE, 3), np.uint8)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (src, tgt)[i % 2]
        reps = np.tile(img, (2, 2, 1))
        r = int(rng.integers(0, reps.shape[0] - TILE))
        c = int(rng.integers(0, reps.shape[1] - TILE))
        out[i] = reps[r : r + TILE, c : c + TILE]
    return out


def _time(fn: Callable[[], object], *, min_s: float, min_runs: int = 2) -> float:
    """Seconds per call: best of repeated runs after one warm-up call."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < min_runs or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights", type=Path, default=DATA / "stainnet" / "StainNet-3x0_best_psnr_layer3_ch32.pth"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=64, help="tiles per CUDA batch")
    parser.add_argument(
        "--min-seconds", type=float, default=1.0, help="time each row at least this long"
    )
    args = parser.parse_args(argv)

    import torch

    from wsi_norm.colormap.stainnet import StainNetMap, load_stainnet

    torch.set_num_threads(1)
    cmap = StainNetMap(load_stainnet(args.weights))
    tiles = _tiles(max(4, args.batch if args.device != "cpu" else 4))
    tile = tiles[0]
    rows: list[tuple[str, float]] = []  # (name, seconds per tile)

    t0 = time.perf_counter()
    cmap.lut()
    lut_build_s = time.perf_counter() - t0

    tensor_tile = torch.from_numpy(tile)
    rows.append(
        (
            "cpu torch float32 matmul (1 thread)",
            _time(lambda: cmap.apply_torch(tensor_tile, use_lut=False), min_s=args.min_seconds),
        )
    )
    rows.append(
        (
            "cpu numpy float32 reference",
            _time(lambda: cmap.evaluate_numpy(tile), min_s=args.min_seconds),
        )
    )
    rows.append(
        (
            "cpu published module, 64k-pixel slabs",
            _time(lambda: cmap.apply(tile, method="direct"), min_s=args.min_seconds),
        )
    )
    rows.append(
        (
            "cpu numba LUT gather",
            _time(lambda: cmap.apply(tile, method="lut"), min_s=args.min_seconds),
        )
    )

    if args.device != "cpu":
        dev = torch.device(args.device)
        host = torch.from_numpy(tiles)
        if dev.type == "cuda":
            host = host.pin_memory()  # page-locked: faster, asynchronous host->device copies
        for method in ("direct", "lut"):

            def run(method: str = method) -> None:
                out = cmap.apply_torch(host.to(dev, non_blocking=True), use_lut=method == "lut")
                out.cpu()

            per_batch = _time(run, min_s=args.min_seconds)
            rows.append(
                (
                    f"{dev} {method}, {args.batch} tiles/batch, incl. uint8 copies",
                    per_batch / args.batch,
                )
            )

    print(
        f"StainNet throughput, {TILE}x{TILE} tiles; "
        f"LUT build {lut_build_s:.2f} s (once per map and process)"
    )
    print(f"{'path':58s} {'tiles/s':>10s} {'MP/s':>8s}")
    for name, seconds in rows:
        print(f"{name:58s} {1 / seconds:10.1f} {TILE * TILE / seconds / 1e6:8.1f}")
    print(
        f"{'paper (Kang et al. 2021), GPU, 512x512':58s} {PAPER_FPS:10.1f} "
        f"{TILE * TILE * PAPER_FPS / 1e6:8.1f}"
    )


if __name__ == "__main__":
    main()
