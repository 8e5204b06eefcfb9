"""The ``wsi-norm`` command: parses options, sets up logging, calls the library.

Every :class:`~wsi_norm.errors.WsiNormError` ends the command with one line on stderr
(``wsi-norm: error: <file>: <problem>``) and exit status 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_norm.errors import WsiNormError

log = logging.getLogger("wsi_norm.cli")

EXIT_ERROR = 2


def _add_slide_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("openslide", "tiffslide", "image"),
        default=None,
        help="slide reader (default: OpenSlide for files it knows, tiffslide for other tiled "
        "TIFFs, the image reader for PNG/JPEG/untiled TIFF)",
    )
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel to assume")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        default=None,
        help="address of an existing dask scheduler (default: $WSI_NORM_SCHEDULER, else a "
        "local in-process cluster)",
    )


# ---------------------------------------------------------------- info / mask
def _cmd_info(args: argparse.Namespace) -> int:
    from wsi_norm.cluster import dask_client
    from wsi_norm.mask import coarse_mask, tissue_fraction
    from wsi_norm.slide import open_slide

    slide = open_slide(args.slide, backend=args.backend, mpp=args.mpp)
    facts: dict[str, Any] = {
        "path": str(slide.path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": list(slide.level_downsamples),
        "tile_size": [list(t) if t else None for t in map(slide.tile_size, range(slide.level_count))],
        "mpp": list(slide.mpp) if slide.mpp else None,
        "chunk_shape": list(slide.chunk_shape(0)),
    }
    if not args.no_tissue:
        with dask_client(args.scheduler):
            coarse = coarse_mask(slide)
            stats = tissue_fraction(slide, coarse=coarse)
        facts["tissue_fraction"] = stats.fraction
        facts["tissue_chunks"] = [stats.chunks_read, stats.chunks_total]
    if args.properties or args.json:
        facts["properties"] = slide.properties
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    w, h = slide.dimensions
    mpp = f"{slide.mpp[0]:.4g} x {slide.mpp[1]:.4g} um/px" if slide.mpp else "none recorded"
    lines = [
        f"file       {slide.path}",
        f"backend    {slide.backend}  (vendor: {slide.vendor})",
        f"size       {w} x {h} px  ({w * h / 1e6:.1f} MP)",
        f"mpp        {mpp}",
        f"levels     {slide.level_count}",
    ]
    for level, ((lw, lh), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
        tile = slide.tile_size(level)
        tile_s = f"tiles {tile[0]}x{tile[1]}" if tile else "untiled"
        lines.append(f"  [{level}] {lw} x {lh}  downsample {ds:.4g}  {tile_s}")
    if "tissue_fraction" in facts:
        read, total = facts["tissue_chunks"]
        lines.append(
            f"tissue     {facts['tissue_fraction']:.1%} of pixels (gray <= 200; "
            f"{read} of {total} chunks hold tissue)"
        )
    if args.properties:
        lines += [f"  {k} = {v}" for k, v in sorted(slide.properties.items())]
    print("\n".join(lines))
    return 0


def _cmd_mask(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from wsi_norm.mask import coarse_mask
    from wsi_norm.slide import open_slide

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        from wsi_norm.errors import OutputExistsError

        raise OutputExistsError(f"{out}: exists; pass --overwrite to replace it")
    slide = open_slide(args.slide, backend=args.backend, mpp=args.mpp)
    coarse = coarse_mask(slide, max_px=args.max_px)
    if args.overlay:
        thumb = slide.thumbnail(args.max_px)[: coarse.mask.shape[0], : coarse.mask.shape[1]]
        tint = np.array([0, 160, 0], dtype=np.float32)
        img = thumb.astype(np.float32)
        img[coarse.mask] = 0.6 * img[coarse.mask] + 0.4 * tint
        Image.fromarray(img.round().astype(np.uint8)).save(out)
    else:
        Image.fromarray((coarse.mask * 255).astype(np.uint8), mode="L").save(out)
    print(
        f"{out}: coarse tissue mask {coarse.mask.shape[1]}x{coarse.mask.shape[0]} "
        f"(white = tissue, 1 px = {coarse.downsample[0]:.2f} level-0 px), "
        f"tissue {coarse.fraction:.1%}"
    )
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wsi-norm`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="wsi-norm",
        description="Slide-wide stain normalization of whole-slide images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a slide's facts and tissue fraction")
    p.add_argument("slide")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--properties", action="store_true", help="list all properties")
    p.add_argument("--no-tissue", action="store_true", help="skip the tissue fraction")
    _add_slide_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("mask", help="write the coarse tissue mask as an image")
    p.add_argument("slide")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--max-px", type=int, default=2048, help="larger side of the mask image")
    p.add_argument("--overlay", action="store_true", help="tint tissue on the thumbnail instead")
    p.add_argument("--overwrite", action="store_true")
    _add_slide_options(p)
    p.set_defaults(func=_cmd_mask)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-norm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # tifffile logs its own complaints about damaged files; ours name file and problem
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except WsiNormError as exc:
        if args.verbose:
            raise
        print(f"wsi-norm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("wsi-norm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
