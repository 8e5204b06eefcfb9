"""StainNet training: distillation of a teacher colour map, determinism, pair helpers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from wsi_norm.color import is_background
from wsi_norm.colormap.stainnet import StainNetMap, StainNetMetadata, load_stainnet, save_stainnet
from wsi_norm.stainnet.train import EpochRecord, _merge_pairs, pairs_from_teacher, train_stainnet

IO = 240.0


def _unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


# Ruifrok & Johnston's H and E optical-density vectors, and a second stain set 7.5 deg (H) and
# 10.9 deg (E) away, with all components positive (a physically possible staining).
RUIFROK = np.stack([_unit([0.650, 0.704, 0.286]), _unit([0.072, 0.990, 0.105])])
OTHER_STAINS = np.stack([_unit([0.55, 0.76, 0.35]), _unit([0.20, 0.95, 0.24])])
# Concentration scaling of the teacher (Macenko's max_conc_tgt / max_conc_src): darker H, paler E.
CONC_SCALE = np.array([1.3, 0.75])


def _od(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    od: NDArray[np.float64] = -np.log((rgb.astype(np.float64) + 1.0) / IO)
    return od


def _render(conc: NDArray[np.float64], stains: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Beer-Lambert: I = io * exp(-C @ M) (with the +1 of the OD convention), as uint8."""
    return np.clip(np.rint(IO * np.exp(-conc @ stains) - 1.0), 0, 255).astype(np.uint8)


