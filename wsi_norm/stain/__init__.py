"""Stain normalisation methods and their registry.

Each method provides ``fit_<method>(pixels, params) -> <Method>Stats``,
``aggregate_<method>(stats_list)`` and a colour map; this module dispatches
on the method name through explicit dict maps.

Methods: ``"macenko"``, ``"vahadane"``, ``"reinhard"``, ``"histmatch"``;
``compile_colormap("none", ...)`` gives the identity map (benchmark baseline).
StainNet lives in :mod:`wsi_norm.stain.stainnet` (a learned map, not fitted here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import DEFAULT_WHITE
from wsi_norm.colormap import (
    ColorMap,
    GlassBlend,
    GlassMode,
    HistogramMap,
    IdentityMap,
    ReinhardMap,
    StainMatrixMap,
)
from wsi_norm.stain.base import StainMatrixStats, StainParams, Stats
from wsi_norm.stain.histmatch import (
    HistMatchStats,
    aggregate_histmatch,
    fit_histmatch,
    match_tables,
)
from wsi_norm.stain.macenko import MacenkoStats, aggregate_macenko, fit_macenko
from wsi_norm.stain.reinhard import ReinhardStats, aggregate_reinhard, fit_reinhard
from wsi_norm.stain.vahadane import VahadaneStats, aggregate_vahadane, fit_vahadane

__all__ = [
    "METHODS",
    "STAIN_MATRIX_METHODS",
    "HistMatchStats",
    "MacenkoStats",
    "ReinhardStats",
    "StainParams",
    "Stats",
    "VahadaneStats",
    "aggregate_stats",
    "compile_colormap",
    "default_params",
    "fit_histmatch",
    "fit_macenko",
    "fit_reinhard",
    "fit_stats",
    "fit_vahadane",
    "stats_from_dict",
]

METHODS = ("macenko", "vahadane", "reinhard", "histmatch")
#: Methods whose statistics are stain vectors (fitted in optical density against the white point).
STAIN_MATRIX_METHODS = ("macenko", "vahadane")

_FIT: dict[str, Callable[[NDArray[np.uint8], StainParams | None], Any]] = {
    "macenko": fit_macenko,
    "vahadane": fit_vahadane,
    "reinhard": fit_reinhard,
    "histmatch": fit_histmatch,
}
_AGGREGATE: dict[str, Callable[[list[Any]], Any]] = {
    "macenko": aggregate_macenko,
    "vahadane": aggregate_vahadane,
    "reinhard": aggregate_reinhard,
    "histmatch": aggregate_histmatch,
}
_STATS_TYPE: dict[str, type] = {
    "macenko": MacenkoStats,
    "vahadane": VahadaneStats,
    "reinhard": ReinhardStats,
    "histmatch": HistMatchStats,
}


def _check_method(method: str, *, allow_none: bool = False) -> None:
    known = METHODS + (("none",) if allow_none else ())
    if method not in known:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(known)}")


def default_params(method: str) -> StainParams:
    """Default parameters of a method (one :class:`StainParams` serves all methods)."""
    _check_method(method, allow_none=True)
    return StainParams()


def fit_stats(
    method: str, pixels: NDArray[Any], params: StainParams | None = None, *, white: Any = None
) -> Any:
    """Fit ``method``'s statistics to ``(N, 3)`` tissue pixels (see ``fit_<method>``).

    ``white`` (the slide's white point, (3,)) is used by the stain-matrix methods only.
    """
    _check_method(method)
    if method in STAIN_MATRIX_METHODS:
        return _FIT[method](pixels, params, white=white)  # type: ignore[call-arg]
    return _FIT[method](pixels, params)


def aggregate_stats(method: str, stats_list: Sequence[Any]) -> Any:
    """Robust cohort aggregate of several slides' statistics (see ``aggregate_<method>``)."""
    _check_method(method)
    expected = _STATS_TYPE[method]
    for s in stats_list:
        if not isinstance(s, expected):
            raise TypeError(f"{method}: expected {expected.__name__}, got {type(s).__name__}")
    return _AGGREGATE[method](list(stats_list))


def stats_from_dict(method: str, d: dict[str, Any]) -> Any:
    """Rebuild ``method``'s statistics from ``Stats.to_dict()`` output."""
    _check_method(method)
    return _STATS_TYPE[method].from_dict(d)


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
        One of :data:`METHODS`, or ``"none"`` for the identity (stats ignored).
    source_stats, target_stats : the method's Stats
    params : StainParams, optional
        ``min_stain_angle_deg`` is used by Macenko / Vahadane.
    source_white, target_white : float or (3,) array_like, keyword-only
        White points (glass intensity per channel) of the source slide and the target.
    glass : {"target", "keep"}, keyword-only
        ``target`` (default): glass goes to the target's white point (the stain methods by
        construction, Reinhard and histogram matching through a :class:`GlassBlend`);
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
    _check_method(method, allow_none=True)
    if glass not in ("target", "keep"):
        raise ValueError(f"glass must be 'target' or 'keep', got {glass!r}")
    if method == "none":
        return IdentityMap()
    expected = _STATS_TYPE[method]
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


_COMPILE: dict[str, Callable[..., ColorMap]] = {
    "macenko": _compile_stain,
    "vahadane": _compile_stain,
    "reinhard": _compile_reinhard,
    "histmatch": _compile_histmatch,
}
