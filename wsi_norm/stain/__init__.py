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

from wsi_norm.colormap import ColorMap, HistogramMap, IdentityMap, ReinhardMap, StainMatrixMap
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


def fit_stats(method: str, pixels: NDArray[np.uint8], params: StainParams | None = None) -> Any:
    """Fit ``method``'s statistics to ``(N, 3) uint8`` tissue pixels (see ``fit_<method>``)."""
    _check_method(method)
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
    method: str, source_stats: Any = None, target_stats: Any = None, params: StainParams | None = None
) -> ColorMap:
    """Build the per-pixel colour map taking ``source_stats`` to ``target_stats``.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`, or ``"none"`` for the identity (stats ignored).
    source_stats, target_stats : the method's Stats
    params : StainParams, optional
        ``io`` and ``min_stain_angle_deg`` are used by Macenko / Vahadane.

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
    if method == "none":
        return IdentityMap()
    expected = _STATS_TYPE[method]
    for s in (source_stats, target_stats):
        if not isinstance(s, expected):
            raise TypeError(f"{method}: expected {expected.__name__}, got {type(s).__name__}")
    p = params or StainParams()
    return _COMPILE[method](source_stats, target_stats, p)


def _compile_stain(src: StainMatrixStats, tgt: StainMatrixStats, p: StainParams) -> ColorMap:
    return StainMatrixMap(
        src.stain_matrix, src.max_conc, tgt.stain_matrix, tgt.max_conc,
        io=p.io, min_stain_angle_deg=p.min_stain_angle_deg,
    )


def _compile_reinhard(src: ReinhardStats, tgt: ReinhardStats, p: StainParams) -> ColorMap:
    return ReinhardMap(src.mean, src.std, tgt.mean, tgt.std)


def _compile_histmatch(src: HistMatchStats, tgt: HistMatchStats, p: StainParams) -> ColorMap:
    return HistogramMap(match_tables(src, tgt))


_COMPILE: dict[str, Callable[[Any, Any, StainParams], ColorMap]] = {
    "macenko": _compile_stain,
    "vahadane": _compile_stain,
    "reinhard": _compile_reinhard,
    "histmatch": _compile_histmatch,
}
