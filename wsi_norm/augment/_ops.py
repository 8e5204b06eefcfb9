"""The augmentations' arithmetic, written once for numpy and torch (planar, explicit parameters).

Every function here takes the three colour planes of a batch as intensities ``v`` in [0, 255]
(float, any shape ``(N, H, W)``) and per-sample parameters shaped ``(N, 1, 1)``, and returns
three planes. No random draws and no layout: :mod:`wsi_norm.augment.numpy_ops` (channels last)
and :mod:`wsi_norm.augment.transforms` (torch, channels first) draw the parameters and split the
planes, so the two backends compute one function.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from wsi_norm.color import array_namespace

__all__ = [
    "GLASS_BAND",
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "SKIMAGE_HED_UNIT",
    "brightness_contrast_planes",
    "channel_scale_planes",
    "check_image",
    "check_range",
    "hed_lookup",
    "hed_planes",
    "hed_tables",
    "tissue_blend",
]

_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_D = np.array([0.27, 0.57, 0.78])
RGB_FROM_HED: np.ndarray = np.stack([v / np.linalg.norm(v) for v in (_H, _E, _D)])
"""(3, 3) float64: Ruifrok & Johnston's hematoxylin, eosin and DAB optical-density rows (unit norm)."""
HED_FROM_RGB: np.ndarray = np.linalg.inv(RGB_FROM_HED)
"""(3, 3) float64: ``s = od @ HED_FROM_RGB`` unmixes optical density into H, E, D amounts."""
RGB_FROM_HED.setflags(write=False)
HED_FROM_RGB.setflags(write=False)

SKIMAGE_HED_UNIT = math.log(1e6)
"""scikit-image's ``rgb2hed`` divides natural-log optical density by ln(10^6) (~13.8): one unit
there is 13.8 OD here, so its ``beta = 0.05`` is 0.69 OD (``units="skimage"`` converts)."""

GLASS_BAND = (200.0, 224.0)
"""Luma band (0-255) over which ``tissue_only`` hands over from the augmented colour (below) to the
untouched input (above): a smoothstep, so no switch at the gray > 200 glass rule."""


