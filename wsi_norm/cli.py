"""The ``wsi-norm`` command: parses options, sets up logging, calls the library.

Every :class:`~wsi_norm.errors.WsiNormError` ends the command with one line on stderr
(``wsi-norm: error: <file>: <problem>``) and exit status 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from wsi_norm._malloc import return_freed_memory
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
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the local cluster's dask dashboard on 127.0.0.1 (port 8787 or a free one; "
        "default: none)",
    )


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """The dask client of a command (``--scheduler``, ``--dashboard``); names the dashboard."""
    from wsi_norm.cluster import dashboard_url, dask_client

    # without --verbose, distributed logs nothing of a failed task ("Compute Failed" and its
    # traceback) nor of the tasks Ctrl-C cancels: the command's one error line says it
    quiet = logging.WARNING if args.verbose else logging.CRITICAL
    with dask_client(args.scheduler, dashboard=args.dashboard, log_level=quiet) as client:
        if args.dashboard:
            print(f"dask dashboard: {dashboard_url(client)}", file=sys.stderr, flush=True)
        yield client


# ---------------------------------------------------------------- info / mask
def _cmd_info(args: argparse.Namespace) -> int:
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
        with _cluster(args):
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


# ---------------------------------------------------------------- fit / normalize
def _parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["alpha=1", "beta=0.15"]`` -> ``{"alpha": 1.0, "beta": 0.15}`` (JSON values, else str)."""
    params: dict[str, Any] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--param expects NAME=VALUE, got {item!r}")
        try:
            params[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[name.strip()] = value
    return params


class _Progress:
    """A one-line progress bar on stderr (a line per 10 % when stderr is not a terminal)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        import time

        self._label = label
        self._enabled = enabled
        self._tty = sys.stderr.isatty()
        self._start = time.perf_counter()
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        import time

        if not self._enabled or total <= 0:
            return
        elapsed = time.perf_counter() - self._start
        if self._tty:
            filled = int(30 * done / total)
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if done >= total else ""
            print(f"\r{self._label} [{bar}] {done}/{total} chunks {elapsed:6.1f} s", end=end,
                  file=sys.stderr, flush=True)
            return
        decile = int(10 * done / total)
        if decile != self._last_decile:
            self._last_decile = decile
            print(f"{self._label}: {done}/{total} chunks ({elapsed:.1f} s)", file=sys.stderr,
                  flush=True)


def _check_output(path: Path, overwrite: bool) -> None:
    from wsi_norm.errors import OutputExistsError

    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")


def _cmd_fit(args: argparse.Namespace) -> int:
    from wsi_norm.pipeline import fit_template
    from wsi_norm.template import save_template

    out = Path(args.output)
    _check_output(out, args.overwrite)
    if args.dry_run:
        print(f"would fit {args.method} on {len(args.slides)} slide(s) and write {out}")
        return 0
    with _cluster(args):
        template = fit_template(
            args.slides,
            method=args.method,
            params=_parse_params(args.param),
            n_pixels=args.n_pixels,
            seed=args.seed,
            backend=args.backend,
            force=args.force,
        )
    save_template(template, out)
    w = template.white
    print(f"{out}: {args.method} template from {len(args.slides)} slide(s), "
          f"{template.n_pixels} tissue pixels, seed {args.seed}, white point "
          f"({w.rgb[0]:.1f}, {w.rgb[1]:.1f}, {w.rgb[2]:.1f}) from {w.source}")
    stats = template.stats.to_dict()
    if "stain_matrix" in stats:
        for name, row, conc in zip(("hematoxylin", "eosin"), stats["stain_matrix"],
                                   stats.get("max_concentrations", [None, None]), strict=True):
            print(f"  {name:<12} OD ({row[0]:.4f}, {row[1]:.4f}, {row[2]:.4f})  max conc {conc:.3f}")
    return 0


def _cmd_normalize(args: argparse.Namespace) -> int:
    from wsi_norm.pipeline import normalize_slide

    out = Path(args.output)
    _check_output(out, args.overwrite)
    needs_target = args.method not in ("none", "stainnet")
    if needs_target and not (args.target or args.reference):
        raise argparse.ArgumentTypeError(f"--method {args.method} needs --target or --reference")
    if args.method == "stainnet" and not args.weights:
        raise argparse.ArgumentTypeError("--method stainnet needs --weights FILE")
    if args.dry_run:
        print(f"would normalize {args.slide} with {args.method} on {args.device} into {out}")
        return 0
    with _cluster(args):
        result = normalize_slide(
            args.slide,
            out,
            method=args.method,
            target=args.target,
            reference=args.reference,
            params=_parse_params(args.param),
            weights=args.weights,
            device=args.device,
            chunk_px=args.tile_size,
            n_pixels=args.n_pixels,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=_Progress(f"normalize {Path(args.slide).name}", enabled=not args.quiet),
            tile_px=args.out_tile,
            quality=args.quality,
            compression=args.compression,
            zarr_format=args.zarr_format,
            backend=args.backend,
            glass="keep" if args.keep_glass else "target",
            force=args.force,
        )
    t = result.timings
    print(f"{result.out}: {result.shape[1]}x{result.shape[0]} px, {args.method}, "
          f"fit {t['fit_s']:.1f} s, write {t['write_s']:.1f} s")
    qc = result.provenance.get("qc", {})
    if qc.get("forced"):
        print(f"warning: QC gate failed, written because of --force: {'; '.join(qc['problems'])}",
              file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from wsi_norm.synthetic import SITE_STAINS, generate_slide

    out = Path(args.output)
    _check_output(out, args.overwrite)
    if args.stains not in SITE_STAINS:
        raise argparse.ArgumentTypeError(
            f"--stains must be one of {', '.join(SITE_STAINS)}, got {args.stains!r}")
    if len(args.io) not in (1, 3) or not all(0 < v <= 255 for v in args.io):
        raise argparse.ArgumentTypeError(f"--io takes one value or three (R G B) in (0, 255], got {args.io}")
    truth = generate_slide(
        out,
        width=args.width,
        height=args.height,
        stain_matrix=SITE_STAINS[args.stains],
        seed=args.seed,
        tile_px=args.tile_px,
        mpp=args.mpp,
        quality=args.quality,
        compression=args.compression,
        tissue_fraction=args.tissue_fraction,
        conc_scale=tuple(args.conc_scale),
        io=tuple(args.io) if len(args.io) == 3 else args.io[0],
    )
    print(f"{out}: {args.width}x{args.height} px Beer-Lambert slide, stains {args.stains}, "
          f"seed {args.seed}, glass {list(truth.io)}, texture from {truth.texture_source}")
    return 0


# ---------------------------------------------------------------- stainnet train
def _cmd_stainnet_train(args: argparse.Namespace) -> int:
    import math

    from wsi_norm.stain.stainnet import save_stainnet
    from wsi_norm.stainnet_teacher import distill_stainnet
    from wsi_norm.stainnet_train import EpochRecord

    out = Path(args.output)
    _check_output(out, args.overwrite)
    if out.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"{out}: the model file must end in .safetensors")
    if args.dry_run:
        print(f"would distill {args.teacher} from {len(args.slides)} slide(s) to {args.target} into {out}")
        return 0

    def progress(record: EpochRecord) -> None:
        held = "n/a" if math.isnan(record.val_loss) else f"{record.val_loss:.5f} ({record.val_loss * 127.5:.2f} grey)"
        print(f"epoch {record.epoch}/{args.epochs}: train L1 {record.train_loss:.5f}, held-out L1 {held}, "
              f"{record.seconds:.1f} s", file=sys.stderr, flush=True)

    with _cluster(args):
        result = distill_stainnet(
            args.slides,
            teacher=args.teacher,
            target=args.target,
            n_pixels_per_slide=args.n_pixels,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            backend=args.backend,
            progress=None if args.quiet else progress,
        )
    save_stainnet(result.model, out, overwrite=args.overwrite)
    held = "n/a" if math.isnan(result.val_loss) else f"{result.val_loss * 127.5:.2f}"
    print(f"{out}: StainNet distilled from {args.teacher} on {len(args.slides)} slide(s), "
          f"{args.epochs} epochs, train L1 {result.history[-1].train_loss * 127.5:.2f} grey levels, "
          f"held-out L1 {held} grey levels")
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

    from wsi_norm.sampling import DEFAULT_N_PIXELS

    p = sub.add_parser("fit", help="fit a template (target statistics) from one or more slides")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--method", required=True, choices=("macenko", "vahadane", "reinhard", "histmatch"))
    p.add_argument("-o", "--output", required=True, help="template JSON to write")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="method parameter, e.g. macenko_variant=textbook white_point=239 "
                   "l1_penalty=0.01 (repeatable; see wsi_norm.stain.base.StainParams)")
    p.add_argument("--n-pixels", type=int, default=DEFAULT_N_PIXELS,
                   help="tissue pixels sampled per slide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="keep a template the QC gate refuses (implausible stains or white point)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    _add_slide_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("normalize", help="normalize a slide into a pyramidal OME-Zarr or TIFF")
    p.add_argument("slide")
    p.add_argument("--method", required=True,
                   choices=("macenko", "vahadane", "reinhard", "histmatch", "stainnet", "none"))
    group = p.add_mutually_exclusive_group()
    group.add_argument("--target", help="template JSON (from `wsi-norm fit`)")
    group.add_argument("--reference", help="reference slide or image to fit the target from")
    p.add_argument("-o", "--output", required=True, help="OUT.ome.zarr or OUT.tiff")
    p.add_argument("--weights", help="StainNet weights (.pth or .safetensors)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="method parameter")
    p.add_argument("--tile-size", type=int, default=1024,
                   help="processing chunk side in pixels (rounded to whole source tiles)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--n-pixels", type=int, default=DEFAULT_N_PIXELS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-tile", type=int, default=256, choices=(256, 512), help="TIFF tile side")
    p.add_argument("--quality", type=int, default=90, help="TIFF JPEG quality")
    p.add_argument("--compression", choices=("jpeg", "deflate"), default="jpeg",
                   help="TIFF tile compression (deflate is lossless)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                   help="3: OME-NGFF 0.5 on zarr v3; 2: NGFF 0.4 on zarr v2 for older viewers")
    p.add_argument("--keep-glass", action="store_true",
                   help="keep the source's glass colour (blended smoothly over a band of luma) "
                   "instead of rendering glass in the target's white point")
    p.add_argument("--force", action="store_true",
                   help="write even when the QC gate fails (recorded in the output's provenance)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_slide_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_normalize)

    p = sub.add_parser("generate", help="generate a Beer-Lambert test slide (pyramidal TIFF)")
    p.add_argument("output")
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--height", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stains", default="site-a", help="stain preset (site-a, site-b, site-c)")
    p.add_argument("--tissue-fraction", type=float, default=0.4)
    p.add_argument("--tile-px", type=int, default=512)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--compression", choices=("jpeg", "deflate"), default="jpeg")
    p.add_argument("--conc-scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("H", "E"),
                   help="stain strengths (factors on hematoxylin and eosin concentration)")
    p.add_argument("--io", type=float, nargs="+", default=[240.0], metavar="LEVEL",
                   help="glass intensity: one value, or R G B (a scanner's white point)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_generate)

    # ---- stainnet (wsi_norm.stainnet_teacher) -------------------------- begin
    p = sub.add_parser("stainnet", help="StainNet models: train one from a slide-wide teacher")
    stainnet_sub = p.add_subparsers(dest="stainnet_command", required=True)
    p = stainnet_sub.add_parser(
        "train", help="distill StainNet from a Macenko/Vahadane teacher over source slides")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="source slides (>= 3: one is held out)")
    p.add_argument("--teacher", required=True, choices=("macenko", "vahadane"))
    p.add_argument("--target", required=True, help="template JSON of the teacher's method")
    p.add_argument("-o", "--output", required=True, help="model .safetensors to write")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4096, help="distinct colour pairs per step")
    p.add_argument("--n-pixels", type=int, default=200_000, help="tissue pixels sampled per slide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")
    p.add_argument("--backend", choices=("openslide", "tiffslide", "image"), default=None,
                   help="slide reader (default: chosen per file)")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_stainnet_train)
    # ---- stainnet ------------------------------------------------------ end

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-norm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return_freed_memory()  # keeps peak RSS flat while slides stream (see wsi_norm._malloc)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # tifffile logs its own complaints about damaged files; ours name file and problem
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except (WsiNormError, argparse.ArgumentTypeError) as exc:
        if args.verbose:
            raise
        print(f"wsi-norm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("wsi-norm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
