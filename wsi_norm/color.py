"""Colour-space transforms of 8-bit RGB: optical density, CIE Lab and luma.

Every transform here is written once, against the small subset of operations
that numpy arrays and torch tensors share (elementwise arithmetic, ``exp``,
``log``, ``where``, ``clip``, ``stack``), so the same function serves the
numpy reference path and the torch (CPU or GPU) path.  Linear maps are spelled
out as sums of products with Python float coefficients instead of ``@``: an
elementwise expression evaluates identically whatever the array's length,
which keeps the exact 256^3 lookup table of :mod:`wsi_norm.colormap.maps`
bit-identical to direct evaluation.

Conventions
-----------
* Optical density (Beer-Lambert), against the slide's **white point** ``white``: the
  8-bit intensity of its glass, per channel (R, G, B), i.e. the illumination ``I0``::

      od = -log((rgb + 1) / (white + 1)),     rgb = (white + 1) * exp(-od) - 1

  Glass (``rgb == white``) has ``od == 0`` exactly, in every channel, whatever the
  scanner's tint.  The ``+ 1`` keeps pure black finite; the inverse subtracts it again,
  so ``rgb -> od -> rgb`` is exact up to float rounding.  Pixels brighter than the
  white point have a (small) negative optical density; it is not clipped, so the round
  trip holds for every 8-bit value.  Macenko et al.'s fixed ``Io = 240`` in
  ``-log((rgb + 1) / Io)`` is ``white = 239`` here (:data:`TEXTBOOK_WHITE`).
* CIE Lab: sRGB primaries, D65 2-degree white point (0.95047, 1.0, 1.08883),
  the same constants as :func:`skimage.color.rgb2lab`.  RGB floats are in
  [0, 1], ``L`` in [0, 100].
* Luma: ITU-R BT.601, ``0.299 R + 0.587 G + 0.114 B`` (MATLAB ``rgb2gray``).
  A pixel is *background* (glass) when its grayscale value -- the luma rounded
  to an integer, as ``rgb2gray`` returns for uint8 -- is above 200, i.e. when
  the luma is at least 200.5; the test is done in exact integer arithmetic
  (``299 R + 587 G + 114 B >= 200500``) so numpy, torch and the numba kernels
  agree on every pixel. :mod:`wsi_norm.tissue.mask` uses the same rule.

All functions are pure and thread-safe.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "BACKGROUND_LUMA",
    "BACKGROUND_WEIGHTED_MIN",
    "DEFAULT_WHITE",
    "TEXTBOOK_WHITE",
    "array_namespace",
    "is_background",
    "lab_to_rgb",
    "luma",
    "luma_x1000",
    "od_to_rgb",
    "rgb_to_lab",
    "rgb_to_od",
    "rgb_where",
    "srgb_linear_levels",
]

#: White point (glass intensity per channel) assumed when a slide shows no measurable glass.
DEFAULT_WHITE = 240.0
#: The white point equivalent to Macenko et al.'s (and torchstain's) fixed ``Io = 240``.
TEXTBOOK_WHITE = 239.0
#: Grayscale value (rounded luma) above which a pixel is glass; see :func:`is_background`.
BACKGROUND_LUMA = 200
#: ``299 R + 587 G + 114 B >= BACKGROUND_WEIGHTED_MIN`` <=> ``round(luma) > BACKGROUND_LUMA``.
BACKGROUND_WEIGHTED_MIN = BACKGROUND_LUMA * 1000 + 500

# sRGB (D65) -> XYZ, the matrix of skimage.color.colorconv.xyz_from_rgb.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_RGB_FROM_XYZ = tuple(tuple(float(v) for v in row) for row in np.linalg.inv(np.array(_XYZ_FROM_RGB)))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def array_namespace(x: Any) -> ModuleType:
    """Return the module (``numpy`` or ``torch``) whose functions handle ``x``.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor

    Returns
    -------
    module
        ``torch`` for a tensor, ``numpy`` otherwise.  torch is never imported
        here: a tensor can only exist if torch was imported by the caller.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return np


def _linear3(c0: Any, c1: Any, c2: Any, matrix: Any) -> list[Any]:
    """Apply a 3x3 matrix (rows = outputs) to three channel arrays, elementwise."""
    return [
        c0 * float(row[0]) + c1 * float(row[1]) + c2 * float(row[2]) for row in matrix
    ]


def _white_channels(white: Any) -> tuple[float, float, float]:
    """A white point as three Python floats (R, G, B), validated: each in (0, 255]."""
    w = np.broadcast_to(np.asarray(white, dtype=np.float64), (3,))
    if not np.all(np.isfinite(w)) or np.any(w <= 0.0) or np.any(w > 255.0):
        raise ValueError(f"white point must be in (0, 255] per channel, got {np.asarray(white).tolist()}")
    return float(w[0]), float(w[1]), float(w[2])


