"""StainNet: published checkpoints, weights files, the colour map's evaluation paths."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image

from wsi_norm.colormap.maps import GlassBlend
from wsi_norm.colormap.stainnet import (
    N_PARAMETERS,
    StainNetMap,
    StainNetMetadata,
    StainNetWeights,
    load_stainnet,
    save_stainnet,
)
from wsi_norm.errors import OutputExistsError, WeightsError

KEEP = GlassBlend.for_whites("keep", (240.0, 240.0, 240.0))
CHECKPOINTS = [
    "StainNet-Public_layer3_ch32.pth",
    "StainNet-Public-centerUni_layer3_ch32.pth",
    "StainNet-3x0_best_psnr_layer3_ch32.pth",
]


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"))[..., :3].copy()


@pytest.fixture(scope="module")
def source_patch(shared_data: Path) -> np.ndarray:
    return _read_rgb(shared_data / "he" / "torchstain-source.png")


@pytest.fixture(scope="module")
def cyto_weights(shared_data: Path) -> StainNetWeights:
    return load_stainnet(shared_data / "stainnet" / "StainNet-3x0_best_psnr_layer3_ch32.pth")


@pytest.fixture(scope="module")
def lut_map(cyto_weights: StainNetWeights) -> StainNetMap:
    """A map with its 256^3 LUT built once for the module (a few seconds)."""
    cmap = StainNetMap(cyto_weights, glass=KEEP, cpu_method="lut")
    cmap.lut()
    return cmap


def _reference_forward(state: dict[str, torch.Tensor], rgb: np.ndarray) -> np.ndarray:
    """The authors' computation in plain float64 numpy, independent of wsi_norm."""
    w = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    x = (rgb.reshape(-1, 3).astype(np.float64) / 255.0 - 0.5) * 2.0
    h1 = np.maximum(x @ w["rgb_trans.0.weight"][:, :, 0, 0].T + w["rgb_trans.0.bias"], 0.0)
    h2 = np.maximum(h1 @ w["rgb_trans.2.weight"][:, :, 0, 0].T + w["rgb_trans.2.bias"], 0.0)
    y = h2 @ w["rgb_trans.4.weight"][:, :, 0, 0].T + w["rgb_trans.4.bias"]
    out = np.trunc(np.clip(y * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out.reshape(rgb.shape)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_published_checkpoint_matches_reference_forward(
    shared_data: Path, source_patch: np.ndarray, name: str
) -> None:
    path = shared_data / "stainnet" / name
    weights = load_stainnet(path)
    state = torch.load(path, weights_only=True, map_location="cpu")
    expected = _reference_forward(state, source_patch)

    got = StainNetMap(weights).apply(source_patch, method="direct")
    diff = np.abs(got.astype(np.int16) - expected)
    assert got.shape == source_patch.shape and got.dtype == np.uint8
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3  # only float32-vs-float64 truncation ties differ
    # the network really changes colours (not an identity that would pass trivially)
    assert np.abs(got.astype(np.int16) - source_patch).mean() > 5

    # the torch module (1x1 convolutions, NCHW) computes the same
    module = weights.to_module().eval()
    assert sum(p.numel() for p in module.parameters()) == N_PARAMETERS == 1283
    with torch.no_grad():
        x = (torch.from_numpy(source_patch).permute(2, 0, 1)[None].float() / 255 - 0.5) * 2
        y = module(x)[0].permute(1, 2, 0)
    conv_out = ((y * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
    assert np.abs(conv_out.astype(np.int16) - expected).max() <= 1


def test_published_state_dict_loads_strictly_into_module(shared_data: Path) -> None:
    from wsi_norm.colormap.stainnet import StainNet

    state = torch.load(
        shared_data / "stainnet" / CHECKPOINTS[0], weights_only=True, map_location="cpu"
    )
    module = StainNet()
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert [type(m).__name__ for m in module.rgb_trans] == [
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "Conv2d",
    ]


def _numpy_reference(w: Any, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """StainNet written out from the paper in numpy float32 (no torch): 1x1 convolutions as
    matrix products on channels-last pixels, the authors' scaling, truncation to uint8."""
    flat = rgb.reshape(-1, 3)
    x = flat.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    h = np.maximum(x @ w.conv0_weight.T + w.conv0_bias, np.float32(0.0))
    h = np.maximum(h @ w.conv1_weight.T + w.conv1_bias, np.float32(0.0))
    y = h @ w.conv2_weight.T + w.conv2_bias
    unit = np.clip(y * np.float32(0.5) + np.float32(0.5), np.float32(0.0), np.float32(1.0))
    out: NDArray[np.uint8] = (unit * np.float32(255.0)).astype(np.uint8).reshape(rgb.shape)
    return out


def test_cpu_numpy_torch_and_lut_paths_agree(
    lut_map: StainNetMap, source_patch: np.ndarray
) -> None:
    rng = np.random.default_rng(0)
    random_colours = rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    for rgb in (source_patch, random_colours):
        direct = lut_map.apply(rgb, method="direct")
        via_lut = lut_map.apply(rgb, method="lut")
        # the LUT is built from the definition (the module on slabs): bit-identical, and so is
        # evaluate_numpy, the definition itself
        np.testing.assert_array_equal(via_lut, direct)
        np.testing.assert_array_equal(lut_map.evaluate_numpy(rgb), direct)
        # an independent numpy reference of the paper's arithmetic (BLAS summation order) and the
        # module on whole tensors: float32 rounding can move a truncation by one level, never more
        net = _numpy_reference(lut_map.weights, rgb).reshape(-1, 3)
        reference = lut_map._blend_numpy(rgb.reshape(-1, 3), net).reshape(rgb.shape)  # its KEEP glass
        torch_out = lut_map.apply_torch(torch.from_numpy(rgb), use_lut=False).numpy()
        for other in (reference, torch_out):
            diff = np.abs(other.astype(np.int16) - direct)
            assert diff.max() <= 1
            assert (diff > 0).mean() < 1e-3
        # torch LUT gather (the CUDA default, here on a CPU tensor): exact
        np.testing.assert_array_equal(
            lut_map.apply_torch(torch.from_numpy(rgb), use_lut=True).numpy(), direct
        )
        # the CPU tensor path hands over to apply(): exact
        np.testing.assert_array_equal(lut_map.apply_torch(torch.from_numpy(rgb)).numpy(), direct)


def test_lut_is_indexed_by_rgb(lut_map: StainNetMap) -> None:
    lut = lut_map.lut()
    assert lut.shape == (256, 256, 256, 3) and lut.dtype == np.uint8
    assert not lut.flags.writeable
    colours = np.array([[[0, 0, 0], [10, 200, 30], [255, 0, 128], [120, 60, 200]]], dtype=np.uint8)
    direct = lut_map.apply(colours, method="direct")
    for (r, g, b), mapped in zip(colours[0], direct[0], strict=True):
        np.testing.assert_array_equal(lut[r, g, b], mapped)


def test_output_does_not_depend_on_tiling(
    cyto_weights: StainNetWeights, source_patch: np.ndarray
) -> None:
    cmap = StainNetMap(cyto_weights, cpu_method="direct")
    whole = cmap.apply(source_patch)
    tiled = np.empty_like(whole)
    for r in range(0, source_patch.shape[0], 97):  # uneven tiles, non-contiguous views
        for c in range(0, source_patch.shape[1], 131):
            tiled[r : r + 97, c : c + 131] = cmap.apply(source_patch[r : r + 97, c : c + 131])
    np.testing.assert_array_equal(tiled, whole)


def _colours_near_glass() -> np.ndarray:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(400_000, 3), dtype=np.uint8)
    luma_sum = rgb.astype(np.int32) @ np.array([299, 587, 114])
    near = rgb[luma_sum > 195_000]
    assert len(near) > 1000
    return np.concatenate([rgb[:50_000], near, np.full((1, 3), 255, np.uint8), np.full((1, 3), 240, np.uint8)])


def test_keep_glass_blends_the_source_glass_back_smoothly(
    cyto_weights: StainNetWeights, lut_map: StainNetMap
) -> None:
    rgb = _colours_near_glass()
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    glass = luma >= KEEP.hi
    tissue = luma <= KEEP.lo
    keep = StainNetMap(cyto_weights, glass=KEEP)
    published = StainNetMap(cyto_weights)
    everything = published.apply(rgb, method="direct")
    outputs = (
        keep.apply(rgb, method="direct"),
        lut_map.apply(rgb, method="lut"),
        keep.apply_torch(torch.from_numpy(rgb), use_lut=False).numpy(),
        keep.evaluate_numpy(rgb),
    )
    for out in outputs:
        np.testing.assert_array_equal(out[glass], rgb[glass])  # glass kept
        assert np.abs(out[tissue].astype(np.int16) - everything[tissue]).max() <= 1  # tissue: the network
    np.testing.assert_array_equal(outputs[0], outputs[1])  # direct and LUT: bit-identical
    # the published models do recolour glass: the option matters
    assert (everything[glass] != rgb[glass]).any(axis=1).mean() > 0.5


def test_auto_switches_to_lut_with_identical_output(
    cyto_weights: StainNetWeights, lut_map: StainNetMap, source_patch: np.ndarray
) -> None:
    n_px = source_patch.shape[0] * source_patch.shape[1]
    cmap = StainNetMap(cyto_weights, glass=KEEP, cpu_method="auto", lut_after_px=2 * n_px)
    builds: list[int] = []

    def reuse_fixture_lut() -> np.ndarray:  # same weights and rule: skip a second 3-9 s build
        builds.append(1)
        return lut_map.lut()

    cmap._build_lut = reuse_fixture_lut  # type: ignore[method-assign]
    first = cmap.apply(source_patch)  # below the threshold: direct, no LUT
    assert cmap._lut is None and not builds
    second = cmap.apply(source_patch)  # reaches it: LUT built once and used from now on
    third = cmap.apply(source_patch)
    assert cmap._lut is not None and builds == [1]
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(third, first)
    lazy = StainNetMap(cyto_weights, glass=KEEP, cpu_method="auto", lut_after_px=10**9)
    np.testing.assert_array_equal(lazy.apply(source_patch), first)
    assert lazy._lut is None


def test_map_pickles_small_and_maps_the_same(
    lut_map: StainNetMap, source_patch: np.ndarray
) -> None:
    blob = pickle.dumps(lut_map)
    assert len(blob) < 20_000  # weights and options only, not the 48 MiB LUT
    clone = pickle.loads(blob)
    assert clone._lut is None
    np.testing.assert_array_equal(
        clone.apply(source_patch, method="direct"), lut_map.apply(source_patch)
    )


def test_apply_rejects_bad_input(cyto_weights: StainNetWeights) -> None:
    cmap = StainNetMap(cyto_weights)
    with pytest.raises(TypeError, match="uint8"):
        cmap.apply(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        cmap.apply(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(TypeError, match=r"torch\.uint8"):
        cmap.apply_torch(torch.zeros((4, 4, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match="cpu_method"):
        StainNetMap(cyto_weights, cpu_method="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="StainNetWeights"):
        StainNetMap({"a": 1})  # type: ignore[arg-type]


# ------------------------------------------------------------------ safetensors round trip


def test_safetensors_round_trip_keeps_weights_and_metadata(
    cyto_weights: StainNetWeights, tmp_path: Path
) -> None:
    meta = StainNetMetadata(
        teacher="macenko",
        target_template="template.json sha256:abc",
        training_data="12 slides, 3e6 tissue pixels, seed 7",
        epochs=40,
        final_loss=0.0031,
        val_loss=0.0035,
        seed=7,
        optimizer="adam lr=0.01 cosine",
    )
    path = save_stainnet(cyto_weights, tmp_path / "model.safetensors", meta)
    loaded = load_stainnet(path)
    for name in (
        "conv0_weight",
        "conv0_bias",
        "conv1_weight",
        "conv1_bias",
        "conv2_weight",
        "conv2_bias",
    ):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(cyto_weights, name))
    assert loaded.metadata.teacher == "macenko"
    assert loaded.metadata.final_loss == pytest.approx(0.0031)
    assert loaded.metadata.seed == 7 and loaded.metadata.epochs == 40
    assert loaded.metadata.wsi_norm_version  # filled in on save
    # header metadata are strings, readable by any safetensors tool; tensors use published keys
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata()
    assert (
        header["teacher"] == "macenko"
        and header["epochs"] == "40"
        and header["format"] == "wsi-norm-stainnet"
    )
    module = cyto_weights.to_module()
    module.load_state_dict(load_file(str(path)), strict=True)
    # saving a module works too, and never overwrites silently
    with pytest.raises(OutputExistsError, match=r"model\.safetensors: exists"):
        save_stainnet(module, path)
    save_stainnet(module, path, overwrite=True)
    assert load_stainnet(path).metadata.teacher == ""
    assert not list(tmp_path.glob("*.partial"))


def test_save_requires_safetensors_suffix(cyto_weights: StainNetWeights, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"model\.pth: .*saved as \.safetensors"):
        save_stainnet(cyto_weights, tmp_path / "model.pth")


# ------------------------------------------------------------------ bad weights files


def test_garbage_and_image_files_are_not_checkpoints(shared_data: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    rng = np.random.default_rng(0)
    for _ in range(100):  # random bytes trip the unpickler in many different ways
        garbage.write_bytes(rng.bytes(4096))
        with pytest.raises(WeightsError, match=r"garbage\.pth: not a PyTorch checkpoint"):
            load_stainnet(garbage)
    png = tmp_path / "image.pth"
    png.write_bytes((shared_data / "he" / "torchstain-source.png").read_bytes())
    with pytest.raises(WeightsError, match=r"image\.pth: not a PyTorch checkpoint"):
        load_stainnet(png)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty\.pt: not a PyTorch checkpoint"):
        load_stainnet(empty)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(
        WeightsError, match=r"garbage\.safetensors: not a readable safetensors file"
    ):
        load_stainnet(bad_st)
    with pytest.raises(WeightsError, match=r"missing\.pth: no such weights file"):
        load_stainnet(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"weights\.onnx: unknown weights suffix"):
        (tmp_path / "weights.onnx").write_bytes(b"x")
        load_stainnet(tmp_path / "weights.onnx")


def test_wrong_architecture_names_key_and_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wide = {
        "rgb_trans.0.weight": torch.randn(64, 3, 1, 1),
        "rgb_trans.0.bias": torch.randn(64),
        "rgb_trans.2.weight": torch.randn(64, 64, 1, 1),
        "rgb_trans.2.bias": torch.randn(64),
        "rgb_trans.4.weight": torch.randn(3, 64, 1, 1),
        "rgb_trans.4.bias": torch.randn(3),
    }
    torch.save(wide, tmp_path / "ch64.pth")
    with pytest.raises(
        WeightsError,
        match=r"ch64\.pth: key 'rgb_trans\.0\.weight' has shape \(64, 3, 1, 1\), "
        r"expected \(32, 3, 1, 1\)",
    ):
        load_stainnet(tmp_path / "ch64.pth")
    partial = {k: v for k, v in wide.items() if not k.startswith("rgb_trans.4")}
    torch.save(partial, tmp_path / "two_layers.pth")
    with pytest.raises(
        WeightsError,
        match=r"two_layers\.pth: .*missing keys \['rgb_trans\.4\.weight', 'rgb_trans\.4\.bias'\]",
    ):
        load_stainnet(tmp_path / "two_layers.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"list\.pth: holds a list, not a state dict"):
        load_stainnet(tmp_path / "list.pth")
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in wide.items()}, str(tmp_path / "ch64.safetensors"))
    with pytest.raises(
        WeightsError,
        match=r"ch64\.safetensors: key 'rgb_trans\.0\.weight' has shape \(64, 3, 1, 1\)",
    ):
        load_stainnet(tmp_path / "ch64.safetensors")


class _MakesDirectory:
    """Unpickling this would call os.mkdir(path): stands for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def test_code_executing_pickle_is_refused_not_run(tmp_path: Path) -> None:
    # the payload is real: plain pickle runs it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_MakesDirectory(proof)))
    assert proof.is_dir()

    marker = tmp_path / "pwned"
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps({"rgb_trans.0.weight": _MakesDirectory(marker)}, protocol=2))
    with pytest.raises(
        WeightsError, match=r"evil_raw\.pth: not a PyTorch checkpoint .*weights_only"
    ):
        load_stainnet(raw)
    assert not marker.exists()

    zipped = tmp_path / "evil_zip.pth"
    torch.save({"rgb_trans.0.weight": _MakesDirectory(marker)}, zipped)  # pickled, not run, at save
    assert zipfile.is_zipfile(zipped)
    with pytest.raises(WeightsError, match=r"evil_zip\.pth: not a PyTorch checkpoint"):
        load_stainnet(zipped)
    assert not marker.exists()


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_paths_match_cpu(lut_map: StainNetMap, source_patch: np.ndarray) -> None:
    cpu = lut_map.apply(source_patch)
    tiles = torch.from_numpy(np.stack([source_patch] * 4)).cuda()
    via_lut = lut_map.apply_torch(tiles, use_lut=True)
    direct = lut_map.apply_torch(tiles, use_lut=False)
    assert via_lut.device.type == "cuda" and via_lut.dtype == torch.uint8
    np.testing.assert_array_equal(via_lut.cpu().numpy()[2], cpu)  # bit-identical to the CPU
    diff = np.abs(direct.cpu().numpy()[1].astype(np.int16) - cpu)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_array_equal(
        lut_map.apply_torch(tiles).cpu().numpy()[0], cpu
    )  # auto = LUT on CUDA


@pytest.mark.parametrize(("checkpoint", "plausible"), [("StainNet-Public_layer3_ch32.pth", True),
                                                       ("StainNet-3x0_best_psnr_layer3_ch32.pth", False)])
def test_a_models_output_is_checked_for_h_and_e_and_written_as_computed(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    checkpoint: str, plausible: bool,
) -> None:
    """StainNet has no fit for the QC gate to check, so its output is: the published cytopathology
    model on the real H&E slide writes dark brown (eosin ~37 deg from Ruifrok's, bound 30): a
    warning that names the slide and the number, and the same finding in provenance; the
    histopathology model passes (~9 and ~14 deg). Either way the file is written."""
    from wsi_norm.pipeline import normalize_slide
    from wsi_norm.stain.qc import MODEL_GATE
    from wsi_norm.writers import read_provenance

    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    out = tmp_path / "out.tiff"
    with caplog.at_level("WARNING", logger="wsi_norm.pipeline"):
        normalize_slide(slide, out, method="stainnet", weights=shared_data / "stainnet" / checkpoint)
    qc = read_provenance(out)["qc"]
    measures = qc["measures"]
    assert measures["gate"] == MODEL_GATE and not qc["forced"]
    hematoxylin, eosin = measures["output_stain_angles_to_ruifrok_deg"]
    warned = [r.getMessage() for r in caplog.records if "does not look like H&E" in r.getMessage()]
    if plausible:
        assert qc["passed"] and max(hematoxylin, eosin) < 20 and not warned, (qc, warned)
    else:
        assert not qc["passed"] and eosin > 33, qc
        assert qc["problems"] == [(f"output: eosin vector {eosin:.1f} deg from Ruifrok's eosin (bound 30.0 deg): "
                                   "not a plausible H&E stain")]
        assert len(warned) == 1 and str(slide) in warned[0] and f"{eosin:.1f} deg" in warned[0], warned
    # and `wsi-norm info` of the output says so
    from wsi_norm.cli import main

    capsys.readouterr()
    assert main(["info", str(out), "--no-tissue"]) == 0
    qc_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("qc "))
    assert qc_line.split(None, 1)[1] == ("✓ plausible H&E (measured, not gated)" if plausible else
                                         f"⚠ measured, not gated: {qc['problems'][0]}"), qc_line


def test_a_slide_without_tissue_is_written_and_its_output_check_says_not_measured(shared_data: Path, tmp_path: Path) -> None:
    """StainNet needs no tissue to map a slide: glass alone is written, and the check records why
    it measured nothing (kept glass, which needs the slide's white point, still asks for tissue)."""
    from wsi_norm.errors import FitError
    from wsi_norm.pipeline import normalize_slide
    from wsi_norm.writers import read_provenance

    glass = tmp_path / "glass.png"
    Image.fromarray(np.full((300, 400, 3), (236, 233, 240), np.uint8)).save(glass)
    weights = shared_data / "stainnet" / "StainNet-Public_layer3_ch32.pth"
    normalize_slide(glass, tmp_path / "out.tiff", method="stainnet", weights=weights)
    qc = read_provenance(tmp_path / "out.tiff")["qc"]
    assert qc["passed"] and qc["measures"] == {"gate": "not measured: no tissue sampled (every pixel has gray > 200)"}
    with pytest.raises(FitError, match="no tissue"):
        normalize_slide(glass, tmp_path / "kept.tiff", method="stainnet", weights=weights, glass="keep")
    assert not (tmp_path / "kept.tiff").exists()
