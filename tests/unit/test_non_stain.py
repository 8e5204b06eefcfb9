"""The fit's colour rules for absorbers that are not stain (black fill, black and green ink):
they catch those and spare every H&E mixture (:func:`wsi_norm.tissue.sampling.non_stain_absorbers`)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from wsi_norm.stain.base import RUIFROK_HE, order_stains
from wsi_norm.tissue.sampling import non_stain_absorbers


def _turned(vector: NDArray[np.float64], deg: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """``vector`` turned by ``deg`` in a random direction (as the fidelity benchmark's cases)."""
    axis = rng.normal(size=3)
    axis -= axis @ vector * vector
    axis /= np.linalg.norm(axis)
    out = np.cos(np.radians(deg)) * vector + np.sin(np.radians(deg)) * axis
    return np.asarray(out / np.linalg.norm(out))


def test_no_h_and_e_mixture_is_taken_for_ink() -> None:
    # 400 stainings as the benchmark draws them (vectors turned up to 15 deg, white points
    # 220-255), each rendered over a grid of concentrations up to the density where one channel
    # saturates; 8-bit rounding as a scanner writes
    rng = np.random.default_rng(0)
    conc = np.stack(np.meshgrid(np.linspace(0, 4, 41), np.linspace(0, 4, 41)), -1).reshape(-1, 2)
    for _ in range(400):
        stains = order_stains(np.stack([_turned(v, rng.uniform(0, 15), rng) for v in RUIFROK_HE]))
        white = rng.uniform(220, 255, 3)
        rgb = np.rint((white + 1) * np.exp(-conc @ stains) - 1).clip(0, 255)
        measured = rgb[(rgb >= 3).all(axis=1)]  # not saturated in every channel
        flagged = non_stain_absorbers(measured.astype(np.uint8), white)
        assert not flagged.any(), (stains.round(3).tolist(), white.round(1).tolist(), measured[flagged][:3])


@pytest.mark.parametrize("white", [(240.0, 240.0, 240.0), (232.0, 240.0, 244.0), (244.0, 238.0, 232.0)])
@pytest.mark.parametrize(("ink", "what", "optical"), [
    ((0, 0, 0), "black fill", False), ((25, 25, 25), "dark-grey fill", False), ((35, 35, 40), "black ink", True),
    ((40, 130, 80), "green ink", True), ((60, 140, 60), "green marking dye", True),
])
def test_fill_and_ink_are_not_stain(ink: tuple[int, int, int], what: str, optical: bool,
                                    white: tuple[float, float, float]) -> None:
    # ink is seen through the scanner's optics, so its colour (given on a 240 white) scales with
    # the white point; fill outside a scan is written as a constant. 3 % brightness jitter and
    # +-2 levels of noise per channel (JPEG on a flat stroke or fill)
    rng = np.random.default_rng(1)
    colour = np.asarray(ink, np.float64) * (np.asarray(white) / 240.0 if optical else 1.0)
    px = colour * rng.normal(1.0, 0.03, (2000, 1)) + rng.integers(-2, 3, (2000, 3))
    flagged = non_stain_absorbers(px.clip(0, 255).astype(np.uint8), np.asarray(white))
    # the bluish black ink lies 2-3 deg from the grey axis, and its noise takes ~8 % of its
    # pixels past the 3 deg bound; everything else is caught whole
    assert flagged.mean() > (0.9 if what == "black ink" else 0.99), (what, flagged.mean())


def test_blocks_and_pixels_take_the_same_rule() -> None:
    # float block means (the Macenko and Vahadane input) and uint8 pixels give the same answer
    rgb = np.random.default_rng(2).integers(0, 256, (20000, 3)).astype(np.uint8)
    white = np.array([238.0, 241.0, 236.0])
    assert np.array_equal(non_stain_absorbers(rgb, white), non_stain_absorbers(rgb.astype(np.float32), white))
