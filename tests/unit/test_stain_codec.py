"""The codec-aware fit: the slide's JPEG coding read from the file, simulated exactly, and its
bias removed from the stain vectors on slides whose truth is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.pipeline import fit_slide
from wsi_norm.slide import open_slide
from wsi_norm.stain.codec import code_like
from wsi_norm.testing.stain_cases import draw_case, render, write_jpeg_tiff


@pytest.mark.parametrize(("quality", "subsampling", "name"), [(85, "420", "4:2:0"), (72, "444", "4:4:4")])
def test_the_coding_is_read_from_the_tiles_and_simulated_bit_for_bit(
        tmp_path: Path, quality: int, subsampling: str, name: str) -> None:
    """Re-coding the original pixels with the coding read back from the file gives exactly the
    pixels the slide decodes to: the simulation is the scanner's coding, not an approximation."""
    rgb = render(draw_case(0).conc, draw_case(0).source)
    path = tmp_path / "s.tiff"
    write_jpeg_tiff(rgb, path, quality=quality, subsampling=subsampling)  # type: ignore[arg-type]
    slide = open_slide(path)
    coding = slide.jpeg_coding()
    assert coding is not None and coding.subsampling == name and not coding.rgb
    assert len(coding.qtables) == 2 and all(len(t) == 64 for t in coding.qtables)
    tile = slide.read_region(0, x=256, y=512, width=256, height=256)
    assert np.array_equal(code_like(rgb[512:768, 256:512], coding), tile)


def test_aperio_rgb_jpeg_is_recognised(sample_svs: Path) -> None:
    """The real Aperio sample stores RGB JPEG (no colour transform), 4:4:4, one table (Q=30):
    re-coding its decoded pixels with that coding changes them by almost nothing (a JPEG
    re-coded with its own tables is nearly a fixed point)."""
    slide = open_slide(sample_svs)
    coding = slide.jpeg_coding()
    assert coding is not None and coding.rgb and coding.subsampling == "4:4:4" and len(coding.qtables) == 1
    tile = slide.read_region(0, x=480, y=480, width=480, height=480)
    assert np.abs(code_like(tile, coding).astype(np.int16) - tile).mean() < 0.01


def test_plain_images_and_lossless_tiffs_have_no_coding_and_keep_their_fit(tmp_path: Path) -> None:
    """Without JPEG tiles there is nothing to simulate: the fit is the plain one, and its
    record says why."""
    import tifffile
    from PIL import Image

    rgb = render(draw_case(0).conc, draw_case(0).source)
    png, lossless = tmp_path / "s.png", tmp_path / "s.tiff"
    Image.fromarray(rgb).save(png)
    tifffile.imwrite(lossless, rgb, tile=(256, 256), compression="zlib", photometric="rgb")
    for path in (png, lossless):
        assert open_slide(path).jpeg_coding() is None
        on = fit_slide(path, method="macenko", params={"codec_correction": True}, n_pixels=100_000)
        off = fit_slide(path, method="macenko", n_pixels=100_000)  # the default: off
        assert np.array_equal(on.stats.stain_matrix, off.stats.stain_matrix)
        assert on.codec is not None and on.codec["applied"] is False and "unknown" in on.codec["reason"]
        assert off.codec == {"applied": False, "reason": "turned off (codec_correction: false)"}
        assert on.to_dict()["codec_correction"] == on.codec


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_correction_moves_jpeg_fits_towards_the_truth(tmp_path: Path, method: str) -> None:
    """Six seeded 4:2:0 cases at q >= 80 (the benchmark's hardest group for hematoxylin),
    written as scanners write slides: the median hematoxylin error falls by at least a third,
    and no case's worse stain gets more than 1 deg worse (bench/codec_fit.py measures all 204
    JPEG cases and whole slides)."""
    off: list[np.ndarray] = []
    on: list[np.ndarray] = []
    index = 0
    while len(off) < 6:
        case = draw_case(index)
        index += 1
        if case.quality is None or case.quality < 80 or case.subsampling != "420":
            continue
        path = tmp_path / f"case{case.index}.tiff"
        write_jpeg_tiff(render(case.conc, case.source, residual=case.residual), path,
                        quality=case.quality, subsampling=case.subsampling)
        for on_off, errors in ((False, off), (True, on)):
            fit = fit_slide(path, method=method, params={"codec_correction": on_off}, n_pixels=200_000)
            errors.append(stain_matrix_angles_deg(fit.stats.stain_matrix, case.source.stain_matrix))
            if on_off:
                assert fit.codec is not None and fit.codec["applied"], fit.codec
                assert fit.codec["coding"]["subsampling"] == "4:2:0"
    before, after = np.array(off), np.array(on)
    assert np.median(after[:, 0]) <= np.median(before[:, 0]) * 2 / 3, (before, after)
    assert np.all(after.max(axis=1) <= before.max(axis=1) + 1.0), (before, after)


@pytest.mark.parametrize("quality", [20, 50, 75, 90, 97])
def test_the_quality_setting_is_read_back_from_the_tables(tmp_path: Path, quality: int) -> None:
    """libjpeg's quality setting is read back from the luminance table it scaled; a table no
    setting makes (libjpeg's own at quality 50, entries reversed) has none."""
    from wsi_norm.tiffjpeg import JpegCoding, _ijg_luma

    rgb = render(draw_case(1).conc, draw_case(1).source)[:512, :512]
    path = tmp_path / "q.tiff"
    write_jpeg_tiff(rgb, path, quality=quality, subsampling="420")
    coding = open_slide(path).jpeg_coding()
    assert coding is not None and coding.quality == quality
    assert JpegCoding(qtables=(_ijg_luma(quality),), subsampling="4:4:4", rgb=False).quality == quality
    assert JpegCoding(qtables=(_ijg_luma(50)[::-1],), subsampling="4:4:4", rgb=False).quality is None


def test_the_aperio_samples_quality_is_the_one_its_description_records(sample_svs: Path) -> None:
    """The real sample's ImageDescription says "JPEG/RGB Q=30"; its table says the same, and
    `wsi-norm info` shows it."""
    import re
    import subprocess
    import sys

    slide = open_slide(sample_svs)
    recorded = re.search(r"Q=(\d+)", slide.properties["tiff.ImageDescription"])
    coding = slide.jpeg_coding()
    assert recorded is not None and coding is not None and coding.quality == int(recorded.group(1)) == 30
    info = subprocess.run([sys.executable, "-m", "wsi_norm.cli", "info", str(sample_svs), "--no-tissue"],
                          capture_output=True, text=True, check=True).stdout
    assert "coding     JPEG tiles: RGB 4:4:4, quality 30 (libjpeg's tables)" in info
