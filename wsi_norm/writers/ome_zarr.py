"""Write a streamed pyramid as OME-Zarr (NGFF 0.5 on zarr v3, or NGFF 0.4 on zarr v2).

Layout
------
One group with arrays ``"0"`` (level 0) to ``"L-1"``, each ``(3, rows, cols)``
uint8 with dimension names ``c, y, x``; NGFF ``multiscales`` metadata with one
``scale`` transformation per level (``[1, mpp_y * 2**k, mpp_x * 2**k]``
micrometres, or pixels with no unit when the source has no MPP) and ``omero``
channel metadata (red, green, blue, window 0-255) so viewers show RGB.

Chunks are ``(1, chunk_px, chunk_px)`` (one colour plane: viewers that fetch per
channel read only what they show); ``chunk_px`` defaults to the input's own
dask chunk side when that is regular (:func:`auto_chunk_px`), else 1024.  On
zarr v3 they are grouped in shards of ``(3, 2 * chunk_px, 2 * chunk_px)``.
Level 0 is computed in blocks of one shard (:func:`wsi_norm.pyramid.iter_blocks`),
so each shard is written completely in a single write (no read-modify-write),
a slide has 12 times fewer files than with unsharded chunks, and memory is a
few shards whatever the slide's size.  Lower levels are spilled to raw files
beside the output (``OUT.levels.partial``) while level 0 streams, and written
shard by shard at the end.

Compression
-----------
Lossless Blosc, chosen by ``zarr_codec`` (:func:`parse_zarr_codec`): ``"lz4:N"`` or
``"zstd:N"`` with a level N in 1..9, no shuffle (uint8 has nothing to byte-shuffle).
Blosc is the one compressor every common OME-Zarr reader decodes, on zarr v2 and v3
(zarr-python / ome-zarr-py / napari, zarrita.js and numcodecs.js in vizarr / Viv,
Neuroglancer, Bio-Formats).  There is no lossy choice: zarr has no standard image
codec yet (a ``jpeg`` codec for zarr v3 was still a proposal in zarr-extensions in
2026), and imagecodecs' numcodecs ``imagecodecs_jpeg`` is decoded only by Python
readers that import imagecodecs and register it, not by web viewers or Bio-Formats.
The default is :data:`DEFAULT_ZARR_CODEC`; see BENCHMARKS.md for the measurements.

Resume
------
Level 0 is written in bands of shards; after each band, the number of level-0 rows
on disk is recorded in ``OUT.partial/wsi_norm_progress.json`` (written to a
temporary file and renamed, so it is never half-written) together with a
fingerprint of the output's inputs.  A later call with the same fingerprint
(same shape, chunking, MPP, options and caller provenance) keeps those rows, reads them
back to rebuild the lower levels (rewritten completely) and computes only the
rest of level 0.  The result is byte-identical to an uninterrupted run.  Any
error the writer sees removes the ``.partial``; only a killed process leaves one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr
from numpy.typing import NDArray

from ..pyramid import LazyLevel, LevelStore, block_edges, iter_blocks, pyramid_shapes
from .atomic import atomic_output, claim_output, partial_path, remove_path
from .provenance import PROVENANCE_KEY, build_record

if TYPE_CHECKING:
    import dask.array as da
from .zarr_codec import DEFAULT_ZARR_CODEC, ZARR_CODEC_NAMES, ZarrCodec, parse_zarr_codec

__all__ = [
    "DEFAULT_ZARR_CODEC",
    "ZARR_CODEC_NAMES",
    "ZarrCodec",
    "auto_chunk_px",
    "ngff_metadata",
    "parse_zarr_codec",
    "write_ome_zarr",
]

logger = logging.getLogger(__name__)

_PROGRESS_FILE = "wsi_norm_progress.json"
_SHARD_CHUNKS = 2  # shard side in chunks
_CHANNELS = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))

def ngff_metadata(
    shapes: list[tuple[int, int]],
    *,
    mpp: tuple[float, float] | None,
    name: str,
    version: str = "0.5",
) -> dict[str, Any]:
    """Return the NGFF ``multiscales`` and ``omero`` metadata of an RGB pyramid.

    Parameters
    ----------
    shapes : list of (rows, cols)
        Level sizes, level 0 first.
    mpp : (mpp_x, mpp_y) or None
        Level-0 pixel size in micrometres; None gives unit-less pixel scales.
    name : str
        Image name.
    version : {"0.5", "0.4"}
        NGFF version.

    Returns
    -------
    dict
        ``{"multiscales": [...], "omero": {...}}``; for 0.5 the caller nests it
        under ``"ome"`` with ``"version"``, for 0.4 it is the attribute root.
    """
    space_unit = {} if mpp is None else {"unit": "micrometer"}
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", **space_unit},
        {"name": "x", "type": "space", **space_unit},
    ]
    mpp_x, mpp_y = (1.0, 1.0) if mpp is None else (float(mpp[0]), float(mpp[1]))
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, mpp_y * 2**k, mpp_x * 2**k]}
            ],
        }
        for k in range(len(shapes))
    ]
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": "mean",
        "metadata": {
            "description": "2x2 mean of the previous level, rounded half up; odd edges average the pixels that exist",
            "method": "wsi_norm.pyramid.downsample_2x",
        },
    }
    if version == "0.4":
        multiscale["version"] = "0.4"
    channels = [
        {
            "label": label,
            "color": color,
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"min": 0, "max": 255, "start": 0, "end": 255},
        }
        for label, color in _CHANNELS
    ]
    omero: dict[str, Any] = {"name": name, "channels": channels, "rdefs": {"model": "color"}}
    if version == "0.4":
        omero["version"] = "0.4"
    return {"multiscales": [multiscale], "omero": omero}


def _fingerprint(array: da.Array | LazyLevel, provenance: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    doc = {
        "shape": list(array.shape),
        "chunks": [list(c) for c in array.chunks[:2]],
        "dtype": str(array.dtype),
        "options": options,
        "provenance": provenance,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=repr).encode()).hexdigest()


def _resume_rows(
    partial: Path, fingerprint: str, shapes: list[tuple[int, int]], zarr_format: int
) -> int:
    """Rows of level 0 a usable ``.partial`` holds, or 0 after clearing it."""
    marker = partial / _PROGRESS_FILE
    if not partial.exists():
        return 0
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        rows = int(doc["level0_rows"])
        same = doc["fingerprint"] == fingerprint
        group = zarr.open_group(partial, mode="r", zarr_format=zarr_format)  # type: ignore[arg-type]
        same = same and all(
            tuple(cast(Any, group[str(k)]).shape) == (3, h, w) for k, (h, w) in enumerate(shapes)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.info("%s: not resumable (%s); starting over", partial, exc)
        same = False
    if not same:
        remove_path(partial)
        return 0
    logger.info("%s: resuming after %d finished level-0 rows", partial, rows)
    return rows


def _write_marker(partial: Path, fingerprint: str, rows: int) -> None:
    tmp = partial / (_PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "level0_rows": rows}), encoding="utf-8")
    os.replace(tmp, partial / _PROGRESS_FILE)


def _create_arrays(
    group: Any, shapes: list[tuple[int, int]], *, chunk_px: int, zarr_format: int, codec: ZarrCodec
) -> list[Any]:
    arrays = []
    for k, (h, w) in enumerate(shapes):
        chunks = (1, min(chunk_px, h), min(chunk_px, w))
        kwargs: dict[str, Any]
        if zarr_format == 3:
            shard = [
                min(c * _SHARD_CHUNKS, -(-n // c) * c) for c, n in ((chunks[1], h), (chunks[2], w))
            ]
            kwargs = {
                "shards": (3, *shard),
                "compressors": codec.v3(),
                "dimension_names": ["c", "y", "x"],
            }
        else:
            kwargs = {
                "compressors": codec.v2(),
                "chunk_key_encoding": {"name": "v2", "separator": "/"},
            }
        arrays.append(
            group.create_array(
                str(k), shape=(3, h, w), chunks=chunks, dtype="uint8", fill_value=0, **kwargs
            )
        )
    return arrays


class _Writes:
    """Runs zarr writes in one background thread, in order, a bounded number ahead."""

    def __init__(self, max_pending: int = 2) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="wsi-norm-zarr-write")
        self.pending: deque[Future[None]] = deque()
        self.max_pending = max_pending

    def submit(self, fn: Callable[[], None]) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn))

    def finish(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


def auto_chunk_px(array: da.Array | LazyLevel) -> int:
    """Chunk side that lines up with ``array``'s dask chunks, or 1024.

    When the dask chunks form a regular square grid whose side is a multiple
    of 16 in 256..4096 (for example 960 px, four 240-px Aperio tiles), zarr
    chunks of that side let every block be written as whole shards; otherwise
    1024.
    """
    rows, cols = array.chunks[0], array.chunks[1]
    inner = set(rows[:-1]) | set(cols[:-1])
    if len(inner) == 1:
        (side,) = inner
        if side % 16 == 0 and 256 <= side <= 4096 and rows[-1] <= side and cols[-1] <= side:
            return int(side)
    return 1024


def write_ome_zarr(
    array: da.Array | LazyLevel,
    out: Path,
    *,
    mpp: tuple[float, float] | None,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
    chunk_px: int | None = None,
    zarr_format: int = 3,
    zarr_codec: str | ZarrCodec = DEFAULT_ZARR_CODEC,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``array`` and its pyramid to an OME-Zarr folder, atomically.

    Parameters
    ----------
    array : dask.array.Array or LazyLevel, (H, W, 3) uint8
        Level 0, computed once (block by block).
    out : Path
        Output folder, conventionally ``*.ome.zarr``.
    mpp : (mpp_x, mpp_y) or None
        Level-0 pixel size in micrometres.
    provenance : mapping
        JSON-serialisable run description, stored under ``"wsi_norm"``.
    overwrite : bool
        Replace an existing ``out``.
    chunk_px : int, optional
        Chunk side in pixels; default :func:`auto_chunk_px`.
    zarr_format : {3, 2}
        3 writes NGFF 0.5 (sharded), 2 writes NGFF 0.4.
    zarr_codec : str or ZarrCodec
        Lossless Blosc compression, ``"lz4:N"`` or ``"zstd:N"`` (:func:`parse_zarr_codec`);
        named in every array's metadata (``zarr.json`` / ``.zarray``).
    progress : callable ``(done_chunks, total_chunks)``, optional
        Called as level-0 chunks of ``array`` complete.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    OutputExistsError, OutputError
        See :func:`wsi_norm.writers.atomic.atomic_output`.
    ValueError
        An invalid ``zarr_format``, ``chunk_px`` or ``zarr_codec``.
    """
    codec = parse_zarr_codec(zarr_codec)
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format}")
    if chunk_px is None:
        chunk_px = auto_chunk_px(array)
    if chunk_px < 16 or chunk_px % 16:
        raise ValueError(f"chunk_px must be a positive multiple of 16, got {chunk_px}")
    shapes = pyramid_shapes(int(array.shape[0]), int(array.shape[1]))
    options = {
        "chunk_px": chunk_px,
        "zarr_format": zarr_format,
        "compression": f"blosc-{codec.cname}-{codec.clevel}",
    }
    if zarr_format == 3:
        options["shard_chunks"] = _SHARD_CHUNKS
    fingerprint = _fingerprint(array, provenance, {**options, "mpp": mpp})
    record = build_record(provenance, fmt="ome-zarr", shapes=shapes, mpp=mpp, options=options)
    name = out.name.removesuffix(".zarr").removesuffix(".ome")

    block_px = chunk_px * _SHARD_CHUNKS
    row_edges = block_edges(array.chunks[0], target=block_px, align=block_px)
    col_edges = block_edges(array.chunks[1], target=block_px, align=block_px)
    store_dir = partial_path(out, ".levels")
    # the claim covers the spill folder too: a stale one is cleared only by its next holder
    with claim_output(out):
        remove_path(store_dir)
        try:
            with atomic_output(out, overwrite=overwrite, keep_partial=True) as partial:
                group = _write_levels(
                    array,
                    partial,
                    shapes,
                    fingerprint=fingerprint,
                    chunk_px=chunk_px,
                    zarr_format=zarr_format,
                    codec=codec,
                    edges=(row_edges, col_edges),
                    store_dir=store_dir,
                    progress=progress,
                )
                meta = ngff_metadata(
                    shapes, mpp=mpp, name=name, version="0.5" if zarr_format == 3 else "0.4"
                )
                if zarr_format == 3:
                    group.attrs.update({"ome": {"version": "0.5", **meta}, PROVENANCE_KEY: record})
                else:
                    group.attrs.update({**meta, PROVENANCE_KEY: record})
                (partial / _PROGRESS_FILE).unlink()
        finally:
            remove_path(store_dir)
    logger.info("%s: wrote %d levels, level 0 %d x %d", out, len(shapes), *shapes[0])
    return out


