"""Gaussian-mixture colour statistics in HSD, after DCGMM (Zanjani et al. 2018).

DCGMM models a tile's colours in HSD (:mod:`wsi_norm.stain.hsd`) as a mixture of K = 4 Gaussians
whose per-pixel memberships a CNN predicts from the density channel alone (so tissue shape decides
the classes), and normalizes each pixel by ``sum_k gamma_k (mu_k^t + sigma_k^t / sigma_k (x - mu_k))``.

What wsi-norm does instead, and why
-----------------------------------
* **Memberships from colour alone**: the mixture is fitted by EM
  (:func:`wsi_norm.stain.mixture.fit_diagonal_mixture`: diagonal covariances, k-means++ start
  seeded by ``params.seed``, scikit-learn's ``GaussianMixture`` algorithm) on a
  seeded subsample (``params.max_fit_pixels``) of the slide-wide tissue sample (luma <= 200),
  in HSD against the slide's white point; K is chosen by BIC among 2-8. A pixel's memberships
  are then a function of its colour, so the normalization is one per-pixel map: one 256^3 LUT,
  no seams between tiles (:class:`wsi_norm.colormap.gmm.GmmMap`).
* **Statistics slide-wide**, not per tile.
* **Components matched to the template's**: DCGMM needs no matching (its channel k is one
  tissue class by training). Two independent EM fits number and split their components
  arbitrarily (a turn of the stain vectors moves every colour; BIC may pick another K), so the
  map refits the source's mixture from the template's components
  (:func:`align_components`: EM on seeded draws from the source mixture, started from the
  template's components, each of which then tracks its own tissue class). Pairing the
  independent fits by the Hungarian algorithm on the distance between component means
  (:func:`match_components`) remains available (``GmmMap(..., components="independent")``). On
  stain vectors turned 12 degrees (``bench/gmm_fidelity.py --cases 6``) the refit reaches a median
  41.2 dB against 28.2 dB for the pairing.
* **Lost**: separating like colours by shape (nuclei and stroma of one colour share a
  component), and exactness under a pure stain change (Macenko's model: 51 dB where the refit
  reaches 41 dB, 25-46 dB by case).

Covariance: diagonal in (D, c_x, c_y); the map scales each HSD channel of a component by
``sigma^t / sigma^s`` of that channel.

References
----------
F. G. Zanjani, S. Zinger, B. E. Bejnordi, J. A. W. M. van der Laak, P. H. N. de With,
"Stain normalization of histopathology images using generative models", MIDL 2018.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import rgb_to_od64
from wsi_norm.errors import FitError
from wsi_norm.runtime import usable_cpus
from wsi_norm.stain.base import StainParams, tissue_pixels, white_of
from wsi_norm.stain.hsd import od_to_hsd
from wsi_norm.stain.mixture import DiagonalMixture, fit_diagonal_mixture

__all__ = [
    "ALIGN_SAMPLES",
    "COMPONENT_RANGE",
    "MAX_MATCH_DISTANCE",
    "MIN_TARGET_WEIGHT",
    "PAIR_SLACK",
    "START_NAMES",
    "ComponentMatch",
    "GmmStats",
    "aggregate_gmm",
    "align_components",
    "fit_gmm",
    "match_components",
]

COMPONENT_RANGE = range(2, 9)
"""Numbers of components BIC chooses among (2-8)."""
MIN_TARGET_WEIGHT = 0.01
"""A target component lighter than this (1 % of tissue) is not matched to (see :func:`match_components`)."""
MAX_MATCH_DISTANCE = 3.0
"""A source component farther than this from every usable target component (pooled standard
deviations, see :func:`match_components`) is absent in the target: it maps by the global moments."""
PAIR_SLACK = 1.0
"""A Hungarian pair is kept only when it is at most this much (pooled standard deviations) farther
than the source component's nearest usable target component; else the nearest is used."""
#: Added to every variance by EM (HSD units^2): no component collapses on one colour.
_REG_COVAR = 1e-4
_MIN_STD = 1e-3


