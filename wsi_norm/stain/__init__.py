"""Stain normalisation methods and their registry.

Each method provides ``fit_<method>(pixels, params) -> <Method>Stats``,
``aggregate_<method>(stats_list)`` and a colour map; this module dispatches
on the method name through explicit dict maps.

Methods: ``"macenko"``, ``"vahadane"``, ``"reinhard"``, ``"histmatch"``, ``"gmm"``. Fits are pure:
pixels in, statistics out. Turning two fits into a colour map is the next stage's job
(:func:`wsi_norm.colormap.compile_colormap`); StainNet is a learned map, not fitted here
(:mod:`wsi_norm.colormap.stainnet`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from wsi_norm.stain.base import StainParams, Stats
from wsi_norm.stain.gmm import GmmStats, aggregate_gmm, fit_gmm
from wsi_norm.stain.histmatch import (
    HistMatchStats,
    aggregate_histmatch,
    fit_histmatch,
)
from wsi_norm.stain.macenko import MacenkoStats, aggregate_macenko, fit_macenko
from wsi_norm.stain.reinhard import ReinhardStats, aggregate_reinhard, fit_reinhard
from wsi_norm.stain.vahadane import VahadaneStats, aggregate_vahadane, fit_vahadane

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "REGISTRY",
    "STAIN_MATRIX_METHODS",
    "GmmStats",
    "HistMatchStats",
    "MacenkoStats",
    "MethodSpec",
    "ReinhardStats",
    "StainParams",
    "Stats",
    "VahadaneStats",
    "aggregate_stats",
    "check_method",
    "default_params",
    "fit_gmm",
    "fit_histmatch",
    "fit_macenko",
    "fit_reinhard",
    "fit_stats",
    "fit_vahadane",
    "method_params",
    "stats_from_dict",
    "stats_type",
]

@dataclass(frozen=True)
class MethodSpec:
    """One fitted method: how to fit it, aggregate a cohort, and what its statistics are."""

    name: str
    fit: Callable[..., Any]
    aggregate: Callable[[list[Any]], Any]
    stats: type[Any]
    stain_matrix: bool
    """True when the statistics are stain vectors (fitted in optical density against the white
    point, so the fit takes the slide's white point)."""
    params: tuple[str, ...]
    """The :class:`StainParams` fields the method's fit reads (``white_point`` for every method: the
    pipeline measures or fixes the white point with it); what its templates record. ``device``
    (where the work ran) is never recorded."""
    od: bool = False
    """True when a method that is not a stain-matrix method still fits in optical density against
    the slide's white point (so its fit takes ``white=`` too): ``gmm``."""


# The fields each fit reads (see fit_<method>): Vahadane starts from the strong Macenko variant,
# so it reads that variant's knobs but not ``macenko_variant``.
_MACENKO_PARAMS = ("white_point", "macenko_variant", "alpha", "beta", "edge_band", "edge_strong",
                   "max_od", "max_conc_percentile", "min_pixels", "min_stain_angle_deg", "codec_correction",
                   "fit_on")
_VAHADANE_PARAMS = ("white_point", "alpha", "beta", "edge_band", "edge_strong", "max_od",
                    "l1_penalty", "debias", "max_conc_percentile", "min_pixels",
                    "min_stain_angle_deg", "seed", "max_fit_pixels", "iterations", "codec_correction",
                    "fit_on")
_PIXEL_STATS_PARAMS = ("white_point", "min_pixels")
_GMM_PARAMS = ("white_point", "min_pixels", "seed", "max_fit_pixels")


#: The registry: every other list of method names derives from it.
REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("macenko", fit_macenko, aggregate_macenko, MacenkoStats, stain_matrix=True,
                   params=_MACENKO_PARAMS),
        MethodSpec("vahadane", fit_vahadane, aggregate_vahadane, VahadaneStats, stain_matrix=True,
                   params=_VAHADANE_PARAMS),
        MethodSpec("reinhard", fit_reinhard, aggregate_reinhard, ReinhardStats, stain_matrix=False,
                   params=_PIXEL_STATS_PARAMS),
        MethodSpec("histmatch", fit_histmatch, aggregate_histmatch, HistMatchStats,
                   stain_matrix=False, params=_PIXEL_STATS_PARAMS),
        MethodSpec("gmm", fit_gmm, aggregate_gmm, GmmStats, stain_matrix=False, params=_GMM_PARAMS,
                   od=True),
    )
}
METHODS = tuple(REGISTRY)
#: Methods whose statistics are stain vectors (fitted in optical density against the white point).
STAIN_MATRIX_METHODS = tuple(name for name, spec in REGISTRY.items() if spec.stain_matrix)
#: Every method the pipeline runs: the fitted ones, the learned StainNet map (applied from a
#: checkpoint, fitted nothing: :mod:`wsi_norm.colormap.stainnet`) and ``none``, the identity.
ALL_METHODS = (*METHODS, "stainnet", "none")


def check_method(method: str, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming the known methods unless ``method`` is one of them."""
    known = METHODS + (("none",) if allow_none else ())
    if method not in known:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(known)}")


def stats_type(method: str) -> type:
    """The statistics class ``fit_stats(method, ...)`` returns."""
    check_method(method)
    return REGISTRY[method].stats


def default_params(method: str) -> StainParams:
    """Default parameters of a method (one :class:`StainParams` serves all methods)."""
    check_method(method, allow_none=True)
    return StainParams()


def method_params(method: str, params: StainParams | None = None) -> dict[str, Any]:
    """The fields of ``params`` (default :class:`StainParams`) that ``method`` reads, as plain JSON
    values: what a template of that method records (:attr:`MethodSpec.params`)."""
    check_method(method)
    values = (params or StainParams()).to_dict()
    return {name: values[name] for name in REGISTRY[method].params}


def fit_stats(
    method: str, pixels: NDArray[Any], params: StainParams | None = None, *, white: Any = None
) -> Any:
    """Fit ``method``'s statistics to ``(N, 3)`` tissue pixels (see ``fit_<method>``).

    ``white`` (the slide's white point, (3,)) is used by the methods fitted in optical density
    (the stain-matrix methods and ``gmm``).
    """
    check_method(method)
    spec = REGISTRY[method]
    if spec.stain_matrix or spec.od:
        return spec.fit(pixels, params, white=white)
    return spec.fit(pixels, params)


def aggregate_stats(method: str, stats_list: Sequence[Any]) -> Any:
    """Robust cohort aggregate of several slides' statistics (see ``aggregate_<method>``)."""
    check_method(method)
    spec = REGISTRY[method]
    for s in stats_list:
        if not isinstance(s, spec.stats):
            raise TypeError(f"{method}: expected {spec.stats.__name__}, got {type(s).__name__}")
    return spec.aggregate(list(stats_list))


def stats_from_dict(method: str, d: dict[str, Any]) -> Any:
    """Rebuild ``method``'s statistics from ``Stats.to_dict()`` output."""
    check_method(method)
    return REGISTRY[method].stats.from_dict(d)
