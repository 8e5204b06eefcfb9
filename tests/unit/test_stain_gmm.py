"""The mixture-model normalizer (``--method gmm``): HSD, the fit, matching, the map, the wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from wsi_norm.color import luma
from wsi_norm.colormap import GmmMap, compile_colormap
from wsi_norm.colormap.maps import GlassBlend
from wsi_norm.errors import FitError, TemplateError
from wsi_norm.pipeline import SlideFit, fit_slide, template_from_fits
from wsi_norm.stain import REGISTRY, StainParams, aggregate_stats, fit_stats, stats_from_dict
from wsi_norm.stain.base import RUIFROK_HE
from wsi_norm.stain.gmm import COMPONENT_RANGE, GmmStats, fit_gmm, match_components
from wsi_norm.stain.hsd import hsd_from_od, od_from_hsd, od_to_hsd
from wsi_norm.stain.template import load_template, save_template
from wsi_norm.testing.synthetic import render_beer_lambert

WHITE = 240.0


def _tissue_image(nuclei: float, seed: int, size: int = 256, *, stains: NDArray[np.float64] = RUIFROK_HE,
                  eosin: float = 0.55) -> NDArray[np.uint8]:
    """Generated H&E: stroma (eosin, a little hematoxylin) and round nuclei covering ``nuclei`` of
    the image, smooth seeded texture, rendered by Beer-Lambert against white 240."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size]
    while mask.mean() < nuclei:
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(3, 7)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    n1 = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2.0)
    n2 = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5)
    n1, n2 = n1 / n1.std(), n2 / n2.std()
    h = np.where(mask, 0.85 + 0.15 * n1, 0.08 + 0.03 * n2)
    e = np.where(mask, 0.25 + 0.05 * n2, eosin + 0.15 * n1)
    return render_beer_lambert(np.clip(np.stack([h, e], -1), 0, None), stains, io=WHITE)


def _pairs(rng: np.random.Generator, a: NDArray[np.uint8]) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """``a`` and ``a`` with one random channel one level away."""
    rows, channel = np.arange(len(a)), rng.integers(0, 3, len(a))
    b = a.copy()
    value = a[rows, channel].astype(np.int32)
    b[rows, channel] = np.where(value < 255, value + 1, value - 1).astype(np.uint8)
    return a, b


def _jump(cmap: GmmMap, a: NDArray[np.uint8], b: NDArray[np.uint8]) -> int:
    return int(np.abs(cmap.evaluate_numpy(a).astype(np.int32) - cmap.evaluate_numpy(b).astype(np.int32)).max())


@pytest.fixture(scope="module")
def composition() -> dict[str, NDArray[np.uint8]]:
    return {"sparse": _tissue_image(0.10, 1), "dense": _tissue_image(0.40, 2)}


@pytest.fixture(scope="module")
def sparse_fit(composition: dict[str, NDArray[np.uint8]]) -> GmmStats:
    return fit_gmm(composition["sparse"].reshape(-1, 3), white=WHITE)


# --------------------------------------------------------------------------- HSD


def test_hsd_round_trip_and_textbook_hsd_on_tissue() -> None:
    rng = np.random.default_rng(0)
    od = rng.uniform(0.2, 2.5, (10_000, 3))
    hsd = od_to_hsd(od)
    back = np.stack(od_from_hsd(np, hsd[:, 0], hsd[:, 1], hsd[:, 2]), axis=1)
    np.testing.assert_allclose(back, od, atol=1e-12)
    d = od.mean(axis=1)
    textbook = np.stack([d, od[:, 0] / d - 1.0, (od[:, 1] - od[:, 2]) / (np.sqrt(3.0) * d)], axis=1)
    np.testing.assert_allclose(hsd[:, 0], textbook[:, 0])
    np.testing.assert_allclose(hsd[:, 1:], textbook[:, 1:], rtol=0.035)  # D_e within 3 % of D at D >= 0.2


def test_hsd_is_finite_and_continuous_at_glass() -> None:
    od = np.array([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [-0.05, 0.02, 0.01]])
    hsd = od_to_hsd(od)
    assert np.all(np.isfinite(hsd))
    np.testing.assert_allclose(hsd[0], 0.0)
    assert np.abs(hsd[1] - hsd[0]).max() < 1e-7
    with pytest.raises(ValueError, match=r"shape \(N, 3\), got \(3,\)"):
        od_to_hsd(np.zeros(3))


def test_hsd_torch_equals_numpy() -> None:
    torch = pytest.importorskip("torch")
    od = np.random.default_rng(1).uniform(-0.1, 3.0, (1000, 3))
    ref = hsd_from_od(np, od[:, 0], od[:, 1], od[:, 2])
    t = torch.from_numpy(od)
    got = hsd_from_od(torch, t[:, 0], t[:, 1], t[:, 2])
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b.numpy(), a, atol=1e-12)


