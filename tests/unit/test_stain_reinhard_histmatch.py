"""Reinhard (Lab mean/std) and histogram matching."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
from numpy.typing import NDArray
from skimage.color import rgb2lab
from test_stain_macenko import load_he

from wsi_norm.color import is_background
from wsi_norm.colormap import HistogramMap, compile_colormap
from wsi_norm.errors import FitError
from wsi_norm.stain import fit_stats
from wsi_norm.stain.histmatch import HistMatchStats, aggregate_histmatch, fit_histmatch
from wsi_norm.stain.reinhard import ReinhardStats, aggregate_reinhard, fit_reinhard


def _tissue(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    px = img.reshape(-1, 3)
    kept: NDArray[np.uint8] = px[~is_background(px)]
    return kept


def test_reinhard_stats_match_skimage_lab() -> None:
    px = _tissue(load_he("source"))
    stats = fit_reinhard(px)
    lab = rgb2lab(px[None].astype(np.float64) / 255.0)[0]
    np.testing.assert_allclose(stats.mean, lab.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats.std, lab.std(0), atol=1e-6)


def test_reinhard_map_moves_lab_stats_to_target() -> None:
    src, tgt = load_he("source"), load_he("target")
    s, t = fit_reinhard(_tissue(src)), fit_reinhard(_tissue(tgt))
    out = compile_colormap("reinhard", s, t).apply(src)
    # background passes through, so measure on the pixels that were tissue in the source
    mapped = out.reshape(-1, 3)[~is_background(src.reshape(-1, 3))]
    lab = rgb2lab(mapped[None].astype(np.float64) / 255.0)[0]
    assert np.all(np.abs(lab.mean(0) - t.mean) < 0.25 * np.abs(s.mean - t.mean) + 1.0), (lab.mean(0), s.mean, t.mean)


def test_histmatch_map_matches_target_quantiles() -> None:
    src, tgt = load_he("source"), load_he("target")
    s, t = fit_histmatch(_tissue(src)), fit_histmatch(_tissue(tgt))
    out = compile_colormap("histmatch", s, t).apply(src)
    mapped = out.reshape(-1, 3)[~is_background(src.reshape(-1, 3))]
    tgt_px = _tissue(tgt)
    for c in range(3):
        q_out = np.percentile(mapped[:, c], [10, 50, 90])
        q_tgt = np.percentile(tgt_px[:, c], [10, 50, 90])
        q_src = np.percentile(_tissue(src)[:, c], [10, 50, 90])
        assert np.all(np.abs(q_out - q_tgt) <= 3), (c, q_out, q_tgt, q_src)


def test_histmatch_tables_are_monotone_and_self_identity() -> None:
    s = fit_histmatch(_tissue(load_he("source")))
    cmap = cast(HistogramMap, compile_colormap("histmatch", s, s))
    assert np.all(np.diff(cmap.tables.astype(int), axis=1) >= 0)
    occupied = s.hist > 0
    assert np.array_equal(cmap.tables[occupied], np.nonzero(occupied)[1].astype(np.uint8))


def test_aggregates() -> None:
    a = ReinhardStats(mean=np.array([60.0, 20.0, -10.0]), std=np.array([10.0, 5.0, 4.0]))
    b = ReinhardStats(mean=np.array([70.0, 10.0, -20.0]), std=np.array([12.0, 6.0, 2.0]))
    c = ReinhardStats(mean=np.array([80.0, 30.0, -15.0]), std=np.array([11.0, 7.0, 3.0]))
    agg = aggregate_reinhard([a, b, c])
    np.testing.assert_allclose(agg.mean, [70, 20, -15])
    np.testing.assert_allclose(agg.std, [11, 6, 3])
    h1 = np.zeros((3, 256)); h1[:, 10] = 100
    h2 = np.zeros((3, 256)); h2[:, 20] = 1
    m = aggregate_histmatch([HistMatchStats(hist=h1), HistMatchStats(hist=h2)])
    np.testing.assert_allclose(m.hist[:, [10, 20]], 0.5)  # each slide weighs the same


@pytest.mark.parametrize("method", ["reinhard", "histmatch"])
def test_no_tissue_raises(method: str) -> None:
    with pytest.raises(FitError, match=f"{method}: only 0 tissue pixels"):
        fit_stats(method, np.full((2000, 3), 230, dtype=np.uint8))


def test_reinhard_constant_image_raises() -> None:
    with pytest.raises(FitError, match="constant Lab channel"):
        fit_reinhard(np.full((2000, 3), 120, dtype=np.uint8))
