"""Write a streamed pyramid as a tiled pyramidal BigTIFF that OpenSlide opens.

Layout
------
One IFD per level in the main IFD chain (level 0 first, lower levels flagged
``NewSubfileType = 1``, reduced resolution): OpenSlide's generic-TIFF reader
takes every tiled IFD of that chain as a level (it does not read SubIFDs), and
tifffile and tiffslide see one series with ``levels``.  Tiles are ``tile_px``
square, RGB; JPEG (libjpeg-turbo via imagecodecs, stored as YCbCr; chroma is
not subsampled at ``quality >= 90``, 4:2:0 below, as libvips does) or lossless
deflate with the horizontal predictor.

Pixel size: ``XResolution``/``YResolution`` in pixels per centimetre with
``ResolutionUnit = CENTIMETER`` on every level (``10_000 / (mpp * 2**k)``),
which OpenSlide reports as ``openslide.mpp-x``/``-y``.  Without an MPP no
resolution is written.

Provenance: the level-0 ImageDescription is the JSON text
``{"wsi_norm": record}``; it does not start with "Aperio", so the file is
read as generic TIFF.

Streaming: level-0 tiles are encoded as the bands of level 0 are computed
(tifffile encodes them in a thread pool); lower levels, which a TIFF must hold
after level 0, are spilled uncompressed to ``OUT.levels.partial/level<k>.raw``
(a third of level 0's raw size in all) with plain file writes, then read back
``tile_px`` rows at a time.  Memory is a few level-0 bands, not a level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import dask.array as da
import numpy as np
import tifffile
from numpy.typing import NDArray

from ..pyramid import Strip, iter_pyramid, pyramid_shapes
from .atomic import atomic_output, partial_path, remove_path
from .provenance import PROVENANCE_KEY, build_record, software_versions

__all__ = ["TIFF_COMPRESSIONS", "write_tiff"]

logger = logging.getLogger(__name__)

#: Accepted ``compression`` values.
TIFF_COMPRESSIONS = ("jpeg", "deflate")
_DEFLATE_LEVEL = 6


def _tiles(rows: NDArray[np.uint8], tile_px: int) -> Iterator[NDArray[np.uint8]]:
    """Yield the full-size tiles of one tile row, edge tiles padded by replication."""
    h, w = rows.shape[:2]
    if h < tile_px:
        rows = np.pad(rows, ((0, tile_px - h), (0, 0), (0, 0)), mode="edge")
    for x in range(0, w, tile_px):
        tile = rows[:, x : x + tile_px]
        if tile.shape[1] < tile_px:
            tile = np.pad(tile, ((0, 0), (0, tile_px - tile.shape[1]), (0, 0)), mode="edge")
        yield tile


class _Spill:
    """Raw row-major files holding levels 1.. until level 0 is written."""

    def __init__(self, folder: Path, shapes: list[tuple[int, int]]) -> None:
        self.folder = folder
        self.shapes = shapes
        folder.mkdir()
        self.files: dict[int, BinaryIO] = {}
        for k in range(1, len(shapes)):
            self.files[k] = open(self.path(k), "wb")  # noqa: SIM115 - closed in add()/close()

    def path(self, level: int) -> Path:
        return self.folder / f"level{level}.raw"

    def add(self, strip: Strip) -> None:
        self.files[strip.level].write(np.ascontiguousarray(strip.pixels).data)
        if strip.final:
            self.files.pop(strip.level).close()

    def tile_rows(self, level: int, tile_px: int) -> Iterator[NDArray[np.uint8]]:
        h, w = self.shapes[level]
        row_bytes = w * 3
        with open(self.path(level), "rb") as f:
            for r0 in range(0, h, tile_px):
                n = min(tile_px, h - r0)
                data = np.fromfile(f, dtype=np.uint8, count=n * row_bytes)
                if data.size != n * row_bytes:
                    raise OSError(f"{self.path(level)}: spill file is short at row {r0}")
                yield data.reshape(n, w, 3)
        self.path(level).unlink()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _level0_tiles(
    stream: Iterator[Strip], spill: _Spill, tile_px: int
) -> Iterator[NDArray[np.uint8]]:
    """Tiles of level 0 in row-major order; lower-level strips go to ``spill``."""
    pieces: list[NDArray[np.uint8]] = []
    n = 0
    for strip in stream:
        if strip.level:
            spill.add(strip)
            continue
        pieces.append(strip.pixels)
        n += strip.pixels.shape[0]
        while n >= tile_px or (strip.final and n):
            block = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            take = min(tile_px, n)
            yield from _tiles(block[:take], tile_px)
            rest = block[take:]
            pieces = [rest] if rest.shape[0] else []
            n -= take
        if strip.final:
            return


def write_tiff(
    array: da.Array,
    out: Path,
    *,
    mpp: tuple[float, float] | None,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
    tile_px: int = 256,
    quality: int = 90,
    compression: str = "jpeg",
    progress: Callable[[int, int], None] | None = None,
    maxworkers: int | None = None,
) -> Path:
    """Write ``array`` and its pyramid to a tiled pyramidal BigTIFF, atomically.

    Parameters
    ----------
    array : dask.array.Array, (H, W, 3) uint8
        Level 0, computed once (band by band).
    out : Path
        Output file, ``*.tif`` or ``*.tiff``.
    mpp : (mpp_x, mpp_y) or None
        Level-0 pixel size in micrometres.
    provenance : mapping
        JSON-serialisable run description, stored in the level-0 ImageDescription.
    overwrite : bool
        Replace an existing ``out``.
    tile_px : {256, 512}
        Tile side in pixels (any multiple of 16 is accepted).
    quality : int
        JPEG quality, 1-100.
    compression : {"jpeg", "deflate"}
        Tile compression; deflate is lossless.
    progress : callable ``(done_chunks, total_chunks)``, optional
        Called as level-0 chunks of ``array`` complete.
    maxworkers : int, optional
        Threads encoding tiles (default: tifffile's choice, all cores).

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    OutputExistsError, OutputError
        See :func:`wsi_norm.writers.atomic.atomic_output`.  A killed run
        leaves ``OUT.partial`` and ``OUT.levels.partial``; the next run removes
        them and starts over (a TIFF cannot be resumed).
    """
    if compression not in TIFF_COMPRESSIONS:
        raise ValueError(f"compression must be one of {TIFF_COMPRESSIONS}, got {compression!r}")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    shapes = pyramid_shapes(int(array.shape[0]), int(array.shape[1]))
    options: dict[str, Any] = {"tile_px": tile_px, "compression": compression}
    codec: dict[str, Any]
    if compression == "jpeg":
        options["quality"] = quality
        codec = {
            "compression": "jpeg",
            "compressionargs": {"level": quality},
            "subsampling": (1, 1) if quality >= 90 else (2, 2),
        }
    else:
        options["deflate_level"] = _DEFLATE_LEVEL
        codec = {
            "compression": "zlib",
            "compressionargs": {"level": _DEFLATE_LEVEL},
            "predictor": True,
        }
    record = build_record(provenance, fmt="tiff", shapes=shapes, mpp=mpp, options=options)
    description = json.dumps({PROVENANCE_KEY: record}, ensure_ascii=True, separators=(",", ":"))
    software = f"wsi-norm {software_versions().get('wsi-norm', 'unknown')}"

    spill_dir = partial_path(out, ".levels")
    remove_path(spill_dir)
    try:
        with atomic_output(out, overwrite=overwrite) as partial:
            spill = _Spill(spill_dir, shapes)
            stream = iter_pyramid(array, progress=progress)
            try:
                with tifffile.TiffWriter(partial, bigtiff=True) as tif:
                    for k, (h, w) in enumerate(shapes):
                        if k == 0:
                            tiles: Iterator[NDArray[np.uint8]] = _level0_tiles(
                                stream, spill, tile_px
                            )
                        else:
                            if k == 1:
                                for strip in stream:  # the rest of the last band's lower levels
                                    spill.add(strip)
                            tiles = (
                                t
                                for rows in spill.tile_rows(k, tile_px)
                                for t in _tiles(rows, tile_px)
                            )
                        resolution: dict[str, Any] = {}
                        if mpp is not None:
                            resolution = {
                                "resolution": (1e4 / (mpp[0] * 2**k), 1e4 / (mpp[1] * 2**k)),
                                "resolutionunit": "CENTIMETER",
                            }
                        tif.write(
                            tiles,
                            shape=(h, w, 3),
                            dtype=np.uint8,
                            tile=(tile_px, tile_px),
                            photometric="rgb",
                            planarconfig="contig",
                            subfiletype=1 if k else 0,
                            description=description if k == 0 else None,
                            software=software if k == 0 else None,
                            metadata=None,
                            maxworkers=maxworkers,
                            **resolution,
                            **codec,
                        )
            finally:
                stream.close()  # stops band prefetching if writing failed
                spill.close()
    finally:
        remove_path(spill_dir)
    logger.info("%s: wrote %d levels, level 0 %d x %d", out, len(shapes), *shapes[0])
    return out