def _per_channel(xp: ModuleType, like: Any, values: tuple[float, float, float]) -> Any:
    """``values`` as an array/tensor broadcasting over the last axis of ``like``."""
    if xp is np:
        return np.asarray(values, dtype=like.dtype if like.dtype.kind == "f" else np.float64)
    return xp.tensor(values, dtype=like.dtype, device=like.device)


def rgb_to_od(rgb: Any, *, white: Any = DEFAULT_WHITE) -> Any:
    """Optical density of RGB intensities, ``-log((rgb + 1) / (white + 1))``.

    Parameters
    ----------
    rgb : (..., 3) array or tensor, uint8 or float, intensities in [0, 255]
        Integer input is converted to float64 (numpy) or float32 (torch).
    white : float or (3,) array_like, keyword-only
        The white point: glass intensity per channel (R, G, B), in (0, 255]; default 240.

    Returns
    -------
    od : (..., 3) float, optical density (unitless); 0 at the white point, > 0 below it

    Examples
    --------
    >>> import numpy as np
    >>> rgb_to_od(np.array([239, 0, 120], dtype=np.uint8), white=239).round(3)
    array([0.   , 5.48 , 0.685])
    """
    xp = array_namespace(rgb)
    if xp is np and np.asarray(rgb).dtype == np.uint8:
        return _od_of_levels(np.asarray(rgb), _white_channels(white))
    x = _as_float(rgb)
    w1 = _per_channel(xp, x, tuple(c + 1.0 for c in _white_channels(white)))  # type: ignore[arg-type]
    return -xp.log((x + 1.0) / w1)


def rgb_to_od64(rgb: NDArray[Any], *, white: Any = DEFAULT_WHITE) -> NDArray[np.float64]:
    """:func:`rgb_to_od` in float64 of numpy pixels of any dtype: 8-bit ones looked up per level,
    others converted to float64 first (float32 block means too, as the fits always did)."""
    arr = np.asarray(rgb)
    return np.asarray(rgb_to_od(arr if arr.dtype == np.uint8 else arr.astype(np.float64, copy=False), white=white))


def _od_of_levels(rgb: NDArray[np.uint8], white: tuple[float, float, float]) -> NDArray[np.float64]:
    """:func:`rgb_to_od` of 8-bit input, looked up: the same float64 operations on the 256 levels
    of each channel, so the same values as computed per pixel (~3x faster at 1 M pixels)."""
    levels = np.arange(256.0) + 1.0
    out = np.empty(rgb.shape, dtype=np.float64)
    for c in range(3):
        out[..., c] = (-np.log(levels / (white[c] + 1.0)))[rgb[..., c]]
    return out


def od_to_rgb(od: Any, *, white: Any = DEFAULT_WHITE) -> Any:
    """RGB intensities of optical density, ``(white + 1) * exp(-od) - 1`` (inverse of :func:`rgb_to_od`).

    Parameters
    ----------
    od : (..., 3) float array or tensor, optical density
    white : float or (3,) array_like, keyword-only
        White point per channel, default 240.

    Returns
    -------
    rgb : (..., 3) float, intensities (not rounded, not clipped)
    """
    xp = array_namespace(od)
    w1 = _per_channel(xp, od, tuple(c + 1.0 for c in _white_channels(white)))  # type: ignore[arg-type]
    return w1 * xp.exp(-od) - 1.0


def _as_float(x: Any) -> Any:
    xp = array_namespace(x)
    if xp is np:
        arr = np.asarray(x)
        return arr if arr.dtype.kind == "f" else arr.astype(np.float64)
    return x if x.is_floating_point() else x.to(xp.float32)


def rgb_to_lab(rgb: Any) -> Any:
    """CIE Lab (D65) of sRGB floats in [0, 1]; agrees with :func:`skimage.color.rgb2lab`.

    Parameters
    ----------
    rgb : (..., 3) float array or tensor in [0, 1], or uint8 in [0, 255]
        Integer input is scaled by 1/255 (as scikit-image's ``img_as_float``).

    Returns
    -------
    lab : (..., 3) float; L in [0, 100], a and b roughly in [-128, 127]
    """
    xp = array_namespace(rgb)
    if xp is np and np.asarray(rgb).dtype == np.uint8:
        # the sRGB decoding of 8-bit input looked up: the same float64 operations on the same
        # 256 values (v / 255), so the same Lab as computed per pixel
        return _lab_of_levels(np.asarray(rgb))
    is_int = (np.asarray(rgb).dtype.kind in "ui") if xp is np else not rgb.is_floating_point()
    rgb = _as_float(rgb) / 255.0 if is_int else _as_float(rgb)
    return xp.stack(_lab_from_channels(xp, rgb[..., 0], rgb[..., 1], rgb[..., 2]), -1)


