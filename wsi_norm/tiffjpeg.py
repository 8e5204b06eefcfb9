"""Decode a tiled TIFF's JPEG tiles directly: the fast read path of both slide backends.

Reading level 0 dominated a plain copy: OpenSlide's ``read_region`` decodes each tile into
premultiplied ARGB, then a PIL image, then a numpy copy, then the RGB composite over white
(~35 MP per CPU-second on a generated slide); tiffslide adds a strict re-parse of every tile.
libjpeg-turbo itself decodes the same tiles at 230-530 MP per CPU-second. For the layouts whose
pixels are exactly known - a TIFF pyramid of baseline 8-bit JPEG tiles, RGB or YCbCr, which is
what Aperio SVS and generic tiled TIFF are - :class:`JpegTiles` reads each tile's bytes with
``os.pread`` (thread-safe, no lock), prefixes the level's shared JPEG tables, and decodes it with
``simplejpeg`` (libjpeg-turbo, the GIL released) straight to RGB.

The pixels are OpenSlide's: both are libjpeg-turbo with its defaults (accurate integer DCT,
fancy upsampling). A TIFF's photometric interpretation says what the JPEG's three components
are, which the stream itself may not: for ``RGB`` an Adobe marker with transform 0 is put in
front (libjpeg would otherwise assume YCbCr for three unmarked components, as Aperio's "RGB
JPEG" tiles are); ``YCbCr`` is libjpeg's own default. Each level is also checked once, on its
first read and its first tile that decodes, against the backend's own reader; a level that
differs (or any layout not listed above) stays on that reader. Tests compare every tile of the real Aperio sample and of
generated pyramids with OpenSlide, bit for bit. One difference is deliberate: OpenSlide takes
region positions in level-0 coordinates, so at a level whose downsample is not a whole number
(2300 px over 288 px: 7.986) it paints the region at a fraction of a pixel, interpolated; here
a level's region is its own pixels, as tiffslide reads them.

Corrupt data: libjpeg only *warns* about corrupt entropy-coded data and fills the rest of the
tile with flat blocks; ``simplejpeg``'s strict mode turns the warning into an error, raised here
as :class:`~wsi_norm.errors.SlideReadError` naming the level, tile and byte range (what
OpenSlide does too). Tiles recorded with no bytes (sparse TIFFs) are left to the backend.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_norm.errors import SlideReadError

__all__ = ["JpegCoding", "JpegTiles", "largest_tiled_series"]

log = logging.getLogger(__name__)

_JPEG = 7  # TIFF compression: "new-style" JPEG (TechNote 2)
_RGB, _YCBCR = 2, 6  # TIFF photometric interpretations
#: APP14 "Adobe" marker, version 100, flags 0/0, transform 0: the three components are R, G, B
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_SOI = b"\xff\xd8"
#: The side of the square, at most, of a tile that :meth:`JpegTiles.covers` compares with the backend
_CHECKED_PX = 1024

#: Reads a region from the backend's own reader: (level, x, y, width, height) -> (h, w, 3) uint8
RegionReader = Callable[[int, int, int, int, int], NDArray[np.uint8]]

#: How many verdicts of :meth:`JpegTiles.covers` a process remembers (oldest out first)
_REMEMBERED_VERDICTS = 4096
_verdicts: OrderedDict[tuple[object, ...], bool] = OrderedDict()
_verdicts_lock = threading.Lock()


@dataclass(frozen=True)
class JpegCoding:
    """How a level's JPEG tiles were coded: what a codec simulation needs to code pixels alike.

    Attributes
    ----------
    qtables : tuple of tuples of 64 int
        The quantization tables, in the order and layout Pillow reads them
        (``PIL.Image.quantization``) and writes them (``save(..., qtables=...)``).
    subsampling : {"4:4:4", "4:2:2", "4:2:0"}
        Chroma subsampling (of the second and third components against the first).
    rgb : bool
        The three components are R, G and B themselves (Aperio's "RGB JPEG"), not YCbCr.
    """

    qtables: tuple[tuple[int, ...], ...]
    subsampling: str
    rgb: bool

    def to_dict(self) -> dict[str, Any]:
        """For provenance: the subsampling, the colour space and the tables' first entries (DC)."""
        return {"subsampling": self.subsampling, "components": "RGB" if self.rgb else "YCbCr",
                "dc_quantizers": [int(t[0]) for t in self.qtables]}

    @property
    def quality(self) -> int | None:
        """The IJG quality (1-100) whose scaled standard luminance table is the first table,
        to one level in every entry; None for tables no quality setting of libjpeg makes."""
        table = self.qtables[0] if self.qtables else ()
        if len(table) != 64:
            return None
        best = min(range(1, 101), key=lambda q: sum(abs(a - b) for a, b in zip(_ijg_luma(q), table, strict=True)))
        return best if max(abs(a - b) for a, b in zip(_ijg_luma(best), table, strict=True)) <= 1 else None


#: The IJG (libjpeg) standard luminance quantization table, natural order (ITU-T T.81 Annex K).
_IJG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


def _ijg_luma(quality: int) -> tuple[int, ...]:
    """libjpeg's luminance table at ``quality`` (``jpeg_quality_scaling``, baseline-clamped)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(max((v * scale + 50) // 100, 1), 255) for v in _IJG_LUMA)


#: Pillow's ``JpegImagePlugin.get_sampling`` codes
_SAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


def _coding_of(stream: bytes, rgb: bool) -> JpegCoding | None:
    """The coding of one complete JPEG stream (tables included), or None when Pillow cannot say."""
    import io

    from PIL import Image, JpegImagePlugin, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(stream)) as im:
            if not isinstance(im, JpegImagePlugin.JpegImageFile) or im.layers != 3:
                return None
            sampling = _SAMPLING_NAMES.get(JpegImagePlugin.get_sampling(im))
            tables = getattr(im, "quantization", None) or {}
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None
    if sampling is None or not tables or len(tables) > 4:
        return None
    return JpegCoding(tuple(tuple(int(v) for v in tables[k]) for k in sorted(tables)), sampling, rgb)


class _Sparse(Exception):
    """A tile with no bytes in the file: the backend decides what it shows."""


class _BadTile(Exception):
    """A tile that does not decode cleanly (the message says which and why)."""


@dataclass(frozen=True)
class _Level:
    file: Path  # the file holding this level's tiles
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    prefix: bytes  # SOI, the colour-space marker if needed, the shared tables
    rgb: bool  # photometric RGB: the components are R, G, B (else YCbCr)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


def _level_layout(page: Any, path: Path) -> _Level | None:
    """The tile layout of one TIFF page of ``path`` when its pixels can be decoded here, else None."""
    if not (page.is_tiled and page.compression == _JPEG and page.planarconfig == 1
            and page.bitspersample == 8 and page.samplesperpixel == 3 and not page.extrasamples
            and page.photometric in (_RGB, _YCBCR) and int(page.imagedepth) == 1):
        return None
    tables = bytes(page.jpegtables or b"")
    if tables and not (tables[:2] == _SOI and tables[-2:] == b"\xff\xd9"):
        return None
    header = tables[2:-2]
    if page.photometric == _RGB:
        if b"JFIF\x00" in header or b"Adobe" in header:  # a marker of its own: not ours to override
            return None
        prefix = _SOI + _ADOBE_RGB + header
    else:
        prefix = _SOI + header
    offsets = tuple(int(o) for o in page.dataoffsets)
    counts = tuple(int(c) for c in page.databytecounts)
    level = _Level(path, int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                   int(page.tilelength), offsets, counts, prefix, page.photometric == _RGB)
    if len(offsets) != level.rows * level.cols or len(counts) != len(offsets):
        return None
    return level


def largest_tiled_series(tif: Any) -> int | None:
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


class JpegTiles:
    """Direct JPEG-tile reads of those levels of a slide that decode exactly.

    Parameters
    ----------
    path : Path
        The slide as opened (a TIFF or SVS file, or one instance of a DICOM slide).
    layouts : sequence of _Level or None
        The tile layout of each level of the slide, in the backend's level order; None where a
        level is not read here (it stays on the backend).
    base_size : (int, int)
        Level 0's ``(width, height)``.
    reference : callable
        The backend's own region reader, for the one-tile check of each level and for sparse
        tiles.
    backend : str, optional
        The name of the backend ``reference`` reads with (keyword-only). With it, each level's
        verdict is remembered for the process, keyed by this name and the identity of the
        level's file as opened (device, inode, size, modification time): the next opening of
        the same unchanged file trusts it instead of decoding a tile again (a flow opens a
        slide to fit it, to write it and for its QC; one check of a slide stored in 2048-px
        tiles is ~70 ms, in 8192-px tiles a whole 64-MP decode). Without it (a reader of
        unknown make) every opening checks.
    """

    def __init__(self, path: Path, layouts: list[_Level | None], base_size: tuple[int, int],
                 reference: RegionReader, *, backend: str | None = None) -> None:
        self._path = path
        self._reference = reference
        self._backend = backend
        # levels whose layout qualifies, each checked against the backend on its first use (not
        # here: a backend read while the slide is being opened could wait on another thread)
        self._unchecked: dict[int, tuple[_Level, bool]] = {}
        for index, layout in enumerate(layouts):
            if layout is not None:
                whole = base_size[0] % layout.width == 0 and base_size[1] % layout.height == 0
                self._unchecked[index] = (layout, whole)
        self._levels: dict[int, _Level] = {}
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        try:
            for layout, _ in self._unchecked.values():
                if layout.file not in self._fds:
                    self._fds[layout.file] = os.open(layout.file, os.O_RDONLY)
        except OSError:
            self.close()
            raise

    @classmethod
    def open(cls, path: Path, level_dimensions: tuple[tuple[int, int], ...],
             reference: RegionReader, *, backend: str | None = None) -> JpegTiles | None:
        """The direct reader for ``path``, or None when no level of it qualifies.

        Level ``i`` is the page of the file's largest tiled image series whose level ``i`` has
        dimensions ``level_dimensions[i]`` (``(width, height)``).
        """
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                index = largest_tiled_series(tif)
                if index is None:
                    return None
                levels = tif.series[index].levels
                layouts: list[_Level | None] = []
                for i, (w, h) in enumerate(level_dimensions):
                    page = levels[i].keyframe if i < len(levels) else None
                    same = page is not None and (int(page.imagewidth), int(page.imagelength)) == (w, h)
                    layouts.append(_level_layout(page, path) if same else None)
                tiles = cls(path, layouts, level_dimensions[0], reference, backend=backend)
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
            log.debug("%s: no direct JPEG reads (%s)", path, exc)
            return None
        if not tiles._unchecked:
            tiles.close()
            return None
        return tiles

    def _agrees(self, level: int, layout: _Level, whole: bool) -> bool:
        """Whether ``level`` decodes here as the backend reads it, judged on one tile.

        The first tile that decodes of: the first tile, then (at a level whose downsample from
        level 0 is a whole number, ``whole``) the middle and the last one. OpenSlide
        addresses regions in level-0 coordinates: at a level whose downsample is not a whole
        number it paints a region at a fraction of a pixel (interpolated), except at the
        origin. A colour-space mistake shows on any tile, glass included (three equal
        components read as YCbCr are not grey). A level none of whose candidates decodes stays
        on the backend.
        """
        candidates = [(0, 0)]
        if whole:
            candidates += [(layout.rows // 2, layout.cols // 2), (layout.rows - 1, layout.cols - 1)]
        for row, col in candidates:
            x, y = col * layout.tile_w, row * layout.tile_h
            # at most the tile's first _CHECKED_PX square: a whole 8192-px tile through OpenSlide
            # and its alpha took seconds, and a decoding mistake shows on any part of a tile
            w = min(layout.tile_w, layout.width - x, _CHECKED_PX)
            h = min(layout.tile_h, layout.height - y, _CHECKED_PX)
            try:
                mine = self._tile(level, layout, row, col)[:h, :w]
            except (_Sparse, _BadTile):
                continue  # a damaged or missing tile says nothing about the layout
            if np.array_equal(mine, self._reference(level, x, y, w, h)):
                return True
            log.info("%s: level %d decodes differently from the backend; read through it", self._path, level)
            return False
        return False

    def covers(self, level: int) -> bool:
        """Whether ``level`` is read here (checked against the backend on the first call)."""
        if level in self._levels:
            return True
        if level not in self._unchecked:
            return False
        with self._lock:
            if level in self._unchecked:
                layout, whole = self._unchecked[level]
                key = self._verdict_key(level, layout, whole)
                with _verdicts_lock:
                    agrees = None if key is None else _verdicts.get(key)
                if agrees is None:
                    agrees = self._agrees(level, layout, whole)
                    if key is not None:
                        with _verdicts_lock:
                            _verdicts[key] = agrees
                            while len(_verdicts) > _REMEMBERED_VERDICTS:
                                _verdicts.popitem(last=False)
                if agrees:
                    self._levels[level] = layout
                del self._unchecked[level]
        return level in self._levels

    def _verdict_key(self, level: int, layout: _Level, whole: bool) -> tuple[object, ...] | None:
        """What a remembered verdict on ``level`` is filed under (None: not remembered)."""
        if self._backend is None:
            return None
        try:
            st = os.fstat(self._fds[layout.file])
        except (KeyError, OSError):
            return None
        return (self._backend, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, level,
                layout.width, layout.height, layout.tile_w, layout.tile_h, whole)

    @property
    def levels(self) -> tuple[int, ...]:
        """The levels read here (every level is checked first)."""
        for level in list(self._unchecked):
            self.covers(level)
        return tuple(sorted(self._levels))

    def _tile(self, level: int, layout: _Level, row: int, col: int) -> NDArray[np.uint8]:
        import simplejpeg

        index = row * layout.cols + col
        offset, count = layout.offsets[index], layout.counts[index]
        if count == 0:
            raise _Sparse
        data = os.pread(self._fds[layout.file], count, offset)
        where = f"tile column {col}, row {row} (bytes {offset}..{offset + count}{self._of(layout)})"
        if len(data) != count:
            raise _BadTile(f"the file ends inside {where}")
        stream = layout.prefix + data[2:] if data[:2] == _SOI else layout.prefix + data
        try:
            tile = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
        except ValueError as exc:  # simplejpeg's strict mode: libjpeg's warnings and errors
            raise _BadTile(f"corrupt JPEG {where}: its data does not decode cleanly ({exc})") from exc
        if tile.shape[0] < min(layout.tile_h, layout.height - row * layout.tile_h) or \
                tile.shape[1] < min(layout.tile_w, layout.width - col * layout.tile_w):
            raise _BadTile(f"{where} decodes to {tile.shape[1]}x{tile.shape[0]} px, "
                           f"smaller than its {layout.tile_w}x{layout.tile_h} place")
        return np.asarray(tile)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        """The region ``(x, y, width, height)`` of ``level`` (which :meth:`covers`), ``(h, w, 3)``
        uint8; outside the image it is white, as OpenSlide's transparent pixels over white."""
        if not self.covers(level):
            raise ValueError(f"{self._path}: level {level} is not read directly")
        layout = self._levels[level]
        out = np.empty((height, width, 3), np.uint8)
        if x < 0 or y < 0 or x + width > layout.width or y + height > layout.height:
            out.fill(255)
        r0, r1 = max(0, y) // layout.tile_h, min(layout.rows, -(-min(y + height, layout.height) // layout.tile_h))
        c0, c1 = max(0, x) // layout.tile_w, min(layout.cols, -(-min(x + width, layout.width) // layout.tile_w))
        for row in range(r0, r1):
            ty0 = row * layout.tile_h
            sy0, sy1 = max(y, ty0), min(y + height, ty0 + layout.tile_h, layout.height)
            for col in range(c0, c1):
                tx0 = col * layout.tile_w
                sx0, sx1 = max(x, tx0), min(x + width, tx0 + layout.tile_w, layout.width)
                if sy1 <= sy0 or sx1 <= sx0:
                    continue
                try:
                    tile = self._tile(level, layout, row, col)
                    piece = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
                except _Sparse:
                    piece = self._reference(level, sx0, sy0, sx1 - sx0, sy1 - sy0)
                except _BadTile as exc:
                    raise SlideReadError(f"{self._path}: cannot read level {level} region x={x} y={y} "
                                         f"{width}x{height}: {exc}") from exc
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = piece
        return out

    def coding(self, level: int = 0) -> JpegCoding | None:
        """How ``level``'s tiles were coded (from its first tile with bytes), or None when the
        level is not read here or its tiles say nothing Pillow understands."""
        if not self.covers(level):
            return None
        layout = self._levels[level]
        for offset, count in zip(layout.offsets, layout.counts, strict=True):
            if count:
                data = os.pread(self._fds[layout.file], count, offset)
                return _coding_of(layout.prefix + (data[2:] if data[:2] == _SOI else data), layout.rgb)
        return None

    def _of(self, layout: _Level) -> str:
        """``" of FILE"`` for a level held in a file other than the slide's own."""
        return "" if layout.file == self._path else f" of {layout.file}"

    def close(self) -> None:
        """Close the files."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
