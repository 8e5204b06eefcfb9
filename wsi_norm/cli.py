"""The ``wsi-norm`` command: parses options, sets up logging, calls the library.

Every :class:`~wsi_norm.errors.WsiNormError` ends the command with one line on stderr
(``wsi-norm: error: <file>: <problem>``) and exit status 2; ``--verbose`` shows the traceback.
Usage errors (an option out of range, an unknown ``--param``, an output suffix no writer takes, a
missing input or output folder) end the same way, and are all checked before any fit starts,
``--dry-run`` included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Self

from wsi_norm.errors import WsiNormError
from wsi_norm.runtime import return_freed_memory, single_threaded_blas
from wsi_norm.stain import ALL_METHODS, METHODS, STAIN_MATRIX_METHODS

log = logging.getLogger("wsi_norm.cli")

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``(default: X)`` after every option with a meaningful default; epilogs printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's ``dest`` and prints a
    one-line deprecation note on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"wsi-norm: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# ---------------------------------------------------------------- option value types
def _int_in(low: int, high: int | None = None, *, multiple_of: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (and a multiple of ``multiple_of``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        if value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= low`` (``> low`` if ``low_open``), ``<= high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            allowed = bound if high is None else f"{bound} and <= {high:g}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


_POSITIVE_INT = _int_in(1)
_SEED = _int_in(0)
_QUALITY = _int_in(1, 100)
_TILE_PX = _int_in(16, multiple_of=16)
_MPP = _float_in(0.0, low_open=True)

# WriterOptions' default, spelled here so that building the parser does not import the
# writers (zarr, dask: ~1 s); tests/integration/test_zarr_codecs.py checks they agree.
_ZARR_CODEC_DEFAULT = "lz4:5"


def _zarr_codec(text: str) -> str:
    """An argparse ``type``: an OME-Zarr codec (:func:`wsi_norm.writers.parse_zarr_codec`), canonical."""
    from wsi_norm.writers import parse_zarr_codec  # only when a normalize command is parsed

    try:
        return str(parse_zarr_codec(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_slide_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("openslide", "tiffslide", "image", "ome-zarr"),
        default=None,
        help="slide reader (default: OpenSlide for files it knows, tiffslide for other tiled "
        "TIFFs, OME-TIFF pyramids (SubIFDs) and tiles OpenSlide cannot decode, the image reader for PNG/JPEG/untiled TIFF, "
        "ome-zarr for an OME-Zarr folder); a --reference this reader cannot read gets the default",
    )
    p.add_argument("--mpp", type=_MPP, default=None,
                   help="microns per pixel (x = y) to assume at level 0, replacing what the file "
                   "records (or supplying it for a file that records none); written into the "
                   "output and recorded with the fit (default: the file's own)")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        default=None,
        help="address of an existing dask scheduler, or 'local' for an embedded in-process "
        "dask cluster (default: $WSI_NORM_SCHEDULER, else dask's threaded scheduler in this "
        "process; --dashboard starts the embedded cluster)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the embedded cluster's dask dashboard on 127.0.0.1 (port 8787 or a free "
        "one; starts that cluster; default: none)",
    )


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """The dask client of a command (``--scheduler``, ``--dashboard``); names the dashboard.

    Unless an option or ``$WSI_NORM_SCHEDULER`` asks for a cluster, none is started: the work
    runs on dask's threaded scheduler in this process (yields None)."""
    from wsi_norm.cluster import dashboard_url, dask_scheduler

    # without --verbose, distributed logs nothing of a failed task ("Compute Failed" and its
    # traceback) nor of the tasks Ctrl-C cancels: the command's one error line says it
    quiet = logging.WARNING if args.verbose else logging.CRITICAL
    with dask_scheduler(args.scheduler, dashboard=args.dashboard, log_level=quiet,
                        embedded_cluster=False) as client:
        if args.dashboard and client is not None:  # a dashboard always has its cluster
            print(f"dask dashboard: {dashboard_url(client)}", file=sys.stderr, flush=True)
        yield client


