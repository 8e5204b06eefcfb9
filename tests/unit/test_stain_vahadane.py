"""Vahadane sparse-NMF fit against known stain vectors and against scikit-learn's solver."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from test_stain_macenko import (
    STAIN_SETS,
    WHITE,
    concentrations_from,
    jpeg90,
    load_he,
    render,
    tissue,
)

from wsi_norm.color import is_background, rgb_to_od
from wsi_norm.colormap import compile_colormap
from wsi_norm.errors import FitError
from wsi_norm.metrics import psnr, ssim, stain_matrix_angles_deg
from wsi_norm.stain import StainParams
from wsi_norm.stain.base import order_stains
from wsi_norm.stain.vahadane import fit_vahadane, sparse_code

N_REF = 3000  # pixels given to both solvers in the comparison (scikit-learn is slow)


@pytest.fixture(scope="module")
def conc_maps() -> dict[str, NDArray[np.float64]]:
    """The real patches' concentration maps (the same as test_stain_macenko's)."""
    return {name: concentrations_from(load_he(name)) for name in ("source", "target")}


def _reference_dictionary(od: NDArray[np.float64], seed: int) -> NDArray[np.float64]:
    from sklearn.decomposition import DictionaryLearning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings
        dl = DictionaryLearning(
            n_components=2, alpha=0.1, positive_dict=True, positive_code=True, fit_algorithm="cd",
            transform_algorithm="lasso_cd", random_state=seed, max_iter=200,
        ).fit(od)
    return order_stains(dl.components_)


@pytest.mark.parametrize("stain_set", ["ruifrok", "e10_blue"])
def test_solver_matches_scikit_learn_on_the_same_objective(
    conc_maps: dict[str, NDArray[np.float64]], stain_set: str
) -> None:
    """Without debiasing, at scikit-learn's lambda = 0.1, our solver reaches the same dictionary
    as scikit-learn's DictionaryLearning (or a better one: closer to the truth)."""
    truth = STAIN_SETS[stain_set]
    px = tissue(render(conc_maps["source"], truth))
    od = rgb_to_od(px, white=WHITE)
    keep = np.flatnonzero(np.linalg.norm(od, axis=1) >= 0.3)
    sub = keep[np.random.default_rng(0).choice(len(keep), N_REF, replace=False)]
    ours = stain_matrix_angles_deg(fit_vahadane(
        px[sub], StainParams(max_fit_pixels=N_REF, min_pixels=100, l1_penalty=0.1, debias=False), white=WHITE
    ).stain_matrix, truth)
    ref = stain_matrix_angles_deg(_reference_dictionary(od[sub], 0), truth)
    report = f"{stain_set}: ours H,E={ours.round(2)} sklearn={ref.round(2)}"
    print(report)
    assert np.all(ours <= ref + 0.5), report


@pytest.mark.parametrize("stain_set", ["ruifrok", "e10_blue"])
@pytest.mark.parametrize("compressed", [False, True])
def test_default_vahadane_recovers_known_vectors(
    conc_maps: dict[str, NDArray[np.float64]], stain_set: str, compressed: bool
) -> None:
    """The default (lambda = 0.01, debiased), on 2 x 2 block means as the pipeline fits.

    Measured on this patch: hematoxylin 2.3-2.6 deg off uncompressed and 6.3-6.5 deg after JPEG q90
    4:2:0, eosin <= 1.9 deg (the default Macenko: H 0.1 / 3.7-5.0 deg). The issue's goal (Macenko's:
    <= 5 deg worst after JPEG) is not met by Vahadane here; these bounds guard against regressions.
    """
    from wsi_norm.tissue.sampling import tissue_blocks

    truth = STAIN_SETS[stain_set]
    img = render(conc_maps["source"], truth)
    if compressed:
        img = jpeg90(img)
    ours = stain_matrix_angles_deg(fit_vahadane(tissue_blocks(img), white=WHITE).stain_matrix, truth)
    print(f"{stain_set} jpeg={compressed}: H,E={ours.round(2)}")
    assert ours[1] <= 2.0, ours
    assert ours[0] <= (7.0 if compressed else 3.0), ours


