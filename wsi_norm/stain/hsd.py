"""HSD colour coordinates (density and two chromatic coordinates), regularised at glass.

The HSD model (van der Laak et al. 2000; used by DCGMM, Zanjani et al. 2018) splits optical
density into an overall density ``D`` (the mean OD of R, G and B) and a chromaticity that does not
depend on it::

    D   = (OD_R + OD_G + OD_B) / 3
    c_x = OD_R / D - 1                  = (OD_R - D) / D
    c_y = (OD_G - OD_B) / (sqrt(3) D)

Chromaticity is undefined at ``D = 0`` (glass) and unbounded near it. wsi-norm divides by
``D_e = sqrt(D^2 + D0^2)`` (:data:`HSD_MIN_DENSITY`, ``D0 = 0.05`` OD) instead of ``D``: on tissue
(``D >= 0.2``) that is within 3 % of ``D``, and every colour of the RGB cube, glass and colours
brighter than the white point (``D <= 0``) included, gets finite coordinates that move
continuously with it. The inverse uses the same ``D_e``, so ``od_from_hsd(*hsd_from_od(od)) == od``
exactly (up to rounding).

Functions work on planar channels (three same-shape arrays) of numpy or torch alike, so one copy
of the math serves the fit (numpy) and the colour map (numpy, torch).

References
----------
J. A. W. M. van der Laak, M. M. M. Pahlplatz, A. G. J. M. Hanselaar, P. C. M. de Wilde,
"Hue-saturation-density (HSD) model for stain recognition in digital images from transmitted
light microscopy", Cytometry 39(4), 2000.
F. G. Zanjani, S. Zinger, B. E. Bejnordi, J. A. W. M. van der Laak, P. H. N. de With,
"Stain normalization of histopathology images using generative models", MIDL 2018.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["HSD_MIN_DENSITY", "effective_density", "hsd_from_od", "od_from_hsd", "od_to_hsd"]

HSD_MIN_DENSITY = 0.05
"""``D0`` (optical density): chromaticity divides by ``sqrt(D^2 + D0^2)``, never by 0."""

_SQRT3 = math.sqrt(3.0)


def effective_density(xp: ModuleType, density: Any) -> Any:
    """``D_e = sqrt(D^2 + D0^2)``: what chromaticity is divided by (>= :data:`HSD_MIN_DENSITY`)."""
    return xp.sqrt(density * density + HSD_MIN_DENSITY * HSD_MIN_DENSITY)


def hsd_from_od(xp: ModuleType, od_r: Any, od_g: Any, od_b: Any) -> list[Any]:
    """Planar optical density -> planar ``[D, c_x, c_y]`` (regularised HSD).

    Parameters
    ----------
    xp : module, ``numpy`` or ``torch``
    od_r, od_g, od_b : same-shape float arrays, optical density (any sign)

    Returns
    -------
    [density, c_x, c_y] : three float arrays of the input shape; density in OD, the
        chromaticity dimensionless
    """
    density = (od_r + od_g + od_b) / 3.0
    d_e = effective_density(xp, density)
    return [density, (od_r - density) / d_e, (od_g - od_b) / (_SQRT3 * d_e)]


def od_from_hsd(xp: ModuleType, density: Any, c_x: Any, c_y: Any, *, chroma_density: Any = None) -> list[Any]:
    """Planar ``[D, c_x, c_y]`` -> planar optical density; the inverse of :func:`hsd_from_od`.

    Parameters
    ----------
    xp : module, ``numpy`` or ``torch``
    density, c_x, c_y : same-shape float arrays
    chroma_density : float array, keyword-only, optional
        The density chromaticity is multiplied by; default ``effective_density(density)`` (the
        exact inverse).

    Returns
    -------
    [od_r, od_g, od_b] : three float arrays, optical density
    """
    d_e = effective_density(xp, density) if chroma_density is None else chroma_density
    half = -0.5 * c_x
    spread = 0.5 * _SQRT3 * c_y
    return [density + d_e * c_x, density + d_e * (half + spread), density + d_e * (half - spread)]


def od_to_hsd(od: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """``(N, 3)`` optical density -> ``(N, 3)`` float64 ``[D, c_x, c_y]`` (numpy convenience).

    Raises
    ------
    ValueError
        ``od`` is not (N, 3).
    """
    arr = np.asarray(od, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"od must have shape (N, 3), got {arr.shape}")
    return np.stack(hsd_from_od(np, arr[:, 0], arr[:, 1], arr[:, 2]), axis=1)
