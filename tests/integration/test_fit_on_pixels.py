"""``fit_on="pixels"``: stain vectors read from the single sampled pixels, for lossless slides.

The 2 x 2 block means the default fits on average out JPEG's chroma noise, and on a lossless
slide they also average away the small pure-stain regions that define a stain's direction.
The cases are the fidelity benchmark's (``wsi_norm.testing.stain_cases``): lossless generated
slides with real texture whose default fit is 2.6-7.1 deg off in hematoxylin
(BENCHMARKS.md, "Pixels or blocks").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.pipeline import fit_slide
from wsi_norm.stain.base import StainParams
from wsi_norm.testing.stain_cases import draw_case


@pytest.mark.parametrize("index", [55, 97, 168])
@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_pixels_recover_the_stains_of_a_lossless_slide(tmp_path: Path, index: int, method: str) -> None:
    case = draw_case(index, size=1024)
    assert case.quality is None and case.texture == "gen-real"  # the cases this test was written on
    path = tmp_path / "lossless.png"
    Image.fromarray(case.source_rgb()).save(path)
    errors = {}
    for fit_on in ("blocks", "pixels"):
        fit = fit_slide(path, method=method, params={"fit_on": fit_on}, n_pixels=200_000)
        assert fit.params["fit_on"] == fit_on  # recorded with the fit (and so in templates and provenance)
        errors[fit_on] = stain_matrix_angles_deg(fit.stats.stain_matrix, case.source.stain_matrix)
    # Macenko reads the extreme angles, which the pure pixels hold; Vahadane's subsampled
    # dictionary learning is noisier (1.3-1.9 deg here against 9.2 deg on blocks)
    assert errors["pixels"].max() <= (1.0 if method == "macenko" else 2.0), errors
    assert errors["pixels"].max() < errors["blocks"].max(), errors


def test_pixels_and_blocks_fit_the_same_sample(tmp_path: Path) -> None:
    case = draw_case(55, size=512)
    path = tmp_path / "lossless.png"
    Image.fromarray(case.source_rgb()).save(path)
    blocks = fit_slide(path, method="macenko", n_pixels=50_000)
    pixels = fit_slide(path, method="macenko", params={"fit_on": "pixels"}, n_pixels=50_000)
    assert blocks.pixels is not None and pixels.pixels is not None
    assert blocks.blocks is not None and pixels.blocks is not None
    assert np.array_equal(blocks.pixels, pixels.pixels) and np.array_equal(blocks.blocks, pixels.blocks)
    assert not np.array_equal(blocks.stats.stain_matrix, pixels.stats.stain_matrix)
    assert blocks.params["fit_on"] == "blocks"
    # the QC gate's colour reference stays the default estimate (on blocks) for both
    assert np.array_equal(np.asarray(blocks.reference.stain_matrix), np.asarray(pixels.reference.stain_matrix))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fit_on": "pixel"}, r"fit_on must be 'blocks' or 'pixels', got 'pixel'"),
        ({"fit_on": "pixels", "codec_correction": True}, r"codec_correction models a JPEG slide's 2 x 2 block fit"),
    ],
)
def test_bad_fit_on_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StainParams(**kwargs)  # type: ignore[arg-type]
