"""Pure per-pixel colour maps: the stage after the fits, before the pyramid.

A :class:`ColorMap` is a function of the pixel alone, so it compiles to one 256^3 lookup
table and tiles can be mapped independently without seams. :func:`compile_colormap` builds the
map of a fitted method from a source fit and a target; :mod:`wsi_norm.colormap.stainnet` holds
the learned StainNet map and its checkpoint format (imported on demand: it needs torch).
"""

from __future__ import annotations

from wsi_norm.colormap.compile import compile_colormap
from wsi_norm.colormap.gmm import GmmMap
from wsi_norm.colormap.maps import (
    ColorMap,
    GlassBlend,
    GlassMode,
    HistogramMap,
    IdentityMap,
    ReinhardMap,
    StainMatrixMap,
    clear_lut_cache,
)

__all__ = [
    "ColorMap",
    "GlassBlend",
    "GlassMode",
    "GmmMap",
    "HistogramMap",
    "IdentityMap",
    "ReinhardMap",
    "StainMatrixMap",
    "clear_lut_cache",
    "compile_colormap",
]
