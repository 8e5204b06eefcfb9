"""Stain augmentation for training stain-robust models: HED jitter, brightness and contrast,
quarter turns, per-channel RGB scaling and per-patch mean-centering.

numpy functions (channels last, ``rng=``) live in :mod:`wsi_norm.augment.functional`; torch
modules (channels first, batched, ``generator=``, any device) in :mod:`wsi_norm.augment.transforms`
(imported on first use, so the numpy path does not load torch). Both call the same arithmetic
(:mod:`wsi_norm.augment._ops`).
"""

from __future__ import annotations

from typing import Any

from wsi_norm.augment._ops import GLASS_BAND, HED_FROM_RGB, RGB_FROM_HED, SKIMAGE_HED_UNIT
from wsi_norm.augment.functional import (
    apply_brightness_contrast,
    apply_channel_scale,
    apply_hed,
    apply_rot90,
    brightness_contrast,
    channel_scale,
    hed_jitter,
    hed_ranges,
    mean_center,
    rot90,
    suggest_channel_scale,
)

__all__ = [
    "GLASS_BAND",
    "HED_FROM_RGB",
    "PRESETS",
    "RGB_FROM_HED",
    "SKIMAGE_HED_UNIT",
    "BrightnessContrast",
    "ChannelScale",
    "Compose",
    "HEDJitter",
    "Rot90",
    "apply_brightness_contrast",
    "apply_channel_scale",
    "apply_hed",
    "apply_rot90",
    "brightness_contrast",
    "channel_scale",
    "hed_jitter",
    "hed_ranges",
    "mean_center",
    "preset",
    "rot90",
    "suggest_channel_scale",
]

_TORCH_NAMES = ("PRESETS", "BrightnessContrast", "ChannelScale", "Compose", "HEDJitter", "Rot90", "preset")


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from wsi_norm.augment import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module 'wsi_norm.augment' has no attribute {name!r}")