def _restain_teacher(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Analytic Macenko-form map, glass kept: C = OD pinv(M_src) * scale; I' = io exp(-C M_tgt)."""
    out = _render(_od(rgb) @ np.linalg.pinv(RUIFROK) * CONC_SCALE, OTHER_STAINS)
    return np.where(is_background(rgb)[..., None], rgb, out)


def _concentrations(path: Path) -> NDArray[np.float64]:
    """H and E concentrations of a real H&E patch, unmixed with Ruifrok's vectors (>= 0)."""
    rgb = np.asarray(Image.open(path).convert("RGBA"))[..., :3]
    conc: NDArray[np.float64] = np.clip(_od(rgb) @ np.linalg.pinv(RUIFROK), 0.0, None)
    return conc


def _teacher_and_images(shared_data: Path, teacher_kind: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """(teacher map, training image, held-out image); both images stained with Ruifrok's set.

    ``"macenko"``: the project's Macenko map fitted from the training tissue rendered with
    Ruifrok's stains to the same tissue rendered with the other stain set (and the teacher's
    concentration scaling), i.e. ``compile_colormap("macenko", fit(A), fit(B))``.
    ``"analytic"``: the exact Beer-Lambert re-staining between the two known stain sets.
    """
    train_conc = _concentrations(shared_data / "he" / "torchstain-source.png")
    test_conc = _concentrations(shared_data / "he" / "torchstain-target.png")  # never trained on
    train_image = _render(train_conc, RUIFROK)
    test_image = _render(test_conc, RUIFROK)
    if teacher_kind == "analytic":
        return _restain_teacher, train_image, test_image
    from wsi_norm.colormap import compile_colormap
    from wsi_norm.stain import fit_macenko

    target_image = _render(train_conc * CONC_SCALE, OTHER_STAINS)
    source_stats = fit_macenko(train_image.reshape(-1, 3))
    target_stats = fit_macenko(target_image.reshape(-1, 3))
    return (
        compile_colormap("macenko", source_stats, target_stats).evaluate_numpy,
        train_image,
        test_image,
    )


@pytest.mark.parametrize("teacher_kind", ["macenko", "analytic"])
def test_distilled_stainnet_reproduces_teacher_on_held_out_image(
    shared_data: Path, teacher_kind: str
) -> None:
    teacher_map, train_image, test_image = _teacher_and_images(shared_data, teacher_kind)
    pixels = train_image.reshape(-1, 3)
    pixels = pixels[~is_background(pixels)]
    inputs, targets = pairs_from_teacher(pixels, teacher_map)

    records: list[EpochRecord] = []
    result = train_stainnet(
        inputs, targets, epochs=40, batch_size=1024, lr=0.01, seed=0, progress=records.append
    )
    assert len(records) == 40 and tuple(records) == result.history
    assert result.history[-1].val_loss < 0.2 * result.history[0].val_loss

    student = StainNetMap(result.model).apply(test_image)
    teacher = teacher_map(test_image)
    tissue = ~is_background(test_image)
    # scikit-image's metrics are unannotated (no-untyped-call)
    psnr_tissue = peak_signal_noise_ratio(teacher[tissue], student[tissue], data_range=255)  # type: ignore[no-untyped-call]
    psnr_identity = peak_signal_noise_ratio(teacher[tissue], test_image[tissue], data_range=255)  # type: ignore[no-untyped-call]
    ssim = structural_similarity(teacher, student, channel_axis=-1, data_range=255)  # type: ignore[no-untyped-call]
    print(
        f"distillation ({teacher_kind}): PSNR (tissue) {psnr_tissue:.2f} dB "
        f"(identity {psnr_identity:.2f} dB), SSIM {ssim:.4f}, "
        f"held-out L1 {result.val_loss * 127.5:.3f} grey levels"
    )
    assert psnr_tissue >= 35.0
    assert ssim >= 0.98
    assert psnr_identity < 27.0  # the teacher changes colours a lot: the task is not trivial
    assert result.metadata.epochs == 40 and result.metadata.seed == 0
    assert result.metadata.val_loss == pytest.approx(result.val_loss)


def _small_pairs(n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    conc = rng.gamma(2.0, 0.3, size=(n, 2))
    inputs = _render(conc, RUIFROK)
    return inputs, _restain_teacher(inputs)


def test_training_is_deterministic_and_restores_torch_state() -> None:
    inputs, targets = _small_pairs()
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    flag_before = torch.are_deterministic_algorithms_enabled()
    first = train_stainnet(inputs, targets, epochs=3, batch_size=2048, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == flag_before
    second = train_stainnet(inputs, targets, epochs=3, batch_size=2048, seed=5)
    other = train_stainnet(inputs, targets, epochs=3, batch_size=2048, seed=6)
    np.testing.assert_array_equal(first.model.conv1_weight, second.model.conv1_weight)
    assert [r.val_loss for r in first.history] == [r.val_loss for r in second.history]
    assert not np.array_equal(first.model.conv1_weight, other.model.conv1_weight)


def test_sgd_option_trains_and_lr_anneals_to_zero(caplog: pytest.LogCaptureFixture) -> None:
    inputs, targets = _small_pairs()
    with caplog.at_level(logging.INFO, logger="wsi_norm.stainnet.train"):
        result = train_stainnet(
            inputs, targets, epochs=4, batch_size=4096, lr=0.05, optimizer="sgd", seed=0
        )
    assert result.history[-1].lr == pytest.approx(0.0, abs=1e-12)
    assert result.history[-1].val_loss < result.history[0].val_loss
    assert "sgd" in result.metadata.optimizer
    assert any("held-out L1" in r.getMessage() for r in caplog.records)
    assert any("optimizer steps" in r.getMessage() for r in caplog.records)  # 4 x 5 steps: warned


def test_trained_model_saves_and_loads_with_metadata(tmp_path: Path) -> None:
    inputs, targets = _small_pairs(5000)
    meta = StainNetMetadata(teacher="beer-lambert analytic", training_data="5000 synthetic pixels")
    result = train_stainnet(inputs, targets, epochs=2, batch_size=1024, seed=0, metadata=meta)
    path = save_stainnet(result.model, tmp_path / "student.safetensors")
    loaded = load_stainnet(path)
    assert loaded == result.model
    assert loaded.metadata.teacher == "beer-lambert analytic"
    assert loaded.metadata.final_loss == pytest.approx(result.history[-1].train_loss)
    rgb = inputs.reshape(50, 100, 3)
    np.testing.assert_array_equal(
        StainNetMap(loaded).apply(rgb), StainNetMap(result.model).apply(rgb)
    )


def test_merge_pairs_counts_duplicates() -> None:
    inputs = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [200, 0, 7], [1, 2, 3]], dtype=np.uint8)
    targets = np.array([[9, 9, 9], [9, 9, 9], [8, 8, 8], [0, 255, 1], [9, 9, 9]], dtype=np.uint8)
    merged_in, merged_out, weight = _merge_pairs(inputs, targets)
    pairs = {
        (tuple(a), tuple(b)): w
        for a, b, w in zip(merged_in.tolist(), merged_out.tolist(), weight, strict=True)
    }
    assert pairs == {
        ((1, 2, 3), (9, 9, 9)): 3.0,
        ((1, 2, 3), (8, 8, 8)): 1.0,
        ((200, 0, 7), (0, 255, 1)): 1.0,
    }


def test_pairs_from_teacher_chunks_and_checks_output() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    shapes: list[tuple[int, ...]] = []

    def invert(rgb: np.ndarray) -> np.ndarray:
        shapes.append(rgb.shape)
        return 255 - rgb

    inputs, targets = pairs_from_teacher(pixels, invert, chunk_px=300)
    assert shapes == [(1, 300, 3), (1, 300, 3), (1, 300, 3), (1, 100, 3)]
    np.testing.assert_array_equal(targets, 255 - pixels)
    assert inputs is pixels
    with pytest.raises(ValueError, match="teacher_map must return uint8"):
        pairs_from_teacher(pixels, lambda rgb: rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"pixels must have shape \(N, 3\)"):
        pairs_from_teacher(pixels.reshape(10, 100, 3), invert)


def test_train_rejects_bad_arguments() -> None:
    inputs, targets = _small_pairs(100)
    with pytest.raises(ValueError, match="same shape"):
        train_stainnet(inputs, targets[:50])
    with pytest.raises(TypeError, match="targets must be uint8"):
        train_stainnet(inputs, targets.astype(np.float32))
    with pytest.raises(ValueError, match="val_fraction"):
        train_stainnet(inputs, targets, val_fraction=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        train_stainnet(inputs, targets, optimizer="lbfgs")  # type: ignore[arg-type]
