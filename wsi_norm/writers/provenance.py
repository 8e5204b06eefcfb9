"""Provenance records stored with every output, and reading them back.

The caller (CLI, Prefect flow) passes a JSON-serialisable mapping describing the
run: method, parameters, fitted source statistics, target template and the
source's identity.  :func:`build_record` adds one key, ``"written"``, with the
software versions, the UTC creation time and the output's own description
(format, level shapes, MPP).  The record is stored

* OME-Zarr: in the root group's attributes under the key ``"wsi_norm"``;
* TIFF: as the ImageDescription of the first IFD (level 0), the JSON text
  ``{"wsi_norm": <record>}`` (ASCII, non-ASCII characters escaped).

:func:`read_provenance` returns the record from either, and
:attr:`wsi_norm.slide.Slide.provenance` from an output opened as a slide.

Source metadata: :func:`wsi_norm.pipeline.normalize_slide` records the source's
acquisition metadata in ``record["source"]``: ``mpp``, ``objective_power``, ``vendor``
and ``scanner`` (:meth:`wsi_norm.slide.Slide.scanner_metadata`: vendor, objective power,
MPP and at most 64 whitelisted scanner properties such as ``aperio.AppMag`` or
``aperio.ScanScope ID``, each cut to 512 characters, and the embedded ICC profile's
description, size and SHA-256, or None).  Besides the record, the MPP
also sits where each format keeps it: the TIFF's XResolution/YResolution (pixels per
centimetre) and the NGFF axes' ``micrometer`` unit with one ``scale`` per level.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import OutputError

__all__ = [
    "PROVENANCE_KEY",
    "RECORD_SCHEMA",
    "build_record",
    "read_provenance",
    "software_versions",
]

#: Key of the record in zarr attributes and in the TIFF description JSON.
PROVENANCE_KEY = "wsi_norm"
#: Version of the ``"written"`` block's layout.
RECORD_SCHEMA = 1

_PACKAGES = (
    ("wsi-norm", "wsi-norm"),
    ("numpy", "numpy"),
    ("dask", "dask"),
    ("distributed", "distributed"),
    ("zarr", "zarr"),
    ("numcodecs", "numcodecs"),
    ("tifffile", "tifffile"),
    ("imagecodecs", "imagecodecs"),
    ("numba", "numba"),
    ("openslide-python", "openslide-python"),
    ("tiffslide", "tiffslide"),
)


def software_versions() -> dict[str, str]:
    """Return the versions of Python and of the packages that shape the output.

    Returns
    -------
    dict of str to str
        Package name to version.  Packages that are not installed are left out;
        ``openslide`` (the C library) and ``torch`` appear only if their Python
        modules are already imported, so calling this never loads them.
    """
    versions = {"python": platform.python_version()}
    for key, dist in _PACKAGES:
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if "wsi-norm" not in versions:
        pkg = sys.modules.get("wsi_norm")
        versions["wsi-norm"] = str(getattr(pkg, "__version__", "unknown"))
    openslide = sys.modules.get("openslide")
    if openslide is not None and getattr(openslide, "__library_version__", None):
        versions["openslide"] = str(openslide.__library_version__)
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(getattr(torch, "__version__", "unknown"))
    return versions


def _to_json(value: Any) -> Any:
    # numpy scalars and arrays (fitted statistics) become plain JSON values.
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _as_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, default=_to_json, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"{what} holds NaN or infinity, which JSON cannot store: {exc}") from exc
    except TypeError as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def build_record(
    provenance: Mapping[str, Any],
    *,
    fmt: str,
    shapes: list[tuple[int, int]],
    mpp: tuple[float, float] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Return the record to store: ``provenance`` plus a ``"written"`` block.

    Parameters
    ----------
    provenance : mapping
        JSON-serialisable description of the run (str keys; no NaN; numpy
        scalars and arrays are converted to numbers and lists).  Must not use
        the key ``"written"``.
    fmt : {"ome-zarr", "tiff"}
        Output format.
    shapes : list of (rows, cols)
        Pyramid level sizes, level 0 first.
    mpp : (mpp_x, mpp_y) or None
        Level-0 pixel size in micrometres.
    options : mapping
        Writer options worth recording (compression, tile size, ...).

    Returns
    -------
    dict
        A deep copy of ``provenance`` (via JSON) with ``"written"`` added:
        ``schema``, ``created`` (UTC, ISO 8601), ``software``, ``format``,
        ``levels`` (list of [rows, cols]), ``mpp`` ([x, y] or null, with a
        ``note`` when null) and ``options``.

    Raises
    ------
    TypeError, ValueError
        ``provenance`` is not JSON-serialisable or uses the key ``"written"``.
    """
    if not isinstance(provenance, Mapping):
        raise TypeError(f"provenance must be a mapping, got {type(provenance).__name__}")
    if "written" in provenance:
        raise ValueError('provenance must not use the key "written"; the writer fills it in')
    record: dict[str, Any] = _as_json(dict(provenance), "provenance")
    written: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "software": software_versions(),
        "format": fmt,
        "levels": [[int(h), int(w)] for h, w in shapes],
        "mpp": None if mpp is None else [float(mpp[0]), float(mpp[1])],
        "options": _as_json(dict(options), "options"),
    }
    if mpp is None:
        written["note"] = "the source had no pixel size (MPP); spatial scales are in pixels"
    record["written"] = written
    return record


def read_provenance(path: str | Path) -> dict[str, Any]:
    """Return the provenance record stored in a finished output.

    Parameters
    ----------
    path : str or Path
        An OME-Zarr folder or a TIFF file written by :func:`wsi_norm.writers.write_pyramid`.

    Returns
    -------
    dict
        The caller's provenance mapping plus the ``"written"`` block.

    Raises
    ------
    OutputError
        ``path`` does not exist, cannot be read, or holds no wsi-norm record.
    """
    path = Path(path)
    if not path.exists():
        raise OutputError(f"{path}: no such output")
    if path.is_dir():
        return _read_zarr_record(path)
    return _read_tiff_record(path)


def _read_zarr_record(path: Path) -> dict[str, Any]:
    attrs: dict[str, Any] | None = None
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        meta = path / name
        if meta.is_file():
            try:
                doc = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise OutputError(f"{meta}: cannot read zarr metadata: {exc}") from exc
            attrs = doc.get(key, {}) if key else doc
            break
    if attrs is None:
        raise OutputError(f"{path}: not a zarr group (no zarr.json or .zattrs)")
    record = attrs.get(PROVENANCE_KEY)
    if not isinstance(record, dict):
        raise OutputError(f"{path}: no {PROVENANCE_KEY!r} provenance in the group attributes")
    return record


def _read_tiff_record(path: Path) -> dict[str, Any]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            description = tif.pages.first.description
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise OutputError(f"{path}: cannot read TIFF: {exc}") from exc
    try:
        doc = json.loads(description)
    except ValueError:
        doc = None
    record = doc.get(PROVENANCE_KEY) if isinstance(doc, dict) else None
    if not isinstance(record, dict):
        raise OutputError(
            f"{path}: no {PROVENANCE_KEY!r} provenance in the level-0 ImageDescription"
        )
    return record
