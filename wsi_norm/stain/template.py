"""Target templates: a versioned JSON document holding one method's fitted statistics.

Schema (``SCHEMA_VERSION = 2``), one JSON object::

    {
      "schema_version": 2,
      "method": "macenko",                   # macenko | vahadane | reinhard | histmatch | gmm
      "stain_matrix": [[h_r, h_g, h_b],      # macenko/vahadane only: unit-norm OD rows,
                       [e_r, e_g, e_b]],     #   row 0 hematoxylin, row 1 eosin
      "max_concentrations": [h, e],          # macenko/vahadane only: 99th-percentile concentrations
      "lab_mean": [L, a, b],                 # reinhard only: CIE Lab (D65) mean of tissue pixels
      "lab_std": [L, a, b],                  # reinhard only: Lab standard deviation
      "histograms": [[256 floats] x 3],      # histmatch only: normalised R, G, B tissue histograms
      "gmm_weights": [K floats],             # gmm only (wsi_norm.stain.gmm.GmmStats): mixture weights,
      "gmm_means": [[D, cx, cy] x K],        #   component means and standard deviations in HSD,
      "gmm_stds": [[D, cx, cy] x K],         #   slide-wide HSD mean and standard deviation,
      "hsd_mean": [D, cx, cy], "hsd_std": [...], "gmm_bic": [[K, BIC], ...],  # BIC per K tried
      "white_point": {"rgb": [R, G, B],      # glass intensity per channel (the target's I0):
                      "source": "glass",     #   glass | fallback | fixed | template-v1
                      "n_pixels": 51234},
      "reference": {"lab_mean": [L, a, b],   # what the QC gate compares a normalized slide with:
                    "stain_matrix": [[...], [...]]},  # tissue Lab mean, Macenko stain vectors
      "params": {...},                       # the StainParams fields this method reads (see below)
      "slides": [{"name": "a.svs",           # the slide(s) the template was fitted from: file
                  "size_bytes": 1234,        #   name (never a path), size, the sampled and
                  "sampled_sha256": "...",   #   first-MiB SHA-256 of Slide.identity(), and
                  "header_sha256": "...",    #   the level-0 MPP [x, y] it was read with
                  "mpp": [0.5, 0.5]}, ...],
      "n_pixels": 1000000,                   # tissue pixels sampled (total over slides)
      "seed": 0,                             # sampling seed
      "aggregation": null,                   # null for one slide, else e.g. "median"
      "wsi_norm_version": "0.2.0",
      "created": "2026-11-29T12:00:00+00:00" # ISO 8601, UTC
    }

``params`` holds only the fields the method's fit reads
(:attr:`wsi_norm.stain.MethodSpec.params`: Macenko its variant, percentiles and thresholds;
Vahadane its sparse-coding knobs, seed and the Macenko start's thresholds; Reinhard and histogram
matching ``white_point`` and ``min_pixels``), so a template does not carry another method's
settings. Templates written before this rule (every StainParams field, slides with their
``path``) still load, and keep what they recorded.

Schema 1 (wsi-norm 0.1) files still load: they have no white point, and their stain vectors
were fitted with ``Io = 240`` in ``-log((I + 1) / Io)``, i.e. white point 239 in every channel;
they are read with that white point (``source: "template-v1"``) and no QC reference (the gate
then checks the fit only). Their ``params`` are kept as recorded.

The method's statistics sit at the top level (the keys of ``Stats.to_dict()``),
so a Macenko template is readable by other tools as ``stain_matrix`` +
``max_concentrations``.  :func:`load_template` raises
:class:`~wsi_norm.errors.TemplateError` naming the file for invalid JSON, a
missing or unknown schema version, an unknown method, a method other than the
one requested, missing or ill-shaped fields, and a white point outside (0, 255].
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_norm.color import TEXTBOOK_WHITE
from wsi_norm.errors import TemplateError
from wsi_norm.stain import METHODS, method_params, stats_from_dict
from wsi_norm.stain.qc import ColourReference
from wsi_norm.tissue.whitepoint import WhitePoint

__all__ = [
    "SCHEMA_VERSION",
    "ColourReference",
    "Template",
    "load_template",
    "save_template",
    "slide_entry",
    "utc_now",
    "wsi_norm_version",
]

SCHEMA_VERSION = 2
MAX_TEMPLATE_BYTES = 16 << 20
"""Largest template file read (16 MiB; a template is a few KB, a cohort's slide list more)."""
_MAX_INT_DIGITS = 30
_READABLE_VERSIONS = (1, 2)
#: What a template records of each slide (from :meth:`wsi_norm.slide.Slide.identity` and the MPP):
#: content, not location.
SLIDE_KEYS = ("name", "size_bytes", "sampled_sha256", "header_sha256", "mpp")
_META_KEYS = ("schema_version", "method", "params", "slides", "n_pixels", "seed",
              "aggregation", "wsi_norm_version", "created", "white_point", "reference")


def wsi_norm_version() -> str:
    """The installed wsi-norm version (``wsi_norm.__version__``, else package metadata, else "unknown")."""
    import wsi_norm

    version = getattr(wsi_norm, "__version__", None)
    if isinstance(version, str):
        return version
    from importlib import metadata

    try:
        return metadata.version("wsi-norm")
    except metadata.PackageNotFoundError:
        return "unknown"


def slide_entry(identity: dict[str, Any]) -> dict[str, Any]:
    """A template's record of one slide: the :data:`SLIDE_KEYS` of its identity (file name and
    content hashes; no path, no modification time)."""
    entry = {k: identity[k] for k in SLIDE_KEYS if k in identity}
    if "name" in entry:
        entry["name"] = Path(str(entry["name"])).name
    return entry


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Template:
    """A target template: fitted statistics, the target's white point, and how they were obtained.

    Parameters
    ----------
    method : str, one of :data:`wsi_norm.stain.METHODS`
    stats : the method's Stats (e.g. ``MacenkoStats``)
    white : WhitePoint
        The target's glass intensity per channel: normalized slides are rendered into it.
    reference : ColourReference or None
        Tissue colour statistics of the target for the QC gate (None for schema-1 files).
    params : dict or StainParams
        The parameters of the fit; a StainParams is reduced to the fields ``method`` reads
        (:func:`wsi_norm.stain.method_params`), a dict is kept as given (as read from a file).
    slides : list of dict, e.g. ``[slide_entry(slide.identity())]`` (name, size, hashes)
    n_pixels : int, tissue pixels sampled
    seed : int, sampling seed
    wsi_norm_version : str
    created : str, ISO 8601 timestamp
    aggregation : str or None, how several slides were combined (None: one slide)
    schema_version : int
        The version the document was read from (written documents are always the current one).
    """

    method: str
    stats: Any
    white: WhitePoint = field(default_factory=lambda: WhitePoint((240.0, 240.0, 240.0), "fallback"))
    reference: ColourReference | None = None
    params: dict[str, Any] = field(default_factory=dict)
    slides: list[dict[str, Any]] = field(default_factory=list)
    n_pixels: int = 0
    seed: int = 0
    wsi_norm_version: str = field(default_factory=wsi_norm_version)
    created: str = field(default_factory=utc_now)
    aggregation: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if getattr(self.stats, "method", None) != self.method:
            raise ValueError(f"stats of method {getattr(self.stats, 'method', None)!r} in a {self.method!r} template")
        if not isinstance(self.white, WhitePoint):
            raise TypeError(f"white must be a WhitePoint, got {type(self.white).__name__}")
        if not isinstance(self.params, dict):
            to_dict = getattr(self.params, "to_dict", None)
            if to_dict is None:
                raise TypeError(f"params must be a dict or StainParams, got {type(self.params).__name__}")
            from wsi_norm.stain.base import StainParams

            params = self.params if isinstance(self.params, StainParams) else StainParams.from_dict(to_dict())
            object.__setattr__(self, "params", method_params(self.method, params))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the module docstring), always in the current schema."""
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "method": self.method}
        d.update(self.stats.to_dict())
        d.update(
            white_point=self.white.to_dict(),
            reference=None if self.reference is None else self.reference.to_dict(),
            params=dict(self.params), slides=list(self.slides), n_pixels=int(self.n_pixels),
            seed=int(self.seed), aggregation=self.aggregation,
            wsi_norm_version=self.wsi_norm_version, created=self.created,
        )
        return d


def save_template(template: Template, path: str | Path) -> None:
    """Write ``template`` as indented JSON to ``path`` (overwrites)."""
    Path(path).write_text(json.dumps(template.to_dict(), indent=2) + "\n", encoding="utf-8")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(text.lstrip('-'))} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _parse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a template may hold")


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"), (b"GIF8", "GIF"))


def _image_kind(raw: bytes) -> str | None:
    """The image format ``raw`` starts like (a slide or picture given where a template belongs),
    or None. A text that starts like JSON is never taken for an image."""
    if raw.lstrip()[:1] in (b"{", b"["):
        return None
    if raw[128:132] == b"DICM":
        return "DICOM"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    if raw[:2] == b"BM" and raw[6:10] == bytes(4):  # the two reserved fields of a BMP header
        return "BMP"
    return next((kind for magic, kind in _IMAGE_MAGIC if raw.startswith(magic)), None)


def _read_json(p: Path) -> Any:
    """The JSON document in ``p``, read with bounded size, number length and nesting."""
    try:
        mode = os.stat(p).st_mode
        if not stat.S_ISREG(mode):
            raise TemplateError(f"{p}: not a regular file; a template is a JSON file")
        with open(p, "rb") as fh:
            raw = fh.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise TemplateError(f"{p}: cannot read template: {exc}") from exc
    image = _image_kind(raw)  # before the size: a slide given here is larger than any template
    if image is not None:
        raise TemplateError(f"{p}: a {image} image, not a template (a JSON file from `wsi-norm fit`); to fit "
                            "the target from an image, pass it as the reference (--reference; reference= in Python; "
                            "a manifest template's slides: [...])")
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{p}: larger than {MAX_TEMPLATE_BYTES:,} bytes, the most a template may be")
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{p}: not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{p}: not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError:
        raise TemplateError(f"{p}: not a template: JSON nested too deeply to parse") from None
    except ValueError as exc:
        raise TemplateError(f"{p}: not a valid template: {exc}") from exc


def load_template(path: str | Path, *, method: str | None = None) -> Template:
    """Read and validate a template document (schema 2, or schema 1 with its stated default).

    Parameters
    ----------
    path : str or Path
    method : str, keyword-only, optional
        If given, the template must be of this method.

    Returns
    -------
    Template

    Raises
    ------
    TemplateError
        Unreadable or non-regular file, a file over :data:`MAX_TEMPLATE_BYTES`, invalid JSON
        (also: an integer of more than 30 digits, NaN/Infinity, nesting too deep to parse),
        missing or unsupported schema version, unknown method, method mismatch, missing or
        ill-shaped fields, a bad white point.
    """
    p = Path(path)
    doc = _read_json(p)
    if not isinstance(doc, dict):
        raise TemplateError(f"{p}: a template must be a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version is None:
        raise TemplateError(f"{p}: missing 'schema_version' (expected {SCHEMA_VERSION})")
    if version not in _READABLE_VERSIONS:
        raise TemplateError(
            f"{p}: unsupported schema_version {version!r} (this wsi-norm reads {', '.join(map(str, _READABLE_VERSIONS))})"
        )
    found = doc.get("method")
    if found not in METHODS:
        raise TemplateError(f"{p}: unknown method {found!r}; known: {', '.join(METHODS)}")
    if method is not None and found != method:
        raise TemplateError(f"{p}: template is for method {found!r}, but {method!r} was requested")
    try:
        stats = stats_from_dict(found, {k: v for k, v in doc.items() if k not in _META_KEYS})
        params = doc.get("params") or {}
        if not isinstance(params, dict):
            raise TypeError("'params' must be an object")
        slides = doc.get("slides", [])
        if not isinstance(slides, list) or not all(isinstance(s, dict) for s in slides):
            raise ValueError("'slides' must be a list of objects")
        if version == 1:
            white = WhitePoint((TEXTBOOK_WHITE,) * 3, "template-v1")
            reference = None
        else:
            if "white_point" not in doc:
                raise KeyError("white_point")
            white = WhitePoint.from_dict(doc["white_point"])
            ref = doc.get("reference")
            reference = None if ref is None else ColourReference.from_dict(ref)
        return Template(
            method=found, stats=stats, white=white, reference=reference, params=params, slides=slides,
            n_pixels=int(doc.get("n_pixels", 0)), seed=int(doc.get("seed", 0)),
            wsi_norm_version=str(doc.get("wsi_norm_version", "unknown")),
            created=str(doc.get("created", "")), aggregation=doc.get("aggregation"),
            schema_version=int(version),
        )
    except KeyError as exc:
        raise TemplateError(f"{p}: {found} template lacks field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"{p}: invalid {found} template: {exc}") from exc
