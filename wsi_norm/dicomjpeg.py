"""Decode a DICOM whole-slide image's JPEG frames directly, as :mod:`wsi_norm.tiffjpeg` does a TIFF's tiles.

OpenSlide reads DICOM slides (VL Whole Slide Microscopy Image instances, one per level) through
``read_region``: each frame is decoded into premultiplied ARGB, then a PIL image, a numpy copy and
the composite over white. A plain copy of a 268-MP slide converted to DICOM (the same JPEG tiles as
frames) took 1.7 x the time of the TIFF it came from, whose tiles are decoded directly. Here the
levels OpenSlide shows are matched to the instances of the slide's series in its folder, and each
level whose frames are baseline 8-bit JPEG in a ``TILED_FULL`` layout (one focal plane, one
optical path, one fragment per frame) is read through :class:`wsi_norm.tiffjpeg.JpegTiles`: each
frame's bytes with ``os.pread``, decoded by libjpeg-turbo with the GIL released.

The pixels are OpenSlide's. ``JpegTiles`` checks each level once against OpenSlide's own reader on
its first read (a level that differs stays on OpenSlide), and the photometric interpretation says
what the three components are, as the TIFF tag does: ``RGB`` gets an Adobe marker with transform 0
in front (libjpeg would otherwise take three unmarked components as YCbCr), ``YBR_FULL_422`` and
``YBR_FULL`` are libjpeg's default. Anything else (JPEG 2000 and other transfer syntaxes,
``TILED_SPARSE``, several focal planes or optical paths, concatenations, frames in several
fragments, two instances of one level's size) stays on OpenSlide.

Frame positions come from the Extended Offset Table where the instance has one, else from walking
the encapsulated items (pydicom's ``parse_fragments``: about 6 us a frame, once per open).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np

from wsi_norm.tiffjpeg import _ADOBE_RGB, _SOI, JpegTiles, RegionReader, _Level

__all__ = ["MAX_SERIES_FILES", "dicom_jpeg_tiles"]

log = logging.getLogger(__name__)

#: A folder with more files than this is not searched for the slide's other instances (its
#: levels stay on OpenSlide): a DICOM slide has a handful, one per level plus label and overview.
MAX_SERIES_FILES = 256

_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"  # (7FE0,0010) OB, undefined length
_YBR = ("YBR_FULL_422", "YBR_FULL")


def _header(path: Path) -> tuple[Any, int] | None:
    """``(dataset without pixel data, file position of the Pixel Data element)``, or None for
    a file pydicom does not read as DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            return ds, f.tell()
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        log.debug("%s: not read as DICOM (%s)", path, exc)
        return None


