"""Tissue: which pixels the statistics are fitted on, and the slide's glass.

The stage after reading (:mod:`wsi_norm.slide`) and before the fits (:mod:`wsi_norm.stain`):

* :mod:`~wsi_norm.tissue.mask`: the gray > 200 rule (glass, not tissue) on a coarse level and
  per tile;
* :mod:`~wsi_norm.tissue.sampling`: tissue pixels sampled slide-wide (never one tile);
* :mod:`~wsi_norm.tissue.whitepoint`: the slide's white point (I0 per channel) from its glass.
"""

from __future__ import annotations

from wsi_norm.tissue.mask import CoarseMask, coarse_mask, tissue_fraction, tissue_mask
from wsi_norm.tissue.sampling import DEFAULT_N_PIXELS, TissueSample, sample_tissue_pixels
from wsi_norm.tissue.whitepoint import WhitePoint, estimate_white_point

__all__ = [
    "DEFAULT_N_PIXELS",
    "CoarseMask",
    "TissueSample",
    "WhitePoint",
    "coarse_mask",
    "estimate_white_point",
    "sample_tissue_pixels",
    "tissue_fraction",
    "tissue_mask",
]
