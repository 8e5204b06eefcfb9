"""Stain normalisation methods and their registry.

Each method provides ``fit_<method>(pixels, params) -> <Method>Stats``,
``aggregate_<method>(stats_list)`` and a colour map; this module dispatches
on the method name through explicit dict maps.

Methods: ``"macenko"``, ``"vahadane"``, ``"reinhard"``, ``"histmatch"``. Fits are pure:
pixels in, statistics out. Turning two fits into a colour map is the next stage's job
(:func:`wsi_norm.colormap.compile_colormap`); StainNet is a learned map, not fitted here
(:mod:`wsi_norm.colormap.stainnet`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_norm.stain.base import StainParams, Stats
from wsi_norm.stain.histmatch import (
    HistMatchStats,
    aggregate_histmatch,
    fit_histmatch,
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
    "check_method",
    "default_params",
    "fit_histmatch",
    "fit_macenko",
    "fit_reinhard",
    "fit_stats",
    "fit_vahadane",
    "stats_from_dict",
    "stats_type",
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


def check_method(method: str, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming the known methods unless ``method`` is one of them."""
    known = METHODS + (("none",) if allow_none else ())
    if method not in known:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(known)}")


def stats_type(method: str) -> type:
    """The statistics class ``fit_stats(method, ...)`` returns."""
    check_method(method)
    return _STATS_TYPE[method]


def default_params(method: str) -> StainParams:
    """Default parameters of a method (one :class:`StainParams` serves all methods)."""
    check_method(method, allow_none=True)
    return StainParams()


def fit_stats(
    method: str, pixels: NDArray[Any], params: StainParams | None = None, *, white: Any = None
) -> Any:
    """Fit ``method``'s statistics to ``(N, 3)`` tissue pixels (see ``fit_<method>``).

    ``white`` (the slide's white point, (3,)) is used by the stain-matrix methods only.
    """
    check_method(method)
    if method in STAIN_MATRIX_METHODS:
        return _FIT[method](pixels, params, white=white)  # type: ignore[call-arg]
    return _FIT[method](pixels, params)


def aggregate_stats(method: str, stats_list: Sequence[Any]) -> Any:
    """Robust cohort aggregate of several slides' statistics (see ``aggregate_<method>``)."""
    check_method(method)
    expected = _STATS_TYPE[method]
    for s in stats_list:
        if not isinstance(s, expected):
            raise TypeError(f"{method}: expected {expected.__name__}, got {type(s).__name__}")
    return _AGGREGATE[method](list(stats_list))


def stats_from_dict(method: str, d: dict[str, Any]) -> Any:
    """Rebuild ``method``'s statistics from ``Stats.to_dict()`` output."""
    check_method(method)
    return _STATS_TYPE[method].from_dict(d)