# --------------------------------------------------------------------------- the fit


def test_fit_chooses_k_by_bic_and_is_seeded(composition: dict[str, NDArray[np.uint8]], sparse_fit: GmmStats) -> None:
    stats = sparse_fit
    ks = [k for k, _ in stats.bic]
    assert ks == list(COMPONENT_RANGE)
    assert stats.n_components == min(stats.bic, key=lambda kv: kv[1])[0]
    assert abs(stats.weights.sum() - 1.0) < 1e-9
    assert np.all(np.diff(stats.means[:, 0]) >= 0)  # sorted by density
    again = fit_gmm(composition["sparse"].reshape(-1, 3), white=WHITE)
    assert again == stats  # same seed, same pixels: the same numbers
    via_registry = fit_stats("gmm", composition["sparse"].reshape(-1, 3), StainParams(), white=WHITE)
    assert via_registry == stats
    assert REGISTRY["gmm"].od and not REGISTRY["gmm"].stain_matrix


def test_stats_round_trip_and_template_file(sparse_fit: GmmStats, tmp_path: Path) -> None:
    d = sparse_fit.to_dict()
    assert stats_from_dict("gmm", json.loads(json.dumps(d))) == sparse_fit
    from wsi_norm.stain.template import Template
    from wsi_norm.tissue.whitepoint import WhitePoint

    t = Template("gmm", sparse_fit, white=WhitePoint((241.0, 238.0, 244.0), "glass", 10),
                 params=StainParams(seed=3, max_fit_pixels=20_000),  # type: ignore[arg-type]  # as in test_template
                 n_pixels=len(d["gmm_weights"]))
    assert set(t.params) == {"white_point", "min_pixels", "seed", "max_fit_pixels"}
    save_template(t, tmp_path / "t.json")
    back = load_template(tmp_path / "t.json", method="gmm")
    assert back.stats == sparse_fit and back.white.rgb == (241.0, 238.0, 244.0) and back.params["seed"] == 3
    doc = json.loads((tmp_path / "t.json").read_text())
    doc["gmm_stds"][0][0] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(TemplateError, match=r"bad.json: invalid gmm template: standard deviations must be > 0"):
        load_template(tmp_path / "bad.json")


def test_aggregate_is_the_medoid(sparse_fit: GmmStats) -> None:
    """Three slides of one composition, eosin pale, medium (``sparse_fit``) and strong: the medium
    one is the cohort's medoid, taken whole (its BIC record dropped)."""
    pale = fit_gmm(_tissue_image(0.10, 3, eosin=0.35).reshape(-1, 3), white=WHITE)
    strong = fit_gmm(_tissue_image(0.10, 4, eosin=0.8).reshape(-1, 3), white=WHITE)
    cohort = aggregate_stats("gmm", [pale, strong, sparse_fit])
    assert cohort == GmmStats(sparse_fit.weights, sparse_fit.means, sparse_fit.stds, sparse_fit.global_mean,
                              sparse_fit.global_std)
    with pytest.raises(FitError, match="empty list"):
        aggregate_stats("gmm", [])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"pixels must have shape \(\.\.\., 3\), got \(10, 4\)"):
        fit_gmm(np.zeros((10, 4), np.uint8))
    with pytest.raises(FitError, match=r"gmm: only 0 tissue pixels .* need at least 1000"):
        fit_gmm(np.full((5000, 3), 250, np.uint8))
    with pytest.raises(FitError, match="constant HSD channel"):
        fit_gmm(np.full((5000, 3), 120, np.uint8))
    ok = {"weights": [0.5, 0.5], "means": np.zeros((2, 3)), "stds": np.ones((2, 3)),
          "global_mean": np.zeros(3), "global_std": np.ones(3)}
    with pytest.raises(ValueError, match=r"weights must be > 0 and sum to 1, got \[0.5, 0.6\]"):
        GmmStats(**{**ok, "weights": [0.5, 0.6]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"means and stds \(K, 3\)"):
        GmmStats(**{**ok, "means": np.zeros((3, 3))})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        GmmStats(**{**ok, "global_mean": [np.nan, 0, 0]})  # type: ignore[arg-type]
    stats = GmmStats(**ok)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gmm_bic must be a list of"):
        GmmStats.from_dict({**stats.to_dict(), "gmm_bic": [[2]]})
    with pytest.raises(ValueError, match=r"temperature must be a positive finite number, got 0.0"):
        GmmMap(stats, stats, temperature=0.0)


# --------------------------------------------------------------------------- matching and fallbacks


def test_a_target_without_nuclei_falls_back_to_the_global_moments_never_nan(sparse_fit: GmmStats) -> None:
    stroma_only = fit_gmm(_tissue_image(0.0, 4).reshape(-1, 3), white=WHITE)
    match = match_components(sparse_fit, stroma_only)
    dense_nuclei = [k for k in range(sparse_fit.n_components) if sparse_fit.means[k, 0] > 0.45]  # OD
    assert dense_nuclei, sparse_fit.means
    assert all(match.how[k] == "global" and match.target_index[k] == -1 for k in dense_nuclei)
    cmap = compile_colormap("gmm", sparse_fit, stroma_only, source_white=WHITE, target_white=WHITE)
    assert isinstance(cmap, GmmMap)
    notes = cmap.notes()["gmm"]
    assert notes["fallbacks"] == match.fallbacks >= len(dense_nuclei)
    assert json.loads(json.dumps(notes))["match"]["how"] == list(match.how)
    with np.errstate(all="raise"):  # no overflow, no NaN anywhere on the cube
        colours = np.random.default_rng(0).integers(0, 256, (200_000, 3)).astype(np.uint8)
        corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], np.uint8)
        out = cmap.evaluate_numpy(np.concatenate([colours, corners]))
    assert out.dtype == np.uint8


