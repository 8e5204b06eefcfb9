"""Stain augmentations as torch modules: batched ``(N, 3, H, W)`` (or ``(3, H, W)``), uint8 or float
in [0, 1], on any device; the dtype is kept and parameters are drawn per sample.

Each module draws its parameters (from ``generator`` when one is given, on that generator's
device) and calls the same ``apply_*`` function as the numpy twins in
:mod:`wsi_norm.augment.functional`, so the arithmetic is written once.

Examples
--------
>>> import torch
>>> from wsi_norm.augment import preset
>>> augment = preset("hed_light")
>>> batch = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
>>> augment(batch, generator=torch.Generator().manual_seed(0)).dtype
torch.uint8
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from wsi_norm.augment._ops import GLASS_BAND, check_range
from wsi_norm.augment.functional import (
    HedUnits,
    apply_brightness_contrast,
    apply_channel_scale,
    apply_hed,
    apply_rot90,
    hed_ranges,
)

__all__ = ["PRESETS", "BrightnessContrast", "ChannelScale", "Compose", "HEDJitter", "Rot90", "preset"]

PresetName = Literal["hed_light", "hed_strong", "brh"]
PRESETS: tuple[str, ...] = ("hed_light", "hed_strong", "brh")
"""``hed_light`` (sigma 0.05) and ``hed_strong`` (sigma 0.2), Tellez et al.'s, beta in OD;
``brh``: StainNet's BR (brightness and contrast in [0.75, 1.25], quarter turns) plus HED scaling
alpha in [0.75, 1.25], beta = 0."""


def _uniform(x: torch.Tensor, shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(x.device)


def _n(x: torch.Tensor) -> int:
    return int(x.shape[0]) if x.ndim == 4 else 1


class HEDJitter(nn.Module):
    """HED jitter (Tellez et al. 2018): ``alpha_c ~ U(1 - sigma, 1 + sigma)``, ``beta_c ~ U(-sigma, sigma)``
    per sample and stain (or explicit ranges), applied to ``od @ HED_FROM_RGB`` and mixed back.

    Parameters
    ----------
    sigma : float in [0, 1)
    alpha, beta : (low, high), optional, override the ranges from sigma
    units : {"od", "skimage"}
        Unit of beta: natural-log OD, or scikit-image's HED unit (OD / ln 10^6).
    tissue_only : bool
        Glass untouched, handed over smoothly over :data:`wsi_norm.augment.GLASS_BAND`.
    """

    def __init__(self, sigma: float | None = 0.05, *, alpha: tuple[float, float] | None = None,
                 beta: tuple[float, float] | None = None, units: HedUnits = "od", tissue_only: bool = False) -> None:
        super().__init__()
        self.alpha_range, self.beta_range = hed_ranges(sigma, alpha=alpha, beta=beta)
        if units not in ("od", "skimage"):
            raise ValueError(f"units must be 'od' or 'skimage', got {units!r}")
        self.units: HedUnits = units
        self.tissue_only = tissue_only

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = _n(x)
        alpha = _uniform(x, (n, 3), *self.alpha_range, generator)
        beta = _uniform(x, (n, 3), *self.beta_range, generator)
        out: torch.Tensor = apply_hed(x, alpha, beta, units=self.units, tissue_only=self.tissue_only,
                                      band=GLASS_BAND, channel_axis=-3)
        return out


class BrightnessContrast(nn.Module):
    """Brightness (factor on intensities) then contrast (factor about the mean luma), drawn per sample."""

    def __init__(self, brightness: tuple[float, float] = (0.75, 1.25), contrast: tuple[float, float] = (0.75, 1.25),
                 *, tissue_only: bool = False) -> None:
        super().__init__()
        self.brightness = check_range("brightness", brightness, lo=0.0)
        self.contrast = check_range("contrast", contrast, lo=0.0)
        self.tissue_only = tissue_only

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = _n(x)
        b = _uniform(x, (n,), *self.brightness, generator)
        c = _uniform(x, (n,), *self.contrast, generator)
        out: torch.Tensor = apply_brightness_contrast(x, b, c, tissue_only=self.tissue_only, channel_axis=-3)
        return out


class ChannelScale(nn.Module):
    """Per-channel RGB scaling ``a_c ~ U(scale)`` per sample and channel (see
    :func:`wsi_norm.augment.suggest_channel_scale`)."""

    def __init__(self, scale: tuple[float, float] = (0.3, 1.5), *, tissue_only: bool = False) -> None:
        super().__init__()
        self.scale = check_range("scale", scale, lo=0.0)
        self.tissue_only = tissue_only

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a = _uniform(x, (_n(x), 3), *self.scale, generator)
        out: torch.Tensor = apply_channel_scale(x, a, tissue_only=self.tissue_only, channel_axis=-3)
        return out


class Rot90(nn.Module):
    """A uniform number of quarter turns (0-3) per sample."""

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        turns = torch.randint(0, 4, (_n(x),), generator=generator, device=device)
        out: torch.Tensor = apply_rot90(x, turns.cpu(), channel_axis=-3)
        return out


class Compose(nn.Module):
    """Transforms in order, one ``generator`` passed to each."""

    def __init__(self, *transforms: nn.Module) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x, generator=generator)
        return x


def preset(name: PresetName, *, tissue_only: bool = False) -> nn.Module:
    """A named augmentation (:data:`PRESETS`)."""
    if name == "hed_light":
        return HEDJitter(0.05, tissue_only=tissue_only)
    if name == "hed_strong":
        return HEDJitter(0.2, tissue_only=tissue_only)
    if name == "brh":
        return Compose(BrightnessContrast(tissue_only=tissue_only), Rot90(),
                       HEDJitter(alpha=(0.75, 1.25), beta=(0.0, 0.0), tissue_only=tissue_only))
    raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}")

