"""Throughput of wsi_norm.augment's HED jitter on 512 x 512 tiles (tiles per second).

Rows: the numpy twin (one thread), the torch module on CPU with 1 and 2 intra-op threads (8-bit
and float input), and, where CUDA exists, on the device (tiles already there) and with the
host-to-device and back copies of 8-bit batches included. A plain per-pixel implementation
(log, 3 x 3 unmix, affine, 3 x 3 mix, exp in numpy, as in the papers) is timed in the same run as
the baseline, so the ratio is from one run.

    python bench/bench_augment.py --batches 6 --batch 32 --json bench-out/augment.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_norm.augment import HED_FROM_RGB, RGB_FROM_HED, HEDJitter, hed_jitter
from wsi_norm.slide import open_slide
from wsi_norm.testing.data import data_dir


def _tiles(n: int, size: int) -> np.ndarray:
    """``n`` real tiles: the torchstain source patch tiled to ``size`` and rolled at random."""
    with open_slide(data_dir() / "he" / "torchstain-source.png") as slide:
        w, h = slide.dimensions
        img = slide.read_region(0, x=0, y=0, width=w, height=h)
    big = np.tile(img, (size // img.shape[0] + 1, size // img.shape[1] + 1, 1))[:size, :size]
    rng = np.random.default_rng(0)
    return np.stack([np.roll(big, int(rng.integers(size)), axis=int(rng.integers(2))) for _ in range(n)])


def _plain(batch: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """The textbook arithmetic, per image: OD -> HED -> alpha s + beta -> OD -> RGB (float64)."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        alpha, beta = rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-sigma, sigma, 3)
        od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
        s = (od @ HED_FROM_RGB) * alpha + beta
        v = 256.0 * np.exp(-(s @ RGB_FROM_HED)) - 1.0
        out[i] = np.clip(np.rint(v), 0, 255).astype(np.uint8).reshape(img.shape)
    return out


def _rate(fn: Callable[[], Any], tiles_per_call: int, calls: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return tiles_per_call * calls / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="tiles per batch")
    ap.add_argument("--batches", type=int, default=6, help="batches timed per row")
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    host = _tiles(args.batch, args.tile_px)  # (N, H, W, 3) uint8
    rng = np.random.default_rng(1)
    module = HEDJitter(0.05)
    as_torch = torch.from_numpy(host).permute(0, 3, 1, 2).contiguous()
    as_float = as_torch.float() / 255.0
    rows: list[tuple[str, float]] = []
    rows.append(("plain numpy (per image, float64), 1 thread", _rate(lambda: _plain(host, rng), args.batch, max(1, args.batches // 3))))
    rows.append(("wsi_norm numpy twin, uint8, 1 thread", _rate(lambda: hed_jitter(host, rng=rng), args.batch, args.batches)))
    gen = torch.Generator().manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows.append((f"torch CPU uint8, {threads} thread(s)", _rate(lambda: module(as_torch, generator=gen), args.batch, args.batches)))
        rows.append((f"torch CPU float32, {threads} thread(s)", _rate(lambda: module(as_float, generator=gen), args.batch, max(1, args.batches // 3))))
    if torch.cuda.is_available():
        dev = as_torch.cuda()
        dev_float = dev.float() / 255.0
        cuda_gen = torch.Generator(device="cuda").manual_seed(0)
        sync = torch.cuda.synchronize
        rows.append(("CUDA uint8, on device", _rate(lambda: module(dev, generator=cuda_gen), args.batch, args.batches * 10, sync)))
        rows.append(("CUDA float32, on device", _rate(lambda: module(dev_float, generator=cuda_gen), args.batch, args.batches * 10, sync)))
        pinned = as_torch.pin_memory()
        rows.append(("CUDA uint8, host -> device -> host copies included",
                     _rate(lambda: module(pinned.cuda(non_blocking=True), generator=cuda_gen).cpu(), args.batch, args.batches * 5, sync)))
    base = rows[0][1]
    print(f"HED jitter (sigma 0.05), {args.tile_px}^2 tiles, batches of {args.batch}")
    print(f"{'path':55s} {'tiles/s':>9s} {'x plain':>8s}")
    for name, rate in rows:
        print(f"{name:55s} {rate:9.1f} {rate / base:8.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tile_px": args.tile_px, "batch": args.batch,
                                         "rows": [{"path": n, "tiles_per_s": r} for n, r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
