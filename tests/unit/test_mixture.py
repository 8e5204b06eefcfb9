"""The diagonal Gaussian mixture EM (wsi_norm.stain.mixture) against scikit-learn's, on real colours."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from wsi_norm.color import rgb_to_od
from wsi_norm.slide import open_slide
from wsi_norm.stain.base import tissue_pixels
from wsi_norm.stain.hsd import od_to_hsd
from wsi_norm.stain.mixture import DiagonalMixture, fit_diagonal_mixture, kmeans_labels

REG = 1e-4  # the mixture normalizer's regularization


def _hsd_sample(rgb: NDArray[np.uint8], n: int = 20_000, seed: int = 0) -> NDArray[np.float64]:
    tissue = tissue_pixels(rgb.reshape(-1, 3))
    rng = np.random.default_rng(seed)
    picked = tissue[np.sort(rng.choice(len(tissue), min(n, len(tissue)), replace=False))]
    return np.ascontiguousarray(od_to_hsd(rgb_to_od(picked.astype(np.float64), white=240.0)))


@pytest.fixture(scope="module")
def real_hsd(shared_data: Path) -> dict[str, NDArray[np.float64]]:
    from PIL import Image

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        cmu = slide.read_region(0, x=0, y=0, width=1024, height=1024)
    out = {"cmu": _hsd_sample(cmu)}
    for name in ("source", "target"):
        out[name] = _hsd_sample(np.asarray(Image.open(shared_data / "he" / f"torchstain-{name}.png"))[..., :3])
    return out


def _sklearn_fit(x: NDArray[np.float64], k: int, **kwargs: Any) -> Any:
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of an unconverged start is not the point
        return GaussianMixture(k, covariance_type="diag", reg_covar=REG, max_iter=200, **kwargs).fit(x)


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("image", ["cmu", "source", "target"])
def test_em_from_a_given_start_is_scikit_learns(real_hsd: dict[str, NDArray[np.float64]], image: str, k: int) -> None:
    x = real_hsd[image]
    rng = np.random.default_rng(k)
    start = (rng.dirichlet(np.ones(k)) + 0.05, x[rng.choice(len(x), k, replace=False)], np.tile(x.var(axis=0), (k, 1)))
    start = (start[0] / start[0].sum(), start[1], start[2])
    ref = _sklearn_fit(x, k, weights_init=start[0], means_init=start[1], precisions_init=1.0 / start[2], tol=1e-6)
    ours = fit_diagonal_mixture(x, k, reg_covar=REG, tol=1e-6, start=start)
    assert ours.n_iter == ref.n_iter_
    np.testing.assert_allclose(ours.weights, ref.weights_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.means, ref.means_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.variances, ref.covariances_, rtol=1e-8, atol=0)
    assert ours.score(x) == pytest.approx(ref.score(x), abs=1e-10)
    assert ours.bic(x) == pytest.approx(ref.bic(x), abs=1e-6)


@pytest.mark.parametrize("image", ["cmu", "source", "target"])
def test_kmeans_start_fits_as_well_as_scikit_learns(real_hsd: dict[str, NDArray[np.float64]], image: str) -> None:
    # EM finds a local optimum from its start; over K = 2..8 and three seeds each, the best
    # mixture of each K must be as likely as scikit-learn's best within 0.02 nats a pixel
    # (measured: -0.011 to +0.047), and the mixtures must be converged
    x = real_hsd[image]
    for k in range(2, 9):
        ours = [fit_diagonal_mixture(x, k, seed=s, reg_covar=REG) for s in range(3)]
        theirs = [_sklearn_fit(x, k, random_state=s) for s in range(3)]
        assert all(m.converged for m in ours)
        best_ours = max(m.score(x) for m in ours)
        best_theirs = max(float(m.score(x)) for m in theirs)
        assert best_ours >= best_theirs - 0.02, f"{image} K={k}: {best_ours:.4f} against {best_theirs:.4f}"


def test_a_known_mixture_is_recovered() -> None:
    rng = np.random.default_rng(3)
    means = np.array([[0.2, 0.0, 0.1], [0.8, 0.3, -0.2], [1.5, -0.4, 0.3]])
    stds = np.array([[0.05, 0.02, 0.03], [0.1, 0.05, 0.02], [0.08, 0.04, 0.06]])
    weights = np.array([0.5, 0.3, 0.2])
    counts = rng.multinomial(30_000, weights)
    x = np.concatenate([rng.normal(means[k], stds[k], (n, 3)) for k, n in enumerate(counts)])
    fit = fit_diagonal_mixture(x, 3, seed=0, reg_covar=1e-6)
    order = np.argsort(fit.means[:, 0])
    np.testing.assert_allclose(fit.means[order], means, atol=0.01)
    np.testing.assert_allclose(np.sqrt(fit.variances[order]), stds, rtol=0.05)
    np.testing.assert_allclose(fit.weights[order], weights, atol=0.01)
    assert fit.converged and fit.weights.sum() == pytest.approx(1.0)


def test_seeded_and_deterministic(real_hsd: dict[str, NDArray[np.float64]]) -> None:
    x = real_hsd["cmu"]
    a, b = fit_diagonal_mixture(x, 5, seed=4, reg_covar=REG), fit_diagonal_mixture(x, 5, seed=4, reg_covar=REG)
    assert isinstance(a, DiagonalMixture)
    for field in ("weights", "means", "variances"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_kmeans_leaves_no_cluster_empty_on_repeated_points() -> None:
    x = np.repeat(np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), [500, 3], axis=0)
    labels = kmeans_labels(x, 4, rng=np.random.default_rng(0))
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
    fit = fit_diagonal_mixture(x, 4, reg_covar=1e-4)
    assert np.all(np.isfinite(fit.means)) and np.all(fit.variances > 0) and np.all(fit.weights > 0)


def test_bad_input_is_refused() -> None:
    x = np.random.default_rng(0).normal(size=(50, 3))
    with pytest.raises(ValueError, match="k must be in"):
        fit_diagonal_mixture(x, 51)
    with pytest.raises(ValueError, match="k must be in"):
        fit_diagonal_mixture(x, 0)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_diagonal_mixture(bad, 2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_diagonal_mixture(x[:, 0], 2)
    with pytest.raises(ValueError, match="reg_covar"):
        fit_diagonal_mixture(x, 2, reg_covar=0.0)
    with pytest.raises(ValueError, match="start must be"):
        fit_diagonal_mixture(x, 2, start=(np.ones(3) / 3, np.zeros((3, 3)), np.ones((3, 3))))
    with pytest.raises(ValueError, match="> 0"):
        fit_diagonal_mixture(x, 2, start=(np.array([0.5, 0.5]), np.zeros((2, 3)), np.zeros((2, 3))))
