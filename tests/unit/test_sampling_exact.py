"""The sampler's fast window helpers give exactly what their plain definitions give.

``tissue_blocks`` sums the four 8-bit pixels of a block in integers and ``glass_candidates``
filters 8-bit luma and skips windows with no pixel away from tissue (see their modules); the
fitted statistics, and so every output pixel, depend on these bytes, so the tests compare them
bit for bit with the straightforward formulas on real and random windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from wsi_norm.color import BACKGROUND_WEIGHTED_MIN
from wsi_norm.tissue.mask import tissue_mask
from wsi_norm.tissue.sampling import tissue_blocks
from wsi_norm.tissue.whitepoint import FLAT_RANGE, TISSUE_MARGIN_PX, glass_candidates


def _blocks_by_definition(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    h, w = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2
    cut = rgb[:h, :w]
    tissue = tissue_mask(cut).reshape(h // 2, 2, w // 2, 2).all(axis=(1, 3))
    means = cut.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3), dtype=np.float32)
    return np.ascontiguousarray(means[tissue])


def _glass_by_definition(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    x = rgb.astype(np.int32)
    weighted = x[..., 0] * 299 + x[..., 1] * 587 + x[..., 2] * 114
    tissue = weighted < BACKGROUND_WEIGHTED_MIN
    near = ndimage.binary_dilation(tissue, iterations=TISSUE_MARGIN_PX) if tissue.any() else tissue
    gray = (weighted + 500) // 1000
    spread = ndimage.maximum_filter(gray, 7, mode="nearest") - ndimage.minimum_filter(gray, 7, mode="nearest")
    return np.ascontiguousarray(rgb[(spread <= FLAT_RANGE) & ~near])


def _windows(slide_rgb: NDArray[np.uint8], n: int, seed: int) -> list[NDArray[np.uint8]]:
    """Real crops of odd and even sizes, random noise, brightened crops and flat glass."""
    rng = np.random.default_rng(seed)
    h, w = slide_rgb.shape[:2]
    out = []
    for _ in range(n):
        wh, ww = int(rng.integers(1, 260)), int(rng.integers(1, 260))
        y, x = int(rng.integers(0, h - wh)), int(rng.integers(0, w - ww))
        win = np.ascontiguousarray(slide_rgb[y : y + wh, x : x + ww])
        kind = rng.random()
        if kind < 0.15:
            win = rng.integers(0, 256, win.shape, dtype=np.uint8)
        elif kind < 0.3:
            win = np.clip(win.astype(np.int16) + 70, 0, 255).astype(np.uint8)
        elif kind < 0.35:
            win = np.full_like(win, 236) + rng.integers(0, 3, win.shape, dtype=np.uint8)
        out.append(win)
    return out


@pytest.fixture
def cmu_rgb(sample_svs: Path) -> NDArray[np.uint8]:
    from wsi_norm.slide import open_slide

    slide = open_slide(sample_svs)
    w, h = slide.dimensions
    return slide.read_region(0, x=0, y=0, width=w, height=h)


def test_tissue_blocks_is_the_float32_block_mean_bit_for_bit(cmu_rgb: NDArray[np.uint8]) -> None:
    n_blocks = 0
    for win in _windows(cmu_rgb, 150, seed=1):
        ours, ref = tissue_blocks(win), _blocks_by_definition(win)
        assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape
        assert ours.tobytes() == ref.tobytes()
        n_blocks += len(ours)
    assert n_blocks > 100_000  # tissue was there to compare


def test_glass_candidates_are_the_rule_pixel_for_pixel(cmu_rgb: NDArray[np.uint8]) -> None:
    n_glass = empty = 0
    for win in _windows(cmu_rgb, 150, seed=2):
        ours, ref = glass_candidates(win), _glass_by_definition(win)
        assert ours.dtype == ref.dtype == np.uint8 and ours.shape == ref.shape
        assert ours.tobytes() == ref.tobytes()
        n_glass += len(ours)
        empty += len(ours) == 0
    assert n_glass > 100_000 and empty > 10  # both glass and all-tissue windows were compared


def test_white_point_median_of_8bit_glass_is_numpys_median() -> None:
    """The white point of 8-bit glass comes from histograms: the same value as np.median, odd
    and even counts (the mean of the two middle values) alike."""
    from wsi_norm.tissue.whitepoint import estimate_white_point

    rng = np.random.default_rng(5)
    for n in (2000, 2001, 2002, 40_000, 40_001):
        glass = rng.integers(225, 250, (n, 3), dtype=np.uint8)
        glass[: n // 3, 1] = 255  # ties and a skewed channel
        ours = estimate_white_point(glass)
        assert ours.source == "glass" and ours.n_pixels == n
        assert ours.rgb == tuple(np.median(glass.astype(np.float64), axis=0).tolist())
        assert ours == estimate_white_point(glass.astype(np.float64))  # the float path agrees


def test_window_sample_shares_one_luma_pass_with_the_same_result(sample_svs: Path) -> None:
    """A sampled window computes luma once for its tissue pixels, blocks and glass: the same
    arrays, and the same draws, as the public functions one after the other."""
    from wsi_norm.slide import open_slide
    from wsi_norm.tissue.sampling import _GLASS_PER_WINDOW, _draw, _sample_window

    slide = open_slide(sample_svs)
    w, h = slide.dimensions
    for x, y, size in ((0, 0, 256), (w - 200, h - 300, 256), (w - 201, h - 157, 256), (1000, 1200, 130),
                       (512, 2048, 64)):
        rgb = slide.read_region(0, x=x, y=y, width=min(size, w - x), height=min(size, h - y))
        rng = np.random.default_rng(11)
        expected: list[NDArray[np.generic]] = [
            _draw(rgb[tissue_mask(rgb)], 5000, rng), _draw(tissue_blocks(rgb), 5000, rng),
            _draw(glass_candidates(rgb), _GLASS_PER_WINDOW, rng)]
        pixels, blocks, glass, window = _sample_window(slide, x, y, size, 5000, 11)
        assert window is None
        got: list[NDArray[np.generic]] = [pixels, blocks, glass]
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_sample_is_the_same_on_dask_and_on_the_plain_thread_pool(sample_svs: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dask loaded the windows run on a thread pool (a biopsy's run imports no dask); the
    sample is the same arrays as on dask's threaded scheduler."""
    import sys

    import dask

    from wsi_norm.slide import open_slide
    from wsi_norm.tissue.sampling import sample_tissue_pixels

    slide = open_slide(sample_svs)
    with dask.config.set(scheduler="threads"):
        on_dask = sample_tissue_pixels(slide, n_pixels=50_000, seed=5)
    monkeypatch.delitem(sys.modules, "dask")  # as in a process that never imported it
    on_pool = sample_tissue_pixels(slide, n_pixels=50_000, seed=5)
    monkeypatch.undo()
    for name in ("pixels", "blocks", "windows"):
        a, b = getattr(on_dask, name), getattr(on_pool, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert on_dask.white == on_pool.white and on_dask.non_stain_fraction == on_pool.non_stain_fraction
    # 50,000 drawn, less those left out as not stain (the real slide's dark debris: ~0.15 %)
    assert len(on_pool.pixels) + round(on_pool.non_stain_fraction * 50_000) == 50_000


# ------------------------------------------------------------------ the final draws


@pytest.mark.parametrize(("count", "n"), [(5, 2), (7, 4), (12, 3)])
def test_subset_positions_draws_every_subset_equally_often(count: int, n: int) -> None:
    """Every n-subset of range(count) is equally likely: 30,000 seeded draws, chi-square over
    all C(count, n) subsets (rates n / count below and above 1/2, so both the removal and the
    addition branch run)."""
    import itertools
    from math import comb

    from scipy.stats import chisquare

    from wsi_norm.tissue.sampling import subset_positions

    rng = np.random.default_rng(11)
    index = {s: i for i, s in enumerate(itertools.combinations(range(count), n))}
    seen = np.zeros(comb(count, n))
    for _ in range(30_000):
        positions = subset_positions(count, n, rng)
        assert len(positions) == n and np.all(np.diff(positions) > 0)  # distinct, in order
        seen[index[tuple(int(p) for p in positions)]] += 1
    assert chisquare(seen).pvalue > 1e-3, seen


def test_subset_positions_at_scale_and_its_edges() -> None:
    from wsi_norm.tissue.sampling import subset_positions

    rng = np.random.default_rng(0)
    positions = subset_positions(4_000_000, 1_000_000, rng)
    assert len(positions) == 1_000_000 and np.all(np.diff(positions) > 0)
    assert positions[0] >= 0 and positions[-1] < 4_000_000
    # spread over the whole range: each tenth holds its share within 0.5 %
    share = np.bincount(positions // 400_000, minlength=10) / 1_000_000
    assert np.all(np.abs(share - 0.1) < 0.0005), share
    assert np.array_equal(subset_positions(9, 9, rng), np.arange(9))
    assert len(subset_positions(9, 0, rng)) == 0
    with pytest.raises(ValueError, match="cannot draw 10 of 9 positions"):
        subset_positions(9, 10, rng)


def test_a_sample_too_small_to_fit_is_refused_before_any_read(sample_svs: Path) -> None:
    """Asking for fewer pixels than the fewest a fit takes was a fit error after the whole sample
    ("only 500 tissue pixels found ... need at least 1000"), which read as if the slide lacked
    tissue; now it is refused up front, naming both numbers, in the sampler and in FitOptions."""
    from wsi_norm.pipeline import FitOptions
    from wsi_norm.slide import open_slide
    from wsi_norm.tissue.sampling import MIN_TISSUE_PIXELS, sample_tissue_pixels

    with pytest.raises(ValueError, match=r"n_pixels=500 is below min_pixels=1000"):
        sample_tissue_pixels(open_slide(sample_svs), n_pixels=500)
    assert 450 < len(sample_tissue_pixels(open_slide(sample_svs), n_pixels=500, min_pixels=100).pixels) <= 500
    with pytest.raises(ValueError, match=r"n_pixels must be an integer >= 1000 .* got 999"):
        FitOptions(n_pixels=MIN_TISSUE_PIXELS - 1)
    assert FitOptions(n_pixels=MIN_TISSUE_PIXELS).n_pixels == MIN_TISSUE_PIXELS
