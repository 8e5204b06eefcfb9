"""Macenko fit on Beer-Lambert renderings with known stain vectors (raw and JPEG q90).

Images here are rendered with white point 239 (Macenko's Io = 240) and fitted with it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from wsi_norm.color import is_background, od_to_rgb, rgb_to_od
from wsi_norm.colormap import compile_colormap
from wsi_norm.errors import FitError
from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.stain import StainParams
from wsi_norm.stain.base import order_stains
from wsi_norm.stain.macenko import MacenkoStats, aggregate_macenko
from wsi_norm.stain.macenko import fit_macenko as _fit_macenko
from wsi_norm.testing.data import data_dir
from wsi_norm.tissue.sampling import tissue_blocks

WHITE = 239.0


def fit_macenko(pixels: NDArray[np.generic], params: StainParams | None = None) -> MacenkoStats:
    return _fit_macenko(pixels, params, white=WHITE)

DATA = data_dir()


def _unit(v: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _rotate(v: ArrayLike, toward: ArrayLike, deg: float) -> NDArray[np.float64]:
    u, t = _unit(v), _unit(toward)
    t = _unit(t - u * (t @ u))
    a = np.radians(deg)
    return _unit(np.cos(a) * u + np.sin(a) * t)


RUIFROK_H = _unit([0.65, 0.70, 0.29])
RUIFROK_E = _unit([0.07, 0.99, 0.11])  # eosin with small red OD
STAIN_SETS = {
    "ruifrok": np.stack([RUIFROK_H, RUIFROK_E]),
    # eosin 10 deg from Ruifrok's, red OD still 0.07; hematoxylin 3 deg off
    "e10_blue": np.stack([_rotate(RUIFROK_H, [0.3, 0.9, 0.3], 3), _rotate(RUIFROK_E, [0, 0, 1], 10)]),
    "e10_red": np.stack([_rotate(RUIFROK_H, [0, 0, 1], 5), _rotate(RUIFROK_E, [1, 0, 0], 10)]),
}


def load_he(name: str) -> NDArray[np.uint8]:
    rgb: NDArray[np.uint8] = np.asarray(Image.open(DATA / "he" / f"torchstain-{name}.png"))[..., :3].copy()
    return rgb


def concentrations_from(img: NDArray[np.uint8]) -> NDArray[np.float64]:
    """Real texture as a (H, W, 2) concentration map with single-stain regions.

    The image is unmixed with its own textbook Macenko fit (alpha = 3 %); negative
    concentrations are clipped, so the ~3 % most extreme pixels of each stain become
    single-stained (nuclear interiors, pure stroma), as the estimator's model assumes.
    """
    px = img.reshape(-1, 3)
    stats = fit_macenko(px, StainParams(macenko_variant="textbook", alpha=3.0))
    conc = rgb_to_od(px, white=WHITE) @ np.linalg.pinv(stats.stain_matrix)
    out: NDArray[np.float64] = np.clip(conc, 0, None).reshape(img.shape[:2] + (2,))
    return out


def render(
    conc: NDArray[np.float64], stain_matrix: NDArray[np.float64], white: float = WHITE
) -> NDArray[np.uint8]:
    """Beer-Lambert: rgb = (white + 1) * exp(-conc @ M) - 1 (the inverse of our OD), uint8."""
    rgb: NDArray[np.uint8] = np.clip(np.rint(od_to_rgb(conc @ stain_matrix, white=white)), 0, 255).astype(np.uint8)
    return rgb


def jpeg90(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, subsampling=2)  # 4:2:0 chroma
    decoded: NDArray[np.uint8] = np.asarray(Image.open(buf)).copy()
    return decoded


def tissue(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    px = img.reshape(-1, 3)
    kept: NDArray[np.uint8] = px[~is_background(px)]
    return kept


@pytest.fixture(scope="module")
def conc_maps() -> dict[str, NDArray[np.float64]]:
    return {name: concentrations_from(load_he(name)) for name in ("source", "target")}


@pytest.mark.parametrize("image", ["source", "target"])
@pytest.mark.parametrize("stain_set", sorted(STAIN_SETS))
def test_default_macenko_recovers_known_vectors(
    conc_maps: dict[str, NDArray[np.float64]], image: str, stain_set: str
) -> None:
    truth = STAIN_SETS[stain_set]
    img = render(conc_maps[image], truth)
    strong = stain_matrix_angles_deg(fit_macenko(tissue(img)).stain_matrix, truth)
    textbook = stain_matrix_angles_deg(
        fit_macenko(tissue(img), StainParams(macenko_variant="textbook")).stain_matrix, truth
    )
    jpg = stain_matrix_angles_deg(fit_macenko(tissue_blocks(jpeg90(img))).stain_matrix, truth)
    report = f"{image}/{stain_set}: strong H,E={strong.round(2)} textbook={textbook.round(2)} strong+jpeg90={jpg.round(2)}"
    print(report)
    # uncompressed: both stains within 1 deg
    assert np.all(strong <= 1.0), report
    # after JPEG q90 (4:2:0), on 2 x 2 block means as the sampler gives them: measured 2.0-5.0 deg (H),
    # 0.8-3.4 deg (E) on these patches; the goal, 5 deg, is not met everywhere (BENCHMARKS.md)
    assert np.all(jpg <= 5.5), report


@pytest.mark.parametrize("image", ["source", "target"])
def test_agrees_with_textbook_on_clean_slides_unmixed_by_construction(image: str) -> None:
    """A real patch unmixed by the textbook estimator itself and re-rendered, uncompressed, in the
    same basis (its stains are the textbook's by construction): the default variant agrees with a
    plain textbook Macenko within 1 deg."""
    px = load_he(image).reshape(-1, 3)
    textbook_params = StainParams(macenko_variant="textbook")
    basis = fit_macenko(px, textbook_params).stain_matrix
    conc = np.clip(rgb_to_od(px, white=WHITE) @ np.linalg.pinv(basis), 0, None)
    img = render(conc, basis)
    textbook = fit_macenko(tissue(img), textbook_params).stain_matrix
    strong = fit_macenko(tissue(img)).stain_matrix
    assert np.all(stain_matrix_angles_deg(textbook, basis) <= 1.0)
    assert np.all(stain_matrix_angles_deg(strong, textbook) <= 1.0)


def test_textbook_beta_rule_loses_eosin_and_the_default_does_not(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    truth = STAIN_SETS["e10_blue"]
    img = render(conc_maps["target"], truth)
    textbook = stain_matrix_angles_deg(
        fit_macenko(tissue(img), StainParams(macenko_variant="textbook")).stain_matrix, truth
    )
    strong = stain_matrix_angles_deg(fit_macenko(tissue(img)).stain_matrix, truth)
    assert textbook[1] > 3.0 and strong[1] < 1.0, (textbook, strong)


def test_hematoxylin_heavy_keeps_eosin(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    """wsi-norm 0.1's 'robust' variant took the angles of the slide's strongest pixels and put eosin
    22-33 deg off on hematoxylin-heavy slides; the default picks the strongest pixels per side."""
    truth = STAIN_SETS["e10_red"]
    conc = conc_maps["source"] * np.array([1.6, 0.6])
    img = render(conc, truth)
    strong = stain_matrix_angles_deg(fit_macenko(tissue(img)).stain_matrix, truth)
    assert np.all(strong <= 1.5), strong
    with pytest.raises(ValueError, match="'robust' variant of wsi-norm 0.1 was removed"):
        StainParams(macenko_variant="robust")  # type: ignore[arg-type]  # invalid on purpose: the runtime check


def test_stats_are_ordered_unit_and_positive(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    stats = fit_macenko(tissue(render(conc_maps["source"], STAIN_SETS["ruifrok"])))
    np.testing.assert_allclose(np.linalg.norm(stats.stain_matrix, axis=1), 1.0, atol=1e-12)
    assert stats.stain_matrix[0, 0] > stats.stain_matrix[1, 0]  # hematoxylin first
    assert np.all(stats.max_conc > 0)


def test_registered_pair_normalises_to_target(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    from wsi_norm.metrics import psnr, ssim

    conc = conc_maps["source"]
    src_img = render(conc, STAIN_SETS["ruifrok"])
    tgt_img = render(conc, STAIN_SETS["e10_red"])
    src, tgt = fit_macenko(tissue(src_img)), fit_macenko(tissue(tgt_img))
    out = compile_colormap("macenko", src, tgt, source_white=WHITE, target_white=WHITE).apply(src_img)
    mask = ~is_background(tgt_img)
    before = psnr(src_img, tgt_img, mask=mask), ssim(src_img, tgt_img, mask=mask)
    after = psnr(out, tgt_img, mask=mask), ssim(out, tgt_img, mask=mask)
    print(f"macenko registered pair: before PSNR/SSIM={before}, after={after}")
    assert after[0] >= 30.0 and after[1] >= 0.95, (before, after)
    assert after[0] > before[0] + 5


def test_no_tissue_raises() -> None:
    glass = np.full((5000, 3), 235, dtype=np.uint8)
    with pytest.raises(FitError, match=r"only 0 tissue pixels .* need at least 1000"):
        fit_macenko(glass)


def test_single_stain_raises(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    conc = conc_maps["source"].copy()
    conc[..., 1] = 0.0  # hematoxylin only
    img = render(conc, STAIN_SETS["ruifrok"])
    with pytest.raises(FitError, match="deg apart|absent"):
        fit_macenko(tissue(img))


def test_black_pixels_do_not_break_the_fit(conc_maps: dict[str, NDArray[np.float64]]) -> None:
    img = render(conc_maps["source"], STAIN_SETS["ruifrok"]).reshape(-1, 3).copy()
    img[:500] = 0  # pure black
    stats = fit_macenko(tissue(img))
    assert np.all(np.isfinite(stats.stain_matrix)) and np.all(np.isfinite(stats.max_conc))
    assert np.all(stain_matrix_angles_deg(stats.stain_matrix, STAIN_SETS["ruifrok"]) < 2.0)


def test_wrong_dtype_and_shape() -> None:
    with pytest.raises(TypeError, match="uint8"):
        fit_macenko(np.zeros((10, 3), dtype=np.int16))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        fit_macenko(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 255\]"):
        fit_macenko(np.full((10, 3), 300.0))


def test_aggregate_is_median_and_renormalised() -> None:
    a = MacenkoStats(stain_matrix=order_stains(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])), max_conc=np.array([1.0, 0.5]))
    b = MacenkoStats(stain_matrix=order_stains(np.array([[0.60, 0.75, 0.30], [0.10, 0.95, 0.20]])), max_conc=np.array([2.0, 1.0]))
    c = MacenkoStats(stain_matrix=order_stains(np.array([[0.70, 0.65, 0.25], [0.05, 0.98, 0.15]])), max_conc=np.array([3.0, 0.7]))
    agg = aggregate_macenko([a, b, c])
    np.testing.assert_allclose(agg.max_conc, [2.0, 0.7])
    np.testing.assert_allclose(np.linalg.norm(agg.stain_matrix, axis=1), 1.0)
    med = np.median(np.stack([a.stain_matrix, b.stain_matrix, c.stain_matrix]), axis=0)
    np.testing.assert_allclose(agg.stain_matrix, med / np.linalg.norm(med, axis=1, keepdims=True))
