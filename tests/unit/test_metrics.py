"""PSNR / SSIM against scikit-image; masks; stain angles."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_stain_macenko import load_he

from wsi_norm.metrics import psnr, ssim, stain_angle_deg, stain_matrix_angles_deg


def _pair() -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    a = load_he("source")[:200, :240]
    rng = np.random.default_rng(0)
    b = np.clip(a.astype(int) + rng.integers(-15, 16, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_ssim_psnr_match_skimage() -> None:
    a, b = _pair()
    # scikit-image's metrics are unannotated (no-untyped-call)
    ref = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,  # type: ignore[no-untyped-call]
                                use_sample_covariance=False, data_range=255)
    assert abs(ssim(a, b) - ref) < 1e-9
    assert abs(psnr(a, b) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-9  # type: ignore[no-untyped-call]


def test_masked_metrics_use_only_masked_pixels() -> None:
    a, b = _pair()
    mask = np.zeros(a.shape[:2], bool)
    mask[:, :100] = True
    c = b.copy()
    c[:, 100:] = 0  # damage outside the mask only
    assert psnr(a, c, mask=mask) == pytest.approx(psnr(a[:, :100], b[:, :100]))
    assert ssim(a, c, mask=mask) > ssim(a, c) + 0.05
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="selects no pixel"):
        psnr(a, b, mask=np.zeros(a.shape[:2], bool))


def test_stain_angles() -> None:
    assert stain_angle_deg([1, 0, 0], [0, 1, 0]) == pytest.approx(90.0)
    assert stain_angle_deg([1, 1, 0], [2, 2, 0]) == pytest.approx(0.0, abs=1e-6)
    assert stain_angle_deg([1, 0, 0], [1, 1, 0]) == pytest.approx(45.0)
    np.testing.assert_allclose(stain_matrix_angles_deg([[1, 0, 0], [0, 1, 0]], [[1, 1, 0], [0, 1, 0]]), [45.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        stain_matrix_angles_deg([[1, 0, 0]], [[1, 0, 0], [0, 1, 0]])
