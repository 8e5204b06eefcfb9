"""Tests of the Beer-Lambert slide generator (wsi_norm.testing.synthetic)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import NDArray

from wsi_norm.errors import OutputExistsError, SlideOpenError
from wsi_norm.testing import synthetic
from wsi_norm.testing.data import data_dir
from wsi_norm.testing.synthetic import (
    RUIFROK_HE,
    SITE_STAINS,
    concentrations,
    generate_slide,
    read_truth,
    render_beer_lambert,
    render_region,
    rotate_stain_matrix,
    unmix_ruifrok,
)

SHARED_DATA = data_dir()
LUMA = np.array([0.299, 0.587, 0.114])

needs_real_data = pytest.mark.skipif(
    not (SHARED_DATA / "slides" / "CMU-1-Small-Region.svs").is_file(),
    reason=f"real H&E data not found under {SHARED_DATA}",
)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(min(1.0, cos))))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _gray(rgb: np.ndarray) -> NDArray[np.float64]:
    gray: NDArray[np.float64] = rgb.astype(np.float64) @ LUMA
    return gray


# ---------------------------------------------------------------- pure maps and stain sets


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (7, 2), elements=st.floats(0.0, 1.25, width=32)))
def test_unmix_inverts_render_within_8bit_rounding(conc: np.ndarray) -> None:
    for matrix in (RUIFROK_HE, SITE_STAINS["site-b"]):
        rgb = render_beer_lambert(conc, matrix, io=240.0)
        back = unmix_ruifrok(rgb, io=240.0, stain_matrix=matrix)
        # half a grey level at I >= 240 * exp(-2.1) ~ 29 is < 0.02 OD; pinv amplifies it < 4x
        np.testing.assert_allclose(back, conc, atol=0.08)


def test_render_glass_is_io_and_dtype() -> None:
    out = render_beer_lambert(np.zeros((3, 4, 2)), RUIFROK_HE, io=231.4)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    assert np.all(out == 231)
    dark = render_beer_lambert(np.full((1, 2), 50.0), RUIFROK_HE)
    assert dark.tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        render_beer_lambert(np.zeros((4, 3)), RUIFROK_HE)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        render_beer_lambert(np.zeros((4, 2)), np.eye(3))


def test_site_stains_are_distinct_unit_non_negative() -> None:
    assert set(SITE_STAINS) >= {"site-a", "site-b", "site-c"}
    np.testing.assert_array_equal(SITE_STAINS["site-a"], RUIFROK_HE)
    for name, m in SITE_STAINS.items():
        assert m.shape == (2, 3), name
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-12)
        assert np.all(m >= 0), name
    b, c = SITE_STAINS["site-b"], SITE_STAINS["site-c"]
    assert _angle_deg(b[1], RUIFROK_HE[1]) == pytest.approx(10.0, abs=1e-6)
    assert _angle_deg(b[0], RUIFROK_HE[0]) == pytest.approx(5.0, abs=1e-6)
    assert b[1, 0] < 0.08  # the small-red-OD eosin that Macenko's beta rule struggles with
    assert _angle_deg(c[0], RUIFROK_HE[0]) == pytest.approx(6.0, abs=1e-6)
    assert _angle_deg(c[1], RUIFROK_HE[1]) == pytest.approx(6.0, abs=1e-6)
    assert _angle_deg(b[1], c[1]) > 10.0


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 20.0), st.floats(0.0, 20.0), st.integers(0, 2**31))
def test_rotate_stain_matrix_exact_angles(h_deg: float, e_deg: float, seed: int) -> None:
    m = rotate_stain_matrix(RUIFROK_HE, h_deg, e_deg, seed=seed)
    assert _angle_deg(m[0], RUIFROK_HE[0]) == pytest.approx(h_deg, abs=1e-4)
    assert _angle_deg(m[1], RUIFROK_HE[1]) == pytest.approx(e_deg, abs=1e-4)
    assert np.all(m >= 0)
    np.testing.assert_array_equal(m, rotate_stain_matrix(RUIFROK_HE, h_deg, e_deg, seed=seed))


# ---------------------------------------------------------------- written slides


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticTruth:
    path = tmp_path_factory.mktemp("synthetic") / "jpeg.tif"
    return generate_slide(path, width=3000, height=2500, tile_px=256, seed=3, mpp=0.3)


@pytest.fixture(scope="module")
def deflate_slide(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticTruth:
    path = tmp_path_factory.mktemp("synthetic") / "deflate.tif"
    return generate_slide(
        path, width=1500, height=1100, tile_px=128, seed=5, compression="deflate", min_level_px=400
    )


@needs_real_data
def test_jpeg_slide_opens_in_openslide_and_tiffslide(jpeg_slide: synthetic.SyntheticTruth) -> None:
    assert jpeg_slide.texture_source == "real"
    expected = ((3000, 2500), (1500, 1250), (750, 625))
    assert jpeg_slide.level_dimensions == expected
    with openslide.OpenSlide(jpeg_slide.path) as osr, tiffslide.TiffSlide(jpeg_slide.path) as tsr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_dimensions == expected
        assert tsr.level_dimensions == expected
        assert osr.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.3, rel=1e-6)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.3, rel=1e-6)
        assert float(tsr.properties["tiffslide.mpp-x"]) == pytest.approx(0.3, rel=1e-6)
        assert float(tsr.properties["tiffslide.mpp-y"]) == pytest.approx(0.3, rel=1e-6)
        region = (700, 500), (900, 800)
        from_os = np.asarray(osr.read_region(region[0], 0, region[1]).convert("RGB"))
        from_ts = tsr.read_region(region[0], 0, region[1], as_array=True)
        np.testing.assert_array_equal(from_os, from_ts)
        whole = tsr.read_region((0, 0), 0, (3000, 2500), as_array=True)
        level1 = tsr.read_region((0, 0), 1, (1500, 1250), as_array=True)
    truth = render_region(jpeg_slide, x=0, y=0, width=3000, height=2500)
    tissue = _gray(truth) <= 200
    assert 0.25 < tissue.mean() < 0.5
    assert _psnr(whole, truth) >= 35.0
    assert _psnr(whole[tissue], truth[tissue]) >= 30.0
    # tiles without tissue (their bytes are reused) decode to io exactly
    glass_tiles = 0
    for ty in range(0, 2500, 256):
        for tx in range(0, 3000, 256):
            if np.all(truth[ty : ty + 256, tx : tx + 256] == 240):
                glass_tiles += 1
                assert np.all(whole[ty : ty + 256, tx : tx + 256] == 240)
    assert glass_tiles >= 20
    # level 1 packs twice the detail per pixel: JPEG loses a little more
    assert (
        _psnr(level1, render_region(jpeg_slide, x=0, y=0, width=1500, height=1250, level=1)) >= 32.0
    )


def test_truth_round_trips_through_the_tiff(jpeg_slide: synthetic.SyntheticTruth) -> None:
    back = read_truth(jpeg_slide.path)
    assert back.to_dict() == jpeg_slide.to_dict()
    np.testing.assert_array_equal(back.stain_matrix, RUIFROK_HE)
    with tifffile.TiffFile(jpeg_slide.path) as tif:
        assert tif.is_bigtiff
        assert [p.shape for p in tif.pages] == [(2500, 3000, 3), (1250, 1500, 3), (625, 750, 3)]
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
        assert len(pages) == 3
        assert all(p.tilewidth == 256 and p.compression == 7 for p in pages)  # 7: JPEG
        assert json.loads(tif.pages.first.description)["seed"] == 3


def test_deflate_levels_equal_render_region_exactly(
    deflate_slide: synthetic.SyntheticTruth,
) -> None:
    assert deflate_slide.level_dimensions == ((1500, 1100), (750, 550), (375, 275))
    with tifffile.TiffFile(deflate_slide.path) as tif:
        levels = [page.asarray() for page in tif.pages]
    for level, data in enumerate(levels):
        w, h = deflate_slide.level_dimensions[level]
        np.testing.assert_array_equal(
            data, render_region(deflate_slide, x=0, y=0, width=w, height=h, level=level)
        )
    # lower levels are rendered from the texture's mips: close to a 2x2 mean of the level above
    for level in (1, 2):
        above = levels[level - 1].astype(np.float64)
        h, w = (above.shape[0] // 2) * 2, (above.shape[1] // 2) * 2
        mean = above[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        diff = np.abs(mean - levels[level][: h // 2, : w // 2])
        assert diff.mean() < 3.0
        assert np.percentile(diff, 99) < 25.0


def test_same_seed_same_bytes_other_seed_other_slide(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"width": 1100, "height": 700, "tile_px": 256, "tissue_fraction": 0.5}
    a = generate_slide(tmp_path / "a.tif", seed=11, **kwargs)
    b = generate_slide(tmp_path / "b.tif", seed=11, workers=1, **kwargs)
    c = generate_slide(tmp_path / "c.tif", seed=12, **kwargs)
    assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    pa = tifffile.imread(a.path)
    pc = tifffile.imread(c.path)
    assert pa.shape == pc.shape == (700, 1100, 3)
    assert np.mean(pa != pc) > 0.2
    assert not list(tmp_path.glob("*.partial"))


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="x.tif: exists"):
        generate_slide(path, width=256, height=256)
    assert path.read_bytes() == b"keep me"
    truth = generate_slide(path, width=256, height=256, tile_px=128, overwrite=True)
    assert truth.level_dimensions == ((256, 256),)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.dimensions == (256, 256)


def test_invalid_parameters_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        generate_slide(tmp_path / "t.tif", width=512, height=512, tile_px=100)
    with pytest.raises(ValueError, match="tissue_fraction"):
        generate_slide(tmp_path / "t.tif", width=512, height=512, tissue_fraction=1.5)
    with pytest.raises(ValueError, match="compression"):
        generate_slide(tmp_path / "t.tif", width=512, height=512, compression="lzw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not inside level 0"):
        concentrations(synthetic.SyntheticParams(512, 512), x=500, y=0, width=20, height=10)
    assert not list(tmp_path.iterdir())


def test_read_truth_rejects_a_plain_tiff(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(SlideOpenError, match="plain.tif: not a readable wsi-norm synthetic slide"):
        read_truth(path)


# ---------------------------------------------------------------- truth without the file


@needs_real_data
def test_registered_pair_shares_concentrations_and_tissue_fraction() -> None:
    a = synthetic.SyntheticParams(2400, 2000, seed=7, tissue_fraction=0.35, texture="real")
    b = synthetic.SyntheticParams(
        2400, 2000, seed=7, stain_matrix=SITE_STAINS["site-b"], tissue_fraction=0.35
    )
    ca = concentrations(a, x=0, y=0, width=2400, height=2000)
    cb = concentrations(b, x=0, y=0, width=2400, height=2000)
    np.testing.assert_array_equal(ca, cb)
    assert ca.dtype == np.float32 and ca.shape == (2000, 2400, 2) and ca.min() >= 0
    rgb_a = render_region(a, x=0, y=0, width=2400, height=2000)
    rgb_b = render_region(a, x=0, y=0, width=2400, height=2000, stain_matrix=SITE_STAINS["site-b"])
    np.testing.assert_array_equal(rgb_b, render_region(b, x=0, y=0, width=2400, height=2000))
    tissue = _gray(rgb_a) <= 200
    assert abs(tissue.mean() - 0.35) <= 0.10
    assert np.mean(np.any(rgb_a[tissue] != rgb_b[tissue], axis=-1)) > 0.9
    glass = ca.sum(axis=-1) == 0
    assert np.all(rgb_a[glass] == 240) and np.all(rgb_b[glass] == 240)


@pytest.mark.parametrize("fraction", [0.15, 0.5])
def test_tissue_fraction_is_met(fraction: float) -> None:
    params = synthetic.SyntheticParams(3000, 2000, seed=1, tissue_fraction=fraction)
    level = 2  # the mask is the same field on every level; level 2 is 16x cheaper
    rgb = render_region(params, x=0, y=0, width=750, height=500, level=level)
    assert abs(float(np.mean(_gray(rgb) <= 200)) - fraction) <= 0.10


def test_regions_do_not_depend_on_block_size() -> None:
    params = synthetic.SyntheticParams(2000, 1500, seed=2, tissue_fraction=0.9)
    whole = concentrations(params, x=100, y=200, width=777, height=555)
    stitched = np.zeros_like(whole)
    for y0 in range(0, 555, 200):
        for x0 in range(0, 777, 300):
            h, w = min(200, 555 - y0), min(300, 777 - x0)
            stitched[y0 : y0 + h, x0 : x0 + w] = concentrations(
                params, x=100 + x0, y=200 + y0, width=w, height=h
            )
    np.testing.assert_array_equal(whole, stitched)
    # no block artefact at the 256 px texture cells: pixel steps across a cell border are no
    # larger than steps elsewhere
    tissue = whole[..., 0] > 0
    step = np.abs(np.diff(whole[..., 0], axis=1))[tissue[:, 1:] & tissue[:, :-1]]
    border_cols = np.array([c - 100 - 1 for c in range(256, 877, 256) if 100 < c < 877])
    at_border = np.abs(np.diff(whole[..., 0], axis=1))[:, border_cols][tissue[:, border_cols]]
    assert at_border.mean() < 2.0 * step.mean()


def test_conc_scale_scales_each_stain() -> None:
    base = synthetic.SyntheticParams(1024, 1024, seed=4, tissue_fraction=0.8)
    scaled = synthetic.SyntheticParams(
        1024, 1024, seed=4, tissue_fraction=0.8, conc_scale=(1.5, 0.5)
    )
    a = concentrations(base, x=256, y=256, width=400, height=300)
    b = concentrations(scaled, x=256, y=256, width=400, height=300)
    np.testing.assert_allclose(b[..., 0], 1.5 * a[..., 0], rtol=1e-6)
    np.testing.assert_allclose(b[..., 1], 0.5 * a[..., 1], rtol=1e-6)
    assert a[..., 0].max() > 0.3


def test_one_seed_one_slide_without_real_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the real data the default (real texture) is an error naming the folder and the way
    out, never a different slide; ``texture="procedural"`` needs no data."""
    monkeypatch.setenv("WSI_NORM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SlideOpenError, match=r"nowhere: real texture files .* texture='procedural'"):
        generate_slide(tmp_path / "r.tif", width=256, height=256, tile_px=256)
    assert not (tmp_path / "r.tif").exists()
    truth = generate_slide(
        tmp_path / "p.tif", width=1024, height=768, tile_px=256, tissue_fraction=0.6,
        texture="procedural",
    )
    assert truth.texture_source == "procedural" and truth.texture_files == ()
    rgb = tifffile.imread(truth.path)
    tissue = _gray(rgb) <= 200
    assert 0.4 < tissue.mean() < 0.75
    conc = concentrations(truth, x=0, y=0, width=1024, height=768)
    assert conc[..., 0].max() > 0.7  # nuclei
    assert np.median(conc[..., 1][conc[..., 1] > 0]) > 0.2  # stroma
    with pytest.raises(SlideOpenError, match="real texture files"):
        concentrations(
            synthetic.SyntheticParams(64, 64, texture="real", seed=99), x=0, y=0, width=8, height=8
        )


def test_procedural_texture_is_the_same_with_or_without_real_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def generate(path: Path) -> str:
        return generate_slide(
            path, width=512, height=512, tile_px=256, seed=3, texture="procedural", compression="deflate"
        ).path

    here = tifffile.imread(generate(tmp_path / "a.tif"))
    monkeypatch.setenv("WSI_NORM_DATA", str(tmp_path / "nowhere"))
    elsewhere = tifffile.imread(generate(tmp_path / "b.tif"))
    np.testing.assert_array_equal(here, elsewhere)


# ---------------------------------------------------------------- streaming a gigapixel slide

_STREAM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from wsi_norm.testing.synthetic import generate_slide
    start = time.perf_counter()
    truth = generate_slide(sys.argv[1], width=50_000, height=50_000, tissue_fraction=0.002, seed=1)
    # VmHWM: peak RSS of this process image (ru_maxrss would include the forking parent's)
    peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(time.perf_counter() - start, len(truth.level_dimensions), peak_kib)
    """
)


def test_gigapixel_slide_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "giga.tif"
    done = subprocess.run(
        [sys.executable, "-c", _STREAM_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seconds, levels, peak_kib = done.stdout.split()
    assert int(levels) == 7
    assert int(peak_kib) < 1.5 * 1024 * 1024  # VmHWM is in KiB
    print(f"50,000^2 mostly-glass slide: {float(seconds):.1f} s, peak RSS {int(peak_kib) / 1024:.0f} MiB")
    with openslide.OpenSlide(path) as slide:
        assert slide.dimensions == (50_000, 50_000)
        assert slide.level_count == 7
        assert slide.level_dimensions[-1] == (782, 782)
        corner = np.asarray(slide.read_region((49_000, 49_000), 0, (1000, 1000)).convert("RGB"))
    assert np.all(corner == 240)