def test_sparse_code_is_optimal() -> None:
    gen = torch.Generator().manual_seed(1)
    od = torch.rand(2000, 3, generator=gen, dtype=torch.float64) * 2
    d = torch.tensor(STAIN_SETS["ruifrok"], dtype=torch.float64)
    conc = sparse_code(od, d, 0.1)
    assert bool((conc >= 0).all())

    def obj(c: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((od - c @ d) ** 2).sum(1) + 0.1 * c.sum(1)

    base = obj(conc)
    for delta in ([1e-3, 0], [-1e-3, 0], [0, 1e-3], [0, -1e-3]):
        moved = torch.clamp(conc + torch.tensor(delta, dtype=torch.float64), min=0)
        assert bool((obj(moved) >= base - 1e-12).all())


def test_vahadane_is_deterministic(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    px = tissue(render(conc_maps["target"], STAIN_SETS["e10_red"]))
    p = StainParams(seed=3, max_fit_pixels=5000)
    a, b = fit_vahadane(px, p, white=WHITE), fit_vahadane(px, p, white=WHITE)
    assert np.array_equal(a.stain_matrix, b.stain_matrix) and np.array_equal(a.max_conc, b.max_conc)


def test_vahadane_registered_pair(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    conc = conc_maps["source"]
    src_img = render(conc, STAIN_SETS["ruifrok"])
    tgt_img = render(conc, STAIN_SETS["e10_red"])
    p = StainParams(max_fit_pixels=5000)
    cmap = compile_colormap("vahadane", fit_vahadane(tissue(src_img), p, white=WHITE),
                            fit_vahadane(tissue(tgt_img), p, white=WHITE), source_white=WHITE, target_white=WHITE)
    out = cmap.apply(src_img)
    mask = ~is_background(tgt_img)
    before = psnr(src_img, tgt_img, mask=mask), ssim(src_img, tgt_img, mask=mask)
    after = psnr(out, tgt_img, mask=mask), ssim(out, tgt_img, mask=mask)
    print(f"vahadane registered pair: before PSNR/SSIM={before}, after={after}")
    assert after[0] >= 30.0 and after[1] >= 0.95, (before, after)


def test_vahadane_no_tissue() -> None:
    with pytest.raises(FitError, match="vahadane: only 0 tissue pixels"):
        fit_vahadane(np.full((3000, 3), 250, dtype=np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vahadane_on_gpu_matches_cpu(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    px = tissue(render(conc_maps["source"], STAIN_SETS["ruifrok"]))
    cpu = fit_vahadane(px, StainParams(max_fit_pixels=5000), white=WHITE)
    gpu = fit_vahadane(px, StainParams(max_fit_pixels=5000, device="cuda"), white=WHITE)
    assert np.all(stain_matrix_angles_deg(cpu.stain_matrix, gpu.stain_matrix) < 0.01)


def test_numpy_and_torch_solvers_are_the_same_function(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    # the CPU fit runs in numpy (no torch import); other devices run the same code in torch:
    # on the CPU both reach the same dictionary to rounding
    from wsi_norm.stain.vahadane import learn_dictionary

    px = tissue(jpeg90(render(conc_maps["source"], STAIN_SETS["e10_blue"])))
    od = rgb_to_od(px, white=WHITE)
    od = od[np.linalg.norm(od, axis=1) >= 0.15][:20000]
    start = np.array(STAIN_SETS["ruifrok"], dtype=np.float64)
    for params in (StainParams(), StainParams(l1_penalty=0.1, debias=False)):
        ours = learn_dictionary(od, start, params)
        theirs = learn_dictionary(torch.from_numpy(od), torch.from_numpy(start), params).numpy()
        assert isinstance(ours, np.ndarray) and np.abs(ours - theirs).max() < 1e-12
        assert np.abs(ours - start).max() > 1e-3  # it did learn


def test_cpu_fit_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, numpy as np; from wsi_norm.stain.vahadane import fit_vahadane; "
            "rng = np.random.default_rng(0); px = rng.integers(40, 200, (5000, 3)).astype(np.uint8); "
            "fit_vahadane(px); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
