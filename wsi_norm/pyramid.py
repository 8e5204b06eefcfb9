"""Streamed 2x pyramid of a lazy RGB image, built in one pass over level 0.

Level ``k + 1`` is the 2x2 mean of level ``k``.  :func:`iter_blocks` computes
level 0 (a dask array, a numpy array or a :class:`LazyLevel` computed on plain
threads) one *block* (a few chunks of one band) at a time, so
every level-0 chunk is computed exactly once, downsamples each block into the
lower levels and spills those to raw files (:class:`LevelStore`) before the
block is dropped.  The writers in :mod:`wsi_norm.writers` encode the level-0
blocks as they come and the lower levels from the store afterwards.  Memory is
a few blocks: it does not grow with the slide's width or height.

Downsampling rule
-----------------
For an input of ``(h, w)`` pixels the output has ``(ceil(h / 2), ceil(w / 2))``
pixels.  Output pixel ``(i, j)`` is the mean of the input pixels
``(2i .. 2i+1, 2j .. 2j+1)`` that exist: four in the interior, two on the last
row or column of an odd-sized input, one in its last corner.  The mean is
rounded half up, ``(sum + n // 2) // n`` with ``n`` the number of pixels
averaged, computed in integers, so the result is exact and reproducible.

The pyramid stops at the first level whose larger side is at most ``max_px``
(1024 by default); an image that already fits has a single level.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "Block",
    "LazyLevel",
    "LevelStore",
    "PreparedBlock",
    "block_depth",
    "block_edges",
    "downsample_2x",
    "iter_blocks",
    "level_chunks",
    "prepared_levels",
    "pyramid_shapes",
    "reference_pyramid",
    "regular_chunks",
]

logger = logging.getLogger(__name__)

#: Default size in pixels that the larger side of the smallest level fits in.
MAX_PX = 1024
#: Inputs smaller than this many pixels are downsampled in one call, not split.
_PARALLEL_MIN_PX = 1 << 20
#: Inputs of at least this many pixels use the compiled kernel (numba, imported and loaded on
#: first use: ~0.2 s); smaller ones use numpy unless numba is already loaded.  Both compute the
#: same integers (``tests/unit/test_pyramid.py``), so the choice never changes a byte.
_COMPILED_MIN_PX = 1 << 22
#: :func:`iter_blocks` decides once per image: the compiled kernel from this many level-0 pixels.
_COMPILED_MIN_IMAGE_PX = 1 << 24
_KERNEL: Any = None


def pyramid_shapes(h: int, w: int, *, max_px: int = MAX_PX) -> list[tuple[int, int]]:
    """Return the ``(rows, cols)`` of every pyramid level of an ``h x w`` image.

    Parameters
    ----------
    h, w : int
        Rows and columns of level 0, in pixels (>= 1).
    max_px : int, optional
        The last level is the first one whose larger side is <= ``max_px``.

    Returns
    -------
    list of (int, int)
        ``[(h, w), (ceil(h/2), ceil(w/2)), ...]``, level 0 first.

    Examples
    --------
    >>> pyramid_shapes(2967, 2220)
    [(2967, 2220), (1484, 1110), (742, 555)]
    """
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h} x {w}")
    if max_px < 1:
        raise ValueError(f"max_px must be positive, got {max_px}")
    shapes = [(int(h), int(w))]
    while max(h, w) > max_px:
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    return shapes


def _compiled_kernel() -> Any:
    """Compile (once, lazily) the numba downsampling kernel."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        _KERNEL = numba.njit(nogil=True, cache=True)(_downsample_loops)
    return _KERNEL


def _kernel_for(n_px: int, compiled: bool | None = None) -> Callable[[NDArray[np.uint8], NDArray[np.uint8]], None]:
    """The 2 x 2 mean kernel ``(src, out)`` for an image of ``n_px`` pixels: ``compiled``, or by
    default compiled for large images or once numba is loaded, numpy otherwise (the same
    integers)."""
    if compiled is None:
        compiled = n_px >= _COMPILED_MIN_PX or "numba" in sys.modules
    if compiled:
        return _compiled_kernel()  # type: ignore[no-any-return]
    return _downsample_numpy


_NUMPY_SLAB_ROWS = 256  # rows of the input per step: uint16 temporaries stay in cache


