"""Macenko stain-vector estimation (Macenko et al. 2009): the textbook algorithm and wsi-norm's default.

Both variants work in optical density against the slide's white point
(``od = -log((rgb + 1) / (white + 1))``, :mod:`wsi_norm.tissue.whitepoint`), find the plane of the two
leading eigenvectors of the OD covariance, and take two extreme angles in that plane as the
hematoxylin and eosin directions (hematoxylin: the larger red OD).

``textbook`` (``params.macenko_variant="textbook"``), as published and as torchstain implements it:
drop pixels with *any* OD component below ``beta`` (0.15); the two stain directions are the
``alpha`` and ``100 - alpha`` percentiles (1 %) of all pixels' angles.

``strong`` (the default) treats each side of the plane separately. Within the outer
``edge_band`` (20 %) of angles on a side, only the pixels whose OD norm is in the top
``100 - edge_strong`` (20 %) of that band are kept, and the side's stain is their
``alpha``-percentile angle (2 %, outermost). Pixels with an OD norm below ``beta`` (0.3) or an
OD component above ``max_od`` (2.5: saturated, pen, dust) are ignored. Why, measured on the
fidelity benchmark (240 seeded cases; BENCHMARKS.md):

* Faint pixels have the noisiest angles (quantisation and JPEG errors are divided by a small
  OD) and JPEG's chroma subsampling throws a tail of pixels past both true stain directions;
  a percentile of *all* angles lands in that tail or, where pure-stain pixels are rare, inside
  the cone. The strongest pixels near a side are the least noisy and, where a stain occurs
  pure, they are pure.
* Choosing the strongest pixels per side, not slide-wide, keeps the weaker stain: wsi-norm
  0.1's "robust" variant took the angles of the 20 % strongest pixels of the slide, which on a
  hematoxylin-heavy slide are nearly all hematoxylin, and put eosin 22-33 deg off.
* The textbook's "any component below beta" rule drops pure-eosin pixels (eosin absorbs
  little red light): on the benchmark's uncompressed cases its eosin was more than 10 deg off in
  a quarter of them (95th percentile 19 deg; the default: 0.4 deg median).

The estimators take 2 x 2 block means (:func:`wsi_norm.tissue.sampling.tissue_blocks`) or single
pixels, uint8 or float, in [0, 255].

References
----------
M. Macenko et al., "A method for normalizing histology slides for quantitative
analysis", ISBI 2009, doi:10.1109/ISBI.2009.5193250.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_norm.color import rgb_to_od64
from wsi_norm.errors import FitError
from wsi_norm.stain.base import (
    StainMatrixStats,
    StainParams,
    aggregate_stain_matrix_stats,
    check_stain_matrix,
    max_concentrations,
    order_stains,
    tissue_pixels,
    white_of,
)

__all__ = ["MacenkoStats", "aggregate_macenko", "fit_macenko", "stain_plane"]


class MacenkoStats(StainMatrixStats):
    """Macenko fit: ``stain_matrix`` (2, 3) unit OD rows (H, E), ``max_conc`` (2,)."""

    method: ClassVar[str] = "macenko"


def stain_plane(od: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Basis of the plane of the two leading eigenvectors of the OD covariance, and angles in it.

    Parameters
    ----------
    od : (N, 3) float64, optical density

    Returns
    -------
    basis : (3, 2) float64, orthonormal columns; the first points into the data
    angles : (N,) float64, each pixel's angle in the plane, radians in (-pi, pi]
    """
    _, vecs = np.linalg.eigh(np.cov(od.T))
    basis = vecs[:, [2, 1]].copy()
    if basis[:, 0].sum() < 0:  # point the first axis into the data so angles do not wrap at +-pi
        basis[:, 0] *= -1
    proj = od @ basis
    return basis, np.arctan2(proj[:, 1], proj[:, 0])


def _strong_side_angles(od: NDArray[np.float64], angles: NDArray[np.float64], p: StainParams) -> list[float]:
    """Per side: the alpha-percentile angle of the strongest pixels in the outer edge band."""
    norm = np.linalg.norm(od, axis=1)
    out = []
    for low_side in (True, False):
        cut = np.percentile(angles, p.edge_band if low_side else 100.0 - p.edge_band)
        band = angles <= cut if low_side else angles >= cut
        strong = norm[band] >= np.percentile(norm[band], p.edge_strong)
        side = angles[band][strong]
        out.append(float(np.percentile(side, p.alpha_ if low_side else 100.0 - p.alpha_)))
    return out


def fit_macenko(
    pixels: NDArray[Any], params: StainParams | None = None, *, white: ArrayLike | None = None
) -> MacenkoStats:
    """Fit Macenko stain vectors and maximum concentrations to tissue pixels.

    Parameters
    ----------
    pixels : (N, 3) uint8 or float in [0, 255]
        Tissue pixels or 2 x 2 block means sampled over the slide; background (gray > 200)
        is dropped again here.
    params : StainParams, optional
        ``macenko_variant``, ``alpha``, ``beta``, ``edge_band``, ``edge_strong``, ``max_od``,
        ``max_conc_percentile``, ``min_pixels``, ``min_stain_angle_deg``, ``white_point``.
    white : (3,) array_like, keyword-only, optional
        The slide's white point (glass intensity per channel); ``params.white_point``
        overrides it; default 240.

    Returns
    -------
    MacenkoStats

    Raises
    ------
    FitError
        Fewer than ``params.min_pixels`` usable pixels, stain vectors closer than
        ``params.min_stain_angle_deg`` (single stain), or a stain with no positive
        concentration.
    """
    p = params or StainParams()
    tissue = tissue_pixels(pixels)
    od_all = rgb_to_od64(tissue, white=white_of(white, p))
    if p.macenko_variant == "textbook":
        keep = ~np.any(od_all < p.beta_, axis=1)
        rule = f"all OD components >= beta={p.beta_}"
    else:
        keep = (np.linalg.norm(od_all, axis=1) >= p.beta_) & np.all(od_all <= p.max_od, axis=1)
        rule = f"OD norm >= beta={p.beta_} and OD <= max_od={p.max_od}"
    od = od_all[keep]
    if len(od) < p.min_pixels:
        raise FitError(
            f"macenko: only {len(od)} tissue pixels with {rule} (of {len(pixels)} given); "
            f"need at least {p.min_pixels}"
        )
    basis, phi = stain_plane(od)
    if p.macenko_variant == "textbook":
        lo, hi = (float(a) for a in np.percentile(phi, [p.alpha_, 100.0 - p.alpha_]))
    else:
        lo, hi = _strong_side_angles(od, phi, p)
    vectors = np.stack([basis @ [np.cos(a), np.sin(a)] for a in (lo, hi)])
    stain_matrix = order_stains(vectors)
    check_stain_matrix(stain_matrix, min_angle_deg=p.min_stain_angle_deg, what="macenko")
    max_conc = max_concentrations(od_all, stain_matrix, percentile=p.max_conc_percentile, what="macenko")
    return MacenkoStats(stain_matrix=stain_matrix, max_conc=max_conc)


def aggregate_macenko(stats_list: list[MacenkoStats]) -> MacenkoStats:
    """Cohort template: component-wise median of stain vectors (re-normalised, H first)
    and median of maximum concentrations.

    Parameters
    ----------
    stats_list : list of MacenkoStats, non-empty

    Returns
    -------
    MacenkoStats
    """
    matrix, conc = aggregate_stain_matrix_stats(list(stats_list), what="macenko")
    return MacenkoStats(stain_matrix=matrix, max_conc=conc)
