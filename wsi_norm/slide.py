"""Open a whole-slide image (OpenSlide, tiffslide, OME-Zarr, or a plain image) and read it lazily.

:func:`open_slide` returns a :class:`Slide`: levels, dimensions, downsamples, MPP, vendor,
properties, region reads, and :meth:`Slide.to_dask`, a lazy ``(H, W, 3) uint8`` dask array
whose chunks are whole multiples of the slide's own tiles.

Backends
--------
``openslide``
    The OpenSlide C library (through openslide-python and openslide-bin): Aperio SVS,
    Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Philips TIFF, Ventana BIF, DICOM, generic tiled TIFF.
    The default for every file OpenSlide recognises.
``tiffslide``
    The pure-Python reader (tifffile + imagecodecs) for TIFF-family slides (SVS, generic
    tiled TIFF, NDPI, ...). The default for tiled TIFFs that OpenSlide does not recognise.
``image``
    A plain image (PNG, JPEG, an untiled TIFF) held in memory as a one-level slide, so a
    reference image or a patch can stand wherever a slide can. Transparency is composited over
    white (PNG's straight alpha, a TIFF's associated or unassociated alpha; a fourth TIFF sample
    of no stated meaning is dropped), so a transparent background is glass; planar (separate)
    TIFF colour samples are read too. MPP is None unless given.
``ome-zarr``
    An NGFF multiscale image folder (OME-Zarr 0.5 on zarr v3, 0.4 on zarr v2), such as
    wsi-norm's own OME-Zarr outputs: RGB(A) uint8 with axes ``(c, y, x)``, ``(y, x, c)`` or
    ``(t, c, z, y, x)`` (other axes of length 1); MPP from the level-0 ``scale`` of ``x`` and
    ``y`` when their unit is a length (micrometer, ...). The only backend that opens a folder.

wsi-norm's outputs are slides like any other: their pyramidal TIFFs open with OpenSlide
(generic TIFF) or tiffslide, their OME-Zarr folders with ``ome-zarr``. :attr:`Slide.provenance`
returns the record an output carries, and :meth:`Slide.scanner_metadata` the acquisition
metadata (vendor, objective power, MPP, scanner properties) of the slide it was made from.

Both slide backends return the same pixels for the same region of the same file: transparency
is composited over white (transparent areas outside the scanned region become white glass;
openslide-python's RGBA is straight, a TIFF's alpha as its ExtraSamples say; within a level of
each other, as OpenSlide rounds in between), and so is what lies outside a level; Aperio's
JPEG 2000 YCbCr tiles (33003), which tifffile returns as YCbCr, are converted as OpenSlide
converts them, and so are a YCbCr TIFF's losslessly coded samples, as libtiff converts them
(:mod:`wsi_norm.tiffycbcr`). For the common layout of Aperio SVS and
generic tiled TIFF (baseline 8-bit JPEG tiles, RGB or YCbCr) both decode the tiles themselves,
through :class:`wsi_norm.tiffjpeg.JpegTiles`: the same pixels, several times faster, corrupt
tiles refused. So are a DICOM slide's baseline JPEG frames (:mod:`wsi_norm.dicomjpeg`).

Thread safety: region reads may run concurrently from dask's threads (OpenSlide handles are
thread-safe; tiffslide decodes through tifffile's locked file handle; zarr arrays are read-only
and read concurrently). A :class:`Slide` pickles
as its path and options; the file is reopened lazily in the receiving process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

import numpy as np
from numpy.typing import NDArray

from wsi_norm.dicomjpeg import dicom_jpeg_tiles
from wsi_norm.errors import LevelError, SlideOpenError, SlideReadError, UnsupportedFormatError
from wsi_norm.tiffjpeg import JpegCoding, JpegTiles, largest_tiled_series
from wsi_norm.tiffycbcr import (
    APERIO_J2K_YCBCR,
    RAW_SAMPLE_CODECS,
    LibtiffYCbCr,
    first_tile_subsampled,
    ycbcr_to_rgb,
)

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_PX",
    "MAX_NGFF_LEVELS",
    "MAX_NGFF_METADATA_BYTES",
    "MAX_SCANNER_PROPERTIES",
    "MAX_TIFF_PAGES",
    "MAX_UNTILED_PIXELS",
    "Backend",
    "Slide",
    "open_slide",
    "shrink_to",
]

log = logging.getLogger(__name__)

Backend = Literal["openslide", "tiffslide", "image", "ome-zarr"]
BACKENDS: tuple[Backend, ...] = ("openslide", "tiffslide", "image", "ome-zarr")
DEFAULT_CHUNK_PX = 1024
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".scn", ".bif", ".qptiff"}
_HEADER_HASH_BYTES = 1 << 20
#: Blocks of :meth:`Slide.identity`'s sampled hash between the first and the last MiB.
_SAMPLE_BLOCKS = 64
_SAMPLE_BLOCK_BYTES = 64 << 10


def _sample_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes the sampled hash reads: all of a small file, else the
    first and last MiB and ``_SAMPLE_BLOCKS`` evenly spaced blocks between them."""
    edge = _HEADER_HASH_BYTES
    if size <= 2 * edge + _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
        return [(0, size)]
    middle = size - 2 * edge - _SAMPLE_BLOCK_BYTES
    step = middle / (_SAMPLE_BLOCKS - 1)
    blocks = [(edge + round(i * step), _SAMPLE_BLOCK_BYTES) for i in range(_SAMPLE_BLOCKS)]
    return [(0, edge), *blocks, (size - edge, edge)]


MAX_TIFF_PAGES = 65_536
"""Most image file directories a TIFF may chain; a longer (or looping) chain is refused."""
MAX_UNTILED_PIXELS = 178_956_970
"""Largest untiled image (PNG, JPEG, untiled TIFF) read, in pixels (about 13,377 x 13,377;
512 MiB as RGB). An untiled image is decoded whole into memory, so a small compressed file can
expand to many GB; larger ones are refused before decoding. It equals PIL's own
decompression-bomb limit (twice ``PIL.Image.MAX_IMAGE_PIXELS`` at its default)."""


class _Reader(Protocol):
    """What a backend provides; all coordinates are in the level's own pixels."""

    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    vendor: str
    mpp: tuple[float, float] | None
    tile_sizes: tuple[tuple[int, int] | None, ...]
    record: Mapping[str, Any] | None
    """The wsi-norm provenance record the file carries (it is a wsi-norm output), else None."""

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]: ...

    def close(self) -> None: ...


def _parse_mpp(props: Mapping[str, str], prefix: str) -> tuple[float, float] | None:
    try:
        mpp_x = float(props[f"{prefix}.mpp-x"])
        mpp_y = float(props[f"{prefix}.mpp-y"])
    except (KeyError, ValueError):
        return None
    if not (math.isfinite(mpp_x) and math.isfinite(mpp_y)) or mpp_x <= 0 or mpp_y <= 0:
        return None
    return (mpp_x, mpp_y)