def _needs_scheduler(args: argparse.Namespace, slide: Any, out: Path, writer: Any) -> bool:
    """False for a run on the CPU (a slide the pipeline holds in memory, or one it computes block
    by block on plain threads) when no option or ``$WSI_NORM_SCHEDULER`` asks for a cluster: such
    a run computes nothing with dask, so it does not import it (0.08-0.11 s), and the sample's
    windows run on a plain thread pool (the same sample). Otherwise :func:`_cluster` is set up."""
    from wsi_norm.cluster import SCHEDULER_ENV
    from wsi_norm.pipeline import runs_in_memory, runs_on_threads

    if args.scheduler or args.dashboard or os.environ.get(SCHEDULER_ENV):
        return True
    return not (runs_in_memory(slide, out, device=args.device, writer=writer)
                or runs_on_threads(device=args.device))


# ---------------------------------------------------------------- info / mask
def _cmd_info(args: argparse.Namespace) -> int:
    from wsi_norm.slide import open_slide
    from wsi_norm.tissue.mask import coarse_mask, tissue_fraction

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
        "objective_power": slide.objective_power,
        "chunk_shape": list(slide.chunk_shape(0)),
        "scanner": slide.scanner_metadata(),
    }
    coding = slide.jpeg_coding()
    if coding is not None:
        facts["jpeg_coding"] = {**coding.to_dict(), "quality": coding.quality}
    record = slide.provenance
    if record is not None:
        facts["provenance"] = record
    if not args.no_tissue:
        coarse = coarse_mask(slide)
        facts["tissue_fraction"] = coarse.fraction
        if args.exact:
            with _cluster(args):
                stats = tissue_fraction(slide, coarse=coarse)
            facts["tissue_fraction_level0"] = stats.fraction
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
        f"objective  {_power_text(slide.objective_power)}",
        f"levels     {slide.level_count}",
    ]
    for level, ((lw, lh), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
        tile = slide.tile_size(level)
        tile_s = f"tiles {tile[0]}x{tile[1]}" if tile else "untiled"
        lines.append(f"  [{level}] {lw} x {lh}  downsample {ds:.4g}  {tile_s}")
    if coding is not None:
        quality = f"quality {coding.quality} (libjpeg's tables)" if coding.quality else "its own tables"
        lines.append(f"coding     JPEG tiles: {'RGB' if coding.rgb else 'YCbCr'} {coding.subsampling}, {quality}")
    if "tissue_fraction" in facts:
        lines.append(f"tissue     {facts['tissue_fraction']:.1%} of the slide (gray <= 200 on the coarse view)")
    if "tissue_fraction_level0" in facts:
        read, total = facts["tissue_chunks"]
        lines.append(f"           {facts['tissue_fraction_level0']:.1%} of level-0 pixels "
                     f"(--exact; {read} of {total} chunks hold tissue)")
    lines += _output_lines(slide.scanner_metadata(), record)
    if args.properties:
        lines += [f"  {k} = {v}" for k, v in sorted(slide.properties.items())]
    print("\n".join(lines))
    return 0


def _power_text(power: Any) -> str:
    return f"{power:g}x" if isinstance(power, (int, float)) else "none recorded"


def _output_lines(scanner: dict[str, Any], record: dict[str, Any] | None) -> list[str]:
    """``info`` lines on the scanner and, for a wsi-norm output, on the run that wrote it."""
    props = scanner.get("properties") or {}
    model = next((props[k] for k in ("aperio.ScanScope ID", "tiff.Model", "tiff.Make") if k in props), None)
    lines = [f"scanner    {scanner.get('vendor')}" + (f", {model}" if model else "")
             + (f" ({len(props)} properties kept)" if props else "")]
    icc = scanner.get("icc_profile")
    if isinstance(icc, dict):
        lines.append(f"icc        {icc.get('description')} ({icc.get('bytes')} bytes): not applied, "
                     "stain fits and maps use the RGB values as stored")
    if record is None:
        return lines
    source = record.get("source") or {}
    written = record.get("written") or {}
    mpp = source.get("mpp")
    mpp_text = f"{mpp[0]:.4g} um/px" if isinstance(mpp, list) and mpp else "no MPP"
    lines[0] += "  (of the source, as recorded)"
    lines.insert(0, f"source     {source.get('name')}  ({scanner.get('vendor')}, "
                    f"{_power_text(scanner.get('objective_power'))}, {mpp_text})")
    lines.insert(0, f"written by {record.get('tool', 'wsi-norm')} {record.get('wsi_norm_version', '?')}, "
                    f"method {record.get('method')}, {written.get('format')}, {written.get('created')}")
    if isinstance(record.get("qc"), dict):
        from wsi_norm.stain.qc import gate_verdict

        lines.insert(1, f"qc         {gate_verdict(record['qc'])}")
    return lines


def _cmd_mask(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from wsi_norm.slide import open_slide
    from wsi_norm.tissue.mask import coarse_mask

    out = Path(args.output)
    _check_output_path(out, args.overwrite, inputs=[args.slide])
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if out.suffix.lower() not in writable:
        raise argparse.ArgumentTypeError(
            f"{out}: unsupported image format {out.suffix!r}; use .png (or another format Pillow writes)")
    slide = open_slide(args.slide, backend=args.backend, mpp=args.mpp)
    coarse = coarse_mask(slide, max_px=args.max_px)
    if args.overlay:
        thumb = slide.thumbnail(args.max_px)[: coarse.mask.shape[0], : coarse.mask.shape[1]]
        tint = np.array([0, 160, 0], dtype=np.float32)
        img = thumb.astype(np.float32)
        img[coarse.tissue] = 0.6 * img[coarse.tissue] + 0.4 * tint
        Image.fromarray(img.round().astype(np.uint8)).save(out)
        shown = "green tint = tissue"
    else:
        Image.fromarray((coarse.tissue * 255).astype(np.uint8), mode="L").save(out)
        shown = "white = tissue"
    print(
        f"{out}: coarse tissue mask {coarse.tissue.shape[1]}x{coarse.tissue.shape[0]} "
        f"({shown}, 1 px = {coarse.downsample[0]:.2f} level-0 px), "
        f"tissue {coarse.fraction:.1%} of the slide (gray <= 200)"
    )
    return 0


# ---------------------------------------------------------------- fit / normalize
#: Method parameters the CLI sets through its own options instead of ``--param``.
_PARAMS_WITH_OPTIONS = {"seed": "--seed"}


def _param_docs() -> dict[str, str]:
    """Each field's description in :class:`StainParams`'s numpy docstring, as plain text."""
    import inspect
    import re

    from wsi_norm.stain.base import StainParams

    docs: dict[str, str] = {}
    name: str | None = None
    for line in inspect.cleandoc(StainParams.__doc__ or "").splitlines():
        if line and not line.startswith(" ") and " : " in line:
            name = line.split(" : ", 1)[0].strip()
            docs[name] = ""
        elif not line.strip() or not line.startswith(" "):
            name = None
        elif name is not None:
            docs[name] = f"{docs[name]} {line.strip()}".strip()
    # reST to plain text: ``x`` -> x, :class:`~a.b.C` -> C
    return {k: re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", v.replace("``", ""))
            for k, v in docs.items()}


def _param_text(value: Any) -> str:
    """A parameter value as it is typed after ``--param NAME=``."""
    return "none" if value is None else value if isinstance(value, str) else json.dumps(value)


def _type_text(hint: Any) -> str:
    import types
    import typing

    if isinstance(hint, types.UnionType):
        return " or ".join(_type_text(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _param_help() -> str:
    """The ``--param`` epilog, generated from :class:`~wsi_norm.stain.base.StainParams`'s fields,
    types, defaults and docstring (so it cannot drift from the code)."""
    import dataclasses
    import textwrap
    import typing

    from wsi_norm.stain.base import StainParams

    hints = typing.get_type_hints(StainParams)
    docs = _param_docs()
    lines = ["method parameters (--param NAME=VALUE, repeatable; wsi_norm.stain.base.StainParams):"]
    for f in dataclasses.fields(StainParams):
        if f.name in _PARAMS_WITH_OPTIONS:
            continue
        lines.append(f"  {f.name}={_param_text(f.default)}  ({_type_text(hints[f.name])})")
        lines += textwrap.wrap(docs.get(f.name, ""), width=88, initial_indent="      ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def _coerce_param(name: str, raw: str, hint: Any) -> Any:
    """``raw`` (the text after ``NAME=``) as a value of the field type ``hint``; raises
    ``ArgumentTypeError`` naming the parameter, the value and the expected type."""
    import types
    import typing

    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if typing.get_origin(option) is typing.Literal and value in typing.get_args(option):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    raise argparse.ArgumentTypeError(f"--param {name}={raw}: expected {_type_text(hint)}")


def _parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["alpha=1", "beta=0.15"]`` -> ``{"alpha": 1.0, "beta": 0.15}``, checked against the fields
    of :class:`~wsi_norm.stain.base.StainParams` (name, type, and the dataclass's own range checks).

    Raises
    ------
    argparse.ArgumentTypeError
        Not ``NAME=VALUE``, an unknown name, a value of the wrong type or out of range.
    """
    import dataclasses
    import typing

    from wsi_norm.stain.base import StainParams

    hints = typing.get_type_hints(StainParams)
    params: dict[str, Any] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--param expects NAME=VALUE, got {item!r}")
        if name in _PARAMS_WITH_OPTIONS:
            raise argparse.ArgumentTypeError(f"--param {name}: use {_PARAMS_WITH_OPTIONS[name]}")
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(StainParams)
                              if f.name not in _PARAMS_WITH_OPTIONS)
            raise argparse.ArgumentTypeError(f"--param {name}: unknown method parameter; known: {known}")
        params[name] = _coerce_param(name, value.strip(), hints[name])
    try:
        StainParams(**params)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--param: {exc}") from None
    return params


class _Progress:
    """Progress on stderr: a spinner while fitting, then a bar of level-0 chunks with elapsed
    time and ETA (rich) on a terminal; without a terminal one line when a phase starts and a
    line per 10 % of chunks. Use as a context manager; call it as ``progress(done, total)``."""

    def __init__(self, label: str, enabled: bool = True, *, tty: bool | None = None) -> None:
        import time

        self._label = label
        self._enabled = enabled
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._start = time.perf_counter()
        self._last_decile = -1
        self._bar: Any = None
        self._task: Any = None
        self.last: tuple[int, int] | None = None  # the last (done, total) reported

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _start_bar(self, *, spinner: bool, description: str, total: int | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._stop()
        columns: list[Any] = (
            [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
            if spinner
            else [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("chunks"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        )
        self._bar = Progress(*columns, console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def status(self, text: str) -> None:
        """Announce a phase without a count (fitting, generating): a spinner, or one line."""
        if not self._enabled:
            return
        if self._tty:
            self._start_bar(spinner=True, description=f"{self._label}: {text}", total=None)
        else:
            print(f"{self._label}: {text}", file=sys.stderr, flush=True)

    def __call__(self, done: int, total: int) -> None:
        import time

        self.last = (done, total)
        if not self._enabled or total <= 0:
            return
        if self._tty:
            if self._bar is None or self._bar.tasks[0].total is None:
                self._start_bar(spinner=False, description=f"{self._label}: writing", total=total)
            self._bar.update(self._task, completed=done, total=total)
            return
        decile = int(10 * done / total)
        if decile != self._last_decile:
            self._last_decile = decile
            elapsed = time.perf_counter() - self._start
            print(f"{self._label}: {done}/{total} chunks ({elapsed:.1f} s)", file=sys.stderr,
                  flush=True)


def _check_output(path: Path, overwrite: bool) -> None:
    from wsi_norm.errors import OutputExistsError

    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")


def _check_output_path(path: Path, overwrite: bool, *, suffixes: Sequence[str] = (),
                       what: str = "output", inputs: Sequence[str | Path] = ()) -> None:
    """The output may be written: not there (or ``--overwrite``), its folder exists, its name
    ends in one of ``suffixes`` (any when empty), and writing it destroys none of ``inputs``.
    Raises ``ArgumentTypeError`` (``OutputError`` for an input given as the output)."""
    from wsi_norm.writers.atomic import refuse_overwriting_input

    _check_output(path, overwrite)
    if suffixes and not path.name.lower().endswith(tuple(suffixes)):
        raise argparse.ArgumentTypeError(
            f"{path}: unsupported {what} format; use a name ending in {', '.join(suffixes)}")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: output folder {parent} does not exist")
    for used in inputs:
        refuse_overwriting_input(path, Path(used), "input")


def _check_inputs(*paths: str, what: str = "slide") -> None:
    """Every input file exists (before any work starts)."""
    for path in paths:
        if not Path(path).exists():
            raise argparse.ArgumentTypeError(f"{path}: no such {what}")


def _open_slides(paths: Sequence[str], *, backend: Any, mpp: float | None) -> list[Any]:
    """Open every slide up front (errors name the file before any fit), with ``--mpp`` applied."""
    from wsi_norm.slide import open_slide

    return [open_slide(path, backend=backend, mpp=mpp) for path in paths]


def _open_reference(path: str, backend: Any) -> Any:
    """The reference slide or image, with ``--backend`` when that reader reads it, else with the
    reader chosen for its file (``--backend`` names the source slide's reader: a PNG reference
    beside a slide read by tiffslide is read as an image)."""
    from wsi_norm.errors import UnsupportedFormatError
    from wsi_norm.slide import open_slide

    try:
        return open_slide(path, backend=backend)
    except UnsupportedFormatError:
        if backend is None:
            raise
        return open_slide(path)


def _cmd_fit(args: argparse.Namespace) -> int:
    from wsi_norm.pipeline import fit_template
    from wsi_norm.stain.template import save_template

    out = Path(args.output)
    _check_output_path(out, args.overwrite, suffixes=(".json",), what="template", inputs=args.slides)
    params = _parse_params(args.param)
    slides = _open_slides(args.slides, backend=args.backend, mpp=args.mpp)
    if args.dry_run:
        print(f"would fit {args.method} on {len(args.slides)} slide(s) and write {out}")
        return 0
    with (
        _Progress(f"fit {args.method}", enabled=not args.quiet) as progress,
        _cluster(args),
    ):
        progress.status(f"fitting on {len(slides)} slide(s)")
        template = fit_template(
            slides,
            method=args.method,
            params=params,
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
    for entry in template.slides:
        codec = entry.get("codec_correction")
        if codec is None:
            continue
        if codec.get("applied"):
            coding = codec["coding"]
            print(f"  {entry.get('name', 'slide')}: {coding['components']} JPEG {coding['subsampling']}; the codec-aware "
                  f"fit moved H {codec['shift_deg'][0]:.2f} deg, E {codec['shift_deg'][1]:.2f} deg")
        elif "coding" in codec:  # asked for (codec_correction=true) and not done: say why
            print(f"  {entry.get('name', 'slide')}: no codec correction ({codec['reason']})")
    return 0


def _cmd_normalize(args: argparse.Namespace) -> int:
    from wsi_norm.pipeline import FitOptions, normalize_slide
    from wsi_norm.writers import WriterOptions

    out = Path(args.output)
    needs_target = args.method not in ("none", "stainnet")
    if needs_target and not (args.target or args.reference):
        raise argparse.ArgumentTypeError(f"--method {args.method} needs --target or --reference")
    if args.method == "stainnet" and not args.weights:
        raise argparse.ArgumentTypeError("--method stainnet needs --weights FILE")
    for option, value in (("--target", args.target), ("--reference", args.reference),
                          ("--param", args.param)):
        if value and not needs_target:
            raise argparse.ArgumentTypeError(f"{option} is not used by --method {args.method}")
    if args.weights and args.method != "stainnet":
        raise argparse.ArgumentTypeError(f"--weights is not used by --method {args.method}")
    _check_output_path(out, args.overwrite, suffixes=(".ome.zarr", ".zarr", ".tif", ".tiff"),
                       inputs=[p for p in (args.slide, args.reference, args.target, args.weights) if p])
    params = _parse_params(args.param)
    (slide,) = _open_slides([args.slide], backend=args.backend, mpp=args.mpp)
    target: Any = None
    if args.target:
        from wsi_norm.stain.template import load_template

        target = load_template(args.target, method=args.method)
    # --mpp is the source slide's; a reference slide keeps its own
    reference = _open_reference(args.reference, args.backend) if args.reference else None
    if args.weights:
        _check_inputs(args.weights, what="weights file")
        if not args.weights.lower().endswith((".pth", ".pt", ".safetensors")):
            raise argparse.ArgumentTypeError(
                f"{args.weights}: unknown weights format; expected .pth, .pt or .safetensors")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("--device cuda: no CUDA device is available")
    if args.dry_run:
        print(f"would normalize {args.slide} with {args.method} on {args.device} into {out}")
        return 0
    writer = WriterOptions(tile_px=args.tile_px, quality=args.quality, compression=args.compression,
                           zarr_format=args.zarr_format, zarr_codec=args.zarr_codec)
    with (
        _Progress(f"normalize {Path(args.slide).name}", enabled=not args.quiet) as progress,
        _cluster(args) if _needs_scheduler(args, slide, out, writer) else contextlib.nullcontext(),
    ):
        if needs_target:
            progress.status(f"fitting {args.method}")
        result = normalize_slide(
            slide,
            out,
            method=args.method,
            target=target,
            reference=reference,
            params=params,
            weights=args.weights,
            device=args.device,
            chunk_px=args.chunk_px,
            overwrite=args.overwrite,
            progress=progress,
            backend=args.backend,
            glass="keep" if args.keep_glass else "target",
            force=args.force,
            fit=FitOptions(n_pixels=args.n_pixels, seed=args.seed),
            writer=writer,
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
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    out = Path(args.output)
    _check_output_path(out, args.overwrite, suffixes=(".tif", ".tiff"))
    if args.stains not in SITE_STAINS:
        raise argparse.ArgumentTypeError(
            f"--stains must be one of {', '.join(SITE_STAINS)}, got {args.stains!r}")
    if len(args.io) not in (1, 3) or not all(0 < v <= 255 for v in args.io):
        raise argparse.ArgumentTypeError(f"--io takes one value or three (R G B) in (0, 255], got {args.io}")
    if args.dry_run:
        print(f"would generate a {args.width}x{args.height} px slide into {out}")
        return 0
    with _Progress(f"generate {out.name}", enabled=not args.quiet) as progress:
        progress.status(f"rendering {args.width}x{args.height} px")
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
            texture=args.texture,
        )
    print(f"{out}: {args.width}x{args.height} px Beer-Lambert slide, stains {args.stains}, "
          f"seed {args.seed}, glass {list(truth.io)}, texture from {truth.texture_source}")
    return 0


# ---------------------------------------------------------------- stainnet train
def _cmd_stainnet_train(args: argparse.Namespace) -> int:
    import math

    from wsi_norm.colormap.stainnet import save_stainnet
    from wsi_norm.stainnet.teacher import distill_stainnet
    from wsi_norm.stainnet.train import EpochRecord

    out = Path(args.output)
    _check_output(out, args.overwrite)
    if out.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"{out}: the model file must end in .safetensors")
    _check_output_path(out, args.overwrite, inputs=[*args.slides, args.target])
    _check_inputs(*args.slides)
    from wsi_norm.stain.template import load_template

    load_template(args.target, method=args.teacher)
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
def _add_subcommand(sub: Any, name: str, help_text: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=epilog, formatter_class=_HelpFormatter)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wsi-norm`` (exposed for documentation and tests).

    Naming of sizes across commands: ``--chunk-px`` is the processing chunk side (level-0
    pixels per dask chunk), ``--tile-px`` the side of a written TIFF's tiles (``normalize`` and
    ``generate``). The old spellings ``--tile-size`` and ``--out-tile`` still work, with a
    deprecation note.
    """
    parser = _Parser(
        prog="wsi-norm",
        description="Slide-wide stain normalization of whole-slide images.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add_subcommand(sub, "info", "print a slide's facts and tissue fraction")
    p.add_argument("slide")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--properties", action="store_true", help="list all properties")
    p.add_argument("--no-tissue", action="store_true", help="skip the tissue fraction")
    p.add_argument("--exact", action="store_true",
                   help="also count tissue pixels at level 0 (reads every tissue chunk)")
    _add_slide_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_info)

    p = _add_subcommand(sub, "mask", "write the coarse tissue mask as an image")
    p.add_argument("slide")
    p.add_argument("-o", "--output", required=True, help="image to write (PNG)")
    p.add_argument("--max-px", type=_POSITIVE_INT, default=2048, help="larger side of the mask image")
    p.add_argument("--overlay", action="store_true", help="tint tissue on the thumbnail instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_slide_options(p)
    p.set_defaults(func=_cmd_mask)

    from wsi_norm.tissue.sampling import DEFAULT_N_PIXELS, MIN_TISSUE_PIXELS

    n_pixels_type = _int_in(MIN_TISSUE_PIXELS)  # the fewest tissue pixels a fit takes
    params_epilog = _param_help()
    p = _add_subcommand(sub, "fit", "fit a template (target statistics) from one or more slides",
                        epilog=params_epilog)
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("-o", "--output", required=True, help="template JSON to write")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="method parameter (repeatable; the list below)")
    p.add_argument("--n-pixels", type=n_pixels_type, default=DEFAULT_N_PIXELS,
                   help="tissue pixels sampled per slide")
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed")
    p.add_argument("--force", action="store_true",
                   help="keep a template the QC gate refuses (implausible stains or white point)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    _add_slide_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_fit)

    p = _add_subcommand(sub, "normalize", "normalize a slide into a pyramidal OME-Zarr or TIFF",
                        epilog=params_epilog)
    p.add_argument("slide")
    p.add_argument("--method", required=True,
                   choices=ALL_METHODS)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--target", help="template JSON (from `wsi-norm fit`)")
    group.add_argument("--reference", help="reference slide or image to fit the target from")
    p.add_argument("-o", "--output", required=True, help="OUT.ome.zarr (or .zarr) or OUT.tiff (or .tif)")
    p.add_argument("--weights", help="StainNet weights (.pth or .safetensors)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="method parameter (repeatable; the list below)")
    p.add_argument("--chunk-px", type=_TILE_PX, default=1024,
                   help="processing chunk side in level-0 pixels, a multiple of 16 (rounded to "
                   "whole source tiles; does not change the output)")
    p.add_argument("--tile-size", dest="chunk_px", type=_TILE_PX, action=_DeprecatedAlias,
                   new="--chunk-px")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the colour map runs")
    p.add_argument("--n-pixels", type=n_pixels_type, default=DEFAULT_N_PIXELS,
                   help="tissue pixels sampled for each fit")
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed")
    p.add_argument("--tile-px", type=_TILE_PX, default=256,
                   help="TIFF tile side, a multiple of 16 (256 or 512 for most viewers)")
    p.add_argument("--out-tile", dest="tile_px", type=_TILE_PX, action=_DeprecatedAlias,
                   new="--tile-px")
    p.add_argument("--quality", type=_QUALITY, default=90, help="TIFF JPEG quality, 1-100")
    p.add_argument("--compression", choices=("jpeg", "deflate"), default="jpeg",
                   help="TIFF tile compression (deflate is lossless)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                   help="3: OME-NGFF 0.5 on zarr v3; 2: NGFF 0.4 on zarr v2 for older viewers")
    p.add_argument("--zarr-codec", type=_zarr_codec, default=_ZARR_CODEC_DEFAULT, metavar="NAME[:LEVEL]",
                   help="OME-Zarr compression, lossless Blosc: lz4 or zstd with a level 1-9 (e.g. zstd:5; "
                   "higher is smaller and slower); no lossy codec (none that common viewers decode)")
    p.add_argument("--keep-glass", action="store_true",
                   help="keep the source's glass colour (blended smoothly over a band of luma) "
                   "instead of rendering glass in the target's white point")
    p.add_argument("--force", action="store_true",
                   help="write even when the QC gate fails (recorded in the output's provenance)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    _add_slide_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_normalize)

    p = _add_subcommand(sub, "generate", "generate a Beer-Lambert test slide (pyramidal TIFF)")
    p.add_argument("output", help="OUT.tiff (or .tif)")
    p.add_argument("--width", type=_POSITIVE_INT, default=16384, help="level-0 width in pixels")
    p.add_argument("--height", type=_POSITIVE_INT, default=16384, help="level-0 height in pixels")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of tissue layout and texture")
    p.add_argument("--stains", default="site-a", help="stain preset (site-a, site-b, site-c)")
    p.add_argument("--tissue-fraction", type=_float_in(0.0, 1.0), default=0.4,
                   help="share of the slide covered by tissue, 0-1")
    p.add_argument("--tile-px", type=_TILE_PX, default=512, help="TIFF tile side, a multiple of 16")
    p.add_argument("--mpp", type=_MPP, default=0.25, help="microns per pixel recorded at level 0")
    p.add_argument("--quality", type=_QUALITY, default=90, help="JPEG quality, 1-100")
    p.add_argument("--compression", choices=("jpeg", "deflate"), default="jpeg",
                   help="tile compression (deflate is lossless)")
    p.add_argument("--conc-scale", type=_float_in(0.0, low_open=True), nargs=2, default=(1.0, 1.0),
                   metavar=("H", "E"),
                   help="stain strengths (factors on hematoxylin and eosin concentration)")
    p.add_argument("--io", type=float, nargs="+", default=[240.0], metavar="LEVEL",
                   help="glass intensity: one value, or R G B (a scanner's white point)")
    p.add_argument("--texture", choices=("real", "procedural"), default="real",
                   help="tissue texture: real H&E unmixed from the data folder ($WSI_NORM_DATA, "
                        "else ../shared/data; an error where missing), or procedural")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=_cmd_generate)

    # ---- stainnet (wsi_norm.stainnet.teacher) -------------------------- begin
    p = _add_subcommand(sub, "stainnet", "StainNet models: train one from a slide-wide teacher")
    stainnet_sub = p.add_subparsers(dest="stainnet_command", required=True)
    p = _add_subcommand(
        stainnet_sub, "train", "distill StainNet from a Macenko/Vahadane teacher over source slides")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="source slides (>= 3: one is held out)")
    p.add_argument("--teacher", required=True, choices=STAIN_MATRIX_METHODS)
    p.add_argument("--target", required=True, help="template JSON of the teacher's method")
    p.add_argument("-o", "--output", required=True, help="model .safetensors to write")
    p.add_argument("--epochs", type=_POSITIVE_INT, default=20, help="training epochs")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=4096,
                   help="distinct colour pairs per step")
    p.add_argument("--n-pixels", type=n_pixels_type, default=200_000,
                   help="tissue pixels sampled per slide")
    p.add_argument("--seed", type=_SEED, default=0, help="sampling and training seed")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--dry-run", action="store_true", help="check the options, do nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")
    p.add_argument("--backend", choices=("openslide", "tiffslide", "image", "ome-zarr"), default=None,
                   help="slide reader (default: chosen per file)")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_stainnet_train)
    # ---- stainnet ------------------------------------------------------ end

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-norm`` console script; returns the exit status (2 for a usage
    error, after one line on stderr; 0 after ``--help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, or a usage error already printed in one line
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return_freed_memory()  # keeps peak RSS flat while slides stream (see wsi_norm.runtime)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # tifffile logs its own complaints about damaged files; ours name file and problem
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        with single_threaded_blas():  # dask's threads fill the cores (see wsi_norm.runtime)
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