def _frames(path: Path, ds: Any, position: int, n_frames: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Offsets and lengths of the ``n_frames`` frames' bytes, one fragment each, or None."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    with open(path, "rb") as f:
        f.seek(position)
        if f.read(len(_PIXEL_DATA_HEADER)) != _PIXEL_DATA_HEADER:
            return None
        parse_basic_offsets(f)  # leaves the file at the first fragment's item tag
        first = f.tell()
        table, lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
        if table is not None and lengths is not None:
            starts = np.frombuffer(bytes(table), "<u8")
            sizes = np.frombuffer(bytes(lengths), "<u8")
            if len(starts) != n_frames or len(sizes) != n_frames:
                return None
            return (tuple(int(first + s + 8) for s in starts), tuple(int(n) for n in sizes))
        count, items = parse_fragments(f)
        if count != n_frames:
            return None
        counts = []
        for item in items:
            f.seek(item + 4)
            counts.append(int.from_bytes(f.read(4), "little"))
    return tuple(i + 8 for i in items), tuple(counts)


def _layout(path: Path, ds: Any, position: int) -> _Level | None:
    """The frame layout of one instance when its frames can be decoded here, else None."""
    def number(name: str, default: int | None = None) -> int | None:
        value = ds.get(name, default)
        return None if value is None else int(value)

    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if not (syntax == _JPEG_BASELINE and number("SamplesPerPixel") == 3 and number("BitsAllocated") == 8
            and photometric in (*_YBR, "RGB") and ds.get("DimensionOrganizationType") == "TILED_FULL"
            and number("TotalPixelMatrixFocalPlanes", 1) == 1 and number("NumberOfOpticalPaths", 1) == 1
            and "ConcatenationUID" not in ds):
        return None
    width, height = number("TotalPixelMatrixColumns"), number("TotalPixelMatrixRows")
    tile_w, tile_h, n_frames = number("Columns"), number("Rows"), number("NumberOfFrames", 1)
    if not (width and height and tile_w and tile_h and n_frames):
        return None
    if n_frames != -(-width // tile_w) * -(-height // tile_h):
        return None
    try:
        frames = _frames(path, ds, position, n_frames)
    except (OSError, ValueError, EOFError) as exc:  # damaged items: OpenSlide reads it and says what
        log.debug("%s: frames not located (%s)", path, exc)
        frames = None
    if frames is None:
        return None
    offsets, counts = frames
    rgb = photometric == "RGB"
    prefix = _SOI
    if rgb:
        with open(path, "rb") as f:
            f.seek(offsets[0])
            head = f.read(min(counts[0], 1024))
        if b"JFIF\x00" in head:  # says YCbCr where the instance says RGB: left to OpenSlide
            return None
        if b"Adobe" not in head:  # no marker of its own: say what the components are
            prefix = _SOI + _ADOBE_RGB
    return _Level(path, width, height, tile_w, tile_h, offsets, counts, prefix, rgb)


def _series_files(path: Path) -> list[Path]:
    """The regular files in ``path``'s folder (``path`` first), or ``[path]`` when there are
    more than :data:`MAX_SERIES_FILES`."""
    try:
        names = sorted(e for e in path.parent.iterdir() if not e.name.startswith("."))
    except OSError:
        return [path]
    if len(names) > MAX_SERIES_FILES:
        log.debug("%s: %d files beside it; only its own level is read directly", path, len(names))
        return [path]

    def regular(p: Path) -> bool:
        try:
            return S_ISREG(os.stat(p).st_mode)
        except OSError:
            return False

    return [path] + [p for p in names if p != path and regular(p)]


def dicom_jpeg_tiles(path: Path, level_dimensions: tuple[tuple[int, int], ...],
                     reference: RegionReader, *, backend: str | None = None) -> JpegTiles | None:
    """The direct reader of a DICOM slide opened from ``path``, or None when no level qualifies.

    Level ``i`` is the one instance of ``path``'s series (in ``path``'s folder, not a label or
    overview) whose total pixel matrix is ``level_dimensions[i]`` (``(width, height)``).
    ``reference`` reads a region through OpenSlide, for the check of each level and for
    nothing else (DICOM frames are never sparse in ``TILED_FULL``).
    """
    try:
        import pydicom  # noqa: F401 - a dependency; a broken install leaves DICOM on OpenSlide
    except ImportError as exc:
        log.debug("%s: no direct DICOM reads (%s)", path, exc)
        return None
    own = _header(path)
    if own is None:
        return None
    series = own[0].get("SeriesInstanceUID")
    by_size: dict[tuple[int, int], list[tuple[Path, Any, int]]] = {}
    for file in _series_files(path):
        found = own if file == path else _header(file)
        if found is None:
            continue
        ds, position = found
        kind = [str(v).upper() for v in ds.get("ImageType", [])]
        if ds.get("SeriesInstanceUID") != series or "LABEL" in kind or "OVERVIEW" in kind:
            continue
        size = (int(ds.get("TotalPixelMatrixColumns", 0) or 0), int(ds.get("TotalPixelMatrixRows", 0) or 0))
        by_size.setdefault(size, []).append((file, ds, position))
    layouts: list[_Level | None] = []
    for size in level_dimensions:
        instances = by_size.get((int(size[0]), int(size[1])), [])
        layouts.append(_layout(*instances[0]) if len(instances) == 1 else None)
    if not any(layouts):
        return None
    try:
        return JpegTiles(path, layouts, level_dimensions[0], reference, backend=backend)
    except OSError as exc:
        log.debug("%s: no direct DICOM reads (%s)", path, exc)
        return None
