"""The gray > 200 background rule, per pixel and as a coarse per-chunk tissue mask.

A pixel is **background** (glass) when its grayscale value exceeds 200, the grayscale value
being MATLAB ``rgb2gray`` of 8-bit RGB: ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``
rounded to the nearest integer. Every other pixel is tissue. The test is done in exact
integer arithmetic: ``round(luma) > 200``  <=>  ``299 R + 587 G + 114 B >= 200500``.

A slide is too large to test pixel by pixel just to find where the tissue is, so a **coarse
mask** is computed first on a low-resolution level (a thumbnail-sized one; for single-level
slides a strided thumbnail read chunk by chunk) and dilated by one coarse pixel so thin tissue
is not lost to averaging. It decides which level-0 chunks hold tissue; the per-pixel rule
decides inside them.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsi_norm import color

if TYPE_CHECKING:
    from wsi_norm.slide import Slide

__all__ = [
    "BACKGROUND_GRAY",
    "CoarseMask",
    "coarse_mask",
    "gray",
    "is_background",
    "tissue_fraction",
    "tissue_mask",
]

log = logging.getLogger(__name__)

BACKGROUND_GRAY = color.BACKGROUND_LUMA
"""A pixel whose rounded ITU-R 601 grayscale value exceeds this is glass."""

_LUMA_WEIGHTS = np.array([299, 587, 114], dtype=np.int32)
COARSE_MAX_PX = 2048


def _check_rgb(rgb: NDArray[np.uint8]) -> None:
    color._check_rgb_uint8(rgb)


def gray(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Grayscale as MATLAB ``rgb2gray``: rounded ITU-R 601 luma.

    Parameters
    ----------
    rgb : (..., 3) uint8

    Returns
    -------
    (...) uint8
    """
    _check_rgb(rgb)
    weighted = rgb.astype(np.int32) @ _LUMA_WEIGHTS
    return ((weighted + 500) // 1000).astype(np.uint8)


def is_background(rgb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """True where a pixel is glass (grayscale > 200); :func:`wsi_norm.color.is_background`
    after checking the input.

    Parameters
    ----------
    rgb : (..., 3) uint8

    Returns
    -------
    (...) bool
    """
    _check_rgb(rgb)
    return np.asarray(color.is_background(rgb))


def tissue_mask(rgb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """True where a pixel is tissue (grayscale <= 200); the complement of :func:`is_background`."""
    return ~is_background(rgb)


def _dilate(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Binary dilation with a 3x3 square (one pixel in every direction)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


@dataclass(frozen=True)
class CoarseMask:
    """Tissue mask of a low-resolution view of a slide.

    Attributes
    ----------
    mask : (h, w) bool
        True where the coarse pixel (or a neighbour) is tissue: where tissue is searched
        (dilated, so no edge is missed).
    level : int
        Slide level the mask was computed from.
    downsample : (float, float)
        Level-0 pixels per mask pixel, ``(x, y)``.
    tissue : (h, w) bool
        The gray <= 200 rule on the coarse view itself (not dilated).
    """

    mask: NDArray[np.bool_]
    level: int
    downsample: tuple[float, float]
    tissue: NDArray[np.bool_]

    @property
    def fraction(self) -> float:
        """The slide's **tissue fraction**: the share of the coarse view (longest side about
        :data:`COARSE_MAX_PX`) whose gray value is <= 200.

        The one definition wsi-norm reports everywhere (``info``, ``mask``, fits, the flows'
        QC). :func:`tissue_fraction` counts level-0 pixels instead (``info --exact``): the same
        rule at full resolution, a slower and slightly different number.
        """
        return float(self.tissue.mean()) if self.tissue.size else 0.0

    @property
    def search_fraction(self) -> float:
        """Share of the coarse view inside :attr:`mask` (dilated): where tissue is read."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @functools.cached_property
    def _summed_area(self) -> NDArray[np.int32]:
        """``(h + 1, w + 1)`` int32: ``[i, j]`` = mask pixels above row ``i`` and left of column
        ``j`` (computed once per mask; a coarse view's count fits int32)."""
        h, w = self.mask.shape
        table = np.zeros((h + 1, w + 1), dtype=np.int32)
        np.cumsum(self.mask, axis=0, dtype=np.int32, out=table[1:, 1:])
        np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
        return table

    def chunk_has_tissue(
        self, shape0: tuple[int, int], chunks: tuple[tuple[int, ...], tuple[int, ...]]
    ) -> NDArray[np.bool_]:
        """Which chunks of a level-0 array touch tissue.

        Parameters
        ----------
        shape0 : (rows, cols)
            Level-0 shape.
        chunks : (row_chunks, col_chunks)
            Dask-style chunk sizes along rows and columns.

        Returns
        -------
        (n_row_chunks, n_col_chunks) bool
        """
        dx, dy = self.downsample
        h, w = self.mask.shape
        row_edges = np.concatenate([[0], np.cumsum(chunks[0])])
        col_edges = np.concatenate([[0], np.cumsum(chunks[1])])
        # each chunk's coarse footprint [r0, r1) x [c0, c1), at least one coarse pixel
        r0 = np.minimum(h - 1, (row_edges[:-1] / dy).astype(np.int64))
        r1 = np.maximum(r0 + 1, np.minimum(h, np.ceil(row_edges[1:] / dy).astype(np.int64)))
        c0 = np.minimum(w - 1, (col_edges[:-1] / dx).astype(np.int64))
        c1 = np.maximum(c0 + 1, np.minimum(w, np.ceil(col_edges[1:] / dx).astype(np.int64)))
        # tissue pixels in every footprint at once, from the mask's summed-area table
        table = self._summed_area
        counts = (table[r1[:, None], c1[None, :]] - table[r0[:, None], c1[None, :]]
                  - table[r1[:, None], c0[None, :]] + table[r0[:, None], c0[None, :]])
        return np.asarray(counts > 0)


def coarse_mask(slide: Slide, *, max_px: int = COARSE_MAX_PX) -> CoarseMask:
    """Coarse tissue mask from a low-resolution view of the slide.

    Parameters
    ----------
    slide : Slide
    max_px : int
        Larger side of the view the mask is computed on (about; the lowest level at least
        this large is used, reduced further if needed).

    Returns
    -------
    CoarseMask
    """
    thumb = slide.thumbnail(max_px)
    w0, h0 = slide.dimensions
    th, tw = thumb.shape[:2]
    tissue = tissue_mask(thumb)
    level = slide.best_level_for(max_px)
    log.debug("coarse mask of %s: %dx%d from level %d", slide.path, tw, th, level)
    return CoarseMask(mask=_dilate(tissue), level=level, downsample=(w0 / tw, h0 / th), tissue=tissue)


def _count_tissue(block: NDArray[np.uint8]) -> NDArray[np.int64]:
    return np.array([[int(tissue_mask(block).sum())]], dtype=np.int64)


@dataclass(frozen=True)
class TissueStats:
    """Result of :func:`tissue_fraction`.

    Attributes
    ----------
    fraction : float
        Tissue pixels / all pixels of level 0.
    tissue_px : int
        Tissue pixel count (per-pixel rule inside tissue chunks).
    total_px : int
        All pixels of level 0.
    chunks_read : int
        Chunks the coarse mask selected (and that were read).
    chunks_total : int
    """

    fraction: float
    tissue_px: int
    total_px: int
    chunks_read: int
    chunks_total: int


def tissue_fraction(
    slide: Slide, *, chunk_px: int = 1024, coarse: CoarseMask | None = None
) -> TissueStats:
    """Share of level-0 pixels that are tissue, reading only the chunks that hold tissue.

    The work runs through dask (the active distributed client if there is one); memory
    stays bounded by a few chunks in flight.

    Parameters
    ----------
    slide : Slide
    chunk_px : int
        Chunk size for the level-0 read.
    coarse : CoarseMask, optional
        A precomputed coarse mask.

    Returns
    -------
    TissueStats
    """
    import dask.array as da
    from dask.base import compute

    coarse = coarse or coarse_mask(slide)
    arr = slide.to_dask(0, chunk_px=chunk_px)
    rows, cols = arr.chunks[0], arr.chunks[1]
    selected = coarse.chunk_has_tissue(arr.shape[:2], (rows, cols))
    blocks = arr.blocks
    counts = [
        da.map_blocks(_count_tissue, blocks[i, j], dtype=np.int64, chunks=(1, 1), drop_axis=2)  # type: ignore[no-untyped-call]
        for i, j in zip(*np.nonzero(selected), strict=True)
    ]
    # dask.base.compute is unannotated
    computed: tuple[Any, ...] = compute(*counts) if counts else ()  # type: ignore[no-untyped-call]
    total_tissue = int(sum(int(c.sum()) for c in computed))
    total_px = int(arr.shape[0]) * int(arr.shape[1])
    return TissueStats(
        fraction=total_tissue / total_px if total_px else 0.0,
        tissue_px=total_tissue,
        total_px=total_px,
        chunks_read=len(counts),
        chunks_total=len(rows) * len(cols),
    )
