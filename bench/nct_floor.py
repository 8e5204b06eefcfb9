"""Cost floor of Neural Color Transfer per 512x512 tile: VGG19 features plus brute-force NN fields.

Usage::

    python bench/nct_floor.py                         # 2 CPU threads, 2 tiles; CUDA rows if present
    python bench/nct_floor.py --threads 2 --tiles 2 --json nct_floor.json
    python bench/nct_floor.py --cpu-field-levels 4    # also brute-force relu2_1 on the CPU (~1 min)
    python bench/nct_floor.py --tf32                  # CUDA products on TF32 tensor cores

Neural Color Transfer (He, Liao, Yuan, Sander, "Neural Color Transfer between Images", 2017;
revised as "Progressive Color Transfer with Dense Semantic Correspondences", ACM TOG 2019) works
coarse to fine over the VGG19 layers relu5_1, relu4_1, relu3_1, relu2_1, relu1_1.  At each level it
matches deep features of the source and the reference both ways (nearest-neighbour fields, found
by PatchMatch over feature patches), fits a local linear colour model per pixel from the matches,
and upsamples to the next level.  This script times only two parts of that, each in its cheapest
form, so the figures are a *floor*:

* **features**: one forward pass of the source tile through VGG19 up to relu5_1 (relu1_1 ...
  relu5_1 read on the way).  The reference's features are computed once per slide and are not
  counted.  (The paper re-extracts the source's features from the intermediate result at each
  level; the ``features, re-extracted per level`` row times that too, but the floor uses one pass.)
* **NN fields**: for each level, the cosine similarity of every source position with every
  reference position (matrix products in chunks) and the argmax, in both directions.  Exact
  nearest neighbours of single feature vectors (1x1 patches): PatchMatch over k x k patches would
  approximate the same search with a k^2 larger distance, so this brute force of 1x1 patches
  bounds the matching work from below as far as the arithmetic goes.  The local linear colour
  model, its guidance filter and the upsampling are not timed at all.

The VGG19 stack is written here in plain torch (torchvision is not a dependency) with **random
weights** (He-normal, seeded): the time of a convolution does not depend on the values of its
weights, so the timing is that of the ImageNet network NCT needs, whose weights no package
reachable from this project ships (docs/decisions/0001-neural-color-transfer.md).

The projection to a gigapixel is per-tile time x (1e9 / 512^2) tiles.  StainNet's per-tile time
(the published checkpoint through :class:`wsi_norm.colormap.stainnet.StainNetMap`) is measured in
the same run, on the same tile and threads, so the ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

TILE = 512
GIGAPIXEL = 1e9
TILES_PER_GP = GIGAPIXEL / (TILE * TILE)
# StainNet's goal on one H100 (StainNet issue, BENCHMARKS.md): >= 20,000 tiles/s, copies counted.
STAINNET_GOAL_TILES_PER_S = 20_000.0
# The figure the NCT paper reports, as quoted in issue 16: about 30 s for a 500x500 image.
PAPER_S_PER_500SQ = 30.0
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# VGG19's convolutional part (Simonyan & Zisserman 2015, configuration E): 3x3 convolutions with
# padding 1, each followed by ReLU; "M" is a 2x2 max-pool with stride 2.  The last block is cut
# after its first convolution: nothing past relu5_1 is used by NCT.
VGG19_PLAN: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512,
)  # fmt: skip
# The ReLUs NCT reads: the first of each block (relu{b}_1), coarse to fine in NCT's order.
LEVELS: tuple[str, ...] = ("relu5_1", "relu4_1", "relu3_1", "relu2_1", "relu1_1")
LEVEL_CHANNELS = {"relu1_1": 64, "relu2_1": 128, "relu3_1": 256, "relu4_1": 512, "relu5_1": 512}
LEVEL_STRIDE = {"relu1_1": 1, "relu2_1": 2, "relu3_1": 4, "relu4_1": 8, "relu5_1": 16}
# ImageNet channel statistics VGG19 expects its RGB input in [0, 1] normalised with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- the network


class VGG19Features(torch.nn.Module):
    """VGG19's convolutions up to relu5_1, returning relu1_1 ... relu5_1.

    Parameters
    ----------
    seed : int, keyword-only
        Seed of the random (He-normal) weights; biases are zero.  Random weights time the same
        as ImageNet's; they do not give NCT's features.
    """

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers: list[torch.nn.Module] = []
        self._taps: dict[int, str] = {}  # index in ``layers`` of a tapped ReLU -> its name
        in_ch, block, conv_in_block = 3, 1, 0
        for item in VGG19_PLAN:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
                block, conv_in_block = block + 1, 0
                continue
            out_ch = int(item)
            conv = torch.nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
            with torch.no_grad():
                std = (2.0 / (in_ch * 9)) ** 0.5
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
                assert conv.bias is not None
                conv.bias.zero_()
            layers.append(conv)
            layers.append(torch.nn.ReLU(inplace=False))
            conv_in_block += 1
            if conv_in_block == 1:
                self._taps[len(layers) - 1] = f"relu{block}_1"
            in_ch = out_ch
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, *, stop_at: str = "relu5_1") -> dict[str, torch.Tensor]:
        """Features of ``x`` down to ``stop_at``.

        Parameters
        ----------
        x : (N, 3, H, W) float tensor
            ImageNet-normalised RGB (see :func:`to_vgg_input`); H, W multiples of 16 for
            relu5_1.
        stop_at : str, keyword-only
            The last level computed (one of :data:`LEVELS`).

        Returns
        -------
        dict level -> (N, C, H / stride, W / stride) float tensor, levels relu1_1 ... stop_at
        """
        if stop_at not in LEVEL_STRIDE:
            raise ValueError(f"stop_at must be one of {LEVELS}, got {stop_at!r}")
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x)
            name = self._taps.get(i)
            if name is not None:
                out[name] = x
                if name == stop_at:
                    break
        return out


def to_vgg_input(rgb: NDArray[np.uint8], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(H, W, 3) uint8`` RGB -> ``(1, 3, H, W) float32`` ImageNet-normalised, on ``device``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(1, 3, 1, 1)
    return (t - mean) / std


# --------------------------------------------------------------------------- NN fields


def nn_field(
    source: torch.Tensor, reference: torch.Tensor, *, chunk_elems: int = 1 << 25
) -> torch.Tensor:
    """Exact nearest-neighbour field by cosine similarity of feature vectors (1x1 patches).

    Parameters
    ----------
    source : (C, h, w) float tensor
    reference : (C, h2, w2) float tensor, same C and device
    chunk_elems : int, keyword-only
        At most this many similarities held at once (source rows per chunk =
        ``chunk_elems // (h2 * w2)``, at least 1); the full matrix at relu1_1 of a 512^2 tile
        would be 256 GiB.

    Returns
    -------
    (h, w) int64 tensor: for each source position, the flat index ``r * w2 + c`` of the
    reference position whose feature has the highest cosine similarity (first one on ties).
    """
    if source.ndim != 3 or reference.ndim != 3 or source.shape[0] != reference.shape[0]:
        raise ValueError(
            f"source and reference must be (C, h, w) with the same C, got "
            f"{tuple(source.shape)} and {tuple(reference.shape)}"
        )
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    c, h, w = source.shape
    src = torch.nn.functional.normalize(source.reshape(c, h * w).T, dim=1)  # (P, C)
    ref = torch.nn.functional.normalize(reference.reshape(c, -1), dim=0)  # (C, Q)
    rows = max(1, chunk_elems // ref.shape[1])
    out = torch.empty(h * w, dtype=torch.int64, device=source.device)
    for start in range(0, h * w, rows):
        out[start : start + rows] = torch.argmax(src[start : start + rows] @ ref, dim=1)
    return out.reshape(h, w)


def bidirectional_fields(
    source: torch.Tensor, reference: torch.Tensor, *, chunk_elems: int = 1 << 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source -> reference and reference -> source fields, as NCT's bidirectional matching."""
    return (
        nn_field(source, reference, chunk_elems=chunk_elems),
        nn_field(reference, source, chunk_elems=chunk_elems),
    )


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: bool = True
) -> float:
    """Seconds per call: the best of ``repeats`` timed calls, after one untimed call if ``warmup``."""
    if warmup:
        fn()
        _sync(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _tiles(n: int) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """``n`` source tiles (N, 512, 512, 3) uint8 and one reference tile, from the real H&E pair."""
    src = np.asarray(Image.open(DATA / "he" / "torchstain-source.png").convert("RGB"))
    ref = np.asarray(Image.open(DATA / "he" / "torchstain-target.png").convert("RGB"))
    rng = np.random.default_rng(0)
    reps = np.tile(src, (2, 2, 1))
    out = np.empty((n, TILE, TILE, 3), np.uint8)
    for i in range(n):
        r = int(rng.integers(0, reps.shape[0] - TILE))
        c = int(rng.integers(0, reps.shape[1] - TILE))
        out[i] = reps[r : r + TILE, c : c + TILE]
    return out, np.ascontiguousarray(np.tile(ref, (2, 2, 1))[:TILE, :TILE])


def _field_flops(level: str) -> float:
    """Multiply-adds x 2 of one direction's brute-force field at ``level`` on a 512^2 tile pair."""
    positions = (TILE // LEVEL_STRIDE[level]) ** 2
    return 2.0 * positions * positions * LEVEL_CHANNELS[level]


def measure(
    device: torch.device,
    tiles: NDArray[np.uint8],
    reference: NDArray[np.uint8],
    *,
    field_levels: int,
    repeats: int,
) -> dict[str, Any]:
    """Per-tile seconds of features and fields on ``device``.

    ``field_levels`` levels (coarse first, of :data:`LEVELS`) are brute-forced; the finer ones
    are projected from the finest measured level's rate (flop/s) and marked so.
    """
    net = VGG19Features(seed=0).to(device).eval()
    with torch.inference_mode():
        ref_feats = net(to_vgg_input(reference, device))
        src_inputs = [to_vgg_input(t, device) for t in tiles]
        feature_s = []
        progressive_s = []
        for i, x in enumerate(src_inputs):
            feature_s.append(_time(lambda x=x: net(x), device, repeats=repeats, warmup=i == 0))

            def progressive(x: torch.Tensor = x) -> None:
                for level in LEVELS:  # one pass per level, each stopping at that level
                    net(x, stop_at=level)

            progressive_s.append(_time(progressive, device, repeats=1, warmup=False))
        feats = net(src_inputs[0])
        fields: dict[str, dict[str, Any]] = {}
        rate = None
        # similarities held at once: 128 MiB on the CPU, 1 GiB on a GPU (fewer, larger products)
        chunk = 1 << 25 if device.type == "cpu" else 1 << 28
        for level in LEVELS[:field_levels]:
            a, b = feats[level][0], ref_feats[level][0]
            s = _time(
                lambda a=a, b=b: bidirectional_fields(a, b, chunk_elems=chunk),
                device,
                repeats=repeats,
                warmup=device.type != "cpu",  # CUDA: first call pays for cuBLAS set-up
            )
            fields[level] = {"seconds": s, "measured": True}
            rate = 2 * _field_flops(level) / s
        for level in LEVELS[field_levels:]:
            if rate is None:
                break
            fields[level] = {"seconds": 2 * _field_flops(level) / rate, "measured": False}
    return {
        "features_s": float(np.median(feature_s)),
        "features_progressive_s": float(np.median(progressive_s)),
        "fields": fields,
    }


def stainnet_per_tile(
    device: torch.device, tiles: NDArray[np.uint8], weights: Path, *, repeats: int
) -> dict[str, float]:
    """StainNet's seconds per tile on ``device``: the published module, and (CPU) the LUT gather."""
    from wsi_norm.colormap.stainnet import StainNetMap, load_stainnet

    cmap = StainNetMap(load_stainnet(weights))
    tile = tiles[0]
    out: dict[str, float] = {}
    if device.type == "cpu":
        out["direct"] = _time(lambda: cmap.apply(tile, method="direct"), device, repeats=repeats)
        cmap.lut()  # built once per map and process; not part of the per-tile time
        out["lut"] = _time(lambda: cmap.apply(tile, method="lut"), device, repeats=repeats)
        return out
    batch = torch.from_numpy(np.repeat(tile[None], 64, axis=0)).to(device)
    for name, use_lut in (("direct", False), ("lut", True)):
        per_batch = _time(
            lambda u=use_lut: cmap.apply_torch(batch, use_lut=u), device, repeats=repeats
        )
        out[name] = per_batch / batch.shape[0]
    return out


# --------------------------------------------------------------------------- report


def _hours_per_gp(seconds_per_tile: float) -> float:
    return seconds_per_tile * TILES_PER_GP / 3600.0


def _fmt_s(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:8.2f} s "
    return f"{seconds * 1e3:8.2f} ms"


def summarize(result: dict[str, Any], stainnet: dict[str, float]) -> dict[str, Any]:
    """Floor totals per tile and per gigapixel, and ratios to StainNet (measured and goal)."""
    fields = result["fields"]
    to_relu2 = sum(fields[lv]["seconds"] for lv in LEVELS[:4] if lv in fields)
    to_relu1 = to_relu2 + (fields["relu1_1"]["seconds"] if "relu1_1" in fields else 0.0)
    floor = result["features_s"] + to_relu2
    best_stainnet = min(stainnet.values())
    return {
        "fields_to_relu2_1_flop": sum(2 * _field_flops(lv) for lv in LEVELS[:4]),
        "fields_to_relu2_1_s": to_relu2,
        "fields_to_relu1_1_s": to_relu1,
        "floor_s_per_tile": floor,
        "floor_h_per_gp": _hours_per_gp(floor),
        "floor_with_relu1_1_h_per_gp": _hours_per_gp(result["features_s"] + to_relu1),
        "features_only_h_per_gp": _hours_per_gp(result["features_s"]),
        "stainnet_s_per_tile": stainnet,
        "floor_over_stainnet": {k: floor / v for k, v in stainnet.items()},
        "floor_over_stainnet_best": floor / best_stainnet,
        "floor_over_stainnet_goal": floor * STAINNET_GOAL_TILES_PER_S,
        "projected_levels": [lv for lv in LEVELS if lv in fields and not fields[lv]["measured"]],
    }


def _print(label: str, result: dict[str, Any], summary: dict[str, Any]) -> None:
    print(f"\n{label}")
    print(f"{'row (per 512x512 tile)':52s} {'time':>11s} {'h / GP':>9s}")

    def row(name: str, seconds: float) -> None:
        print(f"{name:52s} {_fmt_s(seconds):>11s} {_hours_per_gp(seconds):9.3f}")

    row("features, one pass to relu5_1 (floor)", result["features_s"])
    row("features, re-extracted per level (5 passes)", result["features_progressive_s"])
    for level, f in result["fields"].items():
        tag = "measured" if f["measured"] else "projected from flop rate"
        row(f"NN fields both ways, {level} ({tag})", f["seconds"])
    row("floor: features + fields relu5_1..relu2_1", summary["floor_s_per_tile"])
    row("  ... + fields at relu1_1", result["features_s"] + summary["fields_to_relu1_1_s"])
    for name, s in summary["stainnet_s_per_tile"].items():
        row(f"StainNet {name} (same run)", s)
    ratios = ", ".join(f"{k} {v:,.0f} x" for k, v in summary["floor_over_stainnet"].items())
    print(f"floor / StainNet: {ratios}")
    print(
        f"floor / StainNet's goal ({STAINNET_GOAL_TILES_PER_S:,.0f} tiles/s on one H100): "
        f"{summary['floor_over_stainnet_goal']:,.0f} x"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2, help="source tiles timed (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed calls per measurement (best kept)"
    )
    parser.add_argument(
        "--cpu-field-levels",
        type=int,
        default=3,
        choices=range(6),
        help="levels brute-forced on the CPU, coarse first (3: relu5_1..relu3_1; the finer "
        "ones are projected from the measured flop rate)",
    )
    parser.add_argument("--gpu-field-levels", type=int, default=5, choices=range(6))
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: let float32 matrix products use TF32 tensor cores (default: full float32)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=DATA / "stainnet" / "StainNet-3x0_best_psnr_layer3_ch32.pth",
        help="StainNet checkpoint timed beside NCT",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.tiles < 1:
        parser.error(f"--tiles must be >= 1, got {args.tiles}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    torch.set_num_threads(args.threads)
    tiles, reference = _tiles(args.tiles)
    report: dict[str, Any] = {
        "tile_px": TILE,
        "tiles": args.tiles,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "weights": "random (He-normal, seed 0): timing does not depend on weight values",
        "paper_h_per_gp": PAPER_S_PER_500SQ * GIGAPIXEL / 500**2 / 3600.0,
        "runs": {},
    }

    cpu = torch.device("cpu")
    cpu_result = measure(
        cpu, tiles, reference, field_levels=args.cpu_field_levels, repeats=args.repeats
    )
    cpu_stainnet = stainnet_per_tile(cpu, tiles, args.weights, repeats=max(10, args.repeats))
    cpu_summary = summarize(cpu_result, cpu_stainnet)
    report["runs"]["cpu"] = {**cpu_result, **cpu_summary}
    _print(f"CPU, {args.threads} threads ({os.cpu_count()} cores)", cpu_result, cpu_summary)

    if not args.no_cuda and torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        report["cuda_matmul_tf32"] = bool(args.tf32)
        gpu_result = measure(
            dev, tiles, reference, field_levels=args.gpu_field_levels, repeats=max(3, args.repeats)
        )
        gpu_stainnet = stainnet_per_tile(dev, tiles, args.weights, repeats=max(10, args.repeats))
        gpu_summary = summarize(gpu_result, gpu_stainnet)
        report["runs"]["cuda"] = {
            **gpu_result,
            **gpu_summary,
            "device_name": torch.cuda.get_device_name(dev),
        }
        _print(f"CUDA, {torch.cuda.get_device_name(dev)}", gpu_result, gpu_summary)
    else:
        print("\nCUDA: no device (or --no-cuda); GPU rows skipped")

    print(
        f"\npaper (as quoted in issue 16): {PAPER_S_PER_500SQ:.0f} s per 500x500 image = "
        f"{report['paper_h_per_gp']:.1f} h / GP"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
