"""The gray > 200 rule, the coarse mask, tissue fraction and slide-wide sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from wsi_norm import FitError, open_slide
from wsi_norm.tissue.mask import coarse_mask, gray, is_background, tissue_fraction, tissue_mask
from wsi_norm.tissue.sampling import sample_tissue_pixels


def test_gray_is_rounded_bt601_luma() -> None:
    rgb = np.array([[200, 200, 200], [201, 201, 201], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(gray(rgb), [200, 201, 76, 150, 29])
    np.testing.assert_array_equal(is_background(rgb), [False, True, False, False, False])


def test_threshold_is_exact_at_half() -> None:
    # all RGB triples whose luma lies within 0.01 of 200.5: round-half-up decides
    grid = np.stack(np.meshgrid(*(np.arange(150, 256),) * 3, indexing="ij"), -1).reshape(-1, 3)
    luma = grid @ np.array([0.299, 0.587, 0.114])
    near = grid[np.abs(luma - 200.5) < 0.01].astype(np.uint8)
    assert len(near) > 10
    expected = (near.astype(np.int64) @ np.array([299, 587, 114])) >= 200500
    np.testing.assert_array_equal(is_background(near), expected)
    assert is_background(np.array([[255, 255, 0]], np.uint8))[0]  # luma 225.9
    assert not is_background(np.array([[100, 150, 200]], np.uint8))[0]  # luma 140.8


@given(st.lists(st.tuples(*(st.integers(0, 255),) * 3), min_size=1, max_size=50))
def test_gray_matches_float_definition(pixels: list[tuple[int, int, int]]) -> None:
    rgb = np.array(pixels, dtype=np.uint8)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_array_equal(gray(rgb), np.floor(luma + 0.5 + 1e-9).astype(np.uint8))
    np.testing.assert_array_equal(tissue_mask(rgb), ~(np.floor(luma + 0.5 + 1e-9) > 200))


def test_mask_rejects_wrong_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        is_background(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        is_background(np.zeros((4, 4), np.uint8))


def test_tissue_fraction_equals_full_count(sample_svs: Path) -> None:
    slide = open_slide(sample_svs)
    full = slide.read_region(0, x=0, y=0, width=2220, height=2967)
    stats = tissue_fraction(slide)
    assert stats.tissue_px == int(tissue_mask(full).sum())
    assert stats.total_px == 2220 * 2967
    assert 0.25 < stats.fraction < 0.40  # the sample is skin tissue with glass around it
    assert stats.chunks_read < stats.chunks_total  # the coarse mask skipped a glass chunk


def test_coarse_mask_picks_tissue_chunks(sample_svs: Path) -> None:
    slide = open_slide(sample_svs)
    coarse = coarse_mask(slide, max_px=512)
    assert max(coarse.mask.shape) <= 512
    arr = slide.to_dask(0)
    selected = coarse.chunk_has_tissue(arr.shape[:2], (arr.chunks[0], arr.chunks[1]))
    for i in range(len(arr.chunks[0])):
        for j in range(len(arr.chunks[1])):
            has = bool(tissue_mask(arr.blocks[i, j].compute()).any())
            if has:
                assert selected[i, j], f"chunk {(i, j)} has tissue but was not selected"


def test_sampling_is_seeded_and_slide_wide(sample_svs: Path) -> None:
    slide = open_slide(sample_svs)
    a = sample_tissue_pixels(slide, n_pixels=50_000, seed=7)
    b = sample_tissue_pixels(slide, n_pixels=50_000, seed=7)
    c = sample_tissue_pixels(slide, n_pixels=50_000, seed=8)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.pixels, c.pixels)
    # 50,000 drawn, less the share left out as not stain (the real slide's green-leaning JPEG
    # noise, ~0.1 %: tissue.sampling.non_stain_absorbers)
    assert a.pixels.shape == (50_000 - round(a.non_stain_fraction * 50_000), 3)
    assert 0 <= a.non_stain_fraction < 0.005
    assert not is_background(a.pixels).any()
    # windows come from all over the tissue, not one tile: their centres span the bulk
    # (5th-95th percentile box) of the tissue, also when only a few windows are read
    full_mask = tissue_mask(slide.read_region(0, x=0, y=0, width=2220, height=2967))
    ys, xs = np.nonzero(full_mask)
    box_x = np.percentile(xs, [5, 95])
    box_y = np.percentile(ys, [5, 95])
    few = sample_tissue_pixels(slide, n_pixels=20_000, seed=7, n_windows=8)
    for sample in (a, few):
        cx = sample.windows[:, 0] + 128
        cy = sample.windows[:, 1] + 128
        assert cy.min() <= box_y[0] + 400 and cy.max() >= box_y[1] - 400, (cy, box_y)
        assert cx.min() <= box_x[0] + 600 and cx.max() >= box_x[1] - 600, (cx, box_x)
    assert len(few.windows) == 8


def test_sampling_glass_only_raises(tmp_path: Path) -> None:
    path = tmp_path / "glass.png"
    Image.fromarray(np.full((300, 400, 3), 235, np.uint8)).save(path)
    with pytest.raises(FitError, match=r"glass\.png: no tissue found"):
        sample_tissue_pixels(open_slide(path))
    speck = np.full((300, 400, 3), 235, np.uint8)
    speck[10:20, 10:20] = (150, 80, 160)
    path2 = tmp_path / "speck.png"
    Image.fromarray(speck).save(path2)
    with pytest.raises(FitError, match=r"speck\.png: only 100 tissue pixels"):
        sample_tissue_pixels(open_slide(path2))
    sample = sample_tissue_pixels(open_slide(path2), min_pixels=10)
    assert len(sample.pixels) == 100 and len(sample.blocks) == 25  # 10 x 10 px: 5 x 5 blocks of 2 x 2
    np.testing.assert_allclose(sample.blocks, [[150, 80, 160]] * 25)
    assert sample.white.source == "glass" and sample.white.rgb == (235.0, 235.0, 235.0)


# ------------------------------------------------------------------ gigapixel
@pytest.fixture(scope="session")
def giant_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 51,200 x 51,200 px generated pyramidal TIFF (mostly glass, so it builds in seconds)."""
    from wsi_norm.testing.synthetic import generate_slide

    path = tmp_path_factory.mktemp("giant") / "giant.tiff"
    generate_slide(path, width=51_200, height=51_200, seed=11, tissue_fraction=0.02, tile_px=512)
    return path


