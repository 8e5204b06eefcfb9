"""A plain per-tile torchstain script: the yardstick for wsi-norm on a small slide.

What it does, in one process and one thread of Python (as a hand-written script would):

1. fits torchstain's Macenko normalizer (numpy backend, its defaults: Io = 240, alpha = 1,
   beta = 0.15) on the reference image;
2. reads level 0 of the slide with OpenSlide in ``--tile-px`` square tiles (512 by default,
   the tile size torchstain's own examples use), row by row;
3. normalizes each tile with ``normalizer.normalize(tile, stains=False)``, which estimates the
   stain matrix again on every tile (textbook per-tile Macenko); a tile it cannot normalize
   (glass: no pixel above beta, a degenerate covariance) is copied unchanged;
4. builds the same pyramid levels wsi-norm writes (level k + 1 = 2 x 2 mean of level k, the
   last level the first whose larger side is <= 1024 px; an odd last row or column is averaged
   with itself);
5. writes a tiled BigTIFF with tifffile in wsi-norm's layout: every level in the main IFD chain
   (lower levels flagged reduced-resolution), 256 x 256 tiles, JPEG quality 90 stored as YCbCr
   without chroma subsampling, the slide's MPP as resolution.

It reads every pixel once, normalizes every pixel, and encodes the same levels and tiles as
``wsi-norm normalize SLIDE --method macenko -o OUT.tiff``; it has no tissue sampling, no
white point, no QC gate and no provenance. With ``--method none`` step 3 is skipped: the
plain copy.

    python bench/small_slide_torchstain.py SLIDE REFERENCE.png -o OUT.tiff
"""

from __future__ import annotations

import argparse

import numpy as np
import openslide
import tifffile
import torchstain
from PIL import Image

MAX_PX = 1024  # wsi_norm.pyramid.MAX_PX: the last level's larger side
TIFF_TILE_PX = 256


def _downsample(img: np.ndarray) -> np.ndarray:
    """2 x 2 mean, rounded; an odd last row or column is averaged with itself."""
    h, w = img.shape[:2]
    if h % 2:
        img = np.concatenate([img, img[-1:]], axis=0)
    if w % 2:
        img = np.concatenate([img, img[:, -1:]], axis=1)
    x = img.astype(np.uint16)
    s = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("reference", nargs="?", help="reference image (for --method macenko)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--method", choices=("macenko", "none"), default="macenko")
    ap.add_argument("--tile-px", type=int, default=512, help="tile side read and normalized")
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args()

    normalizer = None
    if args.method == "macenko":
        if args.reference is None:
            ap.error("--method macenko needs a reference image")
        normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        normalizer.fit(np.asarray(Image.open(args.reference).convert("RGB")))

    slide = openslide.OpenSlide(args.slide)
    width, height = slide.dimensions
    out = np.empty((height, width, 3), dtype=np.uint8)
    step = args.tile_px
    failed = 0
    with np.errstate(all="ignore"):
        for y in range(0, height, step):
            for x in range(0, width, step):
                w, h = min(step, width - x), min(step, height - y)
                tile = np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))
                if normalizer is not None:
                    try:
                        tile, _, _ = normalizer.normalize(tile, stains=False)
                    except (ValueError, IndexError, np.linalg.LinAlgError):
                        failed += 1  # glass or too little stain: keep the tile
                out[y:y + h, x:x + w] = tile

    levels = [out]
    while max(levels[-1].shape[:2]) > MAX_PX:
        levels.append(_downsample(levels[-1]))

    mpp_x = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    mpp_y = slide.properties.get(openslide.PROPERTY_NAME_MPP_Y)
    with tifffile.TiffWriter(args.output, bigtiff=True) as tif:
        for k, level in enumerate(levels):
            options: dict[str, object] = {}
            if mpp_x and mpp_y:
                options["resolution"] = (1e4 / (float(mpp_x) * 2**k), 1e4 / (float(mpp_y) * 2**k))
                options["resolutionunit"] = "CENTIMETER"
            tif.write(
                level,
                tile=(TIFF_TILE_PX, TIFF_TILE_PX),
                photometric="ycbcr",
                subsampling=(1, 1),
                compression="jpeg",
                compressionargs={"level": args.quality},
                subfiletype=1 if k else 0,
                metadata=None,
                **options,
            )
    if failed:
        print(f"{failed} tile(s) copied unchanged (torchstain could not normalize them)")


if __name__ == "__main__":
    main()