@dataclass(frozen=True)
class GmmStats:
    """A diagonal Gaussian mixture of tissue colours in HSD, plus the slide-wide moments.

    Parameters
    ----------
    weights : (K,) float64, mixture weights, > 0, summing to 1
    means : (K, 3) float64, component means of ``[D, c_x, c_y]`` (D in OD)
    stds : (K, 3) float64, component standard deviations, > 0
    global_mean, global_std : (3,) float64, HSD mean and standard deviation of all tissue
        pixels (std > 0): the fallback map of a component absent in the target
    bic : tuple of (K, BIC) pairs
        The Bayesian information criterion of each number of components tried (provenance; empty
        when unknown, e.g. after aggregation).
    """

    method: ClassVar[str] = "gmm"
    weights: NDArray[np.float64] = field()
    means: NDArray[np.float64] = field()
    stds: NDArray[np.float64] = field()
    global_mean: NDArray[np.float64] = field()
    global_std: NDArray[np.float64] = field()
    bic: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        w = np.array(self.weights, dtype=np.float64)
        m = np.array(self.means, dtype=np.float64)
        s = np.array(self.stds, dtype=np.float64)
        gm = np.array(self.global_mean, dtype=np.float64)
        gs = np.array(self.global_std, dtype=np.float64)
        if w.ndim != 1 or len(w) < 1 or m.shape != (len(w), 3) or s.shape != (len(w), 3):
            raise ValueError(f"weights must be (K,), means and stds (K, 3); got {w.shape}, {m.shape}, {s.shape}")
        if gm.shape != (3,) or gs.shape != (3,):
            raise ValueError(f"global_mean and global_std must be (3,), got {gm.shape} and {gs.shape}")
        if not all(np.all(np.isfinite(a)) for a in (w, m, s, gm, gs)):
            raise ValueError("gmm statistics must be finite")
        if np.any(w <= 0) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be > 0 and sum to 1, got {w.tolist()}")
        if np.any(s <= 0) or np.any(gs <= 0):
            raise ValueError(f"standard deviations must be > 0, got {s.tolist()} and {gs.tolist()}")
        for a in (w, m, s, gm, gs):
            a.flags.writeable = False
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "stds", s)
        object.__setattr__(self, "global_mean", gm)
        object.__setattr__(self, "global_std", gs)
        object.__setattr__(self, "bic", tuple((int(k), float(v)) for k, v in self.bic))

    @property
    def n_components(self) -> int:
        """K."""
        return len(self.weights)

    def to_dict(self) -> dict[str, Any]:
        """``{"gmm_weights", "gmm_means", "gmm_stds", "hsd_mean", "hsd_std", "gmm_bic"}``."""
        return {
            "gmm_weights": self.weights.tolist(),
            "gmm_means": self.means.tolist(),
            "gmm_stds": self.stds.tolist(),
            "hsd_mean": self.global_mean.tolist(),
            "hsd_std": self.global_std.tolist(),
            "gmm_bic": [[k, v] for k, v in self.bic],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict` (``gmm_bic`` optional)."""
        bic = d.get("gmm_bic", [])
        if not isinstance(bic, list) or not all(isinstance(p, list) and len(p) == 2 for p in bic):
            raise ValueError(f"gmm_bic must be a list of [K, BIC] pairs, got {bic!r}")
        return cls(
            weights=np.asarray(d["gmm_weights"], dtype=np.float64),
            means=np.asarray(d["gmm_means"], dtype=np.float64),
            stds=np.asarray(d["gmm_stds"], dtype=np.float64),
            global_mean=np.asarray(d["hsd_mean"], dtype=np.float64),
            global_std=np.asarray(d["hsd_std"], dtype=np.float64),
            bic=tuple((int(k), float(v)) for k, v in bic),
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, GmmStats)
        return bool(
            all(np.array_equal(getattr(self, n), getattr(other, n))
                for n in ("weights", "means", "stds", "global_mean", "global_std"))
            and self.bic == other.bic
        )

    __hash__ = None  # type: ignore[assignment]


def fit_gmm(pixels: NDArray[Any], params: StainParams | None = None, *, white: Any = None) -> GmmStats:
    """Fit a diagonal Gaussian mixture to tissue colours in HSD, K by BIC in 2-8.

    Parameters
    ----------
    pixels : (N, 3) uint8 (or float in [0, 255])
        The slide-wide sample; glass (luma > 200) is dropped.
    params : StainParams, optional
        Reads ``white_point``, ``min_pixels``, ``seed`` (EM's k-means start and the subsample)
        and ``max_fit_pixels`` (the seeded subsample EM runs on).
    white : None, float or (3,) array_like, keyword-only
        The slide's white point (glass intensity per channel; ``params.white_point`` wins): the
        optical density ``-log((I + 1) / (white + 1))`` the HSD coordinates come from.

    Returns
    -------
    GmmStats
        Components sorted by mean density, lightest first.

    Raises
    ------
    FitError
        Fewer than ``min_pixels`` tissue pixels, or a constant HSD channel.
    ValueError, TypeError
        Pixels of the wrong shape or dtype.
    """
    p = params or StainParams()
    tissue = tissue_pixels(pixels)
    if len(tissue) < p.min_pixels:
        raise FitError(f"gmm: only {len(tissue)} tissue pixels (luma <= 200) of {len(pixels)} given; "
                       f"need at least {p.min_pixels}")
    w = white_of(white, p)
    hsd = od_to_hsd(rgb_to_od64(tissue, white=w))
    global_std = hsd.std(axis=0)
    if np.any(global_std < _MIN_STD):
        raise FitError(f"gmm: tissue pixels have a constant HSD channel (std {global_std.tolist()})")
    rng = np.random.default_rng(p.seed)
    sample = hsd if len(hsd) <= p.max_fit_pixels else hsd[np.sort(rng.choice(len(hsd), p.max_fit_pixels, replace=False))]
    candidates = [k for k in COMPONENT_RANGE if k <= len(sample) // 10]
    if not candidates:
        raise FitError(f"gmm: {len(sample)} pixels are too few for a mixture")

    def fit(k: int) -> DiagonalMixture:
        return fit_diagonal_mixture(sample, k, seed=p.seed, reg_covar=_REG_COVAR, max_iter=200)

    # each K is its own seeded fit, so they run side by side, the largest (longest) first so that
    # the threads finish together; the lowest BIC wins, the smaller K on a tie
    with ThreadPoolExecutor(min(len(candidates), usable_cpus()), thread_name_prefix="wsi-norm-gmm") as pool:
        by_k = dict(zip(candidates[::-1], pool.map(fit, candidates[::-1]), strict=True))
    fitted = [by_k[k] for k in candidates]
    scores = [(k, gm.bic(sample)) for k, gm in zip(candidates, fitted, strict=True)]
    best = fitted[min(range(len(scores)), key=lambda i: scores[i][1])]
    order = np.argsort(best.means[:, 0], kind="stable")
    weights = best.weights[order]
    return GmmStats(
        weights=weights / weights.sum(),
        means=best.means[order],
        stds=np.sqrt(best.variances)[order],
        global_mean=hsd.mean(axis=0),
        global_std=global_std,
        bic=tuple(scores),
    )


def aggregate_gmm(stats_list: list[GmmStats]) -> GmmStats:
    """Cohort template: the medoid slide's mixture (mixtures with differently many, arbitrarily
    numbered components have no component-wise median).

    The medoid is the slide whose slide-wide HSD mean and standard deviation lie nearest (sum of
    absolute differences, each channel divided by the cohort's median standard deviation) to the
    cohort's medians; ties go to the earlier slide.
    """
    if not stats_list:
        raise FitError("gmm: cannot aggregate an empty list of stats")
    means = np.stack([s.global_mean for s in stats_list])
    stds = np.stack([s.global_std for s in stats_list])
    scale = np.median(stds, axis=0)
    distance = (np.abs(means - np.median(means, axis=0)) / scale).sum(axis=1) + (
        np.abs(stds - scale) / scale).sum(axis=1)
    chosen = stats_list[int(np.argmin(distance))]
    return GmmStats(chosen.weights, chosen.means, chosen.stds, chosen.global_mean, chosen.global_std)


@dataclass(frozen=True)
class ComponentMatch:
    """Which target component each source component maps to.

    Attributes
    ----------
    target_index : tuple of int, one per source component; -1: none (global fallback)
    how : tuple of str, one per source component:
        ``"aligned"`` (:func:`align_components`: refitted from that template component),
        ``"matched"`` (paired by the Hungarian algorithm), ``"nearest"`` (left over by the
        pairing, or paired too far: mapped like its nearest usable target component) or
        ``"global"`` (no usable target component within :data:`MAX_MATCH_DISTANCE`: the
        component maps by the slides' global HSD moments, ``mu_g^t + sigma_g^t / sigma_g^s (x - mu_g^s)``)
    distance : tuple of float, the matched distance (pooled standard deviations; for aligned, how
        far EM moved the component from its start, source standard deviations; nan for global)
    ignored_targets : tuple of int, target components under :data:`MIN_TARGET_WEIGHT`
    dropped_targets : tuple of int
        Template components whose aligned source component (:func:`align_components`) ended
        under :data:`MIN_TARGET_WEIGHT` of the source's tissue (the source lacks that class):
        dropped from the source mixture, their colours left to the others.
    start : str
        :func:`align_components`' start kept (``"template"`` or ``"carried"``); empty for
        :func:`match_components`.
    """

    target_index: tuple[int, ...]
    how: tuple[str, ...]
    distance: tuple[float, ...]
    ignored_targets: tuple[int, ...]
    dropped_targets: tuple[int, ...] = ()
    start: str = ""

    @property
    def fallbacks(self) -> int:
        """Source components not paired one to one (``nearest`` or ``global``)."""
        return sum(h not in ("matched", "aligned") for h in self.how)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (provenance): target index, how, distance (None for nan)."""
        return {
            "target_index": list(self.target_index),
            "how": list(self.how),
            "distance": [None if not np.isfinite(d) else round(d, 4) for d in self.distance],
            "ignored_targets": list(self.ignored_targets),
            "dropped_targets": list(self.dropped_targets),
            "start": self.start,
        }


def match_components(source: GmmStats, target: GmmStats) -> ComponentMatch:
    """Pair source components with target components (Hungarian algorithm).

    Cost: the Euclidean distance between component means in HSD, each channel divided by the
    pooled slide-wide standard deviation ``sqrt((sigma_g^s^2 + sigma_g^t^2) / 2)`` (so density
    and chromaticity weigh alike; means are not centred on the slides' global means, which move
    with tissue composition). Target components under :data:`MIN_TARGET_WEIGHT` are not used.

    Fallbacks, recorded in the result: a source component the pairing leaves over (K_s > K_t),
    pairs farther than :data:`MAX_MATCH_DISTANCE`, or pairs more than :data:`PAIR_SLACK` farther
    than its nearest usable target component (two fits that split a tissue class differently: the
    one-to-one pairing would send a component to another class) takes its nearest usable target
    component within :data:`MAX_MATCH_DISTANCE` (``"nearest"``); with none, it maps by the global
    moments (``"global"``).

    Returns
    -------
    ComponentMatch
    """
    from scipy.optimize import linear_sum_assignment

    pooled = np.sqrt((source.global_std**2 + target.global_std**2) / 2.0)
    usable = np.flatnonzero(target.weights >= MIN_TARGET_WEIGHT)
    ignored = tuple(int(j) for j in np.flatnonzero(target.weights < MIN_TARGET_WEIGHT))
    k_s = source.n_components
    if len(usable) == 0:
        return ComponentMatch((-1,) * k_s, ("global",) * k_s, (float("nan"),) * k_s, ignored)
    diff = (source.means[:, None, :] - target.means[None, usable, :]) / pooled
    cost = np.sqrt((diff**2).sum(axis=2))  # (K_s, usable)
    rows, cols = linear_sum_assignment(cost)
    paired = dict(zip(rows.tolist(), cols.tolist()))
    index, how, dist = [], [], []
    for k in range(k_s):
        col = paired.get(k)
        nearest = int(np.argmin(cost[k]))
        if col is not None and cost[k, col] <= min(MAX_MATCH_DISTANCE, cost[k, nearest] + PAIR_SLACK):
            index.append(int(usable[col]))
            how.append("matched")
            dist.append(float(cost[k, col]))
            continue
        if cost[k, nearest] <= MAX_MATCH_DISTANCE:
            index.append(int(usable[nearest]))
            how.append("nearest")
            dist.append(float(cost[k, nearest]))
        else:
            index.append(-1)
            how.append("global")
            dist.append(float("nan"))
    return ComponentMatch(tuple(index), tuple(how), tuple(dist), ignored)


#: Seeded draws from the source mixture that :func:`align_components` refits on.
ALIGN_SAMPLES = 20_000
START_NAMES = ("template", "carried")
"""The two starts :func:`align_components` runs EM from (the one EM moves less is kept)."""


def align_components(source: GmmStats, target: GmmStats, *, seed: int = 0,
                     n_samples: int = ALIGN_SAMPLES) -> tuple[GmmStats, ComponentMatch]:
    """Refit the source's tissue colours with EM started from the template's components.

    Two independent EM fits split one tissue differently (a turn of the stain vectors moves
    every colour, and BIC may pick another K), so their components need not correspond, and
    pairing them by mean colour (:func:`match_components`) can send a source class to another
    target class. Here component ``k`` of the returned source mixture *starts* as the
    template's usable component ``k`` (weight >= :data:`MIN_TARGET_WEIGHT`, the template's
    weights), and EM (diagonal, seeded) moves it onto the source tissue it covers: it tracks the
    same tissue class. EM runs from two starts (:data:`START_NAMES`): ``"template"``, the
    template's components as they are (right when only the composition differs), and
    ``"carried"``, carried into the source's colours by the per-channel global moment map
    (``mu_g^s + sigma_g^s / sigma_g^t (mu_k^t - mu_g^t)``, the spreads scaled alike; right when
    the stains moved every colour). The start whose components EM moved less is kept (mean
    distance in source standard deviations weighted by the template's weights, each at most
    :data:`MAX_MATCH_DISTANCE`, a starved component counting that much, plus that distance times
    the weight of absent source components). Source components farther than
    :data:`MAX_MATCH_DISTANCE` from every started template component are added to the start as
    they are, so colours the template lacks keep a component of their own.

    The source's colours are its mixture: ``n_samples`` seeded draws from ``source`` (the
    statistics hold no pixels; the mixture is the slide-wide density the fit found).

    Parameters
    ----------
    source, target : GmmStats
        Independent fits of the slide and the template.
    seed : int, keyword-only
        Seeds the draws and EM.
    n_samples : int, keyword-only
        Draws from the source mixture (>= 100).

    Returns
    -------
    aligned : GmmStats
        The source mixture, one component per usable template component (in the template's
        order) except those EM left under :data:`MIN_TARGET_WEIGHT` (dropped, recorded in
        ``match.dropped_targets``), then one per absent source component; the source's global
        moments.
    match : ComponentMatch
        ``"aligned"`` (component ``k`` maps to the template component it started from) or
        ``"global"``: an absent source component, or an aligned one that EM moved farther than
        :data:`MAX_MATCH_DISTANCE` (source standard deviations) from its start (the guard: it no
        longer tracks that class), mapped by the global moments; ``match.start`` names the
        start kept.

    Raises
    ------
    ValueError
        ``n_samples`` under 100.
    """
    if n_samples < 100:
        raise ValueError(f"n_samples must be >= 100, got {n_samples}")
    usable = np.flatnonzero(target.weights >= MIN_TARGET_WEIGHT)
    ignored = tuple(int(j) for j in np.flatnonzero(target.weights < MIN_TARGET_WEIGHT))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_samples, source.weights)
    draws = np.concatenate([rng.normal(source.means[k], source.stds[k], (n, 3)) for k, n in enumerate(counts)])
    def refit(start_name: str) -> tuple[float, DiagonalMixture, NDArray[np.float64], list[int], str]:
        ratio = source.global_std / target.global_std if start_name == "carried" else np.ones(3)
        start = target.means[usable] if start_name == "template" else (
            source.global_mean + ratio * (target.means[usable] - target.global_mean))
        # a source component farther than MAX_MATCH_DISTANCE (source standard deviations) from
        # every started template component: a colour the template lacks, with a start of its own
        far = np.sqrt((((source.means[:, None, :] - start[None, :, :]) / source.global_std) ** 2).sum(axis=2))
        absent = [k for k in range(source.n_components) if len(usable) == 0 or far[k].min() > MAX_MATCH_DISTANCE]
        means = np.concatenate([start, source.means[absent]])
        stds = np.concatenate([target.stds[usable] * ratio, source.stds[absent]])
        weights = np.concatenate([target.weights[usable], source.weights[absent]])
        gm = fit_diagonal_mixture(draws, len(means), reg_covar=_REG_COVAR, max_iter=200,
                                  start=(weights / weights.sum(), means, stds**2 + _REG_COVAR))
        # how far EM had to move the template's components (source standard deviations, weighted
        # by the template's weights, at most MAX_MATCH_DISTANCE each; a component EM starved
        # counts that much), plus MAX_MATCH_DISTANCE for each absent source component's weight
        moved = np.sqrt((((gm.means[: len(usable)] - start) / source.global_std) ** 2).sum(axis=1))
        starved = gm.weights[: len(usable)] < MIN_TARGET_WEIGHT
        moved = np.where(starved, MAX_MATCH_DISTANCE, np.minimum(moved, MAX_MATCH_DISTANCE))
        movement = float((target.weights[usable] * moved).sum() / max(target.weights[usable].sum(), 1e-12)
                         + MAX_MATCH_DISTANCE * source.weights[absent].sum())
        return movement, gm, start, absent, start_name

    # the two starts' EM runs are independent: side by side; the first start moved least is kept
    with ThreadPoolExecutor(min(len(START_NAMES), usable_cpus()), thread_name_prefix="wsi-norm-gmm") as pool:
        refits = list(pool.map(refit, START_NAMES))
    best: tuple[float, DiagonalMixture, NDArray[np.float64], list[int], str] | None = None
    for candidate in refits:
        if best is None or candidate[0] < best[0]:
            best = candidate
    assert best is not None
    _, gm, start, _, start_name = best
    fitted_w = gm.weights
    keep = np.flatnonzero(fitted_w >= MIN_TARGET_WEIGHT)
    if len(keep) == 0:  # cannot happen: the weights sum to 1 over at most 16 components
        keep = np.array([int(np.argmax(fitted_w))])
    dropped = tuple(int(usable[k]) for k in range(len(usable)) if k not in set(keep.tolist()))
    aligned = GmmStats(
        weights=fitted_w[keep] / fitted_w[keep].sum(),
        means=gm.means[keep],
        stds=np.sqrt(gm.variances[keep]),
        global_mean=source.global_mean,
        global_std=source.global_std,
    )
    index, how, dist = [], [], []
    for kept, k in enumerate(keep.tolist()):
        j = int(usable[k]) if k < len(usable) else -1
        moved_k = float(np.sqrt((((aligned.means[kept] - start[k]) / source.global_std) ** 2).sum())) if j >= 0 else np.nan
        if j >= 0 and moved_k <= MAX_MATCH_DISTANCE:
            index.append(j)
            how.append("aligned")
            dist.append(moved_k)
        else:
            index.append(-1)
            how.append("global")
            dist.append(float("nan"))
    return aligned, ComponentMatch(tuple(index), tuple(how), tuple(dist), ignored, dropped, start=start_name)