def test_gigapixel_dask_array_is_lazy(giant_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    reads: list[int] = []
    slide = open_slide(giant_slide)
    original = slide.read_region

    def counting_read(*a: Any, **k: Any) -> Any:
        reads.append(1)
        return original(*a, **k)

    monkeypatch.setattr(slide, "read_region", counting_read)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    arr = slide.to_dask(0)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert arr.shape == (51_200, 51_200, 3)
    assert arr.numblocks[:2] == (50, 50)  # 1024 = 2 x 512-px tiles
    assert reads == []  # nothing was read to build it
    assert grown_mib < 100, f"constructing the array grew peak RSS by {grown_mib:.0f} MiB"
    print(f"dask array of a 51,200^2 slide built in {elapsed * 1000:.1f} ms")
    arr.blocks[25, 25].compute(scheduler="sync")
    assert reads == [1]  # one chunk computed, one region read


def test_gigapixel_tissue_fraction_memory_is_bounded(giant_slide: Path) -> None:
    """Run ``wsi-norm info --json`` in a child process and read its peak RSS."""
    code = (
        "import json, resource, sys\n"
        "from wsi_norm.cli import main\n"
        "rc = main(['info', sys.argv[1], '--json', '--exact'])\n"
        # VmHWM: this process image's peak RSS (ru_maxrss would include the forking parent's)
        "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('RSS', hwm, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(giant_slide)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    rss_mib = int(proc.stderr.split("RSS")[-1]) / 1024
    assert facts["dimensions"] == [51_200, 51_200]
    assert 0.002 < facts["tissue_fraction"] < 0.05
    assert 0.002 < facts["tissue_fraction_level0"] < 0.05
    assert rss_mib < 1500, f"peak RSS {rss_mib:.0f} MiB for a 2.6-gigapixel slide"


def test_one_tissue_fraction_everywhere(sample_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``info``, ``mask`` and a fit (the flows' QC reports the fit's) give the same number: the
    gray <= 200 share of the coarse view; ``info --exact`` adds the level-0 count, labelled."""
    import json

    from wsi_norm.cli import main
    from wsi_norm.pipeline import fit_slide

    with open_slide(sample_svs) as slide:
        expected = coarse_mask(slide).fraction
    assert 0.25 < expected < 0.40
    assert main(["info", str(sample_svs), "--json", "--exact"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["tissue_fraction"] == expected
    assert abs(facts["tissue_fraction_level0"] - expected) < 0.03  # same rule, finer pixels
    assert main(["mask", str(sample_svs), "-o", str(tmp_path / "m.png"), "--overlay"]) == 0
    line = capsys.readouterr().out
    assert f"tissue {expected:.1%} of the slide" in line and "green tint = tissue" in line
    fit = fit_slide(sample_svs, method="macenko", n_pixels=20_000)
    assert fit.tissue_fraction == expected


def test_chunk_has_tissue_is_any_over_each_chunks_footprint() -> None:
    # against the definition, chunk by chunk: random masks, downsamples, level-0 shapes slightly
    # larger than the coarse view covers, and chunk sides from 1 px to several coarse pixels
    from wsi_norm.tissue.mask import CoarseMask

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        mask = rng.random((h, w)) < rng.choice([0.001, 0.01, 0.1, 0.5])
        dx, dy = (float(v) for v in rng.uniform(0.5, 40, 2))
        rows, cols = int(h * dy) + int(rng.integers(0, 5)), int(w * dx) + int(rng.integers(0, 5))
        side = int(rng.integers(1, 600))
        chunks = (tuple(min(side, rows - y) for y in range(0, rows, side)),
                  tuple(min(side, cols - x) for x in range(0, cols, side)))
        coarse = CoarseMask(mask=mask, level=0, downsample=(dx, dy), tissue=mask)
        got = coarse.chunk_has_tissue((rows, cols), chunks)
        row_edges, col_edges = np.cumsum((0, *chunks[0])), np.cumsum((0, *chunks[1]))
        for i in range(len(chunks[0])):
            r0 = min(h - 1, int(row_edges[i] / dy))
            r1 = max(r0 + 1, min(h, int(np.ceil(row_edges[i + 1] / dy))))
            for j in range(len(chunks[1])):
                c0 = min(w - 1, int(col_edges[j] / dx))
                c1 = max(c0 + 1, min(w, int(np.ceil(col_edges[j + 1] / dx))))
                assert got[i, j] == mask[r0:r1, c0:c1].any(), (i, j)
