"""Compile two fits into one colour map: the bridge from the stain stage to the maps.

:func:`compile_colormap` takes a source slide's statistics and a target's (plus both white
points) and returns the pure per-pixel :class:`~wsi_norm.colormap.maps.ColorMap` that the
pipeline applies to every tile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsi_norm.color import DEFAULT_WHITE
from wsi_norm.colormap.gmm import GmmMap
from wsi_norm.colormap.maps import (
    ColorMap,
    GlassBlend,
    GlassMode,
    HistogramMap,
    IdentityMap,
    ReinhardMap,
    StainMatrixMap,
)
from wsi_norm.stain import STAIN_MATRIX_METHODS, check_method, stats_type
from wsi_norm.stain.base import StainMatrixStats, StainParams
from wsi_norm.stain.gmm import GmmStats
from wsi_norm.stain.histmatch import HistMatchStats, match_tables
from wsi_norm.stain.reinhard import ReinhardStats

__all__ = ["compile_colormap"]


def compile_colormap(
    method: str,
    source_stats: Any = None,
    target_stats: Any = None,
    params: StainParams | None = None,
    *,
    source_white: Any = DEFAULT_WHITE,
    target_white: Any = DEFAULT_WHITE,
    glass: GlassMode = "target",
) -> ColorMap:
    """Build the per-pixel colour map taking ``source_stats`` to ``target_stats``.

    Parameters
    ----------
    method : str
        One of :data:`wsi_norm.stain.METHODS`, or ``"none"`` for the identity (stats ignored).
    source_stats, target_stats : the method's Stats
    params : StainParams, optional
        ``min_stain_angle_deg`` is used by Macenko / Vahadane.
    source_white, target_white : float or (3,) array_like, keyword-only
        White points (glass intensity per channel) of the source slide and the target.
    glass : {"target", "keep"}, keyword-only
        ``target`` (default): glass goes to the target's white point (the stain methods by
        construction, Reinhard, histogram matching and gmm through a :class:`GlassBlend`);
        ``keep``: the source's glass is kept, blended smoothly over a luma band.

    Returns
    -------
    ColorMap

    Raises
    ------
    FitError
        A singular stain matrix or non-positive statistics.
    TypeError
        Stats of another method.
    """
    check_method(method, allow_none=True)
    if glass not in ("target", "keep"):
        raise ValueError(f"glass must be 'target' or 'keep', got {glass!r}")
    if method == "none":
        return IdentityMap()
    expected = stats_type(method)
    for s in (source_stats, target_stats):
        if not isinstance(s, expected):
            raise TypeError(f"{method}: expected {expected.__name__}, got {type(s).__name__}")
    p = params or StainParams()
    blend: GlassBlend | None = GlassBlend.for_whites(glass, source_white, target_white)
    if method in STAIN_MATRIX_METHODS and glass == "target":
        blend = None  # optical density against the white points takes glass to the target's white
    return _COMPILE[method](source_stats, target_stats, p, source_white, target_white, blend)


def _compile_stain(
    src: StainMatrixStats, tgt: StainMatrixStats, p: StainParams, ws: Any, wt: Any, blend: GlassBlend | None
) -> ColorMap:
    return StainMatrixMap(
        src.stain_matrix, src.max_conc, tgt.stain_matrix, tgt.max_conc,
        source_white=ws, target_white=wt, glass=blend, min_stain_angle_deg=p.min_stain_angle_deg,
    )


def _compile_reinhard(
    src: ReinhardStats, tgt: ReinhardStats, p: StainParams, ws: Any, wt: Any, blend: GlassBlend | None
) -> ColorMap:
    return ReinhardMap(src.mean, src.std, tgt.mean, tgt.std, glass=blend)


def _compile_histmatch(
    src: HistMatchStats, tgt: HistMatchStats, p: StainParams, ws: Any, wt: Any, blend: GlassBlend | None
) -> ColorMap:
    return HistogramMap(match_tables(src, tgt), glass=blend)


def _compile_gmm(
    src: GmmStats, tgt: GmmStats, p: StainParams, ws: Any, wt: Any, blend: GlassBlend | None
) -> ColorMap:
    return GmmMap(src, tgt, source_white=ws, target_white=wt, glass=blend)


_COMPILE: dict[str, Callable[..., ColorMap]] = {
    "macenko": _compile_stain,
    "vahadane": _compile_stain,
    "reinhard": _compile_reinhard,
    "histmatch": _compile_histmatch,
    "gmm": _compile_gmm,
}
