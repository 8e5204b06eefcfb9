"""Colour transforms: OD round trip, Lab vs scikit-image, luma and background rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import NDArray
from skimage.color import lab2rgb, rgb2lab

from wsi_norm.color import (
    _lab_of_levels,
    is_background,
    lab_to_rgb,
    luma,
    od_to_rgb,
    rgb_to_lab,
    rgb_to_od,
    rgb_to_od64,
)


@given(arrays(np.uint8, st.tuples(st.integers(1, 50), st.just(3))),
       st.tuples(st.floats(200.0, 255.0), st.floats(200.0, 255.0), st.floats(200.0, 255.0)))
def test_od_round_trip(rgb: NDArray[np.uint8], white: tuple[float, float, float]) -> None:
    back = od_to_rgb(rgb_to_od(rgb, white=white), white=white)
    assert np.array_equal(np.rint(back).astype(np.uint8), rgb)


def test_od_values_and_torch_twin() -> None:
    rgb = np.array([[239, 0, 120]], dtype=np.uint8)
    od = rgb_to_od(rgb, white=239.0)
    np.testing.assert_allclose(od, [[0.0, np.log(240.0), np.log(240 / 121)]], atol=1e-12)
    od_t = rgb_to_od(torch.from_numpy(rgb), white=239.0)
    assert od_t.dtype == torch.float32
    np.testing.assert_allclose(od_t.numpy(), od, atol=1e-6)


def test_glass_has_zero_od_in_every_channel_whatever_the_tint() -> None:
    white = (231.0, 244.0, 252.0)
    glass = np.array([[231, 244, 252]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_od(glass, white=white), 0.0, atol=1e-12)
    t = rgb_to_od(torch.from_numpy(glass), white=white)
    assert float(t.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="white point must be in"):
        rgb_to_od(glass, white=(0.0, 240.0, 240.0))


def test_lab_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((500, 3))
    np.testing.assert_allclose(rgb_to_lab(rgb), rgb2lab(rgb[None])[0], atol=1e-8)
    lab = rgb2lab(rgb[None])[0]
    np.testing.assert_allclose(lab_to_rgb(lab), lab2rgb(lab[None])[0], atol=1e-6)
    np.testing.assert_allclose(lab_to_rgb(torch.from_numpy(lab)).numpy(), rgb, atol=1e-6)


def test_lab_of_8_bit_input_is_the_formula_exactly() -> None:
    # uint8 input looks its sRGB decoding up in a table of the 256 levels: every level and a
    # million random colours give the same float64 Lab as the formula on v / 255, bit for bit
    rng = np.random.default_rng(1)
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rgb = np.concatenate([levels, rng.integers(0, 256, (1_000_000, 3), dtype=np.uint8)])
    formula = rgb_to_lab(rgb.astype(np.float64) / 255.0)
    assert np.array_equal(_lab_of_levels(rgb, compiled=False), formula)
    # the compiled loop: the same operations; bit for bit unless numpy's power is SVML's (AVX-512)
    compiled = _lab_of_levels(rgb, compiled=True)
    assert np.abs(compiled - formula).max() <= 1e-12
    assert np.array_equal(_lab_of_levels(rgb.reshape(-1, 4, 3), compiled=True), compiled.reshape(-1, 4, 3))
    assert np.array_equal(rgb_to_lab(rgb.reshape(-1, 4, 3)), rgb_to_lab(rgb).reshape(-1, 4, 3))
    np.testing.assert_allclose(rgb_to_lab(rgb[:5000]), rgb2lab(rgb[None, :5000])[0], atol=1e-8)


@pytest.mark.parametrize("white", [240.0, (231.5, 236.0, 250.25), 255.0])
def test_od_of_8_bit_input_is_the_formula_exactly(white: float | tuple[float, float, float]) -> None:
    # uint8 input looks each channel's 256 levels up: the same float64 optical density as the
    # formula on the same values as floats, bit for bit, whatever the shape and the white point
    rng = np.random.default_rng(2)
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rgb = np.concatenate([levels, rng.integers(0, 256, (1_000_000, 3), dtype=np.uint8)])
    exact = rgb_to_od(rgb.astype(np.float64), white=white)
    assert rgb_to_od(rgb, white=white).dtype == np.float64
    assert np.array_equal(rgb_to_od(rgb, white=white).view(np.uint64), exact.view(np.uint64))
    assert np.array_equal(rgb_to_od(rgb.reshape(-1, 4, 3), white=white), exact.reshape(-1, 4, 3))
    assert np.array_equal(rgb_to_od64(rgb, white=white), exact)
    as_float32 = rgb_to_od(rgb.astype(np.float32), white=white)  # float32 stays float32 in rgb_to_od
    assert as_float32.dtype == np.float32
    assert np.array_equal(rgb_to_od64(rgb.astype(np.float32), white=white), exact)  # and float64 in rgb_to_od64


def test_luma_and_background_boundary() -> None:
    assert luma(np.array([100, 200, 50], dtype=np.uint8)) == 0.299 * 100 + 0.587 * 200 + 0.114 * 50
    grey200 = np.array([[200, 200, 200], [201, 201, 201]], dtype=np.uint8)
    assert is_background(grey200).tolist() == [False, True]
    assert is_background(torch.from_numpy(grey200)).tolist() == [False, True]
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10000, 3), dtype=np.uint8)
    # MATLAB rgb2gray rounds the luma of uint8 input: glass is round(luma) > 200
    assert np.array_equal(is_background(rgb), np.floor(luma(rgb) + 0.5 + 1e-9) > 200)
    assert np.array_equal(is_background(torch.from_numpy(rgb)).numpy(), is_background(rgb))


def test_luma_x1000_is_the_integer_formula_for_every_colour() -> None:
    from wsi_norm.color import luma_x1000

    cube = np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij"), axis=-1)
    rgb = cube.astype(np.uint8)
    expected = cube[..., 0] * 299 + cube[..., 1] * 587 + cube[..., 2] * 114
    got = luma_x1000(rgb)
    assert got.dtype == np.int32 and got.shape == rgb.shape[:-1]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(is_background(rgb), expected >= 200_500)
    np.testing.assert_array_equal(luma_x1000(rgb[::3, 1::2]), expected[::3, 1::2])  # strided views


@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (1000, 3), (37, 53, 3), (4, 5, 6, 3)])
def test_rgb_where_is_boolean_indexing(shape: tuple[int, ...]) -> None:
    from wsi_norm.color import rgb_where

    rng = np.random.default_rng(len(shape))
    rgb = rng.integers(0, 256, shape, dtype=np.uint8)
    for p in (0.0, 0.3, 1.0):
        mask = rng.random(shape[:-1]) < p
        got = rgb_where(rgb, mask)
        assert got.dtype == np.uint8 and got.shape == (int(mask.sum()), 3)
        np.testing.assert_array_equal(got, rgb[mask])
    if len(shape) == 3:  # a strided view is copied first, with the same result
        view, mask = rgb[::2, 1::3], rng.random(rgb[::2, 1::3].shape[:-1]) < 0.5
        np.testing.assert_array_equal(rgb_where(view, mask), view[mask])


def test_rgb_where_refuses_what_is_not_8_bit_rgb_or_a_mask_of_another_shape() -> None:
    from wsi_norm.color import rgb_where

    with pytest.raises(ValueError, match=r"\(\.\.\., 3\) uint8"):
        rgb_where(np.zeros((4, 4), np.uint8), np.ones(4, bool))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\) uint8"):
        rgb_where(np.zeros((4, 3), np.float32), np.ones(4, bool))
    with pytest.raises(ValueError, match="mask shape"):
        rgb_where(np.zeros((4, 4, 3), np.uint8), np.ones(16, bool))