#: 8-bit input of at least this many pixels gets its Lab from a compiled loop (numba, loaded on
#: first use: ~0.2 s); smaller input too once numba is loaded. Both evaluate the same float64
#: operations in the same order (no fused multiply-add), so the same Lab: bit for bit where
#: numpy's ``power`` is the C library's ``pow`` (it is here; on AVX-512 machines numpy may use
#: SVML's, within an ulp of it), never more than 1e-12 apart (``tests/unit/test_color.py``).
_LAB_COMPILED_MIN_PX = 1 << 21
_LAB_KERNEL: Any = None


def _lab_of_levels(rgb: NDArray[np.uint8], compiled: bool | None = None) -> NDArray[np.float64]:
    """Lab of ``(..., 3)`` uint8 pixels, the sRGB decoding looked up per level: by the compiled
    loop (``compiled``; default: for large input or once numba is loaded) or by numpy."""
    if compiled is None:
        compiled = rgb.size >= 3 * _LAB_COMPILED_MIN_PX or "numba" in sys.modules
    table = srgb_linear_levels()
    if not compiled:
        return np.stack(_lab_from_linear(np, table[rgb[..., 0]], table[rgb[..., 1]], table[rgb[..., 2]]), -1)
    global _LAB_KERNEL
    if _LAB_KERNEL is None:
        import numba

        _LAB_KERNEL = numba.njit(nogil=True, cache=True)(_lab_loops)
    flat = np.ascontiguousarray(rgb).reshape(-1, 3)
    out = np.empty(flat.shape, dtype=np.float64)
    _LAB_KERNEL(flat, table, np.asarray(_XYZ_FROM_RGB), np.asarray(_WHITE_D65), out)
    return out.reshape(rgb.shape)


def _lab_loops(rgb: Any, lin: Any, m: Any, white: Any, out: Any) -> None:  # pragma: no cover - compiled by numba
    """:func:`_lab_from_linear` of ``lin[rgb]``, pixel by pixel (the kernel :func:`_lab_of_levels`
    compiles): the same operations in the same order as the numpy expressions."""
    third = 1.0 / 3.0
    k0 = 16.0 / 116.0
    for i in range(rgb.shape[0]):
        r = lin[rgb[i, 0]]
        g = lin[rgb[i, 1]]
        b = lin[rgb[i, 2]]
        t0 = (r * m[0, 0] + g * m[0, 1] + b * m[0, 2]) / white[0]
        t1 = (r * m[1, 0] + g * m[1, 1] + b * m[1, 2]) / white[1]
        t2 = (r * m[2, 0] + g * m[2, 1] + b * m[2, 2]) / white[2]
        f0 = t0**third if t0 > 0.008856 else 7.787 * t0 + k0
        f1 = t1**third if t1 > 0.008856 else 7.787 * t1 + k0
        f2 = t2**third if t2 > 0.008856 else 7.787 * t2 + k0
        out[i, 0] = 116.0 * f1 - 16.0
        out[i, 1] = 500.0 * (f0 - f1)
        out[i, 2] = 200.0 * (f1 - f2)


_SRGB_LINEAR_LEVELS: NDArray[np.float64] | None = None


def srgb_linear_levels() -> NDArray[np.float64]:
    """Linear-light values of the 256 8-bit sRGB levels, ``(256,)`` float64 (read-only): the
    decoding step of :func:`rgb_to_lab` applied to ``v / 255``, so indexing it gives exactly
    what the formula gives per pixel."""
    global _SRGB_LINEAR_LEVELS
    if _SRGB_LINEAR_LEVELS is None:
        table = _srgb_to_linear(np, np.arange(256.0) / 255.0)
        table.flags.writeable = False
        _SRGB_LINEAR_LEVELS = table
    return _SRGB_LINEAR_LEVELS


def lab_to_rgb(lab: Any) -> Any:
    """sRGB floats in [0, 1] of CIE Lab (D65); agrees with :func:`skimage.color.lab2rgb`.

    Parameters
    ----------
    lab : (..., 3) float array or tensor

    Returns
    -------
    rgb : (..., 3) float in [0, 1]; out-of-gamut colours are clipped
    """
    xp = array_namespace(lab)
    lab = _as_float(lab)
    return xp.stack(_channels_from_lab(xp, lab[..., 0], lab[..., 1], lab[..., 2]), -1)


def _srgb_to_linear(xp: ModuleType, c: Any) -> Any:
    """sRGB [0, 1] -> linear light (IEC 61966-2-1)."""
    return xp.where(c > 0.04045, ((xp.clip(c, 0.04045, None) + 0.055) / 1.055) ** 2.4, c / 12.92)


