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

Streaming: level 0 arrives in blocks (:func:`wsi_norm.pyramid.iter_blocks`),
which are cut into tiles and JPEG/deflate-encoded at once in a thread pool
(the encoder is byte-identical to tifffile's for the same tags); tifffile
writes the encoded tiles in TIFF order, a band at a time.  Lower levels, which
a TIFF must hold after level 0, are spilled uncompressed to
``OUT.levels.partial/level<k>.raw`` (a third of level 0's raw size in all) and
read back ``tile_px`` rows at a time.  Memory is a few blocks, a band's
encoded tiles, and fewer than ``tile_px`` full-width rows when the source's
chunks do not line up with the tiles: it does not grow with the slide.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import imagecodecs
import numpy as np
import tifffile
from numpy.typing import NDArray

from ..pyramid import (
    Block,
    LazyLevel,
    LevelStore,
    PreparedBlock,
    _cpu_count,
    block_edges,
    iter_blocks,
    level_chunks,
    prepared_levels,
    pyramid_shapes,
)
from .atomic import atomic_output, claim_output, partial_path, remove_path
from .provenance import PROVENANCE_KEY, build_record, software_versions

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["TIFF_COMPRESSIONS", "write_tiff"]

logger = logging.getLogger(__name__)

#: Accepted ``compression`` values.
TIFF_COMPRESSIONS = ("jpeg", "deflate")
_DEFLATE_LEVEL = 6
#: Preferred level-0 block size, rows x columns: blocks are computed and encoded one at
#: a time (12 MiB each).  Wider blocks mean fewer, larger dask computations: 1024-px
#: square blocks read a 268-MP slide 1.24x slower.
_BLOCK_ROWS, _BLOCK_COLS = 1024, 4096


def _encoder(compression: str, quality: int) -> Callable[[NDArray[np.uint8]], bytes]:
    """The tile encoder, byte-identical to tifffile's for the tags it writes."""
    if compression == "jpeg":
        subsampling = (1, 1) if quality >= 90 else (2, 2)
        # imagecodecs types the result "bytes | bytearray" for the ``out=`` case; without
        # ``out`` it is bytes
        return cast(
            Callable[[NDArray[np.uint8]], bytes],
            functools.partial(
                imagecodecs.jpeg_encode,
                level=quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=subsampling,
            ),
        )

    def deflate(tile: NDArray[np.uint8]) -> bytes:
        return bytes(
            imagecodecs.deflate_encode(
                # the stub says bytes-like only; any buffer (an ndarray here) is accepted
                imagecodecs.delta_encode(tile, axis=-2), level=_DEFLATE_LEVEL  # type: ignore[arg-type]
            )
        )

    return deflate


#: Tiles encoded per thread-pool task: a future per 256-px tile (~0.3 ms of encoding) cost about a
#: tenth of the encoding in scheduling; cutting the tiles inside the task keeps the copies off
#: the thread that hands out the work.
_TILES_PER_TASK = 4


def _tile(rows: NDArray[np.uint8], x: int, tile_px: int) -> NDArray[np.uint8]:
    """The full-size tile at column ``x`` of one tile row, edges padded by replication."""
    tile = rows[:, x : x + tile_px]
    h, w = tile.shape[:2]
    if h < tile_px or w < tile_px:
        tile = np.pad(tile, ((0, tile_px - h), (0, tile_px - w), (0, 0)), mode="edge")
    return np.ascontiguousarray(tile)


def _encode_tiles(rows: NDArray[np.uint8], xs: range, tile_px: int,
                  encode: Callable[[NDArray[np.uint8]], bytes]) -> list[bytes]:
    """The tiles at columns ``xs`` of one tile row (``rows``: at most ``tile_px`` rows), encoded."""
    return [encode(_tile(rows, x, tile_px)) for x in xs]


def _prepare_block(compression: str, quality: int, tile_px: int, depth: int, compiled: bool,
                   pixels: NDArray[np.uint8]) -> PreparedBlock:
    """A level-0 block's lower levels and encoded tiles, made on the ``distributed`` worker that
    computed it (:func:`wsi_norm.pyramid.iter_blocks` ``prepare``): the block's origin is on
    the tile grid, so its tiles are whole tiles of the level (those at the image's right and
    bottom edges padded as :func:`_tile` pads them), and the same bytes as cut and encoded here."""
    encode = _encoder(compression, quality)
    pixels = np.ascontiguousarray(pixels)
    h, w = pixels.shape[:2]
    tiles = tuple(tuple(_encode_tiles(pixels[r : r + tile_px], range(0, w, tile_px), tile_px, encode))
                  for r in range(0, h, tile_px))
    return PreparedBlock((h, w), prepared_levels(pixels, depth, compiled=compiled), tiles)


def _submit_row(
    rows: NDArray[np.uint8], tile_px: int, encode: Callable[[NDArray[np.uint8]], bytes], pool: ThreadPoolExecutor
) -> list[Future[list[bytes]]]:
    """Start encoding the tiles of one tile row (``rows``: at most ``tile_px`` rows); the
    futures' lists, in order, are its tiles left to right."""
    starts = range(0, rows.shape[1], tile_px)

    return [pool.submit(_encode_tiles, rows, starts[i : i + _TILES_PER_TASK], tile_px, encode)
            for i in range(0, len(starts), _TILES_PER_TASK)]


def _results(futures: list[Future[list[bytes]]]) -> Iterator[bytes]:
    for future in futures:
        yield from future.result()


class _Level0Tiles:
    """Cuts level-0 blocks into tiles, encodes them, and releases whole tile rows.

    Blocks come band by band, left to right.  Rows of a band below its last
    full tile row are kept (full width, fewer than ``tile_px`` rows) for the
    next band; columns right of a block's last full tile are kept (one band
    tall, fewer than ``tile_px`` columns) for the next block.  Only encoded
    tiles are held for a whole band.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        tile_px: int,
        encode: Callable[[NDArray[np.uint8]], bytes],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.height, self.width = shape
        self.tile_px = tile_px
        self.encode = encode
        self.pool = pool
        self.top: NDArray[np.uint8] | None = None  # rows carried into this band
        self.next_top: NDArray[np.uint8] | None = None
        self.left: NDArray[np.uint8] | None = None  # columns carried into the next block
        self.encoded: list[list[Future[list[bytes]]]] = []  # per tile row of the band
        self.previous: list[Future[list[bytes]]] = []  # the last block's, still encoding
        self.ready: list[list[bytes]] = []  # prepared blocks' tiles, per tile row of the band

    def add(self, block: Block) -> list[bytes]:
        """Take one block; return the encoded tiles it completes, in TIFF order.

        A block's tiles encode while the next block is cut and handed out: only then does
        this wait for them, so at most two blocks' pixels are held by the encoders. A block
        prepared on a worker brings its tiles encoded: they are only put in order.
        """
        if block.tiles is not None:
            return self._add_prepared(block)
        assert block.pixels is not None
        t = self.tile_px
        c0, c1 = block.col, block.col + block.pixels.shape[1]
        rows = block.pixels
        if self.top is not None:
            rows = np.concatenate([self.top[:, c0:c1], rows])
        x0 = c0
        if self.left is not None:
            rows = np.concatenate([self.left, rows], axis=1)
            x0 -= self.left.shape[1]
        last_band = block.row + block.pixels.shape[0] == self.height
        n_rows = rows.shape[0] if last_band else rows.shape[0] // t * t
        x1 = c1 if c1 == self.width else x0 + (c1 - x0) // t * t
        self.left = rows[:, x1 - x0 :].copy() if x1 < c1 else None
        if c0 == 0:
            self.encoded = [[] for _ in range(-(-n_rows // t))]
            rest = rows.shape[0] - n_rows
            self.next_top = np.empty((rest, self.width, 3), np.uint8) if rest else None
        if self.next_top is not None:
            self.next_top[:, x0:x1] = rows[n_rows:, : x1 - x0]
        submitted: list[Future[list[bytes]]] = []
        for i, row in enumerate(self.encoded):
            band = rows[i * t : min((i + 1) * t, n_rows), : x1 - x0]
            futures = _submit_row(band, t, self.encode, self.pool)
            row.extend(futures)
            submitted.extend(futures)
        for future in self.previous:
            future.result()  # the block before this one: its pixels are released once encoded
        self.previous = submitted
        if not block.band_end:
            return []
        self.top, self.next_top = self.next_top, None
        done = [tile for row in self.encoded for tile in _results(row)]
        self.encoded, self.previous = [], []
        return done

    def _add_prepared(self, block: Block) -> list[bytes]:
        assert block.tiles is not None
        if block.col == 0:
            self.ready = [[] for _ in block.tiles]
        for row, tiles in zip(self.ready, block.tiles, strict=True):
            row.extend(tiles)
        if not block.band_end:
            return []
        done, self.ready = [tile for row in self.ready for tile in row], []
        return done


def _lower_bytes(
    store: LevelStore,
    level: int,
    tile_px: int,
    encode: Callable[[NDArray[np.uint8]], bytes],
    pool: ThreadPoolExecutor,
) -> Iterator[bytes]:
    h = store.shapes[level][0]
    previous: list[Future[list[bytes]]] = []
    for r0 in range(0, h, tile_px):  # one tile row encodes while the next is read
        current = _submit_row(store.read(level, r0, r0 + tile_px), tile_px, encode, pool)
        yield from _results(previous)
        previous = current
    yield from _results(previous)


def write_tiff(
    array: da.Array | NDArray[np.uint8] | LazyLevel,
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
    chunk_shape: tuple[int, int] | None = None,
    icc_profile: bytes | None = None,
) -> Path:
    """Write ``array`` and its pyramid to a tiled pyramidal BigTIFF, atomically.

    Parameters
    ----------
    array : dask.array.Array, numpy.ndarray or LazyLevel, (H, W, 3) uint8
        Level 0, computed once (block by block); a numpy array (a small slide held in
        memory) or a :class:`~wsi_norm.pyramid.LazyLevel` is written without dask.
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
    chunk_shape : (rows, cols), optional
        A numpy level 0's processing chunks (they group into blocks; progress counts them);
        default 1024 x 1024. Does not change the file.
    icc_profile : bytes, optional
        ICC profile of the pixels, stored as level 0's InterColorProfile (OpenSlide reports it).

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

    encode = _encoder(compression, quality)
    row_chunks, col_chunks = level_chunks(array, chunk_shape)
    row_edges = block_edges(row_chunks, target=_BLOCK_ROWS, align=tile_px)
    col_edges = block_edges(col_chunks, target=_BLOCK_COLS)
    store_dir = partial_path(out, ".levels")
    n_threads = maxworkers or _cpu_count()
    # the claim covers the spill folder too: a stale one is cleared only by its next holder
    with claim_output(out):
        remove_path(store_dir)
        try:
            with (
                atomic_output(out, overwrite=overwrite) as partial,
                LevelStore(store_dir, shapes, row_edges, col_edges) as store,
                ThreadPoolExecutor(n_threads, thread_name_prefix="wsi-norm-encode") as pool,
                tifffile.TiffWriter(partial, bigtiff=True) as tif,
            ):
                # on a distributed cluster, blocks on the tile grid are encoded (and their lower
                # levels built) by the worker that computed them: the tiles travel, not the pixels
                on_grid = all(e % tile_px == 0 for e in (*row_edges[1:-1], *col_edges[1:-1]))
                prepare = functools.partial(_prepare_block, compression, quality, tile_px) if on_grid else None
                blocks = iter_blocks(array, store, progress=progress, chunk_shape=chunk_shape, prepare=prepare)
                try:
                    for k, (h, w) in enumerate(shapes):
                        if k == 0:
                            cutter = _Level0Tiles((h, w), tile_px, encode, pool)
                            tiles: Iterator[bytes] = (t for block in blocks for t in cutter.add(block))
                        else:
                            tiles = _lower_bytes(store, k, tile_px, encode, pool)
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
                            iccprofile=icc_profile if k == 0 else None,
                            metadata=None,
                            **resolution,
                            **codec,
                        )
                        if k == 0:
                            # tifffile stops taking tiles once it has level 0's last one, leaving
                            # the stream paused at its final block: resume it so it reports that
                            # block's progress (done == total) and ends
                            next(blocks, None)
                finally:
                    blocks.close()  # stops block prefetching if writing failed
        finally:
            remove_path(store_dir)
    logger.info("%s: wrote %d levels, level 0 %d x %d", out, len(shapes), *shapes[0])
    return out
