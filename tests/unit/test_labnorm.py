"""LabNorm, the learnable Lab layer: its Lab, its statistics, training, and the link to the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import ArrayLike, NDArray
from skimage.color import lab2rgb, rgb2lab

from wsi_norm.color import is_background, rgb_to_lab
from wsi_norm.colormap import compile_colormap
from wsi_norm.errors import TemplateError
from wsi_norm.labnorm import EPS, LabNorm, fit_tensors
from wsi_norm.pipeline import fit_slide, normalize_slide
from wsi_norm.slide import open_slide
from wsi_norm.stain.base import RUIFROK_HE
from wsi_norm.stain.macenko import MacenkoStats
from wsi_norm.stain.reinhard import ReinhardStats, fit_reinhard
from wsi_norm.stain.template import Template, load_template, save_template
from wsi_norm.tissue.whitepoint import WhitePoint
from wsi_norm.writers import read_level

TARGET_MEAN = np.array([62.0, 24.0, -14.0])
TARGET_STD = np.array([13.0, 9.0, 7.0])
TARGET_WHITE = (236.0, 238.0, 241.0)


def _batch(tiles: NDArray[np.uint8]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).contiguous().to(torch.float32) / 255.0


def _levels(y: torch.Tensor) -> NDArray[np.int16]:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) grey levels, rounded."""
    return torch.round(y.detach().to(torch.float32) * 255.0).permute(0, 2, 3, 1).to(torch.int16).numpy()


@pytest.fixture(scope="module")
def source_image(shared_data: Path) -> NDArray[np.uint8]:
    with open_slide(shared_data / "he" / "torchstain-source.png") as s:
        w, h = s.dimensions
        return s.read_region(0, x=0, y=0, width=w, height=h)


@pytest.fixture(scope="module")
def cmu(shared_data: Path) -> tuple[Path, NDArray[np.uint8]]:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(path) as s:
        w, h = s.dimensions
        return path, s.read_region(0, x=0, y=0, width=w, height=h)


