"""Streamed 2x pyramid of a lazy RGB image, built in one pass over level 0.

Level ``k + 1`` is the 2x2 mean of level ``k``.  :func:`iter_pyramid` computes
the level-0 dask array one *band* (one row of chunks) at a time, so every
level-0 chunk is computed exactly once, and derives every lower level from that
band before the band is dropped.  The writers in :mod:`wsi_norm.writers` consume
the resulting stream of :class:`Strip` objects; neither holds a whole level in
memory.

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

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numba
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Strip",
    "downsample_2x",
    "iter_pyramid",
    "pyramid_shapes",
    "reference_pyramid",
]

logger = logging.getLogger(__name__)

#: Default size in pixels that the larger side of the smallest level fits in.
MAX_PX = 1024
#: Inputs smaller than this many pixels are downsampled in one call, not split.
_PARALLEL_MIN_PX = 1 << 20


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


@numba.njit(nogil=True, cache=True)
def _downsample_kernel(src: Any, out: Any) -> None:  # pragma: no cover - compiled
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

    Returns
    -------
    (ceil(H/2), ceil(W/2), 3) uint8
        Mean of each 2x2 block, rounded half up.

    Notes
    -----
    Pure and thread-safe; compiled with numba (``nogil``).
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
    if executor is None or n_workers < 2 or h * w < _PARALLEL_MIN_PX:
        _downsample_kernel(image, out)
        return out
    # Blocks of an even number of rows downsample independently (and stay
    # C-contiguous); the last block keeps the image's own bottom edge.
    step = max(2, 2 * math.ceil(h / (2 * n_workers)))
    futures = [
        executor.submit(
            _downsample_kernel, image[r0 : r0 + step], out[r0 // 2 : (r0 + step + 1) // 2]
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
class Strip:
    """A run of full-width rows of one pyramid level.

    Attributes
    ----------
    level : int
        Pyramid level, 0 is full resolution.
    row : int
        Index of the strip's first row within its level.
    pixels : (n, w_level, 3) uint8
        The rows; may be a view of a larger buffer, do not modify.
    final : bool
        True for the last strip of the level.
    """

    level: int
    row: int
    pixels: NDArray[np.uint8]
    final: bool


class _Chain:
    """Turns level-0 bands into strips of every level, carrying odd rows over."""

    def __init__(self, shapes: list[tuple[int, int]], executor: ThreadPoolExecutor | None) -> None:
        self.shapes = shapes
        self.executor = executor
        self.pending: list[NDArray[np.uint8] | None] = [None] * len(shapes)
        self.next_row = [0] * len(shapes)

    def push(
        self, level: int, pixels: NDArray[np.uint8], final: bool, *, emit: bool = True
    ) -> Iterator[Strip]:
        row = self.next_row[level]
        self.next_row[level] += pixels.shape[0]
        if emit and pixels.shape[0]:
            yield Strip(level, row, pixels, final)
        if level + 1 >= len(self.shapes):
            return
        carry = self.pending[level]
        rows = pixels if carry is None else np.concatenate([carry, pixels])
        if final:
            n_even = rows.shape[0]
            self.pending[level] = None
        else:
            n_even = rows.shape[0] // 2 * 2
            self.pending[level] = rows[n_even:].copy() if n_even < rows.shape[0] else None
        if n_even == 0 and not final:
            return
        down = downsample_2x(rows[:n_even], executor=self.executor)
        del rows
        yield from self.push(level + 1, down, final)


def _band_edges(row_chunks: tuple[int, ...], start_row: int, height: int) -> list[tuple[int, int]]:
    edges = np.cumsum((0, *row_chunks)).tolist()
    cuts = [start_row] + [e for e in edges if start_row < e < height] + [height]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _default_client() -> Any | None:
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()  # type: ignore[no-untyped-call]
    except ValueError:
        return None


def iter_pyramid(
    array: da.Array,
    *,
    max_px: int = MAX_PX,
    start_row: int = 0,
    read_done: Callable[[int, int], NDArray[np.uint8]] | None = None,
    replay_px: int = 1024,
    prefetch: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Generator[Strip, None, None]:
    """Stream every pyramid level of a lazy image, computing level 0 once.

    Level 0 is computed one band (one row of chunks) at a time, with up to
    ``prefetch`` bands computing ahead; each band is downsampled into every
    lower level at once.  Strips of one level come in row order; a strip of
    level ``k + 1`` comes after the level-``k`` strips it was made from.

    Parameters
    ----------
    array : dask.array.Array, (H, W, 3) uint8
        Level 0.  Its row chunking sets the band height (memory use is about
        ``(prefetch + 2) * band_rows * W * 3`` bytes).
    max_px : int, optional
        See :func:`pyramid_shapes`.
    start_row : int, optional
        Resume point: level-0 rows ``[0, start_row)`` are not computed but read
        with ``read_done`` (from a partial output) to rebuild the lower levels;
        no level-0 strip is emitted for them.
    read_done : callable ``(row0, row1) -> (row1 - row0, W, 3) uint8``, optional
        Required when ``start_row > 0``.
    replay_px : int, optional
        Rows read per ``read_done`` call.
    prefetch : int, optional
        Bands computing ahead of the consumer (>= 1).
    progress : callable ``(done_chunks, total_chunks)``, optional
        Called after each band, with counts of level-0 chunks.

    Yields
    ------
    Strip
        Full-width strips of every level.

    Notes
    -----
    Bands are computed with ``array.compute()`` in a background thread, so a
    default ``distributed`` client is used when one is active, otherwise the
    configured dask scheduler (threaded by default).
    """
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"array must have shape (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        raise TypeError(f"array must be uint8, got {array.dtype}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    height, width = int(array.shape[0]), int(array.shape[1])
    if not 0 <= start_row <= height:
        raise ValueError(f"start_row must be in [0, {height}], got {start_row}")
    if start_row and read_done is None:
        raise ValueError("start_row > 0 needs read_done")
    if array.chunks[2] != (3,):
        array = array.rechunk({2: 3})  # type: ignore[no-untyped-call]
    shapes = pyramid_shapes(height, width, max_px=max_px)
    row_chunks = array.chunks[0]
    chunk_ends = np.cumsum(row_chunks)
    per_row = len(array.chunks[1])
    total = len(row_chunks) * per_row

    n_threads = max(2, min(4, _cpu_count()))
    with (
        ThreadPoolExecutor(n_threads, thread_name_prefix="wsi-norm-downsample") as down_pool,
        ThreadPoolExecutor(prefetch, thread_name_prefix="wsi-norm-band") as band_pool,
    ):
        chain = _Chain(shapes, down_pool)
        for r0 in range(0, start_row, replay_px):
            r1 = min(r0 + replay_px, start_row)
            pixels = np.ascontiguousarray(read_done(r0, r1))  # type: ignore[misc]
            if pixels.shape != (r1 - r0, width, 3):
                raise ValueError(f"read_done({r0}, {r1}) returned shape {pixels.shape}")
            yield from chain.push(0, pixels, final=r1 == height, emit=False)
        bands = _band_edges(row_chunks, start_row, height)
        if progress is not None and start_row:
            progress(int(np.searchsorted(chunk_ends, start_row, side="right")) * per_row, total)
        client = _default_client()
        queue: deque[tuple[int, int, Any]] = deque()

        def submit(i: int) -> None:
            b0, b1 = bands[i]
            part = array[b0:b1]
            future: Any = (
                client.compute(part) if client is not None else band_pool.submit(part.compute)
            )
            queue.append((b0, b1, future))

        for i in range(min(prefetch, len(bands))):
            submit(i)
        next_band = len(queue)
        while queue:
            b0, b1, future = queue.popleft()
            pixels = np.ascontiguousarray(future.result())
            del future
            if next_band < len(bands):
                submit(next_band)
                next_band += 1
            if pixels.shape != (b1 - b0, width, 3) or pixels.dtype != np.uint8:
                raise ValueError(
                    f"level-0 rows {b0}:{b1} computed to {pixels.shape} {pixels.dtype}, expected {(b1 - b0, width, 3)} uint8"
                )
            yield from chain.push(0, pixels, final=b1 == height)
            del pixels
            if progress is not None:
                done = int(np.searchsorted(chunk_ends, b1, side="right")) * per_row
                progress(done, total)


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