def _write_levels(
    array: da.Array | LazyLevel,
    partial: Path,
    shapes: list[tuple[int, int]],
    *,
    fingerprint: str,
    chunk_px: int,
    zarr_format: int,
    codec: ZarrCodec,
    edges: tuple[list[int], list[int]],
    store_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> Any:
    """Write every level into ``partial`` (resuming level 0 if it can); return the group."""
    start_row = _resume_rows(partial, fingerprint, shapes, zarr_format)
    # Write every chunk, even one that equals the fill value: zarr's default scans each
    # chunk for that first, which made shard writes 2.5x slower; resumed and fresh
    # runs must use the same setting to give identical bytes.  Arrays keep the
    # setting they were opened with.
    with zarr.config.set({"array.write_empty_chunks": True}):
        if start_row:
            group = zarr.open_group(partial, mode="r+", zarr_format=zarr_format)  # type: ignore[arg-type]
            arrays: list[Any] = [group[str(k)] for k in range(len(shapes))]
        else:
            group = zarr.open_group(partial, mode="w", zarr_format=zarr_format)  # type: ignore[arg-type]
            arrays = _create_arrays(
                group, shapes, chunk_px=chunk_px, zarr_format=zarr_format, codec=codec
            )
            _write_marker(partial, fingerprint, 0)
    level0 = arrays[0]

    def put(level: int, r0: int, c0: int, pixels: NDArray[np.uint8]) -> None:
        r1, c1 = r0 + pixels.shape[0], c0 + pixels.shape[1]
        arrays[level][:, r0:r1, c0:c1] = pixels.transpose(2, 0, 1)

    def read_done(r0: int, r1: int, c0: int, c1: int) -> NDArray[np.uint8]:
        return np.ascontiguousarray(np.asarray(level0[:, r0:r1, c0:c1]).transpose(1, 2, 0))

    block_px = chunk_px * _SHARD_CHUNKS
    writes = _Writes()
    try:
        with LevelStore(store_dir, shapes, *edges) as store:
            for block in iter_blocks(
                array,
                store,
                start_row=start_row,
                read_done=read_done,
                progress=progress,
            ):
                assert block.pixels is not None  # no ``prepare``: every block holds its pixels
                writes.submit(functools.partial(put, 0, block.row, block.col, block.pixels))
                if block.band_end:
                    rows = block.row + block.pixels.shape[0]
                    writes.submit(functools.partial(_write_marker, partial, fingerprint, rows))
            for k in range(1, len(shapes)):
                h, w = shapes[k]
                for r0 in range(0, h, block_px):
                    for c0 in range(0, w, block_px):
                        pixels = store.read(k, r0, r0 + block_px, c0, c0 + block_px)
                        writes.submit(functools.partial(put, k, r0, c0, pixels))
            writes.finish()
    finally:
        writes.close()
    return group