def check_range(name: str, value: tuple[float, float], *, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """``(low, high)`` as floats, finite, ``low <= high`` and inside ``[lo, hi]``; else ValueError."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got ({low}, {high})")
    if low > high:
        raise ValueError(f"{name}: low > high ({low} > {high})")
    if low < lo or high > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got ({low}, {high})")
    return low, high


def check_image(x: Any, *, channel_axis: int, name: str = "image") -> None:
    """Raise ValueError unless ``x`` is an RGB image or batch: 3 channels on ``channel_axis``,
    uint8 or float, floats finite and in [0, 1]."""
    xp = array_namespace(x)
    shape = tuple(x.shape)
    if len(shape) not in (3, 4) or shape[channel_axis] != 3:
        layout = "(..., H, W, 3)" if channel_axis == -1 else "(..., 3, H, W)"
        raise ValueError(f"{name} must be {layout} RGB with 3 channels, got shape {shape}")
    if xp is np:
        kind = x.dtype.kind
        if kind == "u" and x.dtype == np.uint8:
            return
        if kind != "f":
            raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {x.dtype}")
        if x.size and not np.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(f"{name}: float input must lie in [0, 1], got [{float(x.min()):g}, {float(x.max()):g}]")
        return
    if x.dtype == xp.uint8:
        return
    if not x.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if x.numel():
        low, high = xp.aminmax(x.float())
        low_v, high_v = float(low), float(high)
        if not (math.isfinite(low_v) and math.isfinite(high_v)):
            raise ValueError(f"{name} holds NaN or infinite values")
        if low_v < 0.0 or high_v > 1.0:
            raise ValueError(f"{name}: float input must lie in [0, 1], got [{low_v:g}, {high_v:g}]")


def hed_planes(xp: ModuleType, planes: list[Any], alpha: list[Any], beta_od: list[Any]) -> list[Any]:
    """HED jitter (Tellez et al. 2018): ``s = od @ HED_FROM_RGB``; ``s'_c = alpha_c s_c + beta_c``;
    ``od' = s' @ RGB_FROM_HED``; back to intensities.

    Negative stain amounts are kept (scikit-image's ``rgb2hed`` clamps them, which moves pixels even
    at the identity). The two linear steps fold into one 3 x 3 matrix per sample,
    ``od' = od @ (HED_FROM_RGB diag(alpha) RGB_FROM_HED) + beta @ RGB_FROM_HED``.

    Parameters
    ----------
    planes : three (N, H, W) float, intensities in [0, 255]
    alpha : three (N, 1, 1) float, scale per stain (H, E, D)
    beta_od : three (N, 1, 1) float, shift per stain, in optical density (natural log)
    """
    n = planes[0].shape[0]
    like = planes[0]
    if xp is np:
        a = np.concatenate([np.asarray(x).reshape(n, 1) for x in alpha], 1).astype(like.dtype)  # (N, 3)
        b = np.concatenate([np.asarray(x).reshape(n, 1) for x in beta_od], 1).astype(like.dtype)
    else:
        a = xp.cat([x.reshape(n, 1) for x in alpha], 1).to(like.dtype)
        b = xp.cat([x.reshape(n, 1) for x in beta_od], 1).to(like.dtype)
    rgb = _constant(xp, RGB_FROM_HED, a)
    m = (_constant(xp, HED_FROM_RGB, a)[None, :, :] * a[:, None, :]) @ rgb  # (N, 3, 3)
    # With L = ln(v + 1): od = ln 256 - L, so v'_j + 1 = exp(sum_i L_i m_ij + c_j) with
    # c_j = ln 256 (1 - sum_i m_ij) - (beta @ RGB_FROM_HED)_j: one log1p per input channel, one
    # exponential per output channel, the rest in place.
    c = math.log(256.0) * (1.0 - m.sum(axis=1)) - b @ rgb  # (N, 3)
    logs = [xp.log1p(v) for v in planes]
    out = []
    for j in range(3):
        acc = logs[0] * m[:, 0, j].reshape(n, 1, 1)
        for i in (1, 2):
            if xp is np:
                acc += logs[i] * m[:, i, j].reshape(n, 1, 1)
            else:
                acc.addcmul_(logs[i], m[:, i, j].reshape(n, 1, 1))
        acc += c[:, j].reshape(n, 1, 1)
        if xp is np:
            np.expm1(acc, out=acc)
            np.clip(acc, 0.0, 255.0, out=acc)
        else:
            acc.expm1_().clamp_(0.0, 255.0)
        out.append(acc)
    return out


def _constant(xp: ModuleType, matrix: np.ndarray, like: Any) -> Any:
    """``matrix`` as an array of ``like``'s kind, dtype and device (a copy)."""
    if xp is np:
        return matrix.astype(like.dtype)
    return xp.tensor(matrix.tolist(), dtype=like.dtype, device=like.device)


def hed_tables(xp: ModuleType, alpha: Any, beta_od: Any) -> Any:
    """Per-sample lookup tables of HED jitter for 8-bit input (the same function as :func:`hed_planes`).

    With ``od_i = -ln((v_i + 1) / 256)`` and ``od'_j = sum_i od_i M_ij + b_j`` (``M`` the folded
    3 x 3 matrix, ``b = beta @ RGB_FROM_HED``), ``v'_j + 1 = 256 exp(-b_j) prod_i ((v_i + 1) / 256) ** M_ij``:
    a product of three 256-entry tables per output channel, so a pixel costs nine lookups and
    no logarithm or exponential.

    Parameters
    ----------
    alpha, beta_od : (N, 3) float (numpy array or tensor), per-sample stain scales and OD shifts

    Returns
    -------
    tables : (N, 3 [input i], 3 [output j], 256) float32, ``tables[:, 0]`` carrying ``256 exp(-b_j)``
    """
    f64 = np.float64 if xp is np else xp.float64
    hed = xp.asarray(HED_FROM_RGB, dtype=f64) if xp is np else xp.as_tensor(HED_FROM_RGB, dtype=f64, device=alpha.device)
    rgb = xp.asarray(RGB_FROM_HED, dtype=f64) if xp is np else xp.as_tensor(RGB_FROM_HED, dtype=f64, device=alpha.device)
    a = alpha.astype(f64) if xp is np else alpha.to(f64)
    b = beta_od.astype(f64) if xp is np else beta_od.to(f64)
    m = (hed[None, :, :] * a[:, None, :]) @ rgb  # (N, 3, 3): HED_FROM_RGB diag(alpha) RGB_FROM_HED
    shift = b @ rgb  # (N, 3)
    levels = xp.arange(256, dtype=f64) if xp is np else xp.arange(256, dtype=f64, device=alpha.device)
    log_v = xp.log((levels + 1.0) / 256.0)
    tables = xp.exp(m[..., None] * log_v)  # (N, i, j, 256)
    tables[:, 0] *= 256.0 * xp.exp(-shift)[..., None]
    return tables.astype(np.float32) if xp is np else tables.to(xp.float32)


def hed_lookup(xp: ModuleType, levels: list[Any], tables: Any) -> list[Any]:
    """HED jitter of 8-bit planes through :func:`hed_tables`: three (N, H, W) float32 planes of
    intensities (not clipped, not rounded).

    Parameters
    ----------
    levels : three (N, H, W) integer planes, 0-255
    tables : (N, 3, 3, 256) float32
    """
    n = tables.shape[0]
    if xp is np:
        # channels 0 and 1 through one 65,536-entry table per sample and output: six lookups a pixel
        pair = (tables[:, 0, :, :, None] * tables[:, 1, :, None, :]).reshape(n, 3, 65536)
        base = np.arange(n, dtype=np.intp).reshape(n, 1, 1)
        index01 = ((levels[0].astype(np.intp) << 8) | levels[1]) + (base << 16)
        index2 = levels[2].astype(np.intp) + (base << 8)
        out = []
        for j in range(3):
            o = np.ascontiguousarray(pair[:, j]).reshape(-1).take(index01)
            o *= tables[:, 2, j].reshape(-1).take(index2)
            o -= 1.0
            out.append(o)
        return out
    offset = (xp.arange(n, device=tables.device) * 256).reshape(n, 1, 1)
    index = [lv.long() + offset for lv in levels]
    out = []
    for j in range(3):
        o = tables[:, 0, j].reshape(-1)[index[0]]
        o.mul_(tables[:, 1, j].reshape(-1)[index[1]]).mul_(tables[:, 2, j].reshape(-1)[index[2]]).sub_(1.0)
        out.append(o)
    return out


def brightness_contrast_planes(xp: ModuleType, planes: list[Any], brightness: Any, contrast: Any) -> list[Any]:
    """``v1 = b v``; ``v2 = c (v1 - m) + m`` with ``m`` the sample's mean luma of ``v1``; clipped.

    Parameters
    ----------
    planes : three (N, H, W) float, intensities in [0, 255]
    brightness, contrast : (N, 1, 1) float, factors (1 = unchanged)
    """
    scaled = [v * brightness for v in planes]
    gray = 0.299 * scaled[0] + 0.587 * scaled[1] + 0.114 * scaled[2]
    mean = gray.mean(axis=(-2, -1), keepdims=True) if xp is np else gray.mean(dim=(-2, -1), keepdim=True)
    return [xp.clip(contrast * (v - mean) + mean, 0.0, 255.0) for v in scaled]


def channel_scale_planes(xp: ModuleType, planes: list[Any], scale: list[Any]) -> list[Any]:
    """``v'_c = a_c v_c`` per channel, clipped to [0, 255] (``scale``: three (N, 1, 1) factors)."""
    return [xp.clip(v * a, 0.0, 255.0) for v, a in zip(planes, scale, strict=True)]


def tissue_blend(xp: ModuleType, planes: list[Any], augmented: list[Any], band: tuple[float, float] = GLASS_BAND) -> list[Any]:
    """``v + w (aug - v)`` with ``w = 1 - smoothstep`` of the input's luma over ``band``: tissue
    fully augmented, glass untouched, and a continuous hand-over between (no switch at gray 200)."""
    lo, hi = band
    gray = 0.299 * planes[0] + 0.587 * planes[1] + 0.114 * planes[2]
    t = xp.clip((gray - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    w = 1.0 - t * t * (3.0 - 2.0 * t)
    return [v + w * (a - v) for v, a in zip(planes, augmented, strict=True)]
