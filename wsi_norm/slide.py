"""Open a whole-slide image (OpenSlide, tiffslide, or a plain image) and read it lazily.

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
    reference image or a patch can stand wherever a slide can. Alpha is dropped; MPP is None
    unless given.

Both slide backends return the same pixels for the same region of the same file: OpenSlide's
premultiplied RGBA is composited over white (transparent areas outside the scanned region
become white glass), tiffslide's RGB is used as is.

Thread safety: region reads may run concurrently from dask's threads (OpenSlide handles are
thread-safe; tiffslide decodes through tifffile's locked file handle). A :class:`Slide` pickles
as its path and options; the file is reopened lazily in the receiving process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from wsi_norm.errors import LevelError, SlideOpenError, SlideReadError, UnsupportedFormatError

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "Backend", "BACKENDS", "Slide", "open_slide", "DEFAULT_CHUNK_PX", "MAX_TIFF_PAGES",
    "MAX_UNTILED_PIXELS",
]

log = logging.getLogger(__name__)

Backend = Literal["openslide", "tiffslide", "image"]
BACKENDS: tuple[Backend, ...] = ("openslide", "tiffslide", "image")
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


def _rgba_over_white(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite OpenSlide's premultiplied RGBA over white: ``rgb + (255 - alpha)``."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha)[..., None].astype(np.uint16)
    return np.minimum(out, 255).astype(np.uint8)


class _OpenSlideReader:
    def __init__(self, path: Path) -> None:
        import openslide

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
        self.mpp = _parse_mpp(props, "openslide")
        self.tile_sizes = _tile_sizes(props, "openslide", len(self.level_dimensions))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        import openslide

        ds = self.level_downsamples[level]
        try:
            region = self._slide.read_region(
                (int(round(x * ds)), int(round(y * ds))), level, (width, height)
            )
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self._path}: cannot read level {level} region x={x} y={y} "
                f"{width}x{height}: {exc}"
            ) from exc
        return _rgba_over_white(np.asarray(region))

    def close(self) -> None:
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
        self.mpp = _parse_mpp(self.properties, "tiffslide")
        self.tile_sizes = _tile_sizes(self.properties, "tiffslide", len(self.level_dimensions))
        self._check_pixels(path)
        self._fd = os.open(path, os.O_RDONLY)  # os.pread on it is thread-safe, no lock needed
        self._verified: set[tuple[int, int]] = set()
        self._warned_unchecked = False

    def _put_slide_first(self, path: Path) -> None:
        """Make the largest tiled image series 0, the one tiffslide reads as the slide.

        tiffslide reads tifffile's series 0, which is the first image in the file; when that is
        a small stripped thumbnail written before the slide, it would be taken for the slide.
        tifffile caches its list of series, so reordering it in place redirects tiffslide
        (before any pixels or levels are read).
        """
        tif = self._slide.ts_tifffile
        index = _largest_tiled_series(tif)
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

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        ds = self.level_downsamples[level]
        try:
            region = self._slide.read_region(
                (int(round(x * ds)), int(round(y * ds))), level, (width, height), as_array=True
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

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        h, w = self._rgb.shape[:2]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x1, y1 = min(x + width, w), min(y + height, h)
        if x1 > x and y1 > y:
            out[: y1 - y, : x1 - x] = self._rgb[y:y1, x:x1]
        return out

    def close(self) -> None:
        pass


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
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideOpenError(f"{path}: cannot read TIFF image: {exc}") from exc
        mode = f"{data.dtype}x{data.shape[-1] if data.ndim == 3 else 1}"
        if data.dtype != np.uint8:
            raise UnsupportedFormatError(f"{path}: {data.dtype} pixels; wsi-norm reads 8-bit RGB")
        if data.ndim != 3 or data.shape[2] not in (3, 4):
            raise UnsupportedFormatError(f"{path}: image of shape {data.shape} is not RGB(A)")
        return np.ascontiguousarray(data[..., :3]), mode

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
    except Exception:  # not parseable as TIFF: the backends will say why
        return None
    return None


def _openslide_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def _largest_tiled_series(tif: Any) -> int | None:
    """Index of the series whose full-resolution page is the largest tiled image, or None.

    tifffile numbers series in file order, so a small stripped thumbnail written before the
    slide would be series 0 and be read as the slide; the slide is the largest tiled image.
    None also when the first image is untiled and larger than every tiled one (a plain
    untiled image with a tiled preview stays an untiled image).
    """
    best: tuple[int, int] | None = None
    first_pixels = 0
    for index, series in enumerate(tif.series):
        page = series.levels[0].keyframe
        if page is None:
            continue
        pixels = int(page.imagewidth) * int(page.imagelength)
        if index == 0:
            first_pixels = pixels
        if page.is_tiled and (best is None or pixels > best[1]):
            best = (index, pixels)
    return None if best is None or best[1] < first_pixels else best[0]


def _is_tiled_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _largest_tiled_series(tif) is not None
    except Exception:  # not a TIFF, or a broken one: not ours to judge here
        return False


def _choose_backend(path: Path) -> Backend:
    suffix = path.suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return "image"
    if _openslide_format(path) is not None:
        return "openslide"
    if _is_tiled_tiff(path):
        return "tiffslide"
    if suffix in {".tif", ".tiff"}:
        return "image"
    raise UnsupportedFormatError(
        f"{path}: not a slide or image any backend can open "
        "(OpenSlide does not recognise it and it is not a tiled TIFF)"
    )


# One open handle per (backend, file, process), shared by every Slide of that file and counted:
# reopening per chunk would dominate small reads, and closing a handle another thread is
# reading from crashes OpenSlide. The key includes size and mtime, so a replaced file reopens.
_HandleKey = tuple[str, str, Any, int, int]
_HANDLES: dict[_HandleKey, tuple[_Reader, int]] = {}
_HANDLES_LOCK = threading.RLock()  # re-entrant: __del__ may run during a GC inside the lock


def _handle_key(path: Path, backend: Backend, mpp: tuple[float, float] | None) -> _HandleKey:
    stat = path.stat()
    return (backend, str(path), mpp, stat.st_size, stat.st_mtime_ns)


def _acquire_reader(key: _HandleKey, path: Path, backend: Backend) -> _Reader:
    with _HANDLES_LOCK:
        entry = _HANDLES.get(key)
        if entry is None:
            reader: _Reader
            if backend == "openslide":
                reader = _OpenSlideReader(path)
            elif backend == "tiffslide":
                reader = _TiffSlideReader(path)
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
        The file.
    backend : {"openslide", "tiffslide", "image"}
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

    # -- pickling: path and options only; the handle is reopened in the receiving process
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "mpp": self._mpp_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["backend"], mpp=state["mpp"])  # type: ignore[misc]

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, {w}x{h}, levels={self.level_count})"

    def __enter__(self) -> Slide:
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

    @property
    def vendor(self) -> str:
        """Format vendor as the backend reports it (``aperio``, ``generic-tiff``, ``image/png``...)."""
        return self._reader.vendor

    @property
    def properties(self) -> dict[str, str]:
        """All metadata properties the backend exposes, as strings."""
        return dict(self._reader.properties)

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

        Returns
        -------
        dict
            ``{"name", "path", "size_bytes", "mtime_ns", "header_sha256", "header_bytes",
            "sampled_sha256", "sample"}``.
        """
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
        return self._reader.read(level, int(x), int(y), int(width), int(height))

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
        stat = self.path.stat()
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
        if scale >= 1:
            return self.read_region(level, x=0, y=0, width=w, height=h)
        if w * h <= 8192 * 8192:
            rgb = self.read_region(level, x=0, y=0, width=w, height=h)
        else:
            step = max(1, int(1 / scale))
            rgb = self.to_dask(level)[::step, ::step].compute()
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
        The file.
    backend : {"openslide", "tiffslide", "image"}, optional
        Reader to use. Default: OpenSlide for every file it recognises, tiffslide for other
        tiled TIFFs, the in-memory image reader for PNG/JPEG and untiled TIFFs.
    mpp : float or (float, float), optional
        Microns per pixel ``(x, y)`` to use instead of what the file says (or for an image
        that records none).

    Returns
    -------
    Slide

    Raises
    ------
    SlideOpenError
        The file is missing or no backend can open it.
    UnsupportedFormatError
        It opens but is not 8-bit RGB, or the chosen backend does not read this format.

    Examples
    --------
    >>> slide = open_slide("CMU-1-Small-Region.svs")  # doctest: +SKIP
    >>> slide.to_dask(0).chunksize  # doctest: +SKIP
    (960, 960, 3)
    """
    p = Path(path)
    _check_regular_file(p)
    if _starts_like_tiff(p):
        hint = _tiff_damage_hint(p)
        if hint:
            raise SlideOpenError(f"{p}: cannot open{hint}")
        problem = _tiff_truncation(p)
        if problem:
            raise SlideOpenError(f"{p}: {problem}")
    if backend is None:
        backend = _choose_backend(p)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    elif backend == "tiffslide" and not _is_tiled_tiff(p):
        if p.suffix.lower() not in _TIFF_SUFFIXES:
            raise UnsupportedFormatError(f"{p}: tiffslide reads TIFF-family files only")
    log.debug("opening %s with %s", p, backend)
    return Slide(p, backend, mpp=mpp)


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
        raise SlideOpenError(f"{path}: is a directory, not a slide file")
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