#: micrometres per unit of OME's ``PhysicalSizeXUnit`` (the schema's default is the micrometre)
_OME_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0,
                 "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(description: str | None, size: tuple[int, int]) -> tuple[float, float] | None:
    """Pixel size in µm from an OME-TIFF's OME-XML: the first ``Pixels`` element of the
    slide's size (``SizeX``, ``SizeY``) with a ``PhysicalSizeX`` and ``PhysicalSizeY`` in a
    length unit. None when there is no such element (or the XML declares entities, which an
    OME document never needs)."""
    if not description or "<OME" not in description[:4096] or len(description) > _MAX_RECORD_CHARS \
            or "<!ENTITY" in description or "<!DOCTYPE" in description:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None
    for pixels in root.iter():
        if not pixels.tag.endswith("}Pixels") and pixels.tag != "Pixels":
            continue
        a = pixels.attrib
        try:
            if (int(a["SizeX"]), int(a["SizeY"])) != size:
                continue
            x = float(a["PhysicalSizeX"]) * _OME_UNITS_UM[a.get("PhysicalSizeXUnit", "µm")]
            y = float(a["PhysicalSizeY"]) * _OME_UNITS_UM[a.get("PhysicalSizeYUnit", "µm")]
        except (KeyError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0:
            return (x, y)
    return None


def _rationals(value: Any, n: int) -> tuple[float, ...] | None:
    """A TIFF RATIONAL[n] tag's values as floats (tifffile gives n numerator, denominator
    pairs, flattened); None when the tag is absent."""
    if value is None:
        return None
    flat = [float(v) for v in np.ravel(value)]
    if len(flat) == 2 * n:
        return tuple(flat[2 * i] / flat[2 * i + 1] for i in range(n))
    if len(flat) == n:
        return tuple(flat)
    raise ValueError(f"{len(flat)} values where {n} rationals were expected")


def _tile_sizes(props: Mapping[str, str], prefix: str, n: int) -> tuple[tuple[int, int] | None, ...]:
    sizes: list[tuple[int, int] | None] = []
    for level in range(n):
        try:
            w = int(props[f"{prefix}.level[{level}].tile-width"])
            h = int(props[f"{prefix}.level[{level}].tile-height"])
        except (KeyError, ValueError):
            sizes.append(None)
        else:
            sizes.append((w, h) if w > 0 and h > 0 else None)
    return tuple(sizes)


#: Key of the provenance record in an output's metadata (``wsi_norm.writers.provenance.PROVENANCE_KEY``;
#: repeated here because reading sits below writing in the layers).
_RECORD_KEY = "wsi_norm"
_MAX_RECORD_CHARS = 4 << 20
#: Scanner-property name prefixes kept from a source (the vendor namespaces OpenSlide and
#: tiffslide use), and single properties kept besides them.
_VENDOR_PREFIXES = (
    "aperio.", "dicom.", "hamamatsu.", "leica.", "mirax.", "olympus.", "philips.", "sakura.",
    "ventana.", "zeiss.",
)
_KEPT_PROPERTIES = (
    "openslide.vendor", "openslide.objective-power", "openslide.mpp-x", "openslide.mpp-y",
    "tiffslide.vendor", "tiffslide.objective-power", "tiffslide.mpp-x", "tiffslide.mpp-y",
    "tiff.Make", "tiff.Model", "tiff.Software", "tiff.DateTime",
)
_OBJECTIVE_KEYS = ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag")
MAX_SCANNER_PROPERTIES = 64
"""Most scanner properties :meth:`Slide.scanner_metadata` keeps (the kept ones first, then the
vendor's, by name); each value is cut to :data:`_MAX_PROPERTY_CHARS` characters."""
_MAX_PROPERTY_CHARS = 512


def _record_from_description(text: str | None) -> Mapping[str, Any] | None:
    """The provenance record of a wsi-norm TIFF output: its level-0 ImageDescription is the JSON
    text ``{"wsi_norm": record}``. None for any other description."""
    if not text or not text.startswith('{"' + _RECORD_KEY + '"') or len(text) > _MAX_RECORD_CHARS:
        return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    record = doc.get(_RECORD_KEY) if isinstance(doc, dict) else None
    return record if isinstance(record, dict) else None


def _objective_power(props: Mapping[str, str]) -> float | None:
    for key in _OBJECTIVE_KEYS:
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def _scanner_properties(props: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """The whitelisted properties (bounded) and how many matching ones were left out."""
    kept = [k for k in _KEPT_PROPERTIES if props.get(k) not in (None, "", "None")]
    vendor = sorted(k for k in props if k.startswith(_VENDOR_PREFIXES) and "[" not in k)
    names = kept + vendor
    out = {}
    for key in names[:MAX_SCANNER_PROPERTIES]:
        value = str(props[key])
        if len(value) > _MAX_PROPERTY_CHARS:
            value = value[:_MAX_PROPERTY_CHARS] + f"... ({len(value)} characters)"
        out[key] = value
    return out, max(0, len(names) - MAX_SCANNER_PROPERTIES)


def _rgba_over_white(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite premultiplied (associated, TIFF ``ExtraSamples = 1``) RGBA over white:
    ``rgb + (255 - alpha)``."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha)[..., None].astype(np.uint16)
    return np.minimum(out, 255).astype(np.uint8)


def _straight_alpha_over_white(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite straight (unassociated) RGBA, as PNG and TIFF ``ExtraSamples = 2`` store it,
    over white: ``(rgb * alpha + 255 * (255 - alpha)) / 255``, rounded. An opaque pixel keeps
    its colour and a transparent one is glass, as OpenSlide's transparent areas are."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


_OPENSLIDE_ERROR: list[str] = []  # why OpenSlide could not be loaded, once known


def _openslide() -> Any:
    """openslide-python with its library loaded, or None where it cannot load (no wheel of
    openslide-bin for the platform, no system libopenslide): tiffslide, the pure-Python
    backend, then reads the TIFF-family slides (said once, as a warning)."""
    try:
        import openslide
    except (ImportError, OSError) as exc:
        if not _OPENSLIDE_ERROR:
            _OPENSLIDE_ERROR.append(f"{type(exc).__name__}: {exc}")
            log.warning("OpenSlide cannot be loaded (%s); TIFF-family slides (Aperio SVS, generic "
                        "and OME-TIFF) are read with tiffslide, other formats need OpenSlide "
                        "(pip install openslide-bin)", _OPENSLIDE_ERROR[0])
        return None
    return openslide


def _require_openslide(path: Path) -> Any:
    openslide = _openslide()
    if openslide is None:
        raise SlideOpenError(f"{path}: reading it needs OpenSlide, which cannot be loaded "
                             f"({_OPENSLIDE_ERROR[0]}); pip install openslide-bin")
    return openslide


class _OpenSlideReader:
    def __init__(self, path: Path) -> None:
        openslide = _require_openslide(path)

        self._path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError(f"{path}: not a format OpenSlide reads") from exc
        except openslide.OpenSlideError as exc:
            raise SlideOpenError(
                f"{path}: OpenSlide cannot open it: {exc}{_tiff_damage_hint(path)}"
            ) from exc
        props = dict(self._slide.properties)
        self.properties: Mapping[str, str] = props
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.vendor = props.get("openslide.vendor", "unknown")
        self.mpp = _parse_mpp(props, "openslide") or _ome_mpp(
            props.get("tiff.ImageDescription"), self.level_dimensions[0])
        self.tile_sizes = _tile_sizes(props, "openslide", len(self.level_dimensions))
        self.record = _record_from_description(props.get("tiff.ImageDescription"))
        profile = getattr(self._slide, "color_profile", None)
        self.icc: bytes | None = profile.tobytes() if profile is not None else None
        # Aperio and generic TIFF are TIFF pyramids OpenSlide reads tile by tile as stored; a
        # DICOM slide's levels are instances of frames alike
        self._tiles: JpegTiles | None = None
        if self.vendor in ("aperio", "generic-tiff"):
            self._tiles = JpegTiles.open(path, self.level_dimensions, self._read_region, backend="openslide")
        elif self.vendor == "dicom":
            self._tiles = dicom_jpeg_tiles(path, self.level_dimensions, self._read_region, backend="openslide")

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        if self._tiles is not None and self._tiles.covers(level):
            return self._tiles.read(level, x, y, width, height)
        return self._read_region(level, x, y, width, height)

    def _read_region(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        import openslide

        ds = self.level_downsamples[level]
        try:
            region = self._slide.read_region(
                (round(x * ds), round(y * ds)), level, (width, height)
            )
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self._path}: cannot read level {level} region x={x} y={y} "
                f"{width}x{height}: {exc}"
            ) from exc
        # openslide-python returns straight (not premultiplied) RGBA, unlike OpenSlide's C API
        return _straight_alpha_over_white(np.asarray(region))

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        self._slide.close()


class _TiffSlideReader:
    def __init__(self, path: Path) -> None:
        import tiffslide

        self._path = path
        try:
            self._slide = tiffslide.TiffSlide(str(path))
            self._put_slide_first(path)
            props = dict(self._slide.properties)
        except Exception as exc:  # tifffile raises many types on garbage; all mean "cannot open"
            raise SlideOpenError(
                f"{path}: tiffslide cannot open it: {type(exc).__name__}: {exc}"
                f"{_tiff_damage_hint(path)}"
            ) from exc
        self.properties: Mapping[str, str] = {k: str(v) for k, v in props.items() if v is not None}
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.vendor = str(props.get("tiffslide.vendor") or "generic-tiff")
        self.mpp = _parse_mpp(self.properties, "tiffslide") or _ome_mpp(
            self._slide.ts_tifffile.pages.first.description, self.level_dimensions[0])
        self.tile_sizes = _tile_sizes(self.properties, "tiffslide", len(self.level_dimensions))
        self.record = _record_from_description(self.properties.get("tiff.ImageDescription"))
        self._check_pixels(path)
        icc = self._slide.ts_tifffile.series[0].levels[0].keyframe.tags.valueof(34675)  # InterColorProfile
        self.icc: bytes | None = bytes(icc) if icc is not None and len(icc) else None
        self._fd = os.open(path, os.O_RDONLY)  # os.pread on it is thread-safe, no lock needed
        # ExtraSamples of each level: 1 associated (premultiplied) alpha, 2 straight alpha
        self._alpha = tuple(
            next((int(v) for v in lvl.keyframe.extrasamples if int(v) in (1, 2)), 0)
            for lvl in self._slide.ts_tifffile.series[0].levels
        )
        try:
            self._to_rgb = self._ycbcr_converters(path)
        except BaseException:
            os.close(self._fd)
            self._slide.close()
            raise
        self._verified: set[tuple[int, int]] = set()
        self._warned_unchecked = False
        self._tiles = JpegTiles.open(path, self.level_dimensions, self._read_region, backend="tiffslide")

    def _put_slide_first(self, path: Path) -> None:
        """Make the largest tiled image series 0, the one tiffslide reads as the slide.

        tiffslide reads tifffile's series 0, which is the first image in the file; when that is
        a small stripped thumbnail written before the slide, it would be taken for the slide.
        tifffile caches its list of series, so reordering it in place redirects tiffslide
        (before any pixels or levels are read).
        """
        tif = self._slide.ts_tifffile
        index = largest_tiled_series(tif)
        if index:
            series = tif.series
            log.debug("%s: series %d is the largest tiled image; reading it as level 0", path, index)
            series.insert(0, series.pop(index))

    def _check_pixels(self, path: Path) -> None:
        series = self._slide.ts_tifffile.series[0]
        page = series.levels[0].keyframe
        if page.dtype != np.uint8:
            raise UnsupportedFormatError(f"{path}: {page.dtype} pixels; wsi-norm reads 8-bit RGB")
        if page.samplesperpixel < 3:
            raise UnsupportedFormatError(
                f"{path}: {page.samplesperpixel} sample(s) per pixel; wsi-norm reads RGB"
            )

    def _ycbcr_converters(self, path: Path) -> tuple[Callable[[NDArray[np.uint8]], NDArray[np.uint8]] | None, ...]:
        """Per level, the conversion of samples the decoder returns as YCbCr (or None): Aperio's
        JPEG 2000 YCbCr tiles (33003) with chroma at full resolution, and YCbCr stored with a
        lossless codec (:mod:`wsi_norm.tiffycbcr`)."""
        converters: list[Callable[[NDArray[np.uint8]], NDArray[np.uint8]] | None] = []
        for index, lvl in enumerate(self._slide.ts_tifffile.series[0].levels):
            page = lvl.keyframe
            if page.compression == APERIO_J2K_YCBCR:
                holder = lvl.pages[0] if lvl.pages and lvl.pages[0] is not None else page
                subsampled = first_tile_subsampled(self._fd, holder.dataoffsets, holder.databytecounts)
                if subsampled is None:
                    raise SlideOpenError(
                        f"{path}: level {index}: JPEG 2000 YCbCr tiles (TIFF compression 33003) "
                        "whose first tile has no readable SIZ marker; cannot tell how to convert them"
                    )
                converters.append(None if subsampled else ycbcr_to_rgb)
            elif page.photometric == 6 and page.compression in RAW_SAMPLE_CODECS:
                try:
                    luma = _rationals(page.tags.valueof(529), 3) or (0.299, 0.587, 0.114)
                    reference = _rationals(page.tags.valueof(532), 6) or (0.0, 255.0, 128.0, 255.0, 128.0, 255.0)
                    converters.append(LibtiffYCbCr(luma, reference))
                except (TypeError, ValueError, ZeroDivisionError) as exc:
                    raise SlideOpenError(f"{path}: level {index}: YCbCr tags unusable: {exc}") from exc
            else:
                converters.append(None)
        return tuple(converters)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        if self._tiles is not None and self._tiles.covers(level):
            return self._tiles.read(level, x, y, width, height)  # checked strictly as decoded
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return self._read_region(level, x, y, width, height)
        # tiffslide fills what lies outside the level with black; a slide's outside is white
        out = np.full((height, width, 3), 255, np.uint8)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_region(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read_region(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        ds = self.level_downsamples[level]
        try:
            region = self._slide.read_region(
                (round(x * ds), round(y * ds)), level, (width, height), as_array=True
            )
        except Exception as exc:  # decoder and short-read errors of any type
            raise SlideReadError(
                f"{self._path}: cannot read level {level} region x={x} y={y} "
                f"{width}x{height}: {exc}"
            ) from exc
        self._verify_jpeg_tiles(level, x, y, width, height)
        region = np.asarray(region)
        if region.ndim != 3 or region.shape[2] < 3:
            raise UnsupportedFormatError(f"{self._path}: region of shape {region.shape} is not RGB")
        to_rgb = self._to_rgb[level]
        if to_rgb is not None:
            return to_rgb(region[..., :3].astype(np.uint8, copy=False))
        if region.shape[2] == 4 and self._alpha[level]:
            # tiffslide returns the alpha channel as stored; transparent areas are glass, as
            # OpenSlide composites them over white
            rgba = region.astype(np.uint8, copy=False)
            return _rgba_over_white(rgba) if self._alpha[level] == 1 else _straight_alpha_over_white(rgba)
        return np.ascontiguousarray(region[..., :3])

    def _verify_jpeg_tiles(self, level: int, x: int, y: int, width: int, height: int) -> None:
        """Raise :class:`SlideReadError` if a JPEG tile under the region is corrupt.

        libjpeg only *warns* about corrupt entropy-coded data ("premature end of data segment",
        "bad Huffman code") and fills the rest of the tile with flat blocks; OpenSlide turns the
        warning into an error, but tifffile/imagecodecs return the damaged tile silently. So each
        baseline/progressive 8-bit JPEG tile is parsed once by a strict JPEG parser (libjxl's
        lossless JPEG transcoder through imagecodecs, which rejects such streams) before its
        pixels are trusted. Costs about 10 MP/s per thread (measured on the sample SVS's tiles),
        once per tile; other compressions are read as tifffile decodes them.
        """
        lvl = self._slide.ts_tifffile.series[0].levels[level]
        page = lvl.keyframe
        if page.compression != 7 or not page.is_tiled or page.planarconfig != 1:
            return
        import imagecodecs

        if not imagecodecs.JPEGXL.available:  # an imagecodecs build without libjxl
            if not self._warned_unchecked:
                self._warned_unchecked = True
                log.warning("%s: imagecodecs lacks JPEG XL; JPEG tiles are not checked for "
                            "corruption on the tiffslide path", self._path)
            return

        holder = lvl.pages[0] if lvl.pages and lvl.pages[0] is not None else page
        offsets, counts = holder.dataoffsets, holder.databytecounts
        tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
        cols = -(-int(page.imagewidth) // tile_w)
        rows = -(-int(page.imagelength) // tile_h)
        tables = page.jpegtables
        for row in range(max(0, y // tile_h), min(rows, -(-(y + height) // tile_h))):
            for col in range(max(0, x // tile_w), min(cols, -(-(x + width) // tile_w))):
                index = row * cols + col
                if (level, index) in self._verified or index >= len(offsets) or not counts[index]:
                    continue
                data = os.pread(self._fd, int(counts[index]), int(offsets[index]))
                stream = bytes(tables[:-2]) + data[2:] if tables and data[:2] == b"\xff\xd8" else data
                if _jpeg_frame_kind(stream) is not None:
                    try:
                        imagecodecs.jpegxl_encode_jpeg(stream, numthreads=1)
                    except imagecodecs.JpegxlError as exc:  # its JPEG parser refused the data
                        raise SlideReadError(
                            f"{self._path}: corrupt JPEG tile at level {level}, tile column {col}, "
                            f"row {row} (bytes {int(offsets[index])}..{int(offsets[index] + counts[index])}): "
                            f"its data does not decode cleanly ({exc})"
                        ) from exc
                self._verified.add((level, index))

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        os.close(self._fd)
        self._slide.close()


def _jpeg_frame_kind(stream: bytes) -> int | None:
    """The SOF marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive) of an 8-bit Huffman JPEG,
    or None for anything else (arithmetic coding, 12-bit, lossless, or no frame header found):
    the kinds the strict check in :meth:`_TiffSlideReader._verify_jpeg_tiles` understands."""
    pos = 2 if stream[:2] == b"\xff\xd8" else 0
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xC0, 0xC1, 0xC2):
            return marker if pos + 4 < len(stream) and stream[pos + 4] == 8 else None
        if marker in (0xDA, 0xD9) or 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # scan or image end before a Huffman frame header, or another coding
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return None


def _image_icc(path: Path) -> bytes | None:
    """The ICC profile a PNG, JPEG or TIFF image embeds (its header only is read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            icc = im.info.get("icc_profile")
    except Exception:  # noqa: BLE001 - the pixels were read; a header PIL cannot parse has no profile for us
        return None
    return bytes(icc) if icc else None


def icc_summary(icc: bytes | None) -> dict[str, Any] | None:
    """What provenance and ``info`` say of an ICC profile: its description (as the profile
    names itself), size and SHA-256; None without a profile."""
    if not icc:
        return None
    import io

    from PIL import ImageCms

    try:
        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
    except (OSError, ImageCms.PyCMSError):
        description = "unreadable profile"
    return {"description": description[:200], "bytes": len(icc), "sha256": hashlib.sha256(icc).hexdigest()}


class _ImageReader:
    """A plain image held in memory as a one-level slide."""

    def __init__(self, path: Path, mpp: float | tuple[float, float] | None) -> None:
        self._path = path
        rgb, mode = _read_plain_image(path)
        self._rgb = rgb
        h, w = rgb.shape[:2]
        self.level_dimensions: tuple[tuple[int, int], ...] = ((w, h),)
        self.level_downsamples: tuple[float, ...] = (1.0,)
        self.vendor = f"image/{path.suffix.lower().lstrip('.') or 'unknown'}"
        self.properties: Mapping[str, str] = {"wsi_norm.image-mode": mode}
        self.mpp: tuple[float, float] | None = None
        self.tile_sizes: tuple[tuple[int, int] | None, ...] = (None,)
        self.record: Mapping[str, Any] | None = None
        self.icc: bytes | None = _image_icc(path)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        h, w = self._rgb.shape[:2]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x1, y1 = min(x + width, w), min(y + height, h)
        if x1 > x and y1 > y:
            out[: y1 - y, : x1 - x] = self._rgb[y:y1, x:x1]
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- OME-Zarr (NGFF 0.4 / 0.5)
MAX_NGFF_METADATA_BYTES = 16 << 20
"""Largest zarr metadata document (``zarr.json``, ``.zattrs``) read when opening an OME-Zarr image."""
MAX_NGFF_LEVELS = 64
"""Most multiscale levels (datasets) an OME-Zarr image may list."""
#: NGFF (UDUNITS) length units and their size in micrometres: the scale of x and y gives MPP.
_LENGTH_UNITS_UM = {
    "micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "angstrom": 1e-4,
    "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
}


def _read_zarr_document(path: Path) -> dict[str, Any]:
    """One zarr metadata JSON document, read with a size bound; SlideOpenError names the file."""
    import json

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_NGFF_METADATA_BYTES + 1)
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot read zarr metadata: {exc.strerror or exc}") from exc
    if len(raw) > MAX_NGFF_METADATA_BYTES:
        raise SlideOpenError(
            f"{path}: zarr metadata larger than {MAX_NGFF_METADATA_BYTES:,} bytes, the most read"
        )
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise SlideOpenError(f"{path}: zarr metadata is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SlideOpenError(f"{path}: zarr metadata is not a JSON object")
    return doc


def _zarr_group_attributes(path: Path) -> dict[str, Any] | None:
    """The attributes of the zarr group at ``path`` (v3 ``zarr.json`` or v2 ``.zattrs``), or None
    when ``path`` holds no zarr group metadata at all."""
    if (path / "zarr.json").is_file():
        doc = _read_zarr_document(path / "zarr.json")
        if doc.get("node_type") != "group":
            raise UnsupportedFormatError(
                f"{path}: a zarr {doc.get('node_type') or 'node'}, not a group; an OME-Zarr image "
                "is a group with NGFF multiscales metadata"
            )
        attrs = doc.get("attributes", {})
    elif (path / ".zattrs").is_file():
        attrs = _read_zarr_document(path / ".zattrs")
    elif (path / ".zgroup").is_file():
        attrs = {}
    else:
        return None
    return attrs if isinstance(attrs, dict) else {}


def _ngff_image(path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(image_folder, attributes, multiscale)`` of the NGFF image at ``path``.

    Reads NGFF 0.5 (attributes under ``"ome"``) and 0.4 (at the root); a bioformats2raw
    container is followed to its first image (``0/``).  Only the first multiscale is read.
    """
    attrs = _zarr_group_attributes(path)
    if attrs is None:
        raise SlideOpenError(
            f"{path}: is a directory but not an OME-Zarr image (no zarr.json, .zattrs or .zgroup); "
            "a slide is a file, or an NGFF (OME-Zarr) image folder"
        )
    nested = attrs.get("ome")
    ome: dict[str, Any] = nested if isinstance(nested, dict) else attrs
    if "multiscales" not in ome and "bioformats2raw.layout" in ome and (path / "0").is_dir():
        return _ngff_image(path / "0")
    for kind in ("plate", "well"):
        if kind in ome:
            raise UnsupportedFormatError(
                f"{path}: an NGFF {kind}, not an image; open one of its images' folders instead"
            )
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise UnsupportedFormatError(
            f"{path}: a zarr group without NGFF 'multiscales' metadata: not an OME-Zarr image"
        )
    return path, attrs, multiscales[0]


def _ngff_axes(path: Path, multiscale: Mapping[str, Any], ndim: int) -> list[dict[str, Any]]:
    """The multiscale's axes as ``{"name", "type", "unit"}`` dicts (NGFF 0.3 lists names only;
    NGFF 0.1/0.2 have no axes and mean t, c, z, y, x)."""
    axes = multiscale.get("axes")
    if axes is None and ndim == 5:
        axes = ["t", "c", "z", "y", "x"]
    if not isinstance(axes, list) or len(axes) != ndim:
        raise UnsupportedFormatError(
            f"{path}: NGFF axes {axes!r} do not match the {ndim} dimensions of level 0"
        )
    out = []
    for axis in axes:
        entry = {"name": axis} if isinstance(axis, str) else axis
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UnsupportedFormatError(f"{path}: NGFF axis {axis!r} has no name")
        out.append({"name": entry["name"].lower(), "type": entry.get("type"), "unit": entry.get("unit")})
    return out


def _ngff_scale(transforms: Any, ndim: int) -> list[float] | None:
    """The product of the ``scale`` transformations in an NGFF list, or None when there is none."""
    if not isinstance(transforms, list):
        return None
    scale: list[float] | None = None
    for t in transforms:
        values = t.get("scale") if isinstance(t, dict) and t.get("type") == "scale" else None
        if isinstance(values, list) and len(values) == ndim:
            try:
                factors = [float(v) for v in values]
            except (TypeError, ValueError):
                return None
            scale = factors if scale is None else [a * b for a, b in zip(scale, factors, strict=True)]
    return scale


class _OmeZarrReader:
    """An NGFF (OME-Zarr 0.4 on zarr v2, 0.5 on zarr v3) multiscale RGB uint8 image.

    Axes may be ``(c, y, x)``, ``(y, x, c)`` or ``(t, c, z, y, x)``: ``y`` and ``x`` are the
    image, a channel axis of 3 (RGB) or 4 (RGBA, alpha dropped) is the colour, any other axis
    must have length 1.  Levels are the multiscale's datasets, largest first; each read
    fetches only the zarr chunks under the region (never a whole level).
    """

    def __init__(self, path: Path) -> None:
        import zarr

        self._path = path
        image, attrs, multiscale = _ngff_image(path)
        datasets = multiscale.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            raise UnsupportedFormatError(f"{path}: NGFF multiscales list no datasets (levels)")
        if len(datasets) > MAX_NGFF_LEVELS:
            raise UnsupportedFormatError(
                f"{path}: {len(datasets)} NGFF datasets, more than the {MAX_NGFF_LEVELS} levels read"
            )
        self._arrays: list[Any] = []
        for k, ds in enumerate(datasets):
            sub = ds.get("path") if isinstance(ds, dict) else None
            if not isinstance(sub, str) or not sub or ".." in Path(sub).parts or Path(sub).is_absolute():
                raise UnsupportedFormatError(f"{path}: NGFF dataset {k} has no usable path ({sub!r})")
            for name in ("zarr.json", ".zarray"):
                meta = image / sub / name
                if meta.is_file() and meta.stat().st_size > MAX_NGFF_METADATA_BYTES:
                    raise SlideOpenError(
                        f"{meta}: zarr metadata larger than {MAX_NGFF_METADATA_BYTES:,} bytes, the most read"
                    )
            try:
                self._arrays.append(zarr.open_array(image / sub, mode="r"))
            except Exception as exc:  # zarr raises many types for a missing or broken array
                raise SlideOpenError(
                    f"{path}: cannot open level {k} (zarr array {sub!r}): {type(exc).__name__}: {exc}"
                ) from exc
        first = self._arrays[0]
        axes = _ngff_axes(path, multiscale, first.ndim)
        names = [a["name"] for a in axes]
        channel = [i for i, a in enumerate(axes) if a["type"] == "channel" or a["name"] == "c"]
        if "y" not in names or "x" not in names or len(channel) != 1 or len(set(names)) != len(names):
            raise UnsupportedFormatError(
                f"{path}: NGFF axes {','.join(names)}: wsi-norm reads y, x and one channel axis (RGB)"
            )
        self._yx_c = (names.index("y"), names.index("x"), channel[0])
        dims: list[tuple[int, int]] = []
        for k, arr in enumerate(self._arrays):
            shape = tuple(int(n) for n in arr.shape)
            where = f"{path}: level {k} (array {datasets[k]['path']!r})"
            if arr.dtype != np.uint8:
                raise UnsupportedFormatError(f"{where}: {arr.dtype} pixels; wsi-norm reads 8-bit RGB")
            if len(shape) != len(names):
                raise UnsupportedFormatError(f"{where}: {len(shape)} dimensions, the axes name {len(names)}")
            if shape[channel[0]] not in (3, 4):
                raise UnsupportedFormatError(
                    f"{where}: {shape[channel[0]]} channel(s); wsi-norm reads RGB (3) or RGBA (4)"
                )
            extra = {n: s for i, (n, s) in enumerate(zip(names, shape, strict=True))
                     if i not in self._yx_c and s != 1}
            if extra:
                raise UnsupportedFormatError(
                    f"{where}: axes {', '.join(f'{n}={s}' for n, s in extra.items())} are not "
                    "single; wsi-norm reads one 2-D RGB image"
                )
            chunk_px = int(arr.chunks[self._yx_c[0]]) * int(arr.chunks[self._yx_c[1]])
            if chunk_px > MAX_UNTILED_PIXELS:
                raise UnsupportedFormatError(
                    f"{where}: chunks of {arr.chunks[self._yx_c[1]]} x {arr.chunks[self._yx_c[0]]} px "
                    f"({chunk_px:,} pixels) are over the limit of {MAX_UNTILED_PIXELS:,} pixels a "
                    "region read may decode; rechunk the image"
                )
            h, w = shape[self._yx_c[0]], shape[self._yx_c[1]]
            if h <= 0 or w <= 0 or (dims and (w > dims[-1][0] or h > dims[-1][1])):
                raise UnsupportedFormatError(
                    f"{where}: {w} x {h} px; NGFF levels must be non-empty and shrink level by level"
                )
            dims.append((w, h))
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(dims)
        w0, h0 = dims[0]
        # as OpenSlide computes it: the mean of the width and height ratios
        self.level_downsamples: tuple[float, ...] = tuple((w0 / w + h0 / h) / 2 for w, h in dims)
        self.tile_sizes: tuple[tuple[int, int] | None, ...] = tuple(
            (int(a.chunks[self._yx_c[1]]), int(a.chunks[self._yx_c[0]])) for a in self._arrays
        )
        self.mpp = self._mpp(multiscale, datasets[0], axes)
        self.vendor = "ome-zarr"
        version = (attrs.get("ome") or {}).get("version") if isinstance(attrs.get("ome"), dict) else None
        props = {
            "ngff.version": str(version or multiscale.get("version") or "unknown"),
            "ngff.axes": ",".join(names),
            "ngff.name": str(multiscale.get("name", "")),
            "ngff.zarr-format": str(first.metadata.zarr_format),
            "ngff.image-path": str(image.relative_to(path)) if image != path else ".",
        }
        for k, ds in enumerate(datasets):
            props[f"ngff.level[{k}].path"] = str(ds["path"])
        record = attrs.get(_RECORD_KEY)
        self.record: Mapping[str, Any] | None = record if isinstance(record, dict) else None
        self.properties: Mapping[str, str] = props

    def _mpp(self, multiscale: Mapping[str, Any], dataset: Mapping[str, Any],
             axes: list[dict[str, Any]]) -> tuple[float, float] | None:
        """Level-0 pixel size from the dataset's (and the multiscale's) scale, in micrometres."""
        n = len(axes)
        scale = _ngff_scale(dataset.get("coordinateTransformations"), n)
        outer = _ngff_scale(multiscale.get("coordinateTransformations"), n)
        if scale is None:
            return None
        if outer is not None:
            scale = [a * b for a, b in zip(scale, outer, strict=True)]
        y, x, _ = self._yx_c
        units = [_LENGTH_UNITS_UM.get(str(axes[i]["unit"]).lower()) for i in (x, y)]
        if units[0] is None or units[1] is None:
            return None  # pixels without a physical unit (or an unknown one)
        mpp = (scale[x] * units[0], scale[y] * units[1])
        return mpp if all(math.isfinite(v) and v > 0 for v in mpp) else None

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        w, h = self.level_dimensions[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 <= x0 or y1 <= y0:
            return out
        iy, ix, ic = self._yx_c
        arr = self._arrays[level]
        index: list[Any] = [0] * arr.ndim
        index[iy], index[ix], index[ic] = slice(y0, y1), slice(x0, x1), slice(0, 3)
        try:
            region = np.asarray(arr[tuple(index)])
        except Exception as exc:  # codec and store errors of any type
            raise SlideReadError(
                f"{self._path}: cannot read level {level} region x={x} y={y} "
                f"{width}x{height}: {type(exc).__name__}: {exc}"
            ) from exc
        order = sorted((iy, ix, ic))  # the axes left after integer indexing, in file order
        region = np.moveaxis(region, [order.index(iy), order.index(ix), order.index(ic)], [0, 1, 2])
        out[y0 - y : y1 - y, x0 - x : x1 - x] = region
        return out

    def close(self) -> None:
        self._arrays = []


def _read_plain_image(path: Path) -> tuple[NDArray[np.uint8], str]:
    """Read a PNG/JPEG/untiled TIFF as ``(H, W, 3) uint8``, refusing what is not 8-bit colour."""
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(int(n) for n in series.shape)
                pixels = math.prod(shape[:-1]) if len(shape) >= 3 else math.prod(shape)
                if pixels > MAX_UNTILED_PIXELS:
                    raise SlideReadError(
                        f"{path}: untiled image of shape {shape} ({pixels:,} pixels) is over the "
                        f"limit of {MAX_UNTILED_PIXELS:,} pixels for an image read whole into "
                        "memory; convert it to a tiled pyramidal TIFF"
                    )
                data = series.asarray()
                if data.ndim == 3 and series.axes == "SYX":  # planar (separate) colour samples
                    data = np.moveaxis(data, 0, -1)
                extra = tuple(series.keyframe.extrasamples or ())
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideOpenError(f"{path}: cannot read TIFF image: {exc}") from exc
        mode = f"{data.dtype}x{data.shape[-1] if data.ndim == 3 else 1}"
        if data.dtype != np.uint8:
            raise UnsupportedFormatError(f"{path}: {data.dtype} pixels; wsi-norm reads 8-bit RGB")
        if data.ndim != 3 or data.shape[2] not in (3, 4):
            raise UnsupportedFormatError(f"{path}: image of shape {data.shape} is not RGB(A)")
        if data.shape[2] == 4 and extra[:1] == (1,):  # associated (premultiplied) alpha
            return _rgba_over_white(data), mode
        if data.shape[2] == 4 and extra[:1] == (2,):  # unassociated (straight) alpha
            return _straight_alpha_over_white(data), mode
        return np.ascontiguousarray(data[..., :3]), mode  # a fourth sample of no stated meaning

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:  # reads the header only; PIL itself refuses a bomb here
            img: Image.Image = opened  # rebound below to a converted copy
            width, height = img.size
            if width * height > MAX_UNTILED_PIXELS:
                raise SlideReadError(
                    f"{path}: image of {width}x{height} ({width * height:,} pixels) is over the "
                    f"limit of {MAX_UNTILED_PIXELS:,} pixels for an image read whole into memory"
                )
            img.load()
            mode = img.mode
            if mode in ("P", "PA"):
                img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
            if img.mode not in ("RGB", "RGBA"):
                detail = "16-bit" if ("16" in img.mode or img.mode in ("I", "F")) else "not RGB"
                raise UnsupportedFormatError(
                    f"{path}: image mode {mode!r} ({detail}); wsi-norm reads 8-bit RGB"
                )
            if img.mode == "RGBA":  # PNG's alpha is straight: transparent pixels are glass
                rgb = _straight_alpha_over_white(np.asarray(img, dtype=np.uint8))
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError as exc:
        raise SlideOpenError(f"{path}: not an image any backend can open") from exc
    except Image.DecompressionBombError as exc:
        raise SlideReadError(
            f"{path}: image is over the limit for an image read whole into memory ({exc})"
        ) from exc
    except OSError as exc:
        if isinstance(exc, (UnsupportedFormatError, SlideReadError)):
            raise
        raise SlideOpenError(f"{path}: cannot read image: {exc}") from exc
    return np.ascontiguousarray(rgb), mode


def _tiff_damage_hint(path: Path) -> str:
    """Say so when a file starts like a TIFF but its directory chain is damaged.

    Walks the chain of image file directories (classic TIFF and BigTIFF) reading only their
    headers, with a visited set and at most :data:`MAX_TIFF_PAGES` directories, so a chain that
    runs past the end of the file, loops back on itself or never ends is reported in
    milliseconds (tifffile itself walks a looping chain forever). Returns ``""`` for an intact
    chain or a file that is not a TIFF.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
            if len(head) < 8 or head[:2] not in (b"II", b"MM"):
                return ""
            order: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"
            magic = int.from_bytes(head[2:4], order)
            if magic == 42:
                count_size, entry_size, offset_size, offset = 2, 12, 4, int.from_bytes(head[4:8], order)
            elif magic == 43 and len(head) >= 16:
                count_size, entry_size, offset_size, offset = 8, 20, 8, int.from_bytes(head[8:16], order)
            else:
                return ""
            seen: dict[int, int] = {}
            index = 0
            while offset:
                if offset in seen:
                    return (
                        f" (its TIFF directory chain loops: directory {index} would be directory "
                        f"{seen[offset]} again, at byte {offset})"
                    )
                if index >= MAX_TIFF_PAGES:
                    return (
                        f" (its TIFF directory chain has more than {MAX_TIFF_PAGES} directories, "
                        "the most wsi-norm reads)"
                    )
                seen[offset] = index
                if offset + count_size > size:
                    return (
                        f" (the file looks truncated: TIFF directory {index} is at byte {offset} "
                        f"but the file has only {size} bytes)"
                    )
                fh.seek(offset)
                n = int.from_bytes(fh.read(count_size), order)
                next_at = offset + count_size + n * entry_size
                if next_at + offset_size > size:
                    return (
                        f" (the file looks truncated: TIFF directory {index} at byte {offset} "
                        f"runs past the end of the file ({size} bytes))"
                    )
                fh.seek(next_at)
                offset = int.from_bytes(fh.read(offset_size), order)
                index += 1
    except OSError:
        return ""
    return ""


def _tiff_truncation(path: Path) -> str | None:
    """For a TIFF-family file, say if some strip or tile lies beyond the end of the file.

    Readers differ on such files (OpenSlide refuses them, tifffile fills the missing tiles
    silently), so wsi-norm checks the byte ranges itself. Reads only the directories.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for index, page in enumerate(tif.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    end = int((offsets + counts).max())
                    missing = int(((offsets + counts) > size).sum())
                    return (
                        f"truncated: {missing} of {offsets.size} tiles/strips of TIFF directory "
                        f"{index} end beyond the file (need {end} bytes, file has {size})"
                    )
    except Exception:  # noqa: BLE001 - not parseable as TIFF: the backends will say why
        return None
    return None


def _openslide_format(path: Path) -> str | None:
    openslide = _openslide()
    if openslide is None:
        return None
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None
    return None if fmt is None else str(fmt)


def _is_tiled_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return largest_tiled_series(tif) is not None
    except Exception:  # noqa: BLE001 - not a TIFF, or a broken one: not ours to judge here
        return False


#: The most files of a folder looked at for a DICOM slide (a slide is a few instances: its
#: levels, label and overview; an archive folder is not a slide).
MAX_DICOM_FOLDER_FILES = 256


def _dicom_slide_file(folder: Path) -> Path | None:
    """The largest file of the one DICOM whole-slide image in ``folder`` (OpenSlide opens the
    whole series from any of its files), or None when the folder holds no DICOM slide.

    Raises
    ------
    SlideOpenError
        The folder holds more files than :data:`MAX_DICOM_FOLDER_FILES`, or DICOM slides of
        more than one series (naming them): which one is meant cannot be told; or it holds
        ``.dcm`` files and OpenSlide cannot be loaded.
    """
    try:
        entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise SlideOpenError(f"{folder}: cannot list the folder: {exc}") from exc
    files = [e for e in entries if _is_regular(e)]
    openslide = _openslide()
    if openslide is None:
        if any(f.suffix.lower() == ".dcm" for f in files):
            _require_openslide(folder)  # raises: DICOM is OpenSlide's
        return None
    if len(files) > MAX_DICOM_FOLDER_FILES:
        if any(f.suffix.lower() == ".dcm" for f in files):
            raise SlideOpenError(
                f"{folder}: {len(files)} files, more than a DICOM slide holds "
                f"({MAX_DICOM_FOLDER_FILES} at most are looked at); pass one file of the slide"
            )
        return None
    series: dict[str, Path] = {}
    refused: list[str] = []
    for f in files:
        if openslide.OpenSlide.detect_format(str(f)) != "dicom":
            continue
        try:
            with openslide.OpenSlide(str(f)) as slide:
                uid = slide.properties.get("dicom.SeriesInstanceUID", str(f))
        except openslide.OpenSlideError as exc:
            refused.append(f"{f.name}: {exc}")
            continue
        if uid not in series or f.stat().st_size > series[uid].stat().st_size:
            series[uid] = f  # the largest instance (level 0): what the slide's identity hashes
    if not series and refused:
        raise SlideOpenError(f"{folder}: holds DICOM files OpenSlide cannot open: {refused[0]}")
    if len(series) > 1:
        named = ", ".join(f"{f.name} (series {uid})" for uid, f in series.items())
        raise SlideOpenError(f"{folder}: holds {len(series)} DICOM slides: {named}; pass a file of the one meant")
    return next(iter(series.values()), None)


def _is_regular(path: Path) -> bool:
    try:
        return S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _pyramid_in_subifds(path: Path) -> bool:
    """Whether the file's slide (its largest tiled image) has reduced levels in SubIFDs."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            index = largest_tiled_series(tif)
            if index is None:
                return False
            series = tif.series[index]
            return len(series.levels) > 1 and bool(series.levels[0].keyframe.subifds)
    except Exception:  # noqa: BLE001 - OpenSlide opened it; leave any doubt to OpenSlide
        return False


def _choose_backend(path: Path) -> Backend:
    suffix = path.suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return "image"
    fmt = _openslide_format(path)
    if fmt == "generic-tiff" and _pyramid_in_subifds(path):
        # OME-TIFF keeps its pyramid in SubIFDs, which OpenSlide does not read: it would see
        # level 0 alone, and every thumbnail, mask and overview would decode all of it
        log.debug("%s: its pyramid lies in SubIFDs (OME-TIFF); reading it with tiffslide", path)
        return "tiffslide"
    if fmt is not None:
        return "openslide"
    if _is_tiled_tiff(path):
        return "tiffslide"
    if suffix in {".tif", ".tiff"}:
        return "image"
    if _openslide() is None:
        raise UnsupportedFormatError(
            f"{path}: not a TIFF or image tiffslide and the image reader open, and OpenSlide, which "
            f"reads the other slide formats, cannot be loaded ({_OPENSLIDE_ERROR[0]}); pip install openslide-bin"
        )
    raise UnsupportedFormatError(
        f"{path}: not a slide or image any backend can open "
        "(OpenSlide does not recognise it and it is not a tiled TIFF)" + _json_hint(path)
    )


def _json_hint(path: Path) -> str:
    """A note for a JSON file given as a slide (most likely a template meant as the target)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return ""
    if not head.startswith(b"{"):
        return ""
    return ("; it is JSON: a template (from `wsi-norm fit`) is given as the target (--target; target= "
            "in Python; a manifest template's path:), not as a slide")


#: While :meth:`Slide.tile_cache` is active, a read smaller than half a file tile, of a level
#: whose tiles hold at least this many pixels, is cut from the whole decoded tile (kept).
_CACHED_TILE_PX = 1 << 20
#: Decoded tiles :meth:`Slide.tile_cache` keeps at most, in bytes (least recently used out first).
TILE_CACHE_BYTES = 256 << 20


class _TileCache:
    """Whole decoded tiles of levels with large file tiles, each decoded once while it is kept,
    however many threads ask for it at once (the first decodes, the others wait for it).

    A file may hold a level as a few very large JPEG tiles (a generic TIFF whose writer made one
    tile of 8192 x 8192 px, say). Every reader decodes a whole tile to serve any part of it, so
    the fit's 256 windows of 256 x 256 px would each decode the whole tile: 256 decodes of 64 MP
    where one suffices (OpenSlide's own tile cache, 32 MiB, cannot hold such a tile either).
    """

    def __init__(self, read: Callable[[int, int, int, int, int], NDArray[np.uint8]], max_bytes: int) -> None:
        self._read = read
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._tiles: OrderedDict[tuple[int, int, int], tuple[Future[NDArray[np.uint8]], int]] = OrderedDict()
        self._bytes = 0
        self.decoded = 0  # tiles read from the file (for tests and logs)

    def serves(self, tile: tuple[int, int] | None, width: int, height: int) -> bool:
        """True for a read of ``width`` x ``height`` px worth serving from whole tiles of size ``tile``."""
        if tile is None:
            return False
        area = tile[0] * tile[1]
        return area >= _CACHED_TILE_PX and 2 * width * height <= area

    def _tile(self, level: int, x0: int, y0: int, tw: int, th: int) -> NDArray[np.uint8]:
        key = (level, x0, y0)
        with self._lock:
            entry = self._tiles.get(key)
            owner = entry is None
            if entry is None:
                entry = (Future(), 3 * tw * th)
                self._tiles[key] = entry
                self._bytes += entry[1]
                while self._bytes > self._max_bytes and len(self._tiles) > 1:
                    _, (_, nbytes) = self._tiles.popitem(last=False)
                    self._bytes -= nbytes
            else:
                self._tiles.move_to_end(key)
        future = entry[0]
        if owner:
            try:
                pixels = self._read(level, x0, y0, tw, th)
            except BaseException as exc:
                with self._lock:
                    if self._tiles.get(key) is entry:
                        del self._tiles[key]
                        self._bytes -= entry[1]
                future.set_exception(exc)
                raise
            pixels.flags.writeable = False
            with self._lock:
                self.decoded += 1
            future.set_result(pixels)
        return future.result()

    def read(self, level: int, tile: tuple[int, int], size: tuple[int, int],
             x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        """The region, cut from the whole tiles of ``level`` (``size``: its width and height) it
        touches; outside the level it is white, as every reader's."""
        tw, th = tile
        lw, lh = size
        out = np.empty((height, width, 3), np.uint8)
        if x < 0 or y < 0 or x + width > lw or y + height > lh:
            out.fill(255)
        for ty0 in range(max(0, y) // th * th, min(y + height, lh), th):
            for tx0 in range(max(0, x) // tw * tw, min(x + width, lw), tw):
                sy0, sy1 = max(y, ty0), min(y + height, ty0 + th, lh)
                sx0, sx1 = max(x, tx0), min(x + width, tx0 + tw, lw)
                pixels = self._tile(level, tx0, ty0, tw, th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = pixels[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out


# One open handle per (backend, file, process), shared by every Slide of that file and counted:
# reopening per chunk would dominate small reads, and closing a handle another thread is
# reading from crashes OpenSlide. The key includes size and mtime, so a replaced file reopens.
_HandleKey = tuple[str, str, Any, int, int]
_HANDLES: dict[_HandleKey, tuple[_Reader, int]] = {}
_HANDLES_LOCK = threading.RLock()  # re-entrant: __del__ may run during a GC inside the lock


def _handle_key(path: Path, backend: Backend, mpp: tuple[float, float] | None) -> _HandleKey:
    stat = _version_stat(path)
    return (backend, str(path), mpp, stat.st_size, stat.st_mtime_ns)


def _version_stat(path: Path) -> os.stat_result:
    """The stat that changes when ``path`` is replaced: the file's own, or for a zarr folder its
    root metadata document's (an output is replaced whole, by rename, so that is new too)."""
    if path.is_dir():
        for name in ("zarr.json", ".zattrs", ".zgroup"):
            if (path / name).is_file():
                return (path / name).stat()
    return path.stat()


def _acquire_reader(key: _HandleKey, path: Path, backend: Backend) -> _Reader:
    with _HANDLES_LOCK:
        entry = _HANDLES.get(key)
        if entry is None:
            reader: _Reader
            if backend == "openslide":
                reader = _OpenSlideReader(path)
            elif backend == "tiffslide":
                reader = _TiffSlideReader(path)
            elif backend == "ome-zarr":
                reader = _OmeZarrReader(path)
            else:
                reader = _ImageReader(path, None)
            entry = (reader, 0)
        _HANDLES[key] = (entry[0], entry[1] + 1)
        return entry[0]


def _release_reader(key: _HandleKey) -> None:
    with _HANDLES_LOCK:
        entry = _HANDLES.get(key)
        if entry is None:
            return
        reader, users = entry
        if users > 1:
            _HANDLES[key] = (reader, users - 1)
            return
        del _HANDLES[key]
    reader.close()


def _normalise_mpp(mpp: float | tuple[float, float] | None) -> tuple[float, float] | None:
    if mpp is None:
        return None
    pair = (float(mpp), float(mpp)) if isinstance(mpp, (int, float)) else tuple(map(float, mpp))
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"mpp must be a positive number or (x, y) pair, got {mpp!r}")
    return (pair[0], pair[1])


@dataclass(frozen=True)
class _LevelSource:
    """Array-like view of one level for :func:`dask.array.from_array` (read on ``__getitem__``)."""

    slide: Slide
    level: int

    @property
    def shape(self) -> tuple[int, int, int]:
        w, h = self.slide.level_dimensions[self.level]
        return (h, w, 3)

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> NDArray[np.uint8]:
        rows, cols = key[0], key[1]
        h, w, _ = self.shape
        y0, y1, _ = rows.indices(h)
        x0, x1, _ = cols.indices(w)
        region = self.slide.read_region(self.level, x=x0, y=y0, width=x1 - x0, height=y1 - y0)
        return region[(slice(None), slice(None), *key[2:])] if len(key) > 2 else region


class Slide:
    """A whole-slide image or plain image, opened read-only.

    Use :func:`open_slide` to make one. Dimensions are ``(width, height)`` pairs as in
    OpenSlide; arrays are ``(rows, cols, 3)``.

    Attributes
    ----------
    path : Path
        The file, or the OME-Zarr folder.
    backend : {"openslide", "tiffslide", "image", "ome-zarr"}
        The reader in use.
    """

    def __init__(
        self, path: Path, backend: Backend, *, mpp: float | tuple[float, float] | None = None
    ) -> None:
        self.path = path
        self.backend: Backend = backend
        self._mpp_override = _normalise_mpp(mpp)
        self._key = _handle_key(path, backend, self._mpp_override)
        self._reader = _acquire_reader(self._key, path, backend)
        self._closed = False
        self._held: NDArray[np.uint8] | None = None  # level 0 in memory (hold_level0)
        self._tiles: _TileCache | None = None  # whole large tiles kept (tile_cache)

    # -- pickling: path and options only; the handle is reopened in the receiving process
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "mpp": self._mpp_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["backend"], mpp=state["mpp"])  # type: ignore[misc]

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, {w}x{h}, levels={self.level_count})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release this Slide's use of the shared handle; the file is closed when no Slide
        of this process uses it any more. Idempotent."""
        if not getattr(self, "_closed", True):
            self._closed = True
            _release_reader(self._key)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: modules may be gone
            return

    # -- facts
    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self._reader.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of each level, level 0 first."""
        return self._reader.level_dimensions

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self._reader.level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each level relative to level 0."""
        return self._reader.level_downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Microns per pixel at level 0 as ``(x, y)``, or None when the file records none."""
        return self._mpp_override or self._reader.mpp

    def jpeg_coding(self) -> JpegCoding | None:
        """How level 0's JPEG tiles were coded (quantization tables, chroma subsampling, colour
        space) when this process decodes them itself (Aperio SVS and generic tiled TIFF, both
        backends); None for any other slide (other formats, other codecs, plain images)."""
        tiles: JpegTiles | None = getattr(self._reader, "_tiles", None)  # the TIFF readers only
        return tiles.coding(0) if tiles is not None else None

    @property
    def vendor(self) -> str:
        """Format vendor as the backend reports it (``aperio``, ``generic-tiff``, ``image/png``...)."""
        return self._reader.vendor

    @property
    def properties(self) -> dict[str, str]:
        """All metadata properties the backend exposes, as strings."""
        return dict(self._reader.properties)

    @property
    def provenance(self) -> dict[str, Any] | None:
        """The provenance record of a wsi-norm output (its TIFF ImageDescription or OME-Zarr
        ``wsi_norm`` attribute), or None for any other slide."""
        record = self._reader.record
        return None if record is None else dict(record)

    @property
    def objective_power(self) -> float | None:
        """Objective magnification the slide was scanned at (20.0 for 20x), or None when unknown.

        Read from ``openslide.objective-power``, ``tiffslide.objective-power`` or
        ``aperio.AppMag``; for a wsi-norm output, the one recorded of its source.
        """
        recorded = self._recorded_scanner()
        if recorded is None:
            return _objective_power(self._reader.properties)
        value = recorded.get("objective_power")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def _recorded_scanner(self) -> Mapping[str, Any] | None:
        record = self._reader.record
        source = record.get("source") if record is not None else None
        scanner = source.get("scanner") if isinstance(source, Mapping) else None
        return scanner if isinstance(scanner, Mapping) else None

    def scanner_metadata(self) -> dict[str, Any]:
        """What the slide's scanner recorded, bounded, for provenance.

        Returns
        -------
        dict
            ``{"vendor", "objective_power", "mpp", "properties", "properties_left_out",
            "icc_profile"}``: the format vendor, the objective power (float or None), the file's level-0 MPP
            ``[x, y]`` (or None; not an ``mpp`` override), and at most
            :data:`MAX_SCANNER_PROPERTIES` properties: ``openslide.``/``tiffslide.`` vendor,
            objective power and MPP, ``tiff.Make``/``Model``/``Software``/``DateTime``, then
            the vendor's own (``aperio.*``, ``hamamatsu.*``, ...) by name; values longer than
            512 characters are cut; the embedded ICC profile's :func:`icc_summary`. For a wsi-norm output, the metadata recorded of the slide
            it was made from (so it survives a chain of runs); ``{"from_record": True}`` says so.
        """
        recorded = self._recorded_scanner()
        if recorded is not None:
            return {**dict(recorded), "from_record": True}
        props, left_out = _scanner_properties(self._reader.properties)
        mpp = self._reader.mpp
        return {
            "vendor": self.vendor,
            "objective_power": _objective_power(self._reader.properties),
            "mpp": None if mpp is None else [mpp[0], mpp[1]],
            "properties": props,
            "properties_left_out": left_out,
            "icc_profile": icc_summary(self.icc_profile),
        }

    @property
    def icc_profile(self) -> bytes | None:
        """The ICC colour profile the file embeds (the scanner's colour characterization), or
        None. Reported, not applied: fits and colour maps work on the RGB values as stored,
        as every stain method here is defined on them."""
        return getattr(self._reader, "icc", None)

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        """The file's own tile size ``(width, height)`` at ``level``, or None if untiled."""
        self._check_level(level)
        return self._reader.tile_sizes[level]

    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise LevelError(
                f"{self.path}: level {level} requested, slide has {self.level_count} "
                f"(0..{self.level_count - 1})"
            )

    def identity(self) -> dict[str, Any]:
        """The source's identity for provenance and skip decisions.

        The file is identified by its size, its modification time (``st_mtime_ns``) and a
        *sampled* SHA-256: the first MiB, the last MiB and :data:`_SAMPLE_BLOCKS` blocks of
        64 KiB evenly spaced between them (the whole file when it is smaller than that,
        about 6 MiB), read in one pass of a few MiB whatever the slide's size.  An edit
        inside the file changes its mtime (or, if the mtime was put back, is caught when it
        touches a sampled block); a same-size edit of an unsampled block with the mtime
        restored is not detected.  ``header_sha256`` (the first MiB alone) stays for
        records that compare copies of a file (a copy has another mtime).

        A folder (OME-Zarr) is identified by its files: total size, latest mtime, a hash of
        its root metadata document (``header_sha256``) and a sampled hash over the listing
        of every file (relative path and size), every zarr metadata document and the first
        64 KiB of up to :data:`_SAMPLE_BLOCKS` evenly spaced chunk files.

        Returns
        -------
        dict
            ``{"name", "path", "size_bytes", "mtime_ns", "header_sha256", "header_bytes",
            "sampled_sha256", "sample"}``.
        """
        if self.path.is_dir():
            return _folder_identity(self.path)
        st = self.path.stat()
        size = st.st_size
        header = hashlib.sha256()
        sampled = hashlib.sha256()
        with open(self.path, "rb") as fh:
            head = fh.read(_HEADER_HASH_BYTES)
            header.update(head)
            for offset, length in _sample_spans(size):
                fh.seek(offset)
                sampled.update(fh.read(length))
        return {
            "name": self.path.name,
            "path": str(self.path),
            "size_bytes": size,
            "mtime_ns": st.st_mtime_ns,
            "header_sha256": header.hexdigest(),
            "header_bytes": len(head),
            "sampled_sha256": sampled.hexdigest(),
            "sample": f"first and last {_HEADER_HASH_BYTES >> 20} MiB + {_SAMPLE_BLOCKS} evenly "
            f"spaced {_SAMPLE_BLOCK_BYTES >> 10} KiB blocks",
        }

    # -- pixels
    def read_region(
        self, level: int = 0, *, x: int, y: int, width: int, height: int
    ) -> NDArray[np.uint8]:
        """Read a region of one level.

        Parameters
        ----------
        level : int
            Pyramid level.
        x, y : int
            Top-left corner in the level's own pixel coordinates.
        width, height : int
            Size in pixels (> 0).

        Returns
        -------
        (height, width, 3) uint8
            RGB. Areas outside the slide (or transparent in the file) are white.

        Raises
        ------
        LevelError
            The level does not exist.
        SlideReadError
            The pixels could not be decoded (truncated or corrupt file).
        """
        self._check_level(level)
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        held = self._held
        if level == 0 and held is not None and x >= 0 and y >= 0 and x + width <= held.shape[1] \
                and y + height <= held.shape[0]:
            return held[y : y + height, x : x + width].copy()
        tiles = self._tiles
        if tiles is not None and tiles.serves(self._reader.tile_sizes[level], width, height):
            tile = self._reader.tile_sizes[level]
            assert tile is not None  # serves() says so
            return tiles.read(level, tile, self.level_dimensions[level], int(x), int(y), int(width), int(height))
        return self._reader.read(level, int(x), int(y), int(width), int(height))

    @contextlib.contextmanager
    def tile_cache(self, max_bytes: int = TILE_CACHE_BYTES) -> Iterator[None]:
        """Keep whole decoded file tiles of at least 1 MP for the reads inside, up to
        ``max_bytes`` (least recently used out first); nested, the outer cache serves.

        For many small reads of a slide whose levels are stored in very large tiles (the fit's
        windows): each tile is then decoded once, not once per read that touches it. Only reads
        smaller than half a tile are served so; the pixels are the same as without the cache
        (each region is cut from the tile the reader decodes for it anyway). The most recently
        used tile is kept even when it alone is larger than ``max_bytes``: reading its parts
        one by one would decode it once a read, and the write holds such a tile whole anyway.
        """
        if self._tiles is not None:
            yield
            return
        self._tiles = _TileCache(self._reader.read, max_bytes)
        try:
            yield
        finally:
            decoded, self._tiles = self._tiles.decoded, None
            if decoded:
                log.debug("%s: %d large tiles decoded once each for the reads of a tile cache", self.path, decoded)

    @contextlib.contextmanager
    def hold_level0(self) -> Iterator[NDArray[np.uint8]]:
        """Read level 0 once and serve every level-0 :meth:`read_region` inside it from memory.

        For a slide small enough to hold (a biopsy): the fit's windows, the coarse mask of a
        one-level slide and the write then decode each tile once. The pixels are the file's,
        as :meth:`read_region` reads them (a region is the same slice of the whole level).

        Yields
        ------
        (H, W, 3) uint8, read-only
            Level 0.
        """
        w, h = self.dimensions
        held = self._reader.read(0, 0, 0, int(w), int(h))
        held.flags.writeable = False
        self._held = held
        try:
            yield held
        finally:
            self._held = None

    def chunk_shape(self, level: int = 0, *, chunk_px: int = DEFAULT_CHUNK_PX) -> tuple[int, int]:
        """The ``(rows, cols)`` chunk size :meth:`to_dask` uses: a whole number of file tiles
        closest to ``chunk_px`` (at least one tile)."""
        tile = self.tile_size(level)
        if chunk_px <= 0:
            raise ValueError(f"chunk_px must be positive, got {chunk_px}")
        if tile is None:
            return (chunk_px, chunk_px)
        tw, th = tile
        return (th * max(1, round(chunk_px / th)), tw * max(1, round(chunk_px / tw)))

    def to_dask(self, level: int = 0, *, chunk_px: int = DEFAULT_CHUNK_PX) -> da.Array:
        """The level as a lazy dask array.

        Parameters
        ----------
        level : int
            Pyramid level.
        chunk_px : int
            Target chunk side; rounded to a whole number of the file's tiles.

        Returns
        -------
        dask.array.Array, (H, W, 3) uint8
            Nothing is read until a chunk is computed; each chunk is one region read.
        """
        import dask.array as da
        from dask.base import tokenize

        self._check_level(level)
        chunks = (*self.chunk_shape(level, chunk_px=chunk_px), 3)
        stat = _version_stat(self.path)
        token = tokenize(str(self.path), stat.st_size, stat.st_mtime_ns, self.backend, level, chunks)
        # dask.array.from_array is unannotated (returns Any)
        return da.from_array(  # type: ignore[no-untyped-call,no-any-return]
            _LevelSource(self, level),
            chunks=chunks,
            name=f"slide-{self.path.stem[:24]}-{token}",
            asarray=False,
            fancy=False,
            lock=False,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )

    def best_level_for(self, max_px: int) -> int:
        """The lowest-resolution level whose larger side is still >= ``max_px`` (else level 0)."""
        best = 0
        for level, (w, h) in enumerate(self.level_dimensions):
            if max(w, h) >= max_px:
                best = level
        return best

    def thumbnail(self, max_px: int = 1024) -> NDArray[np.uint8]:
        """A downsampled RGB image whose larger side is at most ``max_px``.

        Reads the lowest level that is at least ``max_px`` large; when that level is large
        (a single-level slide), it is reduced chunk by chunk so memory stays bounded.
        """
        from PIL import Image

        level = self.best_level_for(max_px)
        w, h = self.level_dimensions[level]
        scale = max_px / max(w, h)
        if scale >= 1 or w * h <= 8192 * 8192:
            return shrink_to(self.read_region(level, x=0, y=0, width=w, height=h), max_px)
        step = max(1, int(1 / scale))
        rgb = self.to_dask(level)[::step, ::step].compute()
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def shrink_to(rgb: NDArray[np.uint8], max_px: int) -> NDArray[np.uint8]:
    """``(H, W, 3) uint8`` ``rgb`` box-filtered down so its larger side is ``max_px`` (``rgb``
    itself when it is no larger): what :meth:`Slide.thumbnail` makes of a whole level it read,
    for a caller that holds that level already."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max_px / max(w, h)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: Backend | None = None,
    mpp: float | tuple[float, float] | None = None,
) -> Slide:
    """Open a slide or plain image.

    Parameters
    ----------
    path : path-like
        The file, or an OME-Zarr (NGFF image) folder.
    backend : {"openslide", "tiffslide", "image", "ome-zarr"}, optional
        Reader to use. Default: OpenSlide for every file it recognises, tiffslide for other
        tiled TIFFs, for OME-TIFF pyramids (reduced levels in SubIFDs, which OpenSlide does not
        read) and for tiled TIFFs whose tile compression OpenSlide cannot decode (JPEG
        2000, WebP, JPEG XL), the in-memory image reader for PNG/JPEG and untiled TIFFs,
        OpenSlide for a folder holding one DICOM slide, ``ome-zarr`` for other folders.
    mpp : float or (float, float), optional
        Microns per pixel ``(x, y)`` to use instead of what the file says (or for an image
        that records none).

    Returns
    -------
    Slide

    Raises
    ------
    SlideOpenError
        The file is missing or no backend can open it, or a folder is not an NGFF image.
    UnsupportedFormatError
        It opens but is not 8-bit RGB, or the chosen backend does not read this format.

    Examples
    --------
    >>> slide = open_slide("CMU-1-Small-Region.svs")  # doctest: +SKIP
    >>> slide.to_dask(0).chunksize  # doctest: +SKIP
    (960, 960, 3)
    """
    p = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if _is_folder(p):
        if backend in (None, "openslide") and _zarr_group_attributes(p) is None:
            dicom = _dicom_slide_file(p)
            if dicom is not None:
                log.debug("%s: a DICOM slide; opening %s with openslide", p, dicom.name)
                return Slide(dicom, "openslide", mpp=mpp)
        if backend not in (None, "ome-zarr"):
            raise SlideOpenError(
                f"{p}: is a directory; backend {backend!r} reads files (only 'ome-zarr' reads a "
                "folder, and OpenSlide a folder of one DICOM slide)"
            )
        log.debug("opening %s with ome-zarr", p)
        return Slide(p, "ome-zarr", mpp=mpp)
    _check_regular_file(p)
    if backend == "ome-zarr":
        raise UnsupportedFormatError(f"{p}: is a file; the 'ome-zarr' backend reads an NGFF image folder")
    if _starts_like_tiff(p):
        hint = _tiff_damage_hint(p)
        if hint:
            raise SlideOpenError(f"{p}: cannot open{hint}")
        problem = _tiff_truncation(p)
        if problem:
            raise SlideOpenError(f"{p}: {problem}")
    if backend is None:
        backend = _choose_backend(p)
        if backend == "openslide" and _is_tiled_tiff(p):
            try:
                return Slide(p, backend, mpp=mpp)
            except SlideOpenError as exc:
                # OpenSlide takes a tiled TIFF as generic TIFF but its libtiff lacks some tile
                # codecs (JPEG 2000 34712, WebP, JPEG XL, ...); tiffslide decodes them (imagecodecs)
                if "Unsupported TIFF compression" not in str(exc):
                    raise
                log.info("%s: OpenSlide cannot decode its tiles (%s); reading it with tiffslide", p, exc)
                backend = "tiffslide"
    elif backend == "tiffslide" and not _is_tiled_tiff(p) and p.suffix.lower() not in _TIFF_SUFFIXES:
        raise UnsupportedFormatError(f"{p}: tiffslide reads TIFF-family files only")
    log.debug("opening %s with %s", p, backend)
    return Slide(p, backend, mpp=mpp)


def _is_folder(path: Path) -> bool:
    try:
        return S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False  # _check_regular_file says why


def _folder_identity(path: Path) -> dict[str, Any]:
    """:meth:`Slide.identity` of a folder (an OME-Zarr image): see there."""
    files: list[tuple[str, int, int]] = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            st = os.stat(full, follow_symlinks=False)
            if S_ISREG(st.st_mode):
                files.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    metadata_names = {"zarr.json", ".zattrs", ".zarray", ".zgroup"}
    meta = [f for f in files if os.path.basename(f[0]) in metadata_names]
    chunks = [f for f in files if os.path.basename(f[0]) not in metadata_names]
    step = max(1, math.ceil(len(chunks) / _SAMPLE_BLOCKS))
    picked = chunks[::step]
    if chunks and picked[-1] != chunks[-1]:
        picked.append(chunks[-1])
    sampled = hashlib.sha256()
    for rel, size, _ in files:
        sampled.update(f"{rel}\0{size}\n".encode())
    for rel, _, _ in meta:
        with open(path / rel, "rb") as fh:
            sampled.update(fh.read(MAX_NGFF_METADATA_BYTES))
    for rel, _, _ in picked:
        with open(path / rel, "rb") as fh:
            sampled.update(fh.read(_SAMPLE_BLOCK_BYTES))
    root_doc = next((path / n for n in ("zarr.json", ".zattrs", ".zgroup") if (path / n).is_file()), None)
    head = b"" if root_doc is None else root_doc.read_bytes()[:_HEADER_HASH_BYTES]
    return {
        "name": path.name,
        "path": str(path),
        "size_bytes": sum(f[1] for f in files),
        "mtime_ns": max((f[2] for f in files), default=path.stat().st_mtime_ns),
        "header_sha256": hashlib.sha256(head).hexdigest(),
        "header_bytes": len(head),
        "sampled_sha256": sampled.hexdigest(),
        "sample": f"folder: listing of {len(files)} files, {len(meta)} zarr metadata documents, "
        f"first {_SAMPLE_BLOCK_BYTES >> 10} KiB of {len(picked)} chunk files",
    }


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO blocks until a
    writer appears, and a device or socket is no slide."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SlideOpenError(f"{path}: no such file") from None
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot stat it: {exc.strerror or exc}") from exc
    if S_ISDIR(mode):
        raise SlideOpenError(f"{path}: is a directory, not a slide file or an OME-Zarr image")
    if not S_ISREG(mode):
        kind = (
            "a FIFO (named pipe)" if S_ISFIFO(mode)
            else "a socket" if S_ISSOCK(mode)
            else "a device" if S_ISCHR(mode) or S_ISBLK(mode)
            else "a special file"
        )
        raise SlideOpenError(f"{path}: is {kind}, not a regular slide file")


def _starts_like_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
