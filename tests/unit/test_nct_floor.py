"""The pieces ``bench/nct_floor.py`` times (docs/decisions/0001-neural-color-transfer.md).

The benchmark's figures are only as good as the work it times: VGG19's feature stack must have
VGG19's strides and channels at relu1_1 ... relu5_1, and the brute-force nearest-neighbour field
must be the exact argmax of cosine similarity, chunked or not.  Tiny inputs, a few seconds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nct_floor.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nct_floor", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nct_floor", module)
    spec.loader.exec_module(module)
    return module


nct = _load_bench()


def _rgb(h: int, w: int, seed: int) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_vgg19_strides_and_channels_per_level() -> None:
    """relu{b}_1 of a 64x48 tile: VGG19's channel plan and a stride of 2^(b-1)."""
    net = nct.VGG19Features(seed=0).eval()
    convs = [m for m in net.layers if isinstance(m, torch.nn.Conv2d)]
    # VGG19 (configuration E) up to relu5_1: 2 + 2 + 4 + 4 + 1 convolutions, all 3x3, padding 1
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 4 + [512] * 4 + [512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    with torch.inference_mode():
        feats = net(nct.to_vgg_input(_rgb(64, 48, 1)))
    assert list(feats) == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    expected = {
        "relu1_1": (64, 64, 48),
        "relu2_1": (128, 32, 24),
        "relu3_1": (256, 16, 12),
        "relu4_1": (512, 8, 6),
        "relu5_1": (512, 4, 3),
    }
    for level, (c, h, w) in expected.items():
        assert tuple(feats[level].shape) == (1, c, h, w), level
        assert nct.LEVEL_CHANNELS[level] == c and 64 // nct.LEVEL_STRIDE[level] == h
        assert bool((feats[level] >= 0).all())  # read after the ReLU


def test_vgg19_stop_at_and_seeded_weights() -> None:
    """``stop_at`` ends the pass at that level with the same values; one seed, one network."""
    x = nct.to_vgg_input(_rgb(32, 32, 2))
    with torch.inference_mode():
        full = nct.VGG19Features(seed=3)(x)
        part = nct.VGG19Features(seed=3)(x, stop_at="relu3_1")
        other = nct.VGG19Features(seed=4)(x, stop_at="relu1_1")
    assert list(part) == ["relu1_1", "relu2_1", "relu3_1"]
    for level in part:
        assert torch.equal(part[level], full[level])
    assert not torch.equal(other["relu1_1"], full["relu1_1"])


def _numpy_field(source: NDArray[np.float32], reference: NDArray[np.float32]) -> NDArray[np.intp]:
    """Reference implementation: float64 cosine similarity of every pair, argmax per row."""
    c = source.shape[0]
    s = source.reshape(c, -1).T.astype(np.float64)
    r = reference.reshape(c, -1).T.astype(np.float64)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    best: NDArray[np.intp] = np.argmax(s @ r.T, axis=1)
    return best.reshape(source.shape[1:])


@pytest.mark.parametrize("chunk_elems", [1, 7, 1 << 25])
def test_nn_field_is_the_exact_argmax(chunk_elems: int) -> None:
    """A valid index map, equal to numpy's brute force, whatever the chunking."""
    gen = torch.Generator().manual_seed(11)
    source = torch.randn((16, 9, 7), generator=gen)
    reference = torch.randn((16, 5, 6), generator=gen)
    field = nct.nn_field(source, reference, chunk_elems=chunk_elems)
    assert field.dtype == torch.int64 and tuple(field.shape) == (9, 7)
    assert int(field.min()) >= 0 and int(field.max()) < 5 * 6
    np.testing.assert_array_equal(field.numpy(), _numpy_field(source.numpy(), reference.numpy()))


def test_bidirectional_fields_of_a_tile_with_itself_are_the_identity() -> None:
    """Every feature's nearest neighbour in its own map is itself: both fields are arange."""
    feats = torch.randn((32, 6, 8), generator=torch.Generator().manual_seed(5))
    forward, backward = nct.bidirectional_fields(feats, feats * 2.0)  # cosine: scale-free
    identity = torch.arange(48).reshape(6, 8)
    assert torch.equal(forward, identity) and torch.equal(backward, identity)


def test_bad_input_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"\(8, 4, 4\) and \(6, 4, 4\)"):
        nct.nn_field(torch.zeros(8, 4, 4), torch.zeros(6, 4, 4))
    with pytest.raises(ValueError, match="chunk_elems must be >= 1, got 0"):
        nct.nn_field(torch.ones(8, 4, 4), torch.ones(8, 4, 4), chunk_elems=0)
    with pytest.raises(ValueError, match="'relu6_1'"):
        nct.VGG19Features()(torch.zeros(1, 3, 16, 16), stop_at="relu6_1")
    with pytest.raises(ValueError, match="float32"):
        nct.to_vgg_input(np.zeros((16, 16, 3), np.float32))


def test_projection_to_a_gigapixel() -> None:
    """Per-tile seconds -> hours per 1e9 px: 1e9 / 512^2 = 3814.7 tiles."""
    assert nct.TILES_PER_GP == pytest.approx(3814.697, abs=1e-3)
    assert nct._hours_per_gp(1.0) == pytest.approx(3814.697 / 3600, rel=1e-6)
    # one direction of the relu3_1 field on a 512^2 pair: 128^2 x 128^2 pairs x 256 channels
    assert nct._field_flops("relu3_1") == 2.0 * 128**4 * 256


def test_measure_and_summary_on_tiny_tiles() -> None:
    """The benchmark's plumbing on 32x32 tiles: measured and projected levels, floor arithmetic."""
    tiles = np.stack([_rgb(32, 32, 7), _rgb(32, 32, 8)])
    result = nct.measure(torch.device("cpu"), tiles, _rgb(32, 32, 9), field_levels=2, repeats=1)
    fields = result["fields"]
    assert list(fields) == list(nct.LEVELS)
    assert [f["measured"] for f in fields.values()] == [True, True, False, False, False]
    assert all(f["seconds"] > 0 for f in fields.values())
    summary = nct.summarize(result, {"direct": 0.5, "lut": 0.001})
    to_relu2 = sum(fields[lv]["seconds"] for lv in nct.LEVELS[:4])
    assert summary["floor_s_per_tile"] == pytest.approx(result["features_s"] + to_relu2)
    assert summary["projected_levels"] == ["relu3_1", "relu2_1", "relu1_1"]
    assert summary["floor_over_stainnet"]["lut"] == pytest.approx(
        summary["floor_s_per_tile"] / 0.001
    )
    assert summary["floor_over_stainnet_goal"] == pytest.approx(
        summary["floor_s_per_tile"] * 20_000
    )
