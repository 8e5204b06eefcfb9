"""Target templates: a versioned JSON document holding one method's fitted statistics.

Schema (``SCHEMA_VERSION = 1``), one JSON object::

    {
      "schema_version": 1,
      "method": "macenko",                   # macenko | vahadane | reinhard | histmatch
      "stain_matrix": [[h_r, h_g, h_b],      # macenko/vahadane only: unit-norm OD rows,
                       [e_r, e_g, e_b]],     #   row 0 hematoxylin, row 1 eosin
      "max_concentrations": [h, e],          # macenko/vahadane only: 99th-percentile concentrations
      "lab_mean": [L, a, b],                 # reinhard only: CIE Lab (D65) mean of tissue pixels
      "lab_std": [L, a, b],                  # reinhard only: Lab standard deviation
      "histograms": [[256 floats] x 3],      # histmatch only: normalised R, G, B tissue histograms
      "params": {...},                       # StainParams used for the fit (io, alpha, beta, ...)
      "slides": [{"path": ..., ...}, ...],   # the slide(s) the template was fitted from
      "n_pixels": 1000000,                   # tissue pixels sampled (total over slides)
      "seed": 0,                             # sampling seed
      "aggregation": null,                   # null for one slide, else e.g. "median"
      "wsi_norm_version": "0.1.0",
      "created": "2026-11-22T19:42:00+00:00" # ISO 8601, UTC
    }

The method's statistics sit at the top level (the keys of ``Stats.to_dict()``),
so a Macenko template is readable by other tools as ``stain_matrix`` +
``max_concentrations``.  :func:`load_template` raises
:class:`~wsi_norm.errors.TemplateError` naming the file for invalid JSON, a
missing or unknown schema version, an unknown method, a method other than the
one requested, and missing or ill-shaped fields.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_norm.errors import TemplateError
from wsi_norm.stain import METHODS, StainParams, stats_from_dict

__all__ = ["SCHEMA_VERSION", "Template", "load_template", "save_template", "utc_now", "wsi_norm_version"]

SCHEMA_VERSION = 1
_META_KEYS = ("schema_version", "method", "params", "slides", "n_pixels", "seed",
              "aggregation", "wsi_norm_version", "created")


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


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Template:
    """A target template: fitted statistics plus how they were obtained.

    Parameters
    ----------
    method : str, one of :data:`wsi_norm.stain.METHODS`
    stats : the method's Stats (e.g. ``MacenkoStats``)
    params : StainParams used for the fit
    slides : list of dict, e.g. ``[{"path": "a.svs", "sha256": "..."}]``
    n_pixels : int, tissue pixels sampled
    seed : int, sampling seed
    wsi_norm_version : str
    created : str, ISO 8601 timestamp
    aggregation : str or None, how several slides were combined (None: one slide)
    """

    method: str
    stats: Any
    params: StainParams = field(default_factory=StainParams)
    slides: list[dict[str, Any]] = field(default_factory=list)
    n_pixels: int = 0
    seed: int = 0
    wsi_norm_version: str = field(default_factory=wsi_norm_version)
    created: str = field(default_factory=utc_now)
    aggregation: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if getattr(self.stats, "method", None) != self.method:
            raise ValueError(f"stats of method {getattr(self.stats, 'method', None)!r} in a {self.method!r} template")

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the module docstring)."""
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "method": self.method}
        d.update(self.stats.to_dict())
        d.update(
            params=self.params.to_dict(), slides=list(self.slides), n_pixels=int(self.n_pixels),
            seed=int(self.seed), aggregation=self.aggregation,
            wsi_norm_version=self.wsi_norm_version, created=self.created,
        )
        return d


def save_template(template: Template, path: str | Path) -> None:
    """Write ``template`` as indented JSON to ``path`` (overwrites)."""
    Path(path).write_text(json.dumps(template.to_dict(), indent=2) + "\n", encoding="utf-8")


def load_template(path: str | Path, *, method: str | None = None) -> Template:
    """Read and validate a template document.

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
        Unreadable file, invalid JSON, missing or unsupported schema version,
        unknown method, method mismatch, missing or ill-shaped fields.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TemplateError(f"{p}: cannot read template: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{p}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise TemplateError(f"{p}: a template must be a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version is None:
        raise TemplateError(f"{p}: missing 'schema_version' (expected {SCHEMA_VERSION})")
    if version != SCHEMA_VERSION:
        raise TemplateError(f"{p}: unsupported schema_version {version!r} (this wsi-norm reads {SCHEMA_VERSION})")
    found = doc.get("method")
    if found not in METHODS:
        raise TemplateError(f"{p}: unknown method {found!r}; known: {', '.join(METHODS)}")
    if method is not None and found != method:
        raise TemplateError(f"{p}: template is for method {found!r}, but {method!r} was requested")
    try:
        stats = stats_from_dict(found, {k: v for k, v in doc.items() if k not in _META_KEYS})
        params = StainParams.from_dict(doc.get("params") or {})
        slides = doc.get("slides", [])
        if not isinstance(slides, list) or not all(isinstance(s, dict) for s in slides):
            raise ValueError("'slides' must be a list of objects")
        return Template(
            method=found, stats=stats, params=params, slides=slides,
            n_pixels=int(doc.get("n_pixels", 0)), seed=int(doc.get("seed", 0)),
            wsi_norm_version=str(doc.get("wsi_norm_version", "unknown")),
            created=str(doc.get("created", "")), aggregation=doc.get("aggregation"),
        )
    except KeyError as exc:
        raise TemplateError(f"{p}: {found} template lacks field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"{p}: invalid {found} template: {exc}") from exc