def test_a_target_component_under_one_percent_is_not_matched(sparse_fit: GmmStats) -> None:
    w = sparse_fit.weights.copy()
    w[0] = 0.005
    w[1:] *= (1 - 0.005) / w[1:].sum()
    target = GmmStats(w, sparse_fit.means, sparse_fit.stds, sparse_fit.global_mean, sparse_fit.global_std)
    match = match_components(sparse_fit, target)
    assert match.ignored_targets == (0,)
    assert 0 not in match.target_index
    assert match.how[0] in ("nearest", "global")
    assert match.how[1:] == ("matched",) * (sparse_fit.n_components - 1)
    # no usable target component at all: every source component maps by the global moments
    tiny = GmmStats(np.array([0.995, 0.005]), sparse_fit.means[:2], sparse_fit.stds[:2] * 0 + 1.0,
                    sparse_fit.global_mean, sparse_fit.global_std)
    assert set(match_components(sparse_fit, tiny).how) <= {"matched", "nearest", "global"}


def test_self_map_is_near_identity(sparse_fit: GmmStats, composition: dict[str, NDArray[np.uint8]]) -> None:
    cmap = compile_colormap("gmm", sparse_fit, sparse_fit, source_white=WHITE, target_white=WHITE)
    assert isinstance(cmap, GmmMap)
    assert cmap.match.how == ("matched",) * sparse_fit.n_components
    src = composition["sparse"].reshape(-1, 3)
    diff = np.abs(cmap.evaluate_numpy(src).astype(int) - src)
    assert diff.max() <= 1, diff.max()


# --------------------------------------------------------------------------- the issue's claims