def _lab_from_channels(xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
    """Planar sRGB [0, 1] -> planar Lab (three same-shape arrays in, three out)."""
    return _lab_from_linear(xp, _srgb_to_linear(xp, r), _srgb_to_linear(xp, g), _srgb_to_linear(xp, b))


def _lab_from_linear(xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
    """Planar linear-light RGB -> planar Lab."""
    xyz = _linear3(r, g, b, _XYZ_FROM_RGB)
    f = [
        xp.where(t > 0.008856, xp.clip(t, 0.008856, None) ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
        for t in (xyz[0] / _WHITE_D65[0], xyz[1] / _WHITE_D65[1], xyz[2] / _WHITE_D65[2])
    ]
    return [116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])]


def _channels_from_lab(xp: ModuleType, lightness: Any, a: Any, b: Any) -> list[Any]:
    """Planar Lab -> planar sRGB in [0, 1] (clipped)."""
    fy = (lightness + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = xp.clip(fy - b / 200.0, 0.0, None)
    xyz = [
        w * xp.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
        for f, w in zip((fx, fy, fz), _WHITE_D65)
    ]
    lin = _linear3(xyz[0], xyz[1], xyz[2], _RGB_FROM_XYZ)
    return [
        xp.clip(
            xp.where(c > 0.0031308, 1.055 * xp.clip(c, 0.0031308, None) ** (1.0 / 2.4) - 0.055, 12.92 * c),
            0.0,
            1.0,
        )
        for c in lin
    ]


def luma(rgb: Any) -> Any:
    """ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (MATLAB ``rgb2gray`` before rounding).

    Parameters
    ----------
    rgb : (..., 3) array or tensor, intensities in [0, 255]

    Returns
    -------
    gray : (...) float64 (numpy) or float32 (torch), in [0, 255]
    """
    x = _as_float(rgb)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def is_background(rgb: Any) -> Any:
    """Background (glass) test: rounded luma above 200, evaluated exactly in integers.

    Parameters
    ----------
    rgb : (..., 3) uint8 array or tensor

    Returns
    -------
    mask : (...) bool, True where ``299 R + 587 G + 114 B >= 200500``
    """
    xp = array_namespace(rgb)
    if xp is np:
        return luma_x1000(np.asarray(rgb)) >= BACKGROUND_WEIGHTED_MIN
    x = rgb.to(xp.int32)
    return (x[..., 0] * 299 + x[..., 1] * 587 + x[..., 2] * 114) >= BACKGROUND_WEIGHTED_MIN


def luma_x1000(rgb: NDArray[np.uint8]) -> NDArray[np.int32]:
    """``299 R + 587 G + 114 B`` of 8-bit pixels ``(..., 3)``, exactly, as int32: the gray > 200
    rule is ``luma_x1000(rgb) >= BACKGROUND_WEIGHTED_MIN`` (:func:`is_background`).

    Each channel is multiplied into int32 straight from its strided view (no int32 copy of
    the whole image first: 0.6 x the time on a 16.7-MP image)."""
    arr = np.asarray(rgb)
    weighted = np.multiply(arr[..., 0], 299, dtype=np.int32)
    term = np.multiply(arr[..., 1], 587, dtype=np.int32)
    weighted += term
    np.multiply(arr[..., 2], 114, dtype=np.int32, out=term)
    weighted += term
    return weighted


def rgb_where(rgb: NDArray[np.uint8], mask: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """The ``(N, 3) uint8`` pixels of ``rgb`` (``(..., 3) uint8``) where ``mask`` (its shape
    without the last axis) is True, in raster order: ``rgb[mask]``, the same bytes.

    Each pixel is moved as one 3-byte item: numpy's boolean indexing of ``(..., 3) uint8``
    copies it channel by channel, ~20 x slower (0.29 s against 0.014 s for 10 M pixels)."""
    arr = np.ascontiguousarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"rgb must be (..., 3) uint8, got {arr.shape} {arr.dtype}")
    keep = np.asarray(mask, dtype=np.bool_)
    if keep.shape != arr.shape[:-1]:
        raise ValueError(f"mask shape {keep.shape} does not match the pixels' {arr.shape[:-1]}")
    items = arr.reshape(-1, 3).view(np.dtype((np.void, 3))).reshape(-1)
    return items[keep.reshape(-1)].view(np.uint8).reshape(-1, 3)


def _check_rgb_uint8(rgb: NDArray[Any], name: str = "rgb") -> NDArray[np.uint8]:
    """Validate an (..., 3) uint8 numpy array (shared by the stain fitters)."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {arr.dtype}")
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., 3), got {arr.shape}")
    return arr