def _crops(image: NDArray[np.uint8], n: int, size: int, seed: int) -> NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, image.shape[0] - size, n)
    xs = rng.integers(0, image.shape[1] - size, n)
    return np.stack([image[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])


# -- the colour math -----------------------------------------------------------------------


def test_lab_matches_skimage_on_real_pixels(source_image: NDArray[np.uint8]) -> None:
    tiles = _crops(source_image, 4, 64, seed=0)
    lab = LabNorm.to_lab(_batch(tiles))
    assert lab.dtype == torch.float32
    want = np.stack([rgb2lab(t) for t in tiles]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(lab.numpy(), want, atol=1e-3)
    # uint8 input is the same colours
    np.testing.assert_allclose(LabNorm.to_lab(torch.from_numpy(tiles).permute(0, 3, 1, 2)).numpy(), want, atol=1e-3)


def test_paper_configuration_is_the_published_formula(source_image: NDArray[np.uint8]) -> None:
    """stats="all", no shrinkage, no glass hand-over: y = (x - mu_s) / (sigma_s + 1e-7) * sigma_t + mu_t."""
    tiles = _crops(source_image, 3, 48, seed=1)
    layer = LabNorm(TARGET_MEAN, TARGET_STD, stats="all", glass=None, min_std=0.0, min_tissue_fraction=0.0)
    with torch.no_grad():
        got = layer(_batch(tiles)).numpy().transpose(0, 2, 3, 1)
    for tile, out in zip(tiles, got, strict=True):
        lab = rgb2lab(tile)
        mu, sd = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
        want = lab2rgb((lab - mu) / (sd + EPS) * TARGET_STD + TARGET_MEAN)
        np.testing.assert_allclose(out, want, atol=2e-4)


def test_tissue_statistics_are_the_reinhard_fit_of_the_tile(source_image: NDArray[np.uint8]) -> None:
    tile = source_image[:96, :96]
    assert 0.05 < is_background(tile).mean() < 0.95  # tissue and glass both present
    mean, std, fraction = LabNorm(TARGET_MEAN, TARGET_STD).source_stats(_batch(tile[None]))
    stats = fit_reinhard(tile.reshape(-1, 3))
    np.testing.assert_allclose(mean[0].numpy(), stats.mean, atol=1e-3)
    np.testing.assert_allclose(std[0].numpy(), stats.std, atol=1e-3)
    assert fraction.item() == pytest.approx(1.0 - is_background(tile).mean())
    mean_all, std_all, fraction_all = LabNorm(TARGET_MEAN, TARGET_STD, stats="all").source_stats(_batch(tile[None]))
    lab = rgb_to_lab(tile.reshape(-1, 3))
    np.testing.assert_allclose(mean_all[0].numpy(), lab.mean(0), atol=1e-3)
    np.testing.assert_allclose(std_all[0].numpy(), lab.std(0), atol=1e-3)
    assert fraction_all.item() == 1.0


# -- learning ------------------------------------------------------------------------------


def test_trained_alone_reaches_a_known_template_from_10_units_off(source_image: NDArray[np.uint8]) -> None:
    """The teacher is the pipeline's own compiled Reinhard map to a known template; the layer starts
    10 Lab units off in every mean and standard deviation and learns only from the RGB loss."""
    torch.manual_seed(0)
    source = fit_reinhard(source_image.reshape(-1, 3))
    target = ReinhardStats(mean=TARGET_MEAN, std=TARGET_STD)
    cmap = compile_colormap("reinhard", source, target, source_white=240.0, target_white=TARGET_WHITE)
    tiles = _crops(source_image, 4, 48, seed=2)
    x = _batch(tiles)
    teacher = _batch(cmap.evaluate_numpy(tiles))
    layer = LabNorm(TARGET_MEAN + 10.0 * np.array([1.0, -1.0, 1.0]), TARGET_STD + 10.0, stats="given",
                    white=TARGET_WHITE)
    given = fit_tensors(source, white=240.0)
    opt = torch.optim.Adam([{"params": [layer.delta_mean], "lr": 0.5},
                            {"params": [layer.delta_log_std], "lr": 0.05}])

    def error() -> float:
        with torch.no_grad():
            return max(float((layer.target_mean - torch.tensor(TARGET_MEAN)).abs().max()),
                       float((layer.target_std - torch.tensor(TARGET_STD)).abs().max()))

    assert error() == pytest.approx(10.0)
    reached = None
    for step in range(1, 501):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x, **given), teacher)
        loss.backward()  # type: ignore[no-untyped-call]  # torch: unannotated
        opt.step()
        if reached is None and error() <= 0.5:
            reached = step
        if reached is not None and step >= reached + 50:  # it stays there
            break
    assert reached is not None and reached <= 500
    assert error() <= 0.5


def test_gradient_reaches_only_the_deltas(source_image: NDArray[np.uint8]) -> None:
    layer = LabNorm(TARGET_MEAN, TARGET_STD)
    assert [name for name, _ in layer.named_parameters()] == ["delta_mean", "delta_log_std"]
    assert {name for name, _ in layer.named_buffers()} == {"mean0", "std0"}
    x = _batch(_crops(source_image, 2, 32, seed=3))
    layer(x).mean().backward()
    assert layer.delta_mean.grad is not None and layer.delta_log_std.grad is not None
    assert torch.all(layer.delta_mean.grad != 0) and torch.all(layer.delta_log_std.grad != 0)
    assert not layer.mean0.requires_grad and not layer.std0.requires_grad
    # at init the target is the given statistics exactly, and sigma_t > 0 whatever delta is
    np.testing.assert_allclose(layer.target_mean.detach().numpy(), TARGET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(layer.target_std.detach().numpy(), TARGET_STD, rtol=1e-6)
    with torch.no_grad():
        layer.delta_log_std.fill_(-60.0)
    assert torch.all(layer.target_std > 0)


def test_autocast_keeps_the_lab_math_in_float32(source_image: NDArray[np.uint8]) -> None:
    layer = LabNorm(TARGET_MEAN, TARGET_STD)
    x = _batch(_crops(source_image, 2, 32, seed=4))
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lab = LabNorm.to_lab(x)
            y32 = layer(x)
            y16 = layer(x.to(torch.bfloat16))
    assert lab.dtype == torch.float32
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y32, ref)  # autocast changed nothing
    # bfloat16 only rounds the input and the output (8 bits of mantissa: ~1 level near white)
    assert float((y16.to(torch.float32) - ref).abs().max()) < 3.0 / 255.0
    y_half = layer(x.to(torch.float16))
    assert y_half.dtype == torch.float16
    u8 = layer(torch.round(x * 255).to(torch.uint8))
    assert u8.dtype == torch.float32


