"""Stain augmentation (wsi_norm.augment): identities, the distributions of the parameters refitted
from the outputs, numpy = torch (= CUDA), the smooth glass hand-over, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from scipy import stats

from wsi_norm.augment import (
    GLASS_BAND,
    HED_FROM_RGB,
    SKIMAGE_HED_UNIT,
    BrightnessContrast,
    ChannelScale,
    HEDJitter,
    Rot90,
    apply_brightness_contrast,
    apply_channel_scale,
    apply_hed,
    apply_rot90,
    brightness_contrast,
    channel_scale,
    hed_jitter,
    mean_center,
    preset,
    rot90,
    suggest_channel_scale,
)
from wsi_norm.slide import open_slide

N_DRAWS = 2000
TILE = 24


def _read(path: Path) -> NDArray[np.uint8]:
    with open_slide(path) as slide:
        w, h = slide.dimensions
        return slide.read_region(0, x=0, y=0, width=w, height=h)


@pytest.fixture(scope="module")
def real(shared_data: Path) -> dict[str, NDArray[np.uint8]]:
    return {name: _read(shared_data / "he" / f"torchstain-{name}.png") for name in ("source", "target")}


@pytest.fixture(scope="module")
def tiles(real: dict[str, NDArray[np.uint8]]) -> NDArray[np.uint8]:
    """N_DRAWS real TILE x TILE tissue crops (uint8; median gray <= 200), from both patches at
    seeded positions."""
    rng = np.random.default_rng(5)
    crops: list[NDArray[np.uint8]] = []
    while len(crops) < N_DRAWS:
        img = real["source" if len(crops) % 2 else "target"]
        y, x = rng.integers(0, img.shape[0] - TILE), rng.integers(0, img.shape[1] - TILE)
        crop = img[y:y + TILE, x:x + TILE]
        if np.median(crop @ np.array([0.299, 0.587, 0.114])) <= 200:
            crops.append(crop)
    return np.stack(crops)


def _stain_amounts(v: NDArray[np.floating]) -> NDArray[np.float64]:
    """``od @ HED_FROM_RGB`` of intensities 0-255 (the module's OD convention, white 255)."""
    od = -np.log((np.asarray(v, np.float64) + 1.0) / 256.0)
    return np.asarray(od @ HED_FROM_RGB)


def _refit_hed(before: NDArray[np.floating], after: NDArray[np.floating]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per image and stain, slope and intercept of s' on s over pixels the output did not clip."""
    s, s2 = _stain_amounts(before * 255.0), _stain_amounts(after * 255.0)
    ok = np.asarray(((after > 1e-6) & (after < 1 - 1e-6)).all(-1))
    alpha, beta = np.empty((len(before), 3)), np.empty((len(before), 3))
    for i in range(len(before)):
        m = ok[i]
        assert m.sum() >= 3, f"image {i}: only {m.sum()} unclipped pixels"  # exact data: 3 suffice
        for c in range(3):
            alpha[i, c], beta[i, c] = np.polyfit(s[i][m][:, c], s2[i][m][:, c], 1)
    return alpha, beta


def _uniform_ks(values: NDArray[np.float64], lo: float, hi: float) -> float:
    return float(stats.kstest(values, "uniform", args=(lo, hi - lo)).pvalue)


# ---------------------------------------------------------------- identities


def test_identity_parameters_return_the_input(real: dict[str, NDArray[np.uint8]]) -> None:
    img = real["source"]
    ones, zeros = np.ones((1, 3)), np.zeros((1, 3))
    for out in (apply_hed(img, ones, zeros), apply_hed(img, ones, zeros, tissue_only=True),
                apply_brightness_contrast(img, [1.0], [1.0]), apply_channel_scale(img, ones)):
        diff = np.abs(out.astype(int) - img)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert (diff == 0).mean() >= 0.999 and diff.max() <= 1
    as_float = img.astype(np.float32) / 255.0
    assert np.abs(apply_hed(as_float, ones, zeros) - as_float).max() <= 1.0 / 255.0
    batch = torch.from_numpy(img).permute(2, 0, 1)[None]
    same = apply_hed(batch, torch.ones(1, 3), torch.zeros(1, 3), channel_axis=1)
    assert torch.equal(same, batch)


def test_negative_stain_amounts_are_kept_unlike_skimage(real: dict[str, NDArray[np.uint8]]) -> None:
    """scikit-image clamps negative H, E, D amounts: its round trip moves pixels at alpha 1, beta 0."""
    from skimage.color import hed2rgb, rgb2hed

    img = real["source"]
    theirs = np.rint(np.clip(hed2rgb(rgb2hed(img)), 0, 1) * 255).astype(int)
    moved_theirs = (np.abs(theirs - img).max(-1) > 1).mean()
    ours = apply_hed(img, np.ones((1, 3)), np.zeros((1, 3)))
    assert moved_theirs > 0.01  # the clamp's effect on a real H&E patch
    assert np.array_equal(ours, img)


# ---------------------------------------------------------------- distributions of the draws


@pytest.mark.parametrize(("sigma", "units"), [(0.05, "od"), (0.2, "od"), (0.02, "skimage")])
def test_hed_parameters_refitted_from_outputs_are_uniform(tiles: NDArray[np.uint8], sigma: float, units: str) -> None:
    # darkened by 0.6 (0.51 OD more of every stain): strong jitter then leaves most pixels inside
    # [0, 255], where the refit is exact
    before = tiles.astype(np.float64) / 255.0 * 0.6
    after = hed_jitter(before, sigma=sigma, units=units, rng=np.random.default_rng(11))  # type: ignore[arg-type]
    alpha, beta = _refit_hed(before, after)
    beta_units = beta / (SKIMAGE_HED_UNIT if units == "skimage" else 1.0)
    tol = 1e-6
    assert alpha.min() >= 1 - sigma - tol and alpha.max() <= 1 + sigma + tol
    assert beta_units.min() >= -sigma - tol and beta_units.max() <= sigma + tol
    for c in range(3):
        assert _uniform_ks(alpha[:, c], 1 - sigma, 1 + sigma) > 0.01
        assert _uniform_ks(beta_units[:, c], -sigma, sigma) > 0.01
    # the draws are independent per image and stain, not one shared draw
    assert np.corrcoef(alpha[:, 0], alpha[:, 1])[0, 1] < 0.1


def test_brightness_and_contrast_refitted_are_uniform(tiles: NDArray[np.uint8]) -> None:
    before = tiles.astype(np.float64) / 255.0
    after = brightness_contrast(before, brightness=(0.8, 1.2), contrast=(0.7, 1.1), rng=3)
    b_fit, c_fit = np.empty(len(before)), np.empty(len(before))
    gray_mean = (before * 255.0 @ np.array([0.299, 0.587, 0.114])).mean(axis=(1, 2))
    for i in range(len(before)):
        ok = ((after[i] > 1e-6) & (after[i] < 1 - 1e-6)).reshape(-1)
        k, q = np.polyfit(before[i].reshape(-1)[ok] * 255.0, after[i].reshape(-1)[ok] * 255.0, 1)
        b_fit[i] = k + q / gray_mean[i]  # v2 = c b v + (1 - c) b mean
        c_fit[i] = k / b_fit[i]
    assert 0.8 - 1e-6 <= b_fit.min() and b_fit.max() <= 1.2 + 1e-6
    assert 0.7 - 1e-6 <= c_fit.min() and c_fit.max() <= 1.1 + 1e-6
    assert _uniform_ks(b_fit, 0.8, 1.2) > 0.01 and _uniform_ks(c_fit, 0.7, 1.1) > 0.01


def test_channel_scale_refitted_is_uniform(tiles: NDArray[np.uint8]) -> None:
    before = tiles.astype(np.float64) / 255.0
    after = channel_scale(before, scale=(0.3, 1.5), rng=4)
    ok = (after < 1 - 1e-6) & (before > 0.05)
    ratio = np.where(ok, after / np.maximum(before, 1e-9), np.nan).reshape(len(before), -1, 3)
    measurable = np.asarray(np.isfinite(ratio).any(axis=1))  # a channel clipped on every pixel has no ratio
    a_fit = np.full((len(before), 3), np.nan)
    a_fit[measurable] = np.nanmedian(np.where(measurable[:, None, :], ratio, 0.0), axis=1)[measurable]
    assert np.nanmin(a_fit) >= 0.3 - 1e-6 and np.nanmax(a_fit) <= 1.5 + 1e-6
    for c in range(3):
        col = a_fit[:, c][np.isfinite(a_fit[:, c])]
        assert len(col) > 0.9 * N_DRAWS and _uniform_ks(col, 0.3, 1.5) > 0.01


def test_quarter_turns_are_uniform_and_are_rotations(tiles: NDArray[np.uint8]) -> None:
    out = rot90(tiles, rng=6)
    turns = np.full(len(tiles), -1)
    for i, (a, b) in enumerate(zip(tiles, out, strict=True)):
        matches = [k for k in range(4) if np.array_equal(np.rot90(a, k), b)]
        turns[i] = matches[0]
    counts = np.bincount(turns, minlength=4)
    assert turns.min() >= 0 and stats.chisquare(counts).pvalue > 0.01


def test_same_seed_same_output(tiles: NDArray[np.uint8]) -> None:
    batch = tiles[:64]
    assert np.array_equal(hed_jitter(batch, rng=9), hed_jitter(batch, rng=9))
    assert not np.array_equal(hed_jitter(batch, rng=9), hed_jitter(batch, rng=10))
    t = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    aug = preset("hed_strong")
    first = aug(t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, aug(t, generator=torch.Generator().manual_seed(1)))


# ---------------------------------------------------------------- backends


def _to_torch(x: NDArray[np.uint8]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _from_torch(t: torch.Tensor) -> NDArray[np.float64]:
    return np.asarray(t.permute(0, 2, 3, 1).cpu().double().numpy())


def test_torch_float_equals_numpy_uint8_within_one_level(tiles: NDArray[np.uint8]) -> None:
    """The torch float path (log / exp) and numpy's 8-bit tables compute one function."""
    batch = tiles[:200]
    rng = np.random.default_rng(2)
    alpha, beta = rng.uniform(0.8, 1.2, (200, 3)), rng.uniform(-0.2, 0.2, (200, 3))
    ref = apply_hed(batch, alpha, beta).astype(np.float64)
    t = _to_torch(batch).float() / 255.0
    got = _from_torch(apply_hed(t, torch.tensor(alpha), torch.tensor(beta), channel_axis=1)) * 255.0
    assert np.abs(got - ref).max() <= 1.0
    ref_bc = apply_brightness_contrast(batch, alpha[:, 0], alpha[:, 1]).astype(np.float64)
    got_bc = _from_torch(apply_brightness_contrast(t, torch.tensor(alpha[:, 0]), torch.tensor(alpha[:, 1]), channel_axis=1))
    assert np.abs(got_bc * 255.0 - ref_bc).max() <= 1.0
    uint8_cpu = apply_hed(_to_torch(batch), torch.tensor(alpha), torch.tensor(beta), channel_axis=1)
    assert np.array_equal(_from_torch(uint8_cpu), ref)


def test_torch_modules_keep_dtype_and_shape() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        x = torch.rand(4, 3, 32, 32, generator=gen)
        x = (x * 255).to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
        for module in (HEDJitter(0.1), BrightnessContrast(), ChannelScale(), Rot90(), preset("brh")):
            out = module(x, generator=gen)
            assert out.dtype == dtype and out.shape == x.shape, (module, dtype)
    one = torch.rand(3, 16, 16)
    assert HEDJitter(0.1)(one).shape == one.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu_within_one_level(tiles: NDArray[np.uint8]) -> None:
    batch = _to_torch(tiles[:256])
    rng = np.random.default_rng(8)
    alpha, beta = torch.tensor(rng.uniform(0.8, 1.2, (256, 3))), torch.tensor(rng.uniform(-0.2, 0.2, (256, 3)))
    cpu = apply_hed(batch, alpha, beta, channel_axis=1).int()
    gpu = apply_hed(batch.cuda(), alpha.cuda(), beta.cuda(), channel_axis=1).cpu().int()
    assert (cpu - gpu).abs().max() <= 1
    gen = torch.Generator(device="cuda").manual_seed(3)
    out = preset("hed_strong", tissue_only=True)(batch.cuda(), generator=gen)
    assert out.device.type == "cuda" and out.dtype == torch.uint8


# ---------------------------------------------------------------- glass


def test_tissue_only_keeps_glass_and_hands_over_smoothly() -> None:
    """A gray ramp through the glass band: tissue moves, glass stays, no jump at gray 200."""
    levels = np.arange(150, 256, dtype=np.float64)
    ramp = np.repeat(levels[None, :, None], 3, axis=2) / 255.0  # (1, 106, 3)
    alpha, beta = np.array([[1.3, 0.8, 1.1]]), np.array([[0.15, -0.1, 0.05]])
    plain = apply_hed(ramp, alpha, beta) * 255.0
    kept = apply_hed(ramp, alpha, beta, tissue_only=True) * 255.0
    glass = levels >= GLASS_BAND[1]
    tissue = levels <= GLASS_BAND[0]
    assert np.abs(kept[0][glass] - levels[glass, None]).max() < 1e-6
    assert np.allclose(kept[0][tissue], plain[0][tissue])
    step = np.abs(np.diff(kept[0], axis=0)).max()
    jump = np.abs(plain[0] - levels[:, None]).max()
    assert step <= 1.0 + 1.5 * jump / (GLASS_BAND[1] - GLASS_BAND[0]) + 1e-9
    assert step < 0.5 * jump  # a hard switch would step by the whole colour change


# ---------------------------------------------------------------- helpers from the blog


def test_suggest_channel_scale_spans_the_test_sets_colour(tiles: NDArray[np.uint8]) -> None:
    train = list(tiles[:100].astype(np.float64) / 255.0)
    factors = np.array([0.8, 1.0, 1.15])
    test = [np.clip(t * factors, 0, 1) for t in train]
    low, high = suggest_channel_scale(train, test)
    assert low == pytest.approx(0.8, abs=0.05) and high == pytest.approx(1.15, abs=0.05)
    with pytest.raises(ValueError, match="test: no image holds tissue"):
        suggest_channel_scale(train, [np.full((8, 8, 3), 250, np.uint8)])


def test_mean_center(tiles: NDArray[np.uint8]) -> None:
    batch = tiles[:10]
    centred = mean_center(batch)
    assert centred.dtype == np.float32
    assert np.abs(centred.reshape(10, -1, 3).mean(axis=1)).max() < 1e-5
    recentred = mean_center(batch, to=(0.5, 0.4, 0.6))
    assert recentred.dtype == np.uint8
    assert np.abs(recentred.reshape(10, -1, 3).mean(axis=1) / 255.0 - [0.5, 0.4, 0.6]).max() < 0.02


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("call", "match"), [
    (lambda x: hed_jitter(x, sigma=1.0), r"sigma must be in \[0, 1\), got 1.0"),
    (lambda x: hed_jitter(x, sigma=-0.1), r"sigma must be in \[0, 1\), got -0.1"),
    (lambda x: hed_jitter(x, sigma=float("nan")), "sigma must be in"),
    (lambda x: hed_jitter(x, alpha=(1.2, 0.8), beta=(0, 0)), r"alpha: low > high \(1.2 > 0.8\)"),
    (lambda x: channel_scale(x, scale=(1.5, 0.3)), r"scale: low > high"),
    (lambda x: hed_jitter(x * 2.0), r"float input must lie in \[0, 1\], got \[0, 2\]"),
    (lambda x: hed_jitter(np.where(x > 0.5, np.nan, x)), "NaN"),
    (lambda x: hed_jitter(x[..., :2]), r"3 channels, got shape \(8, 8, 2\)"),
    (lambda x: hed_jitter(x, units="log10"), "units must be 'od' or 'skimage'"),  # type: ignore[arg-type]
    (lambda x: preset("hed_medium"), "unknown augmentation preset 'hed_medium'"),
    (lambda x: apply_rot90(np.zeros((2, 4, 6, 3)), [0, 1]), "cannot mix quarter and half turns"),
    (lambda x: apply_hed(x, np.ones((2, 3)), np.zeros((2, 3))), r"6 parameter values given for a batch of 1"),
])
def test_bad_input_names_the_value(call: object, match: str) -> None:
    x = np.linspace(0, 1, 8 * 8 * 3).reshape(8, 8, 3)
    with pytest.raises(ValueError, match=match):
        call(x)  # type: ignore[operator]
    t = torch.full((1, 3, 4, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        HEDJitter()(t)
