"""Diagonal Gaussian mixtures fitted by EM, with a seeded k-means++ start.

The mixture normalizer (:mod:`wsi_norm.stain.gmm`) fits mixtures of three-dimensional HSD colours
with diagonal covariances, K = 2-8, several times a slide. It used scikit-learn's
``GaussianMixture``, which costs ~1.6 s to import (scipy.stats and its array-API machinery come
with it) and runs its loops under the GIL; for three dimensions and diagonal covariances EM has
closed-form steps of a few array operations, written here. The algorithm is the textbook one as
scikit-learn implements it (the same E- and M-steps, regularization, stopping rule and BIC), so
from the same start the two fit the same mixture
(``tests/unit/test_mixture.py::test_em_from_a_given_start_is_scikit_learns``); the k-means++
start is drawn by numpy's generator, so from ``seed`` alone the two start from different centres.

References
----------
A. P. Dempster, N. M. Laird, D. B. Rubin, "Maximum likelihood from incomplete data via the EM
algorithm", J. R. Stat. Soc. B 39 (1977).
D. Arthur, S. Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
G. Schwarz, "Estimating the dimension of a model", Ann. Stat. 6 (1978) (BIC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DiagonalMixture", "fit_diagonal_mixture", "kmeans_labels"]

_EPS = 10 * np.finfo(np.float64).eps  # added to each component's responsibility sum
_LOG_2PI = math.log(2.0 * math.pi)
_NEGLIGIBLE_LOG = -36.0  # exp(-36) = 2.3e-16


@dataclass(frozen=True)
class DiagonalMixture:
    """A fitted mixture of Gaussians with diagonal covariances.

    Parameters
    ----------
    weights : (K,) float64, > 0, summing to 1
    means : (K, D) float64
    variances : (K, D) float64, > 0 (regularization included)
    converged : bool
        EM stopped because the mean log-likelihood changed by less than ``tol``.
    n_iter : int
        EM iterations run.
    """

    weights: NDArray[np.float64]
    means: NDArray[np.float64]
    variances: NDArray[np.float64]
    converged: bool
    n_iter: int

    def score(self, x: NDArray[np.float64]) -> float:
        """Mean log-likelihood ``mean_i log sum_k w_k N(x_i; mu_k, diag(var_k))`` of the rows of
        ``x`` ``(N, D)``."""
        em_pass, _ = _kernels()
        k, d = self.means.shape
        discard = (np.empty(k), np.empty((k, d)), np.empty((k, d)))  # the M-step it also computes
        return float(em_pass(np.ascontiguousarray(x, dtype=np.float64), self.weights, self.means,
                             self.variances, 0.0, *discard))

    def bic(self, x: NDArray[np.float64]) -> float:
        """Bayesian information criterion on ``x``: ``-2 n score + p log n``, ``p = 2 K D + K - 1``
        free parameters (means, variances, weights)."""
        k, d = (int(v) for v in self.means.shape)
        n = int(x.shape[0])
        return -2.0 * self.score(x) * n + (2 * k * d + k - 1) * math.log(n)


def _em_pass(x: Any, weights: Any, means: Any, variances: Any, reg_covar: float,
             out_weights: Any, out_means: Any, out_variances: Any) -> float:  # pragma: no cover - compiled
    """One EM iteration in one pass over the rows (compiled by numba, :func:`_kernels`): the
    E-step's responsibilities, accumulated straight into the M-step's sums (no ``(N, K)``
    array). Writes the new parameters into ``out_*``; returns the mean log-likelihood of ``x``
    under the old ones."""
    n, d = x.shape
    k = means.shape[0]
    const = np.empty(k)
    precision = np.empty((k, d))
    for j in range(k):
        log_det = 0.0
        for c in range(d):
            precision[j, c] = 1.0 / variances[j, c]
            log_det += math.log(variances[j, c])
        const[j] = math.log(weights[j]) - 0.5 * (d * _LOG_2PI + log_det)
    nk = np.zeros(k)
    sums = np.zeros((k, d))
    squares = np.zeros((k, d))
    lp = np.empty(k)
    total = 0.0
    for i in range(n):
        top = -np.inf
        for j in range(k):
            s = 0.0
            for c in range(d):
                diff = x[i, c] - means[j, c]
                s += diff * diff * precision[j, c]
            lp[j] = const[j] - 0.5 * s
            top = max(top, lp[j])
        acc = 0.0
        for j in range(k):
            # a component more than e^36 less likely than the nearest adds under 2.3e-16 of
            # the row's mass (below float64 resolution of the sum): taken as 0, exp skipped
            lp[j] = math.exp(lp[j] - top) if lp[j] - top > _NEGLIGIBLE_LOG else 0.0
            acc += lp[j]
        total += top + math.log(acc)
        inv = 1.0 / acc
        for j in range(k):
            r = lp[j] * inv
            nk[j] += r
            for c in range(d):
                v = x[i, c]
                sums[j, c] += r * v
                squares[j, c] += r * v * v
    mass = 0.0
    for j in range(k):
        nk[j] += _EPS
        mass += nk[j]
    for j in range(k):
        out_weights[j] = nk[j] / mass
        for c in range(d):
            mean = sums[j, c] / nk[j]
            out_means[j, c] = mean
            out_variances[j, c] = squares[j, c] / nk[j] - mean * mean + reg_covar
    return float(total / n)


def _lloyd_pass(x: Any, centres: Any, labels: Any, counts: Any, sums: Any) -> bool:  # pragma: no cover - compiled
    """Assign each row to its nearest centre and sum the rows per centre (compiled by numba,
    :func:`_kernels`); returns whether any label changed."""
    n, d = x.shape
    k = centres.shape[0]
    changed = False
    counts[:] = 0
    sums[:] = 0.0
    for i in range(n):
        best = 0
        best_d = np.inf
        for j in range(k):
            s = 0.0
            for c in range(d):
                diff = x[i, c] - centres[j, c]
                s += diff * diff
            if s < best_d:
                best_d = s
                best = j
        if labels[i] != best:
            labels[i] = best
            changed = True
        counts[best] += 1
        for c in range(d):
            sums[best, c] += x[i, c]
    return changed


_KERNELS: tuple[Any, Any] | None = None


def _kernels() -> tuple[Any, Any]:
    """:func:`_em_pass` and :func:`_lloyd_pass`, compiled once (numba, cached on disk, GIL
    released: the mixtures for several K fit side by side on threads)."""
    global _KERNELS
    if _KERNELS is None:
        import numba

        jit = numba.njit(nogil=True, cache=True)
        _KERNELS = (jit(_em_pass), jit(_lloyd_pass))
    return _KERNELS


def _start_of_labels(x: NDArray[np.float64], labels: NDArray[np.intp], k: int, reg_covar: float
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """EM's start from hard labels: the M-step of one-hot responsibilities (each cluster's
    share, mean and regularized variance)."""
    nk = np.bincount(labels, minlength=k) + _EPS
    sums = np.stack([np.bincount(labels, weights=x[:, c], minlength=k) for c in range(x.shape[1])], axis=1)
    squares = np.stack([np.bincount(labels, weights=x[:, c] ** 2, minlength=k) for c in range(x.shape[1])], axis=1)
    means = sums / nk[:, None]
    return nk / nk.sum(), means, squares / nk[:, None] - means**2 + reg_covar


def kmeans_labels(x: NDArray[np.float64], k: int, *, rng: np.random.Generator, max_iter: int = 300,
                  tol: float = 1e-4) -> NDArray[np.intp]:
    """Cluster labels of the rows of ``x`` by Lloyd's k-means from a greedy k-means++ start.

    Parameters
    ----------
    x : (N, D) float64, C-contiguous, N >= k
    k : int, >= 1
    rng : numpy.random.Generator, keyword-only
        Draws the start (the first centre, then ``2 + floor(ln k)`` candidates per further
        centre, the one that lowers the inertia most kept).
    max_iter : int, keyword-only
        Lloyd iterations at most.
    tol : float, keyword-only
        Stop when the centres move by less than ``tol`` times the mean per-dimension variance
        of ``x`` (summed squared shift), or when no label changes.

    Returns
    -------
    labels : (N,) intp in [0, k); every cluster non-empty (an emptied cluster takes the point
        farthest from its centre)
    """
    n = x.shape[0]
    _, lloyd = _kernels()

    def sq_distances(centres: NDArray[np.float64]) -> NDArray[np.float64]:
        distances: NDArray[np.float64] = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        return distances

    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    closest = sq_distances(centres[:1])[:, 0]
    trials = 2 + int(math.log(k))
    for c in range(1, k):
        total = closest.sum()
        if total <= 0.0:  # every point sits on a centre: any point will do
            centres[c] = x[rng.integers(n)]
            continue
        picks = np.minimum(np.searchsorted(np.cumsum(closest), rng.random(trials) * total), n - 1)
        candidates = np.minimum(closest[:, None], sq_distances(x[picks]))
        best = int(np.argmin(candidates.sum(axis=0)))
        centres[c] = x[picks[best]]
        closest = candidates[:, best]
    threshold = tol * float(x.var(axis=0).mean())
    labels = np.full(n, -1, dtype=np.intp)
    counts = np.zeros(k, dtype=np.intp)
    sums = np.zeros_like(centres)
    for _ in range(max_iter):
        changed = lloyd(x, centres, labels, counts, sums)
        if not changed:
            break
        new = centres.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        if not filled.all():  # an empty cluster restarts at the points farthest from their centres
            far = np.argsort(-((x - new[labels]) ** 2).sum(axis=1), kind="stable")
            new[~filled] = x[far[: int((~filled).sum())]]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= threshold:
            lloyd(x, centres, labels, counts, sums)  # the labels of the final centres
            break
    empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if len(empty):  # a last reassignment emptied a cluster: give it the farthest points
        far = np.argsort(-((x - centres[labels]) ** 2).sum(axis=1), kind="stable")
        labels[far[: len(empty)]] = empty
    return labels


def fit_diagonal_mixture(
    x: NDArray[np.float64],
    k: int,
    *,
    seed: int = 0,
    reg_covar: float = 1e-6,
    max_iter: int = 200,
    tol: float = 1e-3,
    start: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None = None,
) -> DiagonalMixture:
    """Fit a ``k``-component diagonal Gaussian mixture to the rows of ``x`` by EM.

    Parameters
    ----------
    x : (N, D) float, finite, N >= k
    k : int, >= 1
    seed : int, keyword-only
        Seeds the k-means++ start (ignored with ``start``).
    reg_covar : float, keyword-only
        Added to every variance in every M-step (> 0): no component collapses onto one point.
    max_iter : int, keyword-only
        EM iterations at most.
    tol : float, keyword-only
        EM stops when the mean log-likelihood changes by less than this between iterations.
    start : (weights (K,), means (K, D), variances (K, D)), keyword-only, optional
        Start from these parameters instead of k-means (EM's first step is then an E-step).

    Returns
    -------
    DiagonalMixture
        The parameters after the last M-step.

    Raises
    ------
    ValueError
        ``x`` not 2-D, not finite or with fewer rows than ``k``; ``k``, ``reg_covar``,
        ``max_iter`` or ``tol`` out of range; a ``start`` of the wrong shape or with
        non-positive weights or variances.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be (N, D) with N > 0, got shape {x.shape}")
    if k < 1 or x.shape[0] < k:
        raise ValueError(f"k must be in [1, N = {x.shape[0]}], got {k}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x must be finite")
    if not (reg_covar > 0 and max_iter >= 1 and tol >= 0):
        raise ValueError(f"need reg_covar > 0, max_iter >= 1, tol >= 0; got {reg_covar}, {max_iter}, {tol}")
    if start is None:
        labels = kmeans_labels(x, k, rng=np.random.default_rng(seed))
        weights, means, variances = _start_of_labels(x, labels, k, reg_covar)
    else:
        weights, means, variances = (np.array(a, dtype=np.float64) for a in start)
        if weights.shape != (k,) or means.shape != (k, x.shape[1]) or variances.shape != (k, x.shape[1]):
            raise ValueError(f"start must be weights ({k},), means and variances ({k}, {x.shape[1]}); "
                             f"got {weights.shape}, {means.shape}, {variances.shape}")
        if not (np.all(weights > 0) and np.all(variances > 0) and np.all(np.isfinite(means))):
            raise ValueError("start weights and variances must be > 0 and means finite")
        weights = weights / weights.sum()
    em_pass, _ = _kernels()
    lower_bound = -np.inf
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        new = (np.empty_like(weights), np.empty_like(means), np.empty_like(variances))
        previous, lower_bound = lower_bound, float(em_pass(x, weights, means, variances, reg_covar, *new))
        weights, means, variances = new
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return DiagonalMixture(weights=weights, means=means, variances=variances, converged=converged, n_iter=n_iter)
