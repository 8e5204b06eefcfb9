"""Image-similarity and stain-vector metrics: PSNR, SSIM (optionally over a tissue mask), stain angles.

The StainNet paper (Kang et al., Front. Med. 2021) reports "SSIM GT" and
"PSNR GT" (normalised image vs. the ground-truth target image) and "SSIM
Source" (normalised image vs. the source image, how much structure survives).
Here all three are computed on RGB with :func:`ssim` / :func:`psnr`
(SSIM averaged over the three channels, as ``skimage`` does with
``channel_axis=-1``); the paper's own code computes SSIM the same way on RGB.
The function names map as: SSIM GT = ``ssim(norm, target)``,
PSNR GT = ``psnr(norm, target)``, SSIM Source = ``ssim(norm, source)``.

All functions are pure and thread-safe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["psnr", "ssim", "stain_angle_deg", "stain_matrix_angles_deg"]

_SIGMA = 1.5
_TRUNCATE = 3.5  # skimage: window of 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 pixels


def _pair(a: Any, b: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = np.asarray(a)
    y = np.asarray(b)
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {x.shape} and {y.shape}")
    return x.astype(np.float64), y.astype(np.float64)


def _mask_for(mask: Any, shape: tuple[int, ...]) -> NDArray[np.bool_] | None:
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape[:2]:
        raise ValueError(f"mask must have shape {shape[:2]}, got {m.shape}")
    if not m.any():
        raise ValueError("mask selects no pixel")
    return m


def psnr(a: Any, b: Any, *, mask: Any = None, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB.

    Parameters
    ----------
    a, b : (H, W, C) or (H, W) arrays of the same shape (uint8 or float)
    mask : (H, W) bool, keyword-only
        Only these pixels count (e.g. tissue); all pixels when None.
    data_range : float, keyword-only
        Peak value, 255 for 8-bit images.

    Returns
    -------
    float, dB; ``inf`` for identical inputs
    """
    x, y = _pair(a, b)
    m = _mask_for(mask, x.shape)
    diff = (x - y) ** 2
    mse = float(diff[m].mean() if m is not None else diff.mean())
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def _ssim_map(x: NDArray[np.float64], y: NDArray[np.float64], data_range: float) -> NDArray[np.float64]:
    """Per-pixel SSIM of one channel with a Gaussian window (sigma 1.5, population covariance)."""
    def blur(z: NDArray[np.float64]) -> NDArray[np.float64]:
        from scipy.ndimage import gaussian_filter  # only when SSIM is asked for

        return np.asarray(gaussian_filter(z, sigma=_SIGMA, truncate=_TRUNCATE, mode="reflect"))

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(a: Any, b: Any, *, mask: Any = None, data_range: float = 255.0) -> float:
    """Structural similarity, Gaussian window, as scikit-image's ``structural_similarity``.

    Equivalent to ``structural_similarity(a, b, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255)``: the mean of the SSIM map over pixels at least 5 pixels
    from the border, averaged over channels.  With ``mask``, the mean is taken
    over the masked pixels (the map itself still uses every pixel's window).

    Parameters
    ----------
    a, b : (H, W, C) or (H, W), same shape, H and W >= 11
    mask : (H, W) bool, keyword-only
    data_range : float, keyword-only

    Returns
    -------
    float in [-1, 1]
    """
    x, y = _pair(a, b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    if x.ndim != 3 or min(x.shape[:2]) < 11:
        raise ValueError(f"ssim needs (H, W[, C]) images of at least 11 x 11, got {x.shape}")
    m = _mask_for(mask, x.shape)
    pad = (2 * int(_TRUNCATE * _SIGMA + 0.5) + 1 - 1) // 2
    values = []
    for c in range(x.shape[2]):
        smap = _ssim_map(x[..., c], y[..., c], data_range)
        if m is None:
            values.append(float(smap[pad:-pad, pad:-pad].mean()))
        else:
            values.append(float(smap[m].mean()))
    return float(np.mean(values))


def stain_angle_deg(v1: Any, v2: Any) -> float:
    """Angle in degrees between two stain vectors (sign-insensitive, in [0, 90]).

    Computed as ``atan2(|a x b|, |a . b|)``, accurate also for nearly parallel vectors
    (where ``arccos`` of the cosine loses half the digits).

    Parameters
    ----------
    v1, v2 : (3,) float, OD directions of any length
    """
    return float(stain_matrix_angles_deg(np.reshape(v1, (1, 3)), np.reshape(v2, (1, 3)))[0])


def stain_matrix_angles_deg(m1: Any, m2: Any) -> NDArray[np.float64]:
    """Row-wise angles in degrees between two (K, 3) stain matrices (row k against row k)."""
    a = np.asarray(m1, dtype=np.float64)
    b = np.asarray(m2, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"stain matrices must both be (K, 3), got {a.shape} and {b.shape}")
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    dot = np.abs(np.sum(a * b, axis=-1))
    angles: NDArray[np.float64] = np.degrees(np.arctan2(cross, dot))
    return angles