# -- templates, the link to the pipeline -------------------------------------------------------


def test_template_round_trip(tmp_path: Path) -> None:
    reference_template = Template("reinhard", ReinhardStats(mean=TARGET_MEAN, std=TARGET_STD),
                                  white=WhitePoint(TARGET_WHITE, "glass", 5000),
                                  slides=[{"name": "ref.svs", "size_bytes": 1}], n_pixels=1234)
    save_template(reference_template, tmp_path / "ref.json")
    layer = LabNorm.from_template(tmp_path / "ref.json", stats="given")
    assert layer.white == TARGET_WHITE and layer.stats == "given"
    out = layer.to_template(tmp_path / "learned.json")
    doc = json.loads((tmp_path / "learned.json").read_text())
    assert doc["method"] == "reinhard" and doc["aggregation"] == "learned"
    assert doc["white_point"] == {"rgb": list(TARGET_WHITE), "source": "glass", "n_pixels": 5000}
    assert doc["slides"] == [{"name": "ref.svs", "size_bytes": 1}] and doc["n_pixels"] == 1234
    np.testing.assert_allclose(doc["lab_mean"], TARGET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(doc["lab_std"], TARGET_STD, rtol=1e-6)
    assert load_template(tmp_path / "learned.json", method="reinhard").stats == out.stats
    # the learned values are what is written
    with torch.no_grad():
        layer.delta_mean.copy_(torch.tensor([1.0, -2.0, 3.0]))
        layer.delta_log_std.copy_(torch.tensor([0.0, np.log(2.0), 0.0]))
    learned = layer.to_template().stats
    np.testing.assert_allclose(learned.mean, TARGET_MEAN + [1.0, -2.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(learned.std, TARGET_STD * [1.0, 2.0, 1.0], rtol=1e-6)


def test_the_link_layer_given_equals_the_pipeline_on_every_tile(
    cmu: tuple[Path, NDArray[np.uint8]], shared_data: Path, tmp_path: Path
) -> None:
    """Layer (stats="given", the slide fit's statistics) vs ``normalize_slide`` with the exported
    template, read back from the lossless OME-Zarr: at most 1 grey level on every 512-px tile."""
    path, image = cmu
    fit = fit_slide(path, method="reinhard")
    target = fit_slide(shared_data / "he" / "torchstain-target.png", method="reinhard")
    layer = LabNorm(target.stats.mean, target.stats.std, stats="given", white=TARGET_WHITE)
    with torch.no_grad():  # as after training: the target has moved off its start
        layer.delta_mean.copy_(torch.tensor([1.5, -2.0, 0.7]))
        layer.delta_log_std.copy_(torch.tensor([0.1, -0.05, 0.2]))
    layer.to_template(tmp_path / "learned.json")
    out = tmp_path / "out.ome.zarr"
    normalize_slide(path, out, method="reinhard", target=tmp_path / "learned.json", source_fit=fit)
    written = read_level(out, 0).astype(np.int16)
    assert written.shape == image.shape
    given = fit_tensors(fit)
    worst, n_tiles, n_glass_tiles = 0, 0, 0
    tile = 512
    for y in range(0, image.shape[0], tile):
        for x in range(0, image.shape[1], tile):
            part = image[y : y + tile, x : x + tile]
            with torch.no_grad():
                mine = _levels(layer(_batch(part[None]), **given))[0]
            worst = max(worst, int(np.abs(mine - written[y : y + tile, x : x + tile]).max()))
            n_tiles += 1
            n_glass_tiles += int(is_background(part).mean() > 0.5)
    assert n_tiles == 30 and n_glass_tiles > 0  # tissue and glass tiles alike
    assert worst <= 1


def test_given_mode_batches_slides_with_different_white_points(cmu: tuple[Path, NDArray[np.uint8]]) -> None:
    _, image = cmu
    tiles = np.stack([image[:64, :64], image[1000:1064, 1000:1064]])
    layer = LabNorm(TARGET_MEAN, TARGET_STD, stats="given", white=TARGET_WHITE)
    means = torch.tensor([[50.0, 30.0, -10.0], [55.0, 25.0, -15.0]])
    stds = torch.tensor([[15.0, 10.0, 8.0], [12.0, 9.0, 7.0]])
    whites = torch.tensor([[246.0, 243.0, 243.0], [230.0, 232.0, 250.0]])
    with torch.no_grad():
        both = layer(_batch(tiles), means, stds, whites)
        for i in range(2):
            alone = layer(_batch(tiles[i : i + 1]), means[i], stds[i], whites[i])
            torch.testing.assert_close(both[i : i + 1], alone)
            cmap = compile_colormap("reinhard", ReinhardStats(mean=means[i].numpy(), std=stds[i].numpy()),
                                    ReinhardStats(mean=TARGET_MEAN, std=TARGET_STD),
                                    source_white=whites[i].numpy(), target_white=TARGET_WHITE)
            assert np.abs(_levels(alone)[0] - cmap.evaluate_numpy(tiles[i])).max() <= 1


# -- glass-only and blank tiles -------------------------------------------------------------


def test_glass_only_tile_keeps_its_noise(cmu: tuple[Path, NDArray[np.uint8]]) -> None:
    _, image = cmu
    glass = image[:256, 256:512]
    assert is_background(glass).all()
    x = _batch(glass[None])
    noise_in = (x * 255).std(dim=(2, 3))
    for stats in ("tissue", "all"):
        for glass_mode in ("target", None):
            layer = LabNorm(TARGET_MEAN, TARGET_STD, stats=stats, glass=glass_mode, white=TARGET_WHITE)
            with torch.no_grad():
                y = layer(x)
            assert torch.isfinite(y).all()
            noise_out = (y * 255).std(dim=(2, 3))
            assert torch.all(noise_out <= 1.6 * noise_in + 0.1), (stats, glass_mode, noise_in, noise_out)
    # what the shrinkage prevents: the published layer multiplies the glass noise by sigma_t/sigma_s
    paper = LabNorm(TARGET_MEAN, TARGET_STD, stats="all", glass=None, min_std=0.0, min_tissue_fraction=0.0)
    with torch.no_grad():
        assert torch.all((paper(x) * 255).std(dim=(2, 3)) > 10 * noise_in)


@pytest.mark.parametrize("value", [0, 1, 128, 200, 201, 240, 255])
@pytest.mark.parametrize("stats", ["tissue", "all"])
def test_blank_tiles_map_to_finite_sane_values(value: int, stats: str) -> None:
    layer = LabNorm(TARGET_MEAN, TARGET_STD, stats=stats)  # type: ignore[arg-type]
    x = torch.full((2, 3, 16, 16), value / 255.0, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.delta_mean.grad is not None and torch.isfinite(layer.delta_mean.grad).all()
    assert layer.delta_log_std.grad is not None and torch.isfinite(layer.delta_log_std.grad).all()
    # nothing to measure: the tile is left as it is (white point 240 -> 240 keeps glass too)
    assert float((y.detach() * 255 - value).abs().max()) < 0.5


# -- initialisation --------------------------------------------------------------------------


def test_from_loader_is_the_mean_per_image_statistics(source_image: NDArray[np.uint8]) -> None:
    tiles = _crops(source_image, 6, 40, seed=5)
    blank = np.full((1, 40, 40, 3), 250, dtype=np.uint8)  # no tissue: skipped in tissue mode
    images = torch.from_numpy(np.concatenate([tiles, blank])).permute(0, 3, 1, 2)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(len(images)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    layer = LabNorm.from_loader(loader)
    per_image = []
    for t in tiles:
        lab = rgb_to_lab(t.reshape(-1, 3)[~is_background(t.reshape(-1, 3))])
        per_image.append((lab.mean(0), lab.std(0)))
    np.testing.assert_allclose(layer.mean0.numpy(), np.mean([m for m, _ in per_image], 0), atol=1e-3)
    np.testing.assert_allclose(layer.std0.numpy(), np.mean([s for _, s in per_image], 0), atol=1e-3)
    everything = LabNorm.from_loader(loader, stats="all", max_batches=1)  # 3 tissue tiles, all pixels
    want = np.mean([rgb_to_lab(t.reshape(-1, 3)).mean(0) for t in tiles[:3]], 0)
    np.testing.assert_allclose(everything.mean0.numpy(), want, atol=1e-3)
    with pytest.raises(ValueError, match="no image with tissue"):
        LabNorm.from_loader([images[-1:]])


# -- bad input -------------------------------------------------------------------------------


def test_bad_templates_are_clear_errors(tmp_path: Path) -> None:
    good = Template("reinhard", ReinhardStats(mean=TARGET_MEAN, std=TARGET_STD)).to_dict()
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("zero.json", {"lab_std": [13.0, 0.0, 7.0]}, r"std must be > 0"),
        ("negative.json", {"lab_std": [13.0, -1.0, 7.0]}, r"std must be > 0"),
        ("string.json", {"lab_mean": [62.0, "x", -14.0]}, r"invalid reinhard template"),
    ]
    for name, change, match in cases:
        (tmp_path / name).write_text(json.dumps({**good, **change}))
        with pytest.raises(TemplateError, match=rf"{name}.*{match}"):
            LabNorm.from_template(tmp_path / name)
    (tmp_path / "nan.json").write_text(json.dumps(good).replace("62.0", "NaN"))
    with pytest.raises(TemplateError, match=r"nan.json.*NaN is not a number"):
        LabNorm.from_template(tmp_path / "nan.json")
    macenko = Template("macenko", MacenkoStats(stain_matrix=RUIFROK_HE, max_conc=np.array([1.5, 1.0])))
    with pytest.raises(TemplateError, match="needs a reinhard template, got method 'macenko'"):
        LabNorm.from_template(macenko)
    bad_stats: list[tuple[ArrayLike, ArrayLike, str]] = [
        ([np.nan, 0.0, 0.0], TARGET_STD, r"mean must be finite, got \[nan"),
        (TARGET_MEAN, [13.0, np.inf, 7.0], r"std must be finite, got \[13.0, inf"),
        (TARGET_MEAN, [13.0, 0.0, 7.0], r"std must be > 0, got \[13.0, 0.0, 7.0\]"),
        (TARGET_MEAN, [13.0, 9.0], r"std must have 3 values"),
    ]
    for mean, std, match in bad_stats:
        with pytest.raises(ValueError, match=match):
            LabNorm(mean, std)
    layer = LabNorm(TARGET_MEAN, TARGET_STD)
    with torch.no_grad():
        layer.delta_mean.fill_(float("nan"))
    with pytest.raises(ValueError, match="learned mean must be finite"):
        layer.to_template()


def test_bad_inputs_are_clear_errors() -> None:
    layer = LabNorm(TARGET_MEAN, TARGET_STD)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    over = x.clone()
    over[0, 1, 2, 2] = 1.25
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.25"):
        layer(over)
    under = x.clone()
    under[0, 0, 0, 0] = -0.5
    with pytest.raises(ValueError, match=r"-0\.5"):
        layer(under)
    bad = x.clone()
    bad[0, 2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="must be finite, got nan"):
        layer(bad)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(1, 4, 8, 8\)"):
        layer(torch.rand(1, 4, 8, 8))
    with pytest.raises(TypeError, match="int64"):
        layer(torch.zeros(1, 3, 8, 8, dtype=torch.int64))
    given = LabNorm(TARGET_MEAN, TARGET_STD, stats="given")
    with pytest.raises(ValueError, match="needs source_mean and source_std"):
        given(x)
    with pytest.raises(ValueError, match=r"source_std must be > 0, got \[\[13.0, 0.0, 7.0\]\]"):
        given(x, TARGET_MEAN, [13.0, 0.0, 7.0])
    with pytest.raises(ValueError, match="must be finite"):
        given(x, [np.nan, 0.0, 0.0], TARGET_STD)
    with pytest.raises(ValueError, match=r"source_mean must have shape \(3,\) or \(1, 3\)"):
        given(x, torch.zeros(2, 3), TARGET_STD)
    with pytest.raises(ValueError, match=r"white point must be in \(0, 255\]"):
        given(x, TARGET_MEAN, TARGET_STD, 300.0)
    with pytest.raises(ValueError, match="stats must be one of"):
        LabNorm(TARGET_MEAN, TARGET_STD, stats="tile")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_matches_cpu_within_one_level(source_image: NDArray[np.uint8]) -> None:
    tiles = _crops(source_image, 4, 64, seed=6)
    for stats in ("tissue", "all"):
        layer = LabNorm(TARGET_MEAN, TARGET_STD, stats=stats, white=TARGET_WHITE)
        with torch.no_grad():
            cpu = _levels(layer(_batch(tiles)))
            cuda = _levels(layer.to("cuda")(_batch(tiles).to("cuda")).cpu())
        assert np.abs(cpu - cuda).max() <= 1