def test_composition_does_not_move_colours(composition: dict[str, NDArray[np.uint8]]) -> None:
    """Same stains, nuclei 10 % (source) vs 40 % (target): a perfect normalization is the identity.
    gmm: mean CIEDE2000 <= 2; Reinhard (global moments, moved by the composition) beside it."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    src, tgt = composition["sparse"], composition["dense"]
    tissue = luma(src) <= 200
    figures = {}
    for method in ("gmm", "reinhard"):
        s = fit_stats(method, src.reshape(-1, 3), white=WHITE)
        t = fit_stats(method, tgt.reshape(-1, 3), white=WHITE)
        out = compile_colormap(method, s, t, source_white=WHITE, target_white=WHITE).evaluate_numpy(src)
        delta = deltaE_ciede2000(rgb2lab(src), rgb2lab(out))  # type: ignore[no-untyped-call]  # skimage
        figures[method] = float(delta[tissue].mean())
    print(f"composition 10 % vs 40 % nuclei, mean CIEDE2000 on tissue: {figures}")
    assert figures["gmm"] <= 2.0
    assert figures["reinhard"] > 2.0 * figures["gmm"]


@pytest.fixture(scope="module")
def real_fits(shared_data: Path) -> dict[str, SlideFit]:
    return {
        "cmu": fit_slide(shared_data / "slides" / "CMU-1-Small-Region.svs", method="gmm", n_pixels=60_000),
        "target": fit_slide(shared_data / "he" / "torchstain-target.png", method="gmm", n_pixels=60_000),
    }


# Largest output step for a one-level input step (measured on CMU-1-Small-Region and the torchstain
# patches, all six directions, 10^5 seeded pairs each): <= 4 on tissue colours (the slide's sampled
# tissue, every channel >= 16; one black speck in 10^5 steps by 5); <= 6 over the glass band (<= 3 in 4 of 6 directions); <= 7 over the
# cube once every channel is >= 16; up to 45 at the cube's dark faces (a channel at 0-15: 0 -> 1 is
# 0.69 OD in one channel, which HSD's density, the channels' mean, carries into every channel).
TISSUE_BOUND, BAND_BOUND, CUBE16_BOUND, CUBE_BOUND = 4, 6, 7, 45


@pytest.mark.parametrize("direction", ["cmu->target", "target->cmu"])
def test_continuity(real_fits: dict[str, SlideFit], direction: str) -> None:
    a, b = (real_fits["cmu"], real_fits["target"]) if direction == "cmu->target" else (real_fits["target"], real_fits["cmu"])
    cmap = GmmMap(a.stats, b.stats, source_white=a.white.array, target_white=b.white.array,
                  glass=GlassBlend.for_whites("target", a.white.array, b.white.array))
    rng = np.random.default_rng(1)
    assert a.pixels is not None
    tissue, stepped = _pairs(rng, a.pixels[a.pixels.min(axis=1) >= 16][:100_000])
    steps = np.abs(cmap.evaluate_numpy(tissue).astype(np.int32) - cmap.evaluate_numpy(stepped).astype(np.int32)).max(axis=1)
    assert steps.max() <= TISSUE_BOUND + 1  # (18, 21, 18) -> (18, 21, 19), a black speck: 5
    assert np.mean(steps <= TISSUE_BOUND) >= 0.9999
    c = rng.integers(150, 256, (600_000, 3)).astype(np.uint8)
    y = np.asarray(luma(c))
    band = c[(y > 190) & (y < 245)][:100_000]
    assert _jump(cmap, *_pairs(rng, band)) <= BAND_BOUND
    assert _jump(cmap, *_pairs(rng, rng.integers(16, 256, (100_000, 3)).astype(np.uint8))) <= CUBE16_BOUND
    assert _jump(cmap, *_pairs(rng, rng.integers(0, 256, (100_000, 3)).astype(np.uint8))) <= CUBE_BOUND


def test_torch_agrees_with_numpy(real_fits: dict[str, SlideFit]) -> None:
    torch = pytest.importorskip("torch")
    a, b = real_fits["cmu"], real_fits["target"]
    cmap = compile_colormap("gmm", a.stats, b.stats, source_white=a.white.array, target_white=b.white.array)
    colours = np.random.default_rng(2).integers(0, 256, (50_000, 3)).astype(np.uint8)
    ref = cmap.evaluate_numpy(colours).astype(int)
    got = cmap.apply_torch(torch.from_numpy(colours), dtype=torch.float64).numpy().astype(int)
    assert np.abs(got - ref).max() <= 1


# --------------------------------------------------------------------------- the wiring


def test_cli_fit_and_normalize(shared_data: Path, tmp_path: Path) -> None:
    from wsi_norm.cli import main
    from wsi_norm.writers import read_level, read_provenance

    target = tmp_path / "t.json"
    assert main(["fit", str(shared_data / "he" / "torchstain-target.png"), "--method", "gmm", "-o", str(target), "-q"]) == 0
    assert load_template(target).method == "gmm"
    src = shared_data / "he" / "torchstain-source.png"
    out = tmp_path / "out.tiff"
    assert main(["normalize", str(src), "--method", "gmm", "--target", str(target), "-o", str(out),
                 "--compression", "deflate", "-q"]) == 0
    prov = read_provenance(out)
    assert prov["method"] == "gmm"
    assert prov["map"]["gmm"]["source_components"] in COMPONENT_RANGE
    assert len(prov["map"]["gmm"]["match"]["how"]) == prov["map"]["gmm"]["source_components"]
    from PIL import Image

    rgb = np.array(Image.open(src).convert("RGB"))
    written = read_level(out, 0)
    assert written.shape == rgb.shape
    assert np.abs(written.astype(int) - rgb).mean() > 3  # it did restain


def test_template_from_fits_and_manifest_accept_gmm(real_fits: dict[str, SlideFit], tmp_path: Path) -> None:
    from flows.manifest import load_manifest

    template = template_from_fits([real_fits["target"]])
    assert template.method == "gmm" and template.reference is not None
    (tmp_path / "s.svs").write_bytes(b"x")
    (tmp_path / "m.yaml").write_text("version: 1\noutput_root: out\nmethod: gmm\nsites:\n  a:\n    slides: [s.svs]\n"
                                     "templates:\n  ref: {site: a}\ntarget: ref\n")
    assert load_manifest(tmp_path / "m.yaml").method == "gmm"