def _downsample_numpy(src: NDArray[np.uint8], out: NDArray[np.uint8]) -> None:
    """:func:`_downsample_loops` in numpy, slab by slab (for inputs too small to pay numba's load)."""
    h, w = src.shape[:2]
    w2 = w // 2
    for r0 in range(0, h, _NUMPY_SLAB_ROWS):
        rows = src[r0 : r0 + _NUMPY_SLAB_ROWS].astype(np.uint16)
        o = out[r0 // 2 : (r0 + rows.shape[0] + 1) // 2]
        n2 = rows.shape[0] // 2
        pairs = rows[0 : 2 * n2 : 2] + rows[1 : 2 * n2 : 2]  # (n2, w, 3) column sums
        o[:n2, :w2] = (pairs[:, 0 : 2 * w2 : 2] + pairs[:, 1 : 2 * w2 : 2] + 2) >> 2
        if w % 2:
            o[:n2, w2] = (pairs[:, w - 1] + 1) >> 1
        if rows.shape[0] % 2:  # the image's last row, alone
            last = rows[-1]
            o[n2, :w2] = (last[0 : 2 * w2 : 2] + last[1 : 2 * w2 : 2] + 1) >> 1
            if w % 2:
                o[n2, w2] = last[w - 1]


def _downsample_loops(src: Any, out: Any) -> None:  # pragma: no cover - compiled by numba
    # src (h, w, 3) and out (ceil(h/2), ceil(w/2), 3) are C-contiguous uint8.
    h, w, _ = src.shape
    w2 = w // 2
    col_sums = np.empty(w * 3, np.uint16)
    for i in range(out.shape[0]):
        r0 = src[2 * i].reshape(-1)
        o = out[i].reshape(-1)
        if 2 * i + 1 < h:
            r1 = src[2 * i + 1].reshape(-1)
            for x in range(w * 3):
                col_sums[x] = np.uint16(r0[x]) + r1[x]
            for j in range(w2):
                for c in range(3):
                    o[3 * j + c] = (col_sums[6 * j + c] + col_sums[6 * j + 3 + c] + 2) >> 2
            if w % 2 == 1:
                for c in range(3):
                    o[3 * w2 + c] = (col_sums[6 * w2 + c] + 1) >> 1
        else:
            for j in range(w2):
                for c in range(3):
                    o[3 * j + c] = (np.uint16(r0[6 * j + c]) + r0[6 * j + 3 + c] + 1) >> 1
            if w % 2 == 1:
                for c in range(3):
                    o[3 * w2 + c] = r0[6 * w2 + c]


def _check_rgb(image: NDArray[Any], name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {image.dtype}")


def downsample_2x(
    image: NDArray[np.uint8],
    *,
    out: NDArray[np.uint8] | None = None,
    executor: ThreadPoolExecutor | None = None,
    compiled: bool | None = None,
) -> NDArray[np.uint8]:
    """Return the 2x2 mean of an RGB image (see the module notes for odd edges).

    Parameters
    ----------
    image : (H, W, 3) uint8
        Input pixels.
    out : (ceil(H/2), ceil(W/2), 3) uint8, C-contiguous, optional
        Where to write the result.
    executor : ThreadPoolExecutor, optional
        If given and the image is large, row blocks are downsampled in its
        threads (the kernel releases the GIL).
    compiled : bool, optional
        Use the compiled kernel (True) or its numpy twin (False); by default the compiled one
        for 4 MP or more or once numba is loaded. The same integers either way.

    Returns
    -------
    (ceil(H/2), ceil(W/2), 3) uint8
        Mean of each 2x2 block, rounded half up.

    Notes
    -----
    Pure and thread-safe; compiled with numba (``nogil``) for inputs of 4 MP or more, numpy
    for smaller ones while numba is not loaded (a small slide never pays its import).
    """
    _check_rgb(image)
    h, w = image.shape[:2]
    shape = ((h + 1) // 2, (w + 1) // 2, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {shape} uint8, got {out.shape} {out.dtype}")
    if h == 0 or w == 0:
        return out
    image = np.ascontiguousarray(image)
    n_workers = getattr(executor, "_max_workers", 1) if executor is not None else 1
    kernel = _kernel_for(h * w, compiled)
    if executor is None or n_workers < 2 or h * w < _PARALLEL_MIN_PX:
        kernel(image, out)
        return out
    # Blocks of an even number of rows downsample independently (and stay
    # C-contiguous); the last block keeps the image's own bottom edge.
    step = max(2, 2 * math.ceil(h / (2 * n_workers)))
    futures = [
        executor.submit(
            kernel, image[r0 : r0 + step], out[r0 // 2 : (r0 + step + 1) // 2]
        )
        for r0 in range(0, h, step)
    ]
    for future in futures:
        future.result()
    return out


def reference_pyramid(image: NDArray[np.uint8], *, max_px: int = MAX_PX) -> list[NDArray[np.uint8]]:
    """Return every pyramid level of an in-memory image, computed eagerly.

    Parameters
    ----------
    image : (H, W, 3) uint8
        Level 0.
    max_px : int, optional
        See :func:`pyramid_shapes`.

    Returns
    -------
    list of (h_k, w_k, 3) uint8
        Level 0 (the input itself) first.
    """
    _check_rgb(image)
    levels = [image]
    for _ in pyramid_shapes(*image.shape[:2], max_px=max_px)[1:]:
        levels.append(downsample_2x(levels[-1]))
    return levels


@dataclass(frozen=True)
class LazyLevel:
    """A level 0 that a plain function computes block by block: no dask graph, no scheduler.

    What a run on this process's threads needs of a lazy array: :func:`iter_blocks` calls
    ``compute(r0, r1, c0, c1)`` for each block (a band of whole chunks), ``threads`` blocks at a
    time on a thread pool, and gets the block's ``(r1 - r0, c1 - c0, 3) uint8`` pixels. A block is
    then read and mapped in one piece, straight into one array, where dask would compute its
    chunks as tasks and concatenate them (and the run would import ``dask.array``). ``chunks``
    is the grid the blocks are cut on (row and column chunk sizes, as a dask array's), so the
    blocks, and the file, are the same as for the dask array of the same chunks.

    Parameters
    ----------
    shape : (H, W, 3)
    chunks : (row chunk sizes, column chunk sizes)
    compute : callable ``(r0, r1, c0, c1) -> (r1 - r0, c1 - c0, 3) uint8``; thread-safe
    threads : int
        Blocks computed at once (>= 1).
    """

    shape: tuple[int, int, int]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    compute: Callable[[int, int, int, int], NDArray[np.uint8]]
    threads: int = 2
    dtype: ClassVar[np.dtype[np.uint8]] = np.dtype(np.uint8)
    ndim: ClassVar[int] = 3

    def __post_init__(self) -> None:
        h, w, c = self.shape
        if c != 3 or sum(self.chunks[0]) != h or sum(self.chunks[1]) != w:
            raise ValueError(f"chunks {self.chunks} do not tile the shape {self.shape}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class Block:
    """One rectangle of level 0, as computed.

    Attributes
    ----------
    row, col : int
        Level-0 position of the block's top-left pixel.
    pixels : (h, w, 3) uint8, or None
        The block; do not modify. None when the block was prepared where it was computed
        (``iter_blocks(prepare=...)``): its ``tiles`` stand for it.
    band_end : bool
        True for the last (right-most) block of its band.
    final : bool
        True for the last block of the image.
    shape : (h, w)
        The block's level-0 size.
    tiles : tuple of tuple of bytes, or None
        A prepared block's encoded level-0 tiles, by tile row, left to right.
    """

    row: int
    col: int
    pixels: NDArray[np.uint8] | None
    band_end: bool
    final: bool
    shape: tuple[int, int]
    tiles: tuple[tuple[bytes, ...], ...] | None = None


@dataclass(frozen=True)
class PreparedBlock:
    """What a ``prepare`` function of :func:`iter_blocks` returns for one level-0 block, on the
    ``distributed`` worker that computed it, so that only this travels to the writer.

    Attributes
    ----------
    shape : (h, w)
        The block's level-0 size.
    levels : tuple of (h_k, w_k, 3) uint8
        The block downsampled to levels ``1 .. depth`` (:func:`prepared_levels`).
    tiles : tuple of tuple of bytes
        Its level-0 tiles, encoded, by tile row, left to right.
    """

    shape: tuple[int, int]
    levels: tuple[NDArray[np.uint8], ...]
    tiles: tuple[tuple[bytes, ...], ...]


def prepared_levels(pixels: NDArray[np.uint8], depth: int, *, compiled: bool,
                    executor: ThreadPoolExecutor | None = None) -> tuple[NDArray[np.uint8], ...]:
    """A block's levels ``1 .. depth``: what :func:`iter_blocks` stores for it, wherever they are
    built (the same kernel choice, so the same integers)."""
    levels: list[NDArray[np.uint8]] = []
    level = pixels
    for _ in range(depth):
        level = downsample_2x(level, executor=executor, compiled=compiled)
        levels.append(level)
    return tuple(levels)


def block_edges(chunks: tuple[int, ...], *, target: int, align: int = 1) -> list[int]:
    """Group consecutive dask chunks into blocks; return the block edges.

    A block ends at an even chunk edge (so that every block but the last
    downsamples on its own) that is a multiple of ``align``, at the edge that
    brings it closest to ``target`` pixels; if no aligned edge comes within
    ``4 * target`` pixels, at the first even edge past ``target``.  The image
    end always ends a block.

    Parameters
    ----------
    chunks : tuple of int
        Chunk sizes along one axis.
    target : int
        Preferred block length in pixels.
    align : int, optional
        Preferred multiple for block edges (the writer's tile or shard size).

    Returns
    -------
    list of int
        ``[0, e1, ..., n]``, strictly increasing.

    Examples
    --------
    >>> block_edges((960,) * 5, target=1024)
    [0, 960, 1920, 2880, 3840, 4800]
    >>> block_edges((960,) * 5, target=1024, align=256)
    [0, 3840, 4800]
    >>> block_edges((333,) * 3, target=300)
    [0, 666, 999]
    """
    edges = [0]
    end = 0
    n = sum(chunks)
    for i, size in enumerate(chunks[:-1]):
        end += size
        length = end - edges[-1]
        if end % 2:
            continue
        if end % align == 0:
            after = length + chunks[i + 1]  # the block if it took the next chunk too
            if length >= target or after - target > target - length:
                edges.append(end)
        elif length >= 4 * target:
            edges.append(end)
    edges.append(n)
    return edges


def _v2(n: int) -> int:
    """Exponent of the largest power of two dividing ``n`` (``n`` > 0)."""
    return (n & -n).bit_length() - 1


def block_depth(row_edges: list[int], col_edges: list[int], n_levels: int) -> int:
    """Levels below 0 that every block can downsample on its own.

    A block whose inner edges are multiples of ``2**d`` yields exact levels
    ``1 .. d`` by itself (the image's own edges need no alignment: the odd-edge
    rule is the same in a block as in the whole image).
    """
    inner = row_edges[1:-1] + col_edges[1:-1]
    depth = min((_v2(e) for e in inner), default=n_levels - 1)
    return max(0, min(depth, n_levels - 1))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise OSError(f"{path}: short read at byte {offset}")
        buf, offset = buf[n:], offset + n


class LevelStore:
    """Levels ``1 ..`` of a pyramid, spilled to raw files while level 0 streams.

    Every level ``k`` is one file of ``rows_k * cols_k * 3`` bytes
    (``level<k>.raw``) in ``folder``.  Levels ``1 .. depth`` (see
    :func:`block_depth`) are stored block by block: the level-0 block grid,
    scaled down, with each block's pixels contiguous (bands one after another,
    blocks left to right within a band), so writing a block is one ``pwrite``
    and reading any rows of it one ``pread``.  Deeper levels, which arrive as
    full-width rows, are stored row by row.  Memory is the block, never the
    level; the files take a third of level 0's raw size and are deleted by
    :meth:`close`.

    Parameters
    ----------
    folder : Path
        Created; must not exist.
    shapes : list of (rows, cols)
        All level sizes, level 0 first (level 0 is not stored).
    row_edges, col_edges : list of int, optional
        The level-0 block grid (see :func:`block_edges`); default: one block.
    """

    def __init__(
        self,
        folder: Path,
        shapes: list[tuple[int, int]],
        row_edges: list[int] | None = None,
        col_edges: list[int] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.shapes = shapes
        self.row_edges = [0, shapes[0][0]] if row_edges is None else list(row_edges)
        self.col_edges = [0, shapes[0][1]] if col_edges is None else list(col_edges)
        if self.row_edges[-1] != shapes[0][0] or self.col_edges[-1] != shapes[0][1]:
            raise ValueError(f"block edges do not end at the level-0 size {shapes[0]}")
        self.depth = block_depth(self.row_edges, self.col_edges, len(shapes))
        self.folder.mkdir()
        self.fds: dict[int, int] = {}
        try:
            for k in range(1, len(shapes)):
                fd = os.open(self.path(k), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                self.fds[k] = fd
                h, w = shapes[k]
                os.ftruncate(fd, h * w * 3)
        except OSError:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, level: int) -> Path:
        """File holding ``level``."""
        return self.folder / f"level{level}.raw"

    def grid(self, level: int) -> tuple[list[int], list[int]]:
        """Row and column edges of the blocks of ``level`` (1 .. ``depth``)."""
        h, w = self.shapes[level]
        if not 1 <= level <= self.depth:
            raise ValueError(f"level {level} is stored by rows, not blocks (depth {self.depth})")
        return (
            [e >> level for e in self.row_edges[:-1]] + [h],
            [e >> level for e in self.col_edges[:-1]] + [w],
        )

    def _fd(self, level: int) -> int:
        if level not in self.fds:
            raise ValueError(f"level {level} is not stored (levels 1..{len(self.shapes) - 1})")
        return self.fds[level]

    def write(self, level: int, row: int, col: int, pixels: NDArray[np.uint8]) -> None:
        """Store one block of ``level`` (levels <= depth) or full-width rows (deeper)."""
        fd = self._fd(level)
        h, w = self.shapes[level]
        n, m = pixels.shape[:2]
        if level > self.depth:
            if col != 0 or m != w or not 0 <= row <= row + n <= h:
                raise ValueError(
                    f"level {level}: expected full-width rows, got {n} x {m} at {row}, {col}"
                )
            offset = row * w * 3
        else:
            rows, cols = self.grid(level)
            if row not in rows[:-1] or col not in cols[:-1]:
                raise ValueError(f"level {level}: ({row}, {col}) is not a block origin")
            i, j = rows.index(row), cols.index(col)
            if (n, m) != (rows[i + 1] - row, cols[j + 1] - col):
                raise ValueError(
                    f"level {level}: block at ({row}, {col}) must be {rows[i + 1] - row} x {cols[j + 1] - col}, got {n} x {m}"
                )
            offset = (row * w + (rows[i + 1] - row) * col) * 3
        _pwrite_all(fd, np.ascontiguousarray(pixels).data.cast("B"), offset)

    def read(
        self, level: int, r0: int, r1: int, c0: int = 0, c1: int | None = None
    ) -> NDArray[np.uint8]:
        """Return rows ``r0:r1``, columns ``c0:c1`` (default: all) of ``level``, clipped to it."""
        fd = self._fd(level)
        h, w = self.shapes[level]
        r1, c1 = min(r1, h), w if c1 is None else min(c1, w)
        if not (0 <= r0 <= r1 and 0 <= c0 <= c1):
            raise ValueError(f"level {level}: rows {r0}:{r1}, cols {c0}:{c1} outside {h} x {w}")
        out = np.empty((r1 - r0, c1 - c0, 3), dtype=np.uint8)
        if level > self.depth:
            if c0 == 0 and c1 == w:
                _pread_into(fd, out.data.cast("B"), r0 * w * 3, self.path(level))
            else:
                for i in range(r1 - r0):
                    offset = ((r0 + i) * w + c0) * 3
                    _pread_into(fd, out[i].data.cast("B"), offset, self.path(level))
            return out
        rows, cols = self.grid(level)
        for a, b in itertools.pairwise(rows):
            if b <= r0 or a >= r1:
                continue
            ra, rb = max(a, r0), min(b, r1)
            for x0, x1 in itertools.pairwise(cols):
                if x1 <= c0 or x0 >= c1:
                    continue
                piece = np.empty((rb - ra, x1 - x0, 3), dtype=np.uint8)
                offset = (a * w + (b - a) * x0 + (ra - a) * (x1 - x0)) * 3
                _pread_into(fd, piece.data.cast("B"), offset, self.path(level))
                xa, xb = max(x0, c0), min(x1, c1)
                out[ra - r0 : rb - r0, xa - c0 : xb - c0] = piece[:, xa - x0 : xb - x0]
        return out

    def close(self) -> None:
        """Close and delete the files."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Chain:
    """Downsamples full-width rows of one level into every lower level, carrying odd rows."""

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        sink: Callable[[int, int, NDArray[np.uint8]], None],
        executor: ThreadPoolExecutor | None,
        compiled: bool | None = None,
    ) -> None:
        self.shapes = shapes
        self.sink = sink
        self.executor = executor
        self.compiled = compiled
        self.pending: list[NDArray[np.uint8] | None] = [None] * len(shapes)
        self.next_row = [0] * len(shapes)

    def push(self, level: int, pixels: NDArray[np.uint8], final: bool) -> None:
        """Add the next rows of ``level``; write what they complete below it to the sink."""
        if level + 1 >= len(self.shapes):
            return
        carry = self.pending[level]
        rows = pixels if carry is None else np.concatenate([carry, pixels])
        n_even = rows.shape[0] if final else rows.shape[0] // 2 * 2
        self.pending[level] = None if final or n_even == rows.shape[0] else rows[n_even:].copy()
        if n_even == 0 and not final:
            return
        down = downsample_2x(rows[:n_even], executor=self.executor, compiled=self.compiled)
        del rows
        row = self.next_row[level + 1]
        self.next_row[level + 1] += down.shape[0]
        self.sink(level + 1, row, down)
        self.push(level + 1, down, final)


def _default_client() -> Any | None:
    """The default ``distributed`` client, or None; never imports ``distributed`` (a process
    that has not imported it has no client, and the import alone costs ~0.5 s)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()  # type: ignore[no-untyped-call]
    except ValueError:
        return None


#: Chunk side given to a numpy level 0 (:func:`level_chunks`): the dask path's default.
NUMPY_CHUNK_PX = 1024


def level_chunks(
    array: da.Array | NDArray[np.uint8] | LazyLevel, chunk_shape: tuple[int, int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column chunk sizes of a level 0: a dask array's or a :class:`LazyLevel`'s own, or
    for a numpy array (held in memory, read by slicing) regular chunks of ``chunk_shape``
    ``(rows, cols)``, default :data:`NUMPY_CHUNK_PX` square: they group into blocks and progress
    counts them."""
    if isinstance(array, LazyLevel):
        return array.chunks
    if isinstance(array, np.ndarray):
        h, w = array.shape[:2]
        rows, cols = chunk_shape or (NUMPY_CHUNK_PX, NUMPY_CHUNK_PX)
        if rows < 1 or cols < 1:
            raise ValueError(f"chunk_shape must be positive, got {chunk_shape}")
        return regular_chunks(h, w, rows, cols)
    return tuple(array.chunks[0]), tuple(array.chunks[1])


def regular_chunks(height: int, width: int, rows: int, cols: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column chunk sizes of a ``height`` x ``width`` image cut into ``rows`` x ``cols``
    chunks from its top-left corner (the last ones shorter), as dask's regular chunks."""
    return (tuple(min(rows, height - y) for y in range(0, height, rows)),
            tuple(min(cols, width - x) for x in range(0, width, cols)))


def iter_blocks(
    array: da.Array | NDArray[np.uint8] | LazyLevel,
    store: LevelStore,
    *,
    start_row: int = 0,
    read_done: Callable[[int, int, int, int], NDArray[np.uint8]] | None = None,
    prefetch: int = 2,
    progress: Callable[[int, int], None] | None = None,
    chunk_shape: tuple[int, int] | None = None,
    prepare: Callable[[int, bool, NDArray[np.uint8]], PreparedBlock] | None = None,
) -> Generator[Block, None, None]:
    """Stream level 0 block by block, spilling every lower level to ``store``.

    Level 0 is computed one block (a few chunks, one band tall) at a time, in
    band-major order, with up to ``prefetch`` blocks computing ahead.  Each
    block is downsampled on its own into as many levels as its alignment allows
    (:func:`block_depth`, all of them for 1024-px chunks); deeper levels are
    built from full-width rows of the last of those, which are
    ``2**depth`` times narrower than level 0.  Memory therefore depends on the
    block size, not on the slide's width or height.  Every level-0 chunk is
    computed exactly once.

    Parameters
    ----------
    array : dask.array.Array, numpy.ndarray or LazyLevel, (H, W, 3) uint8
        Level 0 (a numpy array is sliced, in :func:`level_chunks` chunks; a
        :class:`LazyLevel` computes its blocks on threads of this process).
    store : LevelStore
        Receives levels ``1 ..``; complete when the generator is exhausted.
        Its block grid (``store.row_edges``, ``store.col_edges``, see
        :func:`block_edges`) is the grid of the yielded blocks; inner edges must
        be even chunk edges of ``array``.
    start_row : int, optional
        Resume point, a row edge: blocks above it are not computed but read
        with ``read_done`` to rebuild the lower levels, and not yielded.
    read_done : callable ``(r0, r1, c0, c1) -> (r1 - r0, c1 - c0, 3) uint8``, optional
        Required when ``start_row > 0``.
    prefetch : int, optional
        Blocks computing ahead of the consumer (>= 1).
    progress : callable ``(done_chunks, total_chunks)``, optional
        Called after each block (read back or computed), with counts of
        level-0 chunks.
    chunk_shape : (rows, cols), optional
        A numpy level 0's chunks (:func:`level_chunks`).
    prepare : callable ``(depth, compiled, pixels) -> PreparedBlock``, optional
        Used when a ``distributed`` client computes the blocks: run on the worker that
        computed a block, it returns the block's levels ``1 .. depth``
        (:func:`prepared_levels` with these arguments) and its encoded level-0 tiles, which then
        travel instead of its pixels; the yielded :class:`Block` holds ``tiles`` and no
        ``pixels``. Ignored without a client.

    Yields
    ------
    Block
        Level-0 blocks from ``start_row`` on, band by band, left to right.

    Notes
    -----
    Blocks are computed with the default ``distributed`` client when one is
    active (one task a block: the block's chunks are computed inside it, on the worker that
    runs it), otherwise in a background thread with the configured dask
    scheduler (threaded by default).
    """
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"array must have shape (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        raise TypeError(f"array must be uint8, got {array.dtype}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    height, width = int(array.shape[0]), int(array.shape[1])
    if store.shapes[0] != (height, width):
        raise ValueError(f"store is for {store.shapes[0]}, array is {(height, width)}")
    if not isinstance(array, np.ndarray | LazyLevel) and array.chunks[2] != (3,):
        array = array.rechunk({2: 3})  # type: ignore[no-untyped-call]
    row_chunks, col_chunks = level_chunks(array, chunk_shape)
    row_edges, col_edges = store.row_edges, store.col_edges
    _check_edges(row_edges, row_chunks, "row")
    _check_edges(col_edges, col_chunks, "col")
    if start_row not in row_edges[:-1] and start_row != height:
        raise ValueError(f"start_row {start_row} is not a block edge {row_edges}")
    if start_row and read_done is None:
        raise ValueError("start_row > 0 needs read_done")

    shapes = store.shapes
    depth = store.depth
    row_bounds = np.cumsum((0, *row_chunks))
    col_bounds = np.cumsum((0, *col_chunks))
    per_row = len(col_chunks)
    total = len(row_chunks) * per_row
    blocks = [
        (r0, r1, c0, c1)
        for r0, r1 in itertools.pairwise(row_edges)
        for c0, c1 in itertools.pairwise(col_edges)
    ]

    n_threads = max(2, min(4, _cpu_count()))
    # one kernel for the whole image: a small one never loads numba (the same integers)
    compiled = height * width >= _COMPILED_MIN_IMAGE_PX or "numba" in sys.modules
    on_worker = None if prepare is None else functools.partial(prepare, depth, compiled)
    computed = _prefetched(array, [b for b in blocks if b[0] >= start_row], prefetch, on_worker)
    # closed on any way out, while the dask client still runs: after an error or Ctrl-C in this
    # loop the garbage collector would close it once the cluster is gone ("IOLoop is closed")
    with (
        ThreadPoolExecutor(n_threads, thread_name_prefix="wsi-norm-downsample") as down_pool,
        # one thread, so the lower levels of the blocks are built and stored in their order
        ThreadPoolExecutor(1, thread_name_prefix="wsi-norm-lower") as lower_pool,
        contextlib.closing(computed),
    ):
        chain = _Chain(shapes, lambda k, row, px: store.write(k, row, 0, px), down_pool, compiled)
        building: Future[None] | None = None  # the last block's lower levels

        def lower_levels(r0: int, r1: int, c0: int, c1: int, pixels: NDArray[np.uint8] | None,
                         given: tuple[NDArray[np.uint8], ...] = ()) -> None:
            if pixels is not None:
                given = prepared_levels(pixels, depth, compiled=compiled, executor=down_pool)
            for k, level in enumerate(given, start=1):
                store.write(k, r0 >> k, c0 >> k, level)
            if c1 == width and depth + 1 < len(shapes):  # band done: deeper levels at full width
                a, b = r0 >> depth, -(-r1 // 2**depth)
                chain.push(depth, store.read(depth, a, b), final=r1 == height)

        replayed = ((b, read_done(*b)) for b in blocks if b[1] <= start_row)  # type: ignore[misc]
        for (r0, r1, c0, c1), result in itertools.chain(replayed, computed):
            prepared = result if isinstance(result, PreparedBlock) else None
            pixels = None if prepared is not None else np.ascontiguousarray(result)
            if pixels is not None:
                got: Any = f"{pixels.shape} {pixels.dtype}"
                ok = pixels.shape == (r1 - r0, c1 - c0, 3) and pixels.dtype == np.uint8
            else:
                assert prepared is not None
                got, ok = f"prepared {prepared.shape}", prepared.shape == (r1 - r0, c1 - c0)
            if not ok:
                source = "read back" if r0 < start_row else "computed"
                raise ValueError(f"level-0 block {r0}:{r1}, {c0}:{c1} {source} as {got}, "
                                 f"expected {(r1 - r0, c1 - c0, 3)} uint8")
            # the block's lower levels are built while the consumer takes it (both only read
            # its pixels); at most one block's are in flight, and their errors surface here
            if building is not None:
                building.result()
            building = lower_pool.submit(lower_levels, r0, r1, c0, c1, pixels,
                                         prepared.levels if prepared is not None else ())
            if r0 >= start_row:
                yield Block(r0, c0, pixels, band_end=c1 == width, final=(r1, c1) == (height, width),
                            shape=(r1 - r0, c1 - c0), tiles=None if prepared is None else prepared.tiles)
            del pixels, result, prepared
            if progress is not None:
                above = int(np.searchsorted(row_bounds, r0))  # chunk rows of earlier bands
                band = int(np.searchsorted(row_bounds, r1)) - above
                progress(above * per_row + int(np.searchsorted(col_bounds, c1)) * band, total)
        if building is not None:
            building.result()  # the store is complete when the stream ends


def _prefetched(
    array: da.Array | NDArray[np.uint8] | LazyLevel, todo: list[tuple[int, int, int, int]], prefetch: int,
    prepare: Callable[[NDArray[np.uint8]], PreparedBlock] | None = None,
) -> Generator[tuple[tuple[int, int, int, int], Any], None, None]:
    """Compute ``array[r0:r1, c0:c1]`` for each block in turn, ``prefetch`` ahead (a numpy
    array's blocks are slices of it: nothing to compute). With a ``distributed`` client, a block
    is one task (:func:`_block_on_worker`); with ``prepare`` too, it is prepared on the worker
    that computed it, and the :class:`PreparedBlock` comes back instead of its pixels."""
    if isinstance(array, np.ndarray):
        for r0, r1, c0, c1 in todo:
            yield (r0, r1, c0, c1), array[r0:r1, c0:c1]
        return
    if isinstance(array, LazyLevel):
        ahead = max(prefetch, array.threads)
        with ThreadPoolExecutor(ahead, thread_name_prefix="wsi-norm-block") as pool:
            yield from _in_order(todo, ahead, lambda block: pool.submit(array.compute, *block))
        return
    client = _default_client()
    if client is not None:
        # a block is one task on one worker thread: two blocks a thread in flight, so every
        # thread is busy while the writer takes the block before
        threads = sum(int(w.get("nthreads", 1)) for w in client.scheduler_info().get("workers", {}).values())
        prefetch = max(prefetch, 2 * threads)
    with ThreadPoolExecutor(prefetch, thread_name_prefix="wsi-norm-block") as pool:

        def submit(block: tuple[int, int, int, int]) -> Any:
            r0, r1, c0, c1 = block
            part = array[r0:r1, c0:c1]
            if client is None:
                return pool.submit(part.compute)
            # one task a block: its chunks are computed on the worker that runs it
            return client.submit(_block_on_worker, _BlockGraph(part), prepare, pure=False,
                                 resources=_resources(part))

        # a closed client's futures are gone: nothing to cancel
        yield from _in_order(todo, prefetch, submit, lambda: client is None or client.status == "running")


def _in_order(todo: list[tuple[int, int, int, int]], ahead: int, submit: Callable[[tuple[int, int, int, int]], Any],
              cancellable: Callable[[], bool] = lambda: True
              ) -> Generator[tuple[tuple[int, int, int, int], Any], None, None]:
    """Each block's result in ``todo``'s order, ``ahead`` blocks submitted ahead (``submit``
    returns a future); on the way out, the futures not taken are cancelled when ``cancellable()``."""
    queue: deque[tuple[tuple[int, int, int, int], Any]] = deque()
    pending = iter(todo)
    for block in itertools.islice(pending, ahead):
        queue.append((block, submit(block)))
    try:
        while queue:
            block, future = queue.popleft()
            result = future.result()
            del future
            for nxt in itertools.islice(pending, 1):
                queue.append((nxt, submit(nxt)))
            yield block, result
            del result
    finally:
        if cancellable():
            for _, future in queue:
                future.cancel()


@dataclass(frozen=True)
class _BlockGraph:
    """A block's lazy array, handed to a worker as data: ``distributed`` would otherwise schedule
    each of its chunks' reads and maps as tasks of their own (the scheduler's time per task then
    adds up: ~4 CPU-s of the scheduler's alone for the ~3,000 tasks of a 1.07-GP slide)."""

    array: da.Array


def _resources(array: da.Array) -> dict[str, float] | None:
    """The worker resources the chunks' tasks ask for (``dask.annotate(resources=...)``, the
    largest amount of each over the graph's layers; e.g. ``{"GPU": 1}`` for a map on CUDA): the
    block's task asks for them, so it runs on a worker that has them."""
    wanted: dict[str, float] = {}
    graph = array.__dask_graph__()
    for layer in getattr(graph, "layers", {}).values():  # a HighLevelGraph's layers
        for name, amount in ((getattr(layer, "annotations", None) or {}).get("resources") or {}).items():
            wanted[name] = max(wanted.get(name, 0.0), float(amount))
    return wanted or None


def _block_on_worker(block: _BlockGraph, prepare: Callable[[NDArray[np.uint8]], PreparedBlock] | None
                     ) -> NDArray[np.uint8] | PreparedBlock:
    """Compute a block's chunks in this worker's task (dask's synchronous scheduler: the same
    functions on the same chunks, in this thread), then ``prepare`` it when given."""
    pixels = np.asarray(block.array.compute(scheduler="sync"))  # type: ignore[no-untyped-call]  # dask: unannotated
    return pixels if prepare is None else prepare(pixels)


def _check_edges(edges: list[int], chunks: tuple[int, ...], axis: str) -> None:
    bounds = set(np.cumsum((0, *chunks)).tolist())
    n = sum(chunks)
    if edges[0] != 0 or edges[-1] != n or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"{axis} edges {edges} must rise from 0 to {n}")
    bad = [e for e in edges[1:-1] if e % 2 or e not in bounds]
    if bad:
        raise ValueError(f"{axis} edges {bad} are not even chunk edges")


def _cpu_count() -> int:
    from wsi_norm.runtime import usable_cpus

    return usable_cpus()
