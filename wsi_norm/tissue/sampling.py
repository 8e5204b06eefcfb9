"""Slide-wide, seeded sampling of tissue pixels (and glass) for fitting stain statistics.

Stain statistics are fitted from tissue spread over the **whole** slide, never from one tile.
:func:`sample_tissue_pixels` picks small windows at full resolution from all tissue-bearing
areas of the coarse mask (stratified: the tissue windows are ordered by position and one is
taken from each of ``n_windows`` equal strata, at a seeded random offset), reads them through
dask in parallel and returns, from the same reads:

* ``pixels``: a seeded, equal share of tissue pixels (gray <= 200) from each window (Reinhard,
  histogram matching and the QC statistics use them);
* ``blocks``: the means of 2 x 2 pixel blocks whose four pixels are all tissue, on the window's
  even grid (the stain-vector estimators use them: JPEG with 4:2:0 chroma subsampling stores one
  colour per 2 x 2 block, so a block's mean colour survives compression much better than any of
  its pixels' colours);
* the slide's **white point**, from glass pixels of the same windows and of up to
  ``n_glass_windows`` windows placed where the coarse mask shows no tissue
  (:mod:`wsi_norm.tissue.whitepoint`).

Absorbers that are **not stain** are left out of ``pixels`` and ``blocks``
(:func:`non_stain_absorbers`); the colour map still covers every pixel, only the fit does not see
them. Two colour rules, in optical density against the slide's white point:

* **neutral and dense**: at least :data:`NEUTRAL_MIN_OD` in every channel and within
  :data:`NEUTRAL_MAX_ANGLE_DEG` of the grey axis ``(1, 1, 1)``, or black (every channel at most
  :data:`BLACK_MAX`: no colour left to measure). Black or dark-grey fill outside a scan, black
  ink and dark dust absorb every channel alike; hematoxylin and eosin are dyes, whose optical
  density always leans to some channels (Ruifrok's hematoxylin is 18.7 deg from the grey axis, so
  a hematoxylin turned 15 deg, the benchmark's widest, stays 3.7 deg from it).
* **green transmitted most**: an OD norm of at least :data:`GREEN_MIN_OD` and a green OD below both
  red's and blue's by more than :data:`GREEN_MARGIN` of the norm (green ink, green tissue-marking
  dye). Both H&E dyes absorb green most: Ruifrok's hematoxylin has its green OD 0.41 above its
  blue, more than a 15 deg turn can take away, eosin far more, and so every mixture of them.

Neutral absorbers are left out only where they are at least :data:`NEUTRAL_MIN_SHARE` (1 %) of the
sample: fill and ink cover percents of it, while sensor-saturated cores of dense nuclei, which
are tissue and which the maximum concentrations must see, stay well under it. (Leaving those out
too cost up to 4.4 dB on dense generated cases of the fidelity benchmark: the source and the
template lost different shares of their densest pixels.) Green absorbers are always left out.

Left in, fill and ink moved the fit (``bench/pen_marks.py``, CMU-1-Small-Region): a black fill
over 2 % of the image put the 99th-percentile concentrations at 2.3 x the clean slide's (a paler
output everywhere), a dark-grey (25) fill turned hematoxylin 13-15 deg, black ink strokes 12-13
deg, green ink 17-18 deg; all passed the QC gate. On the 240 seeded cases of the fidelity
benchmark the neutral rule matches pixels of 50 sources and 17 truths, at most 0.39 % of a case's
tissue (so none is left out), the green rule 28 sources (at most 0.064 %, JPEG noise); on
CMU-1-Small-Region's sample 0.10 % (green), on the two torchstain patches nothing. Blue ink stays
in: its colour is hematoxylin's within the range of real stain vectors.
:attr:`TissueSample.non_stain_fraction` records the share left out (provenance
``fit.non_stain_fraction``).

Window origins are multiples of ``window_px`` (even), so block grids line up with the JPEG
tiles' chroma grid. The same slide, seed and settings give the same numbers, whatever the
scheduler or thread count.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import BACKGROUND_WEIGHTED_MIN, rgb_to_od64
from wsi_norm.errors import FitError
from wsi_norm.runtime import usable_cpus
from wsi_norm.tissue.mask import CoarseMask, coarse_mask, tissue_mask
from wsi_norm.tissue.whitepoint import (
    WhitePoint,
    estimate_white_point,
    glass_candidates,
    glass_of_luma,
    luma_x1000,
)

if TYPE_CHECKING:
    from wsi_norm.slide import Slide

__all__ = [
    "BLACK_MAX",
    "DEFAULT_N_PIXELS",
    "GREEN_MARGIN",
    "GREEN_MIN_OD",
    "NEUTRAL_MAX_ANGLE_DEG",
    "NEUTRAL_MIN_OD",
    "NEUTRAL_MIN_SHARE",
    "TissueSample",
    "block_means_at",
    "non_stain_absorbers",
    "non_stain_classes",
    "sample_tissue_pixels",
    "tissue_block_mask",
    "tissue_blocks",
]

log = logging.getLogger(__name__)

DEFAULT_N_PIXELS = 1_000_000
DEFAULT_WINDOW_PX = 256
DEFAULT_N_WINDOWS = 256
DEFAULT_N_GLASS_WINDOWS = 16
MIN_TISSUE_PIXELS = 1000
_GLASS_PER_WINDOW = 4096
#: A neutral absorber's optical density is at least this in every channel (intensity below
#: ``(white + 1) / e - 1``, ~88 on a 240 white point): dense enough for its direction to be measured.
NEUTRAL_MIN_OD = 1.0
#: ...and within this angle (deg) of the grey axis. Black ink (35, 35, 40) lies ~2 deg from it
#: on a neutral white point (3 deg on one tinted 12 levels); a hematoxylin turned 15 deg from
#: Ruifrok's towards the axis 3.7 deg (``tests/unit/test_non_stain.py`` renders 400 such stainings).
NEUTRAL_MAX_ANGLE_DEG = 3.0
#: A pixel with every channel at most this is black: fill, not stain (its direction is noise).
BLACK_MAX = 4
#: Neutral absorbers are left out only when they are at least this share of the sample: fill and
#: ink cover percents of it (a 2 % black fill 6.8 %, three black ink strokes 8.5 %), while the
#: all-channel-saturated cores of dense nuclei stay under it (the benchmark's densest case 0.39 %,
#: CMU-1-Small-Region 0.05 %) and are dense tissue, which the maximum concentrations must see.
NEUTRAL_MIN_SHARE = 0.01
#: A green absorber's OD norm is at least this...
GREEN_MIN_OD = 0.5
#: ...and its green OD is below both red's and blue's by more than this share of the norm.
GREEN_MARGIN = 0.1


@dataclass(frozen=True)
class TissueSample:
    """Tissue pixels, tissue blocks and the white point, sampled slide-wide.

    Attributes
    ----------
    pixels : (N, 3) uint8
        RGB tissue pixels (gray <= 200).
    blocks : (M, 3) float32
        Mean RGB of 2 x 2 blocks made only of tissue pixels, values in [0, 255].
    white : WhitePoint
        The slide's glass intensity per channel (or the documented fallback).
    windows : (K, 2) int64
        Level-0 ``(x, y)`` of each tissue window read.
    window_px : int
        Side of the windows.
    seed : int
    coarse_fraction : float
        The slide's tissue fraction (:attr:`wsi_norm.tissue.mask.CoarseMask.fraction`).
    kept_windows : tuple of (H, W, 3) uint8
        Up to ``keep_windows`` of the tissue windows read, spread evenly over them, as read
        (the codec-aware fit simulates the slide's JPEG coding on them).
    non_stain_fraction : float
        Share of the drawn tissue pixels left out as not stain (black fill, black or green ink;
        :func:`non_stain_absorbers`).
    """

    pixels: NDArray[np.uint8]
    blocks: NDArray[np.float32]
    white: WhitePoint
    windows: NDArray[np.int64]
    window_px: int
    seed: int
    coarse_fraction: float
    kept_windows: tuple[NDArray[np.uint8], ...] = ()
    non_stain_fraction: float = 0.0


def tissue_blocks(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Mean colours of the 2 x 2 blocks (on the even grid) whose four pixels are tissue.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        A window whose origin has even coordinates; an odd last row or column is dropped.

    Returns
    -------
    blocks : (M, 3) float32, values in [0, 255]
    """
    return _blocks_of_mask(rgb, tissue_mask(rgb))


def _blocks_of_mask(rgb: NDArray[np.uint8], tissue_px: NDArray[np.bool_]) -> NDArray[np.float32]:
    """:func:`tissue_blocks` given the window's tissue mask ``(H, W) bool``."""
    # the exact integer sum of every block, then the tissue blocks' over 4 in float32: the
    # float32 mean, bit for bit (one boolean selection instead of one per corner)
    return _block_sums(rgb)[_tissue_block_mask(tissue_px)].astype(np.float32) / np.float32(4)


def tissue_block_mask(rgb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """``(H // 2, W // 2)`` bool: the 2 x 2 blocks (even grid) of ``rgb`` whose four pixels are
    tissue (the blocks :func:`tissue_blocks` returns, in row-major order)."""
    return _tissue_block_mask(tissue_mask(rgb))


def _tissue_block_mask(tissue_px: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``(H // 2, W // 2)``: the 2 x 2 blocks (even grid) whose four pixels are tissue."""
    h, w = (tissue_px.shape[0] // 2) * 2, (tissue_px.shape[1] // 2) * 2
    t = tissue_px[:h, :w]
    return np.asarray(t[0::2, 0::2] & t[0::2, 1::2] & t[1::2, 0::2] & t[1::2, 1::2])


def _window_origins(
    coarse: CoarseMask, dimensions: tuple[int, int], window_px: int, *, tissue: bool
) -> NDArray[np.int64]:
    """Level-0 ``(x, y)`` of every window of a regular grid that touches coarse tissue
    (``tissue=True``) or whose coarse footprint holds none at all (``tissue=False``), row-major."""
    width, height = dimensions
    row_chunks = tuple(min(window_px, height - y) for y in range(0, height, window_px))
    col_chunks = tuple(min(window_px, width - x) for x in range(0, width, window_px))
    selected = coarse.chunk_has_tissue((height, width), (row_chunks, col_chunks))
    rows, cols = np.nonzero(selected if tissue else ~selected)
    return np.stack([cols * window_px, rows * window_px], axis=1).astype(np.int64)


_S = TypeVar("_S", bound=np.generic)


def non_stain_absorbers(rgb: NDArray[Any], white: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Rows of ``rgb`` whose colour is not stain: dense neutral absorbers or green ones (module
    docstring). The sampler leaves the neutral ones out only where they are a share of the sample
    that fill or ink makes (:data:`NEUTRAL_MIN_SHARE`); :func:`non_stain_classes` tells them apart.

    Parameters
    ----------
    rgb : (N, 3) uint8 or float in [0, 255]
    white : (3,) float64, the slide's white point

    Returns
    -------
    mask : (N,) bool
    """
    neutral, green = non_stain_classes(rgb, white)
    return neutral | green


def non_stain_classes(rgb: NDArray[Any], white: NDArray[np.float64]) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """``(neutral, green)``: the rows of ``rgb`` that are dense neutral absorbers (or black), and
    those that transmit green most (:func:`non_stain_absorbers`)."""
    rgb = np.asarray(rgb)
    lit = np.asarray(white, dtype=np.float64) + 1.0
    # candidates first, without logarithms (a sample holds a million rows, nearly all stain): dense
    # in every channel (intensity + 1 <= (white + 1) / e, i.e. OD >= NEUTRAL_MIN_OD), or green
    # transmitted most ((g + 1) / (wg + 1) above red's and blue's, i.e. OD_G below both); the
    # exact rules then on those rows only
    r, g, b = (rgb[:, c].astype(np.float32) + np.float32(1) for c in range(3))
    floor = (lit * np.exp(-NEUTRAL_MIN_OD) * (1 + 1e-6)).astype(np.float32)
    candidates = (r <= floor[0]) & (g <= floor[1]) & (b <= floor[2])
    candidates |= (g * np.float32(lit[0]) > r * np.float32(lit[1])) & (g * np.float32(lit[2]) > b * np.float32(lit[1]))
    neutral = (r <= BLACK_MAX + 1) & (g <= BLACK_MAX + 1) & (b <= BLACK_MAX + 1)
    green = np.zeros(len(rgb), dtype=bool)
    rows = np.flatnonzero(candidates)
    if len(rows):
        od = rgb_to_od64(rgb[rows], white=white)
        norm = np.linalg.norm(od, axis=1)
        neutral[rows] |= (od.min(axis=1) >= NEUTRAL_MIN_OD) & (
            od.sum(axis=1) >= np.sqrt(3.0) * np.cos(np.radians(NEUTRAL_MAX_ANGLE_DEG)) * norm)
        green[rows] = (norm >= GREEN_MIN_OD) & (np.minimum(od[:, 0], od[:, 2]) - od[:, 1] > GREEN_MARGIN * norm)
    return neutral, green


def subset_positions(count: int, n: int, rng: np.random.Generator) -> NDArray[np.intp]:
    """``n`` distinct positions of ``range(count)``, in increasing order, every ``n``-subset
    equally likely (``0 <= n <= count``).

    Each position is kept with probability ``n / count``; a uniformly drawn excess of the kept
    positions is then removed, or a uniformly drawn shortfall added from the others. Given how
    many the first step kept, the kept set is uniform among sets of that size, and removing or
    adding a uniform subset keeps it so. It reads and writes the positions in order: 1 M of 4 M
    rows in ~0.04 s where ``Generator.choice(..., replace=False)`` and the gather in its random
    order take 0.23-0.32 s (random access over the 32-MB index array and the rows).
    """
    if not 0 <= n <= count:
        raise ValueError(f"cannot draw {n} of {count} positions")
    if n == count:
        return np.arange(count, dtype=np.intp)
    kept = rng.random(count, dtype=np.float32) < np.float32(n / count)
    positions = np.flatnonzero(kept)
    if len(positions) > n:
        positions = np.delete(positions, rng.choice(len(positions), len(positions) - n, replace=False))
    elif len(positions) < n:
        others = np.flatnonzero(~kept)
        added = np.sort(others[rng.choice(len(others), n - len(positions), replace=False)])
        # merged into the sorted positions (distinct values: the order a sort would give, ~30x faster)
        positions = np.insert(positions, np.searchsorted(positions, added), added)
    return positions


def _draw(rows: NDArray[_S], n: int, rng: np.random.Generator) -> NDArray[_S]:
    """At most ``n`` rows, drawn without replacement (all of them when there are fewer)."""
    return rows if len(rows) <= n else rows[rng.choice(len(rows), size=n, replace=False)]


def _draw_in_order(rows: NDArray[_S], n: int, rng: np.random.Generator) -> NDArray[_S]:
    """:func:`_draw` for millions of rows: the drawn rows in their own order
    (:func:`subset_positions`). A window's few thousand rows are cache-resident, and there
    ``Generator.choice`` is the faster (0.29 against 0.60 ms for 15,628 of 65,536)."""
    return rows if len(rows) <= n else rows[subset_positions(len(rows), n, rng)]


def _drawn_blocks(rgb: NDArray[np.uint8], tissue_px: NDArray[np.bool_], n: int,
                  rng: np.random.Generator) -> NDArray[np.float32]:
    """``_draw(_blocks_of_mask(rgb, tissue_px), n, rng)``, averaging only the drawn blocks: the
    draw picks block positions (the same draw, the same order), then four pixels are summed per
    drawn block."""
    return block_means_at(rgb, _draw(np.flatnonzero(_tissue_block_mask(tissue_px)), n, rng))


def block_means_at(rgb: NDArray[np.uint8], positions: NDArray[np.intp]) -> NDArray[np.float32]:
    """Mean colours ``(len(positions), 3)`` float32 of the 2 x 2 blocks (even grid) at
    ``positions``, row-major indices into the ``(H // 2, W // 2)`` block grid: the exact integer
    sum of the four pixels over 4, as :func:`tissue_blocks` computes it. Every block's sum is
    formed on strided views (four passes over the window) and the drawn ones are picked: a
    quarter of the time of gathering each drawn block's four pixels by index."""
    return _block_sums(rgb).reshape(-1, 3)[positions].astype(np.float32) / np.float32(4)


def _block_sums(rgb: NDArray[np.uint8]) -> NDArray[np.uint16]:
    """``(H // 2, W // 2, 3)`` uint16: the exact sum (<= 1020) of each 2 x 2 block's pixels on the
    even grid (an odd last row or column is dropped)."""
    h, w = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2
    cut = rgb[:h, :w]
    total = cut[0::2, 0::2].astype(np.uint16)
    total += cut[0::2, 1::2]
    total += cut[1::2, 0::2]
    total += cut[1::2, 1::2]
    return total


def _sample_window(
    slide: Slide, x: int, y: int, size: int, n: int, seed: int, keep: bool = False
) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.uint8], NDArray[np.uint8] | None]:
    """Tissue pixels, tissue 2 x 2 block means and glass pixels of one level-0 window, and the
    window itself when ``keep``."""
    width, height = slide.dimensions
    w, h = min(size, width - x), min(size, height - y)
    rgb = slide.read_region(0, x=x, y=y, width=w, height=h)
    rng = np.random.default_rng(seed)
    weighted = luma_x1000(rgb)  # once for the tissue pixels, the blocks and the glass
    is_tissue = weighted < BACKGROUND_WEIGHTED_MIN
    # the draws pick positions first and gather only the drawn rows: the same rows, in the same
    # order, as drawing from every tissue pixel and block
    pixels = rgb.reshape(-1, 3)[_draw(np.flatnonzero(is_tissue), n, rng)]
    return (
        pixels,
        _drawn_blocks(rgb, is_tissue, n, rng),
        _draw(glass_of_luma(rgb, weighted), _GLASS_PER_WINDOW, rng),
        rgb if keep else None,
    )


def _stratified(origins: NDArray[np.int64], k: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """One origin from each of ``k`` equal runs of the row-major order (all when fewer)."""
    if len(origins) <= k:
        return origins
    edges = np.linspace(0, len(origins), k + 1)
    picks = [int(lo + rng.random() * (hi - lo)) for lo, hi in itertools.pairwise(edges)]
    return origins[np.minimum(picks, len(origins) - 1)]


def _glass_of_window(slide: Slide, x: int, y: int, size: int, seed: int) -> NDArray[np.uint8]:
    width, height = slide.dimensions
    rgb = slide.read_region(0, x=x, y=y, width=min(size, width - x), height=min(size, height - y))
    return _draw(glass_candidates(rgb), _GLASS_PER_WINDOW, np.random.default_rng(seed))


_R = TypeVar("_R")
_WINDOW_TASKS = 32  # dask tasks a sample's windows are grouped into


def _read_windows(read: Callable[..., _R], calls: list[tuple[Any, ...]]) -> list[_R]:
    return [read(*args) for args in calls]


def _run_windows(read: Callable[..., _R], calls: list[tuple[Any, ...]]) -> list[_R]:
    """``[read(*args) for args in calls]``, in order, on dask's scheduler when this process has
    imported dask (its configured scheduler or ``distributed`` client then runs the windows),
    else on a thread pool of one thread a CPU, which is what dask's default threaded scheduler
    would do. Each window is seeded on its own, so both give the same sample; a small slide's
    run (``wsi-norm normalize`` of a biopsy) so imports no dask at all (0.08 s)."""
    if "dask" in sys.modules:
        from dask.base import compute
        from dask.delayed import delayed

        # ~32 tasks of a few windows each: a task per 256-px window cost more in scheduling than
        # its work on a distributed cluster (272 tasks for a 1-GP slide)
        per_task = max(1, len(calls) // _WINDOW_TASKS)
        tasks = [delayed(_read_windows)(read, calls[i : i + per_task]) for i in range(0, len(calls), per_task)]
        (results,) = compute(tasks)  # type: ignore[no-untyped-call]  # dask: unannotated
        return [part for batch in results for part in batch]
    if not calls:
        return []
    with ThreadPoolExecutor(min(len(calls), usable_cpus()), thread_name_prefix="wsi-norm-sample") as pool:
        return list(pool.map(lambda args: read(*args), calls))


def sample_tissue_pixels(
    slide: Slide,
    *,
    n_pixels: int = DEFAULT_N_PIXELS,
    seed: int = 0,
    window_px: int = DEFAULT_WINDOW_PX,
    n_windows: int = DEFAULT_N_WINDOWS,
    n_glass_windows: int = DEFAULT_N_GLASS_WINDOWS,
    coarse: CoarseMask | None = None,
    min_pixels: int = MIN_TISSUE_PIXELS,
    keep_windows: int = 0,
) -> TissueSample:
    """Sample tissue pixels, tissue blocks and glass from windows spread over the whole slide.

    Parameters
    ----------
    slide : Slide
    n_pixels : int
        Tissue pixels wanted in all (fewer when the slide has less tissue); as many 2 x 2
        blocks at most.
    seed : int
        Seeds the choice of windows and of pixels within them.
    window_px : int
        Side of each window read at level 0 (even).
    n_windows : int
        Tissue windows read at most (spread over all tissue).
    n_glass_windows : int
        Windows read at most where the coarse mask shows no tissue, for the white point.
    coarse : CoarseMask, optional
        A precomputed coarse mask.
    min_pixels : int
        Fewer tissue pixels than this raises :class:`FitError`.
    keep_windows : int
        Tissue windows to return as read (:attr:`TissueSample.kept_windows`); 0.

    Returns
    -------
    TissueSample

    Raises
    ------
    FitError
        The slide holds (almost) no tissue.

    Notes
    -----
    An earlier version kept only pixels whose 3 x 3 neighbourhood spanned < 40 grey levels, to
    keep JPEG-mixed pixels at nuclear edges out of the fits. On the fidelity benchmark it removed
    most pure-hematoxylin pixels wherever nuclei are small (0.5 um/px scans such as the CMU slide),
    and it biased Reinhard's statistics towards stroma; the 2 x 2 blocks above address JPEG where
    it acts, and every tissue pixel is now kept.
    """
    if window_px < 2 or window_px % 2:
        raise ValueError(f"window_px must be even and >= 2, got {window_px}")
    if n_pixels < min_pixels:
        raise ValueError(f"n_pixels={n_pixels} is below min_pixels={min_pixels}: such a sample could never "
                         f"hold the tissue a fit needs")
    coarse = coarse or coarse_mask(slide)
    rng = np.random.default_rng(seed)
    origins = _stratified(_window_origins(coarse, slide.dimensions, window_px, tissue=True), n_windows, rng)
    if len(origins) == 0:
        raise FitError(f"{slide.path}: no tissue found (every pixel has gray > 200)")
    glass_origins = _stratified(_window_origins(coarse, slide.dimensions, window_px, tissue=False),
                                n_glass_windows, rng)
    # each window keeps up to 4x its fair share, so windows with little tissue do not leave
    # the sample short; the final draw is uniform over what the windows returned
    per_window = 4 * int(np.ceil(n_pixels / len(origins)))
    seeds = rng.integers(0, 2**31, size=len(origins) + len(glass_origins))
    kept = set(np.linspace(0, len(origins) - 1, min(keep_windows, len(origins))).round().astype(int).tolist()) \
        if keep_windows > 0 else set()
    with slide.tile_cache():  # a slide stored in very large tiles decodes each once, not per window
        parts = _run_windows(_sample_window, [
            (slide, int(x), int(y), window_px, per_window, int(s), i in kept)
            for i, ((x, y), s) in enumerate(zip(origins, seeds[: len(origins)], strict=True))
        ])
        glass_parts = _run_windows(_glass_of_window, [
            (slide, int(x), int(y), window_px, int(s))
            for (x, y), s in zip(glass_origins, seeds[len(origins):], strict=True)
        ])
    pixels = np.concatenate([p[0] for p in parts])
    blocks = np.concatenate([p[1] for p in parts])
    glass = np.concatenate([p[2] for p in parts] + list(glass_parts))
    white = estimate_white_point(glass)
    pixels = _draw_in_order(pixels, n_pixels, rng)
    blocks = _draw_in_order(blocks, n_pixels, rng)
    # after the draws (a quarter of the rows to test); a slide with nothing to leave out keeps
    # exactly the sample it had before the rules
    neutral, green = non_stain_classes(pixels, white.array)
    fill_or_ink = len(pixels) > 0 and float(neutral.mean()) >= NEUTRAL_MIN_SHARE
    left_out = green | neutral if fill_or_ink else green
    non_stain_fraction = float(left_out.mean()) if len(pixels) else 0.0
    if left_out.any():
        pixels = pixels[~left_out]
        block_neutral, block_green = non_stain_classes(blocks, white.array)
        blocks = blocks[~(block_green | block_neutral if fill_or_ink else block_green)]
        log.log(logging.WARNING if non_stain_fraction > 0.01 else logging.INFO,
                "%s: %.2f%% of the sampled tissue pixels are not stain (black fill, black or green ink), "
                "left out of the fit", slide.path, 100 * non_stain_fraction)
    if len(pixels) < min_pixels:
        non_stain_note = (f", {non_stain_fraction:.0%} of them left out as not stain (black fill, ink)"
                          if non_stain_fraction > 0 else "")
        raise FitError(
            f"{slide.path}: only {len(pixels)} tissue pixels (gray <= 200) found in "
            f"{len(origins)} windows{non_stain_note}; need at least {min_pixels}"
        )
    log.info(
        "%s: sampled %d tissue pixels, %d blocks from %d windows; white point %s (%s, %d glass px)",
        slide.path, len(pixels), len(blocks), len(origins), white.rgb, white.source, white.n_pixels,
    )
    return TissueSample(
        pixels=np.ascontiguousarray(pixels, dtype=np.uint8),
        blocks=np.ascontiguousarray(blocks, dtype=np.float32),
        white=white,
        windows=origins.astype(np.int64),
        window_px=window_px,
        seed=seed,
        coarse_fraction=coarse.fraction,
        kept_windows=tuple(p[3] for p in parts if p[3] is not None),
        non_stain_fraction=non_stain_fraction,
    )
