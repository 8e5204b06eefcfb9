"""Augmentations as functions: explicit parameters (numpy or torch), and numpy twins that draw them.

Layout: numpy images are channels last, ``(H, W, 3)`` or ``(N, H, W, 3)``; torch batches are
channels first, ``(3, H, W)`` or ``(N, 3, H, W)`` (:mod:`wsi_norm.augment.transforms`). The
``apply_*`` functions take either (``channel_axis`` says where the channels are) and per-sample
parameters of shape ``(N, 3)`` or ``(N,)``; the numpy twins (``hed_jitter``, ...) draw those
parameters from ``rng`` and call them, so numpy and torch compute one function.

Input is uint8 (0-255) or float in [0, 1]; the output has the input's dtype (uint8 rounded,
float16/bfloat16 computed in float32). A parameter draw happens once per image and channel.

References
----------
Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to
train distilled stain-invariant convolutional networks", IEEE TMI 37(9), 2018 (HED jitter).
Tian et al., "StainNet: a fast and robust stain normalization network", Front. Med. 2021 (BR).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_norm.augment._ops import (
    GLASS_BAND,
    SKIMAGE_HED_UNIT,
    brightness_contrast_planes,
    channel_scale_planes,
    check_image,
    check_range,
    hed_lookup,
    hed_planes,
    hed_tables,
    tissue_blend,
)
from wsi_norm.color import BACKGROUND_WEIGHTED_MIN, array_namespace

__all__ = [
    "HedUnits",
    "apply_brightness_contrast",
    "apply_channel_scale",
    "apply_hed",
    "apply_rot90",
    "brightness_contrast",
    "channel_scale",
    "hed_jitter",
    "hed_ranges",
    "mean_center",
    "rot90",
    "suggest_channel_scale",
]

HedUnits = Literal["od", "skimage"]


def hed_ranges(
    sigma: float | None = 0.05, *, alpha: tuple[float, float] | None = None, beta: tuple[float, float] | None = None
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The uniform ranges of HED jitter: ``alpha ~ U(1 - sigma, 1 + sigma)``, ``beta ~ U(-sigma, sigma)``
    unless given explicitly; ``sigma`` must be in [0, 1)."""
    s = float("nan") if sigma is None else float(sigma)
    if (alpha is None or beta is None) and not 0.0 <= s < 1.0:  # NaN fails too
        raise ValueError(f"sigma must be in [0, 1), got {sigma!r}")
    a = check_range("alpha", alpha, lo=0.0) if alpha is not None else (1.0 - s, 1.0 + s)
    b = check_range("beta", beta) if beta is not None else (-s, s)
    return a, b


def _beta_od(beta: Any, units: HedUnits) -> Any:
    if units == "od":
        return beta
    if units == "skimage":
        return beta * SKIMAGE_HED_UNIT
    raise ValueError(f"units must be 'od' or 'skimage', got {units!r}")


def _planes(x: Any, channel_axis: int, *, as_float: bool = True) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Split ``x`` into three planes, batched: float intensities 0-255 (``as_float``), else the
    raw planes (views); and a function that stacks float intensity planes back into ``x``'s
    shape, layout and dtype (rounded for uint8, rescaled to [0, 1] for float)."""
    xp = array_namespace(x)
    batched = x.ndim == 4
    axis = channel_axis % x.ndim
    dtype = x.dtype
    is_int = (dtype == np.uint8) if xp is np else (dtype == xp.uint8)
    raw = [np.moveaxis(x, axis, 0)[c] if xp is np else x.select(axis, c) for c in range(3)]
    if as_float:
        low = (not is_int and dtype.itemsize < 4) if xp is np else dtype in (xp.float16, xp.bfloat16)
        if xp is np:
            raw = [p.astype(np.float32) if (is_int or low) else p for p in raw]
        else:
            raw = [p.float() if (is_int or low) else p for p in raw]
        if not is_int:
            raw = [p * 255.0 for p in raw]
    planes = raw if batched else [p[None] for p in raw]

    def restore(out: list[Any]) -> Any:
        if not batched:
            out = [p[0] for p in out]
        if is_int:
            if xp is np:
                for p in out:  # in place: the planes are this call's own temporaries
                    np.clip(p, 0.0, 255.0, out=p)
                    np.rint(p, out=p)
                return np.stack([p.astype(np.uint8) for p in out], axis)
            return xp.stack([p.clamp(0, 255).round().to(xp.uint8) for p in out], dim=axis)
        stacked = xp.stack(out, axis) if xp is np else xp.stack(out, dim=axis)
        stacked = xp.clip(stacked * (1.0 / 255.0), 0.0, 1.0)
        return stacked.astype(dtype, copy=False) if xp is np else stacked.to(dtype)

    return planes, restore


def _per_sample(x: Any, values: Any, n: int, width: int) -> list[Any]:
    """``values`` ((N, width) or (N,) array-like) as ``width`` lists of (N, 1, 1) arrays of x's kind."""
    xp = array_namespace(x)
    v: Any = np.asarray(values, dtype=np.float32) if xp is np else xp.as_tensor(values, dtype=xp.float32,
                                                                                 device=x.device)
    _check_count(int(v.size) if xp is np else int(v.numel()), n, width)
    v = v.reshape(n, width)
    return [v[:, c].reshape(n, 1, 1) for c in range(width)]


def _check_count(count: int, n: int, width: int) -> None:
    if count != n * width:
        raise ValueError(f"{count} parameter values given for a batch of {n} (expected {n} x {width})")


def _batch_size(x: Any) -> int:
    """Samples in an image (1) or a batch (its first axis)."""
    return int(x.shape[0]) if x.ndim == 4 else 1


def _finish(x: Any, planes: list[Any], out: list[Any], restore: Callable[[list[Any]], Any], tissue_only: bool,
            band: tuple[float, float]) -> Any:
    if tissue_only:
        out = tissue_blend(array_namespace(x), planes, out, band)
    return restore(out)


def apply_hed(
    x: Any, alpha: Any, beta: Any, *, units: HedUnits = "od", tissue_only: bool = False,
    band: tuple[float, float] = GLASS_BAND, channel_axis: int = -1,
) -> Any:
    """HED jitter with given parameters (see :func:`wsi_norm.augment._ops.hed_planes`).

    Parameters
    ----------
    x : (H, W, 3) / (N, H, W, 3) numpy, or torch with ``channel_axis=1`` ((N, 3, H, W)), uint8 or
        float in [0, 1]
    alpha : (N, 3) scale of the H, E, D amounts (1 = unchanged)
    beta : (N, 3) shift of the H, E, D amounts, in optical density (natural log) with
        ``units="od"``, or in scikit-image's HED unit (OD / ln 10^6) with ``units="skimage"``
    tissue_only : bool
        Leave glass untouched, with a smooth hand-over over the luma ``band`` (0-255).

    Returns
    -------
    Same shape, layout and dtype as ``x``.
    """
    check_image(x, channel_axis=channel_axis)
    xp = array_namespace(x)
    n = _batch_size(x)
    if xp is not np and x.dtype == xp.uint8 and x.device.type == "cpu":
        # 8-bit on the CPU: numpy's table lookups on the tensor's own memory beat torch indexing;
        # a batch is split over torch's intra-op threads (the lookups release the GIL)
        arr, a, b = x.numpy(), _param_array(alpha, n), _param_array(beta, n)
        parts = min(n, xp.get_num_threads()) if x.ndim == 4 else 1
        if parts <= 1:
            return xp.from_numpy(apply_hed(arr, a, b, units=units, tissue_only=tissue_only, band=band,
                                           channel_axis=channel_axis))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        with ThreadPoolExecutor(parts) as pool:
            chunks = list(pool.map(
                lambda k: apply_hed(arr[bounds[k]:bounds[k + 1]], a[bounds[k]:bounds[k + 1]], b[bounds[k]:bounds[k + 1]],
                                    units=units, tissue_only=tissue_only, band=band, channel_axis=channel_axis),
                range(parts)))
        return xp.from_numpy(np.concatenate(chunks))
    alphas, betas = _per_sample(x, alpha, n, 3), [_beta_od(b, units) for b in _per_sample(x, beta, n, 3)]
    if (x.dtype == np.uint8) if xp is np else (x.dtype == xp.uint8):
        # exact integers 0-255: the separable tables compute the same function, without log or exp
        cat = np.concatenate if xp is np else xp.cat
        tables = hed_tables(xp, cat([a.reshape(n, 1) for a in alphas], 1), cat([b.reshape(n, 1) for b in betas], 1))
        levels, restore = _planes(x, channel_axis, as_float=False)
        out = hed_lookup(xp, levels, tables)
        if not tissue_only:
            return restore(out)
        planes, restore = _planes(x, channel_axis)
    else:
        planes, restore = _planes(x, channel_axis)
        out = hed_planes(xp, planes, alphas, betas)
    return _finish(x, planes, out, restore, tissue_only, band)


def _param_array(values: Any, n: int) -> NDArray[np.float64]:
    """Per-sample parameters (array-like or tensor) as an (n, 3) float64 numpy array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    _check_count(arr.size, n, 3)
    return arr.reshape(n, 3)


def apply_brightness_contrast(
    x: Any, brightness: Any, contrast: Any, *, tissue_only: bool = False, band: tuple[float, float] = GLASS_BAND,
    channel_axis: int = -1,
) -> Any:
    """Brightness (a factor on intensities) then contrast (a factor about the mean luma), per
    sample; ``brightness``, ``contrast``: (N,) factors, 1 = unchanged."""
    check_image(x, channel_axis=channel_axis)
    n = _batch_size(x)
    planes, restore = _planes(x, channel_axis)
    b, = _per_sample(x, brightness, n, 1)
    c, = _per_sample(x, contrast, n, 1)
    out = brightness_contrast_planes(array_namespace(x), planes, b, c)
    return _finish(x, planes, out, restore, tissue_only, band)


def apply_channel_scale(
    x: Any, scale: Any, *, tissue_only: bool = False, band: tuple[float, float] = GLASS_BAND, channel_axis: int = -1,
) -> Any:
    """Per-channel RGB scaling ``v'_c = a_c v_c`` (clipped); ``scale``: (N, 3) factors."""
    check_image(x, channel_axis=channel_axis)
    n = _batch_size(x)
    planes, restore = _planes(x, channel_axis)
    out = channel_scale_planes(array_namespace(x), planes, _per_sample(x, scale, n, 3))
    return _finish(x, planes, out, restore, tissue_only, band)


def apply_rot90(x: Any, turns: Any, *, channel_axis: int = -1) -> Any:
    """Rotate each sample by ``turns`` (N,) quarter turns counter-clockwise (square tiles when a
    batch mixes odd and even turns)."""
    check_image(x, channel_axis=channel_axis)
    xp = array_namespace(x)
    ks = [int(k) % 4 for k in (np.asarray(turns).reshape(-1) if xp is np else turns.reshape(-1).tolist())]
    axes = (-3, -2) if channel_axis % x.ndim == x.ndim - 1 else (-2, -1)
    if x.ndim == 3:
        if len(ks) != 1:
            raise ValueError(f"one image takes one number of turns, got {len(ks)}")
        return np.ascontiguousarray(np.rot90(x, ks[0], axes)) if xp is np else xp.rot90(x, ks[0], axes)
    if len(ks) != x.shape[0]:
        raise ValueError(f"turns for {len(ks)} samples given for a batch of {x.shape[0]}")
    if len({k % 2 for k in ks}) > 1 and x.shape[axes[0]] != x.shape[axes[1]]:
        raise ValueError(f"a batch of non-square tiles {tuple(x.shape)} cannot mix quarter and half turns")
    if xp is np:
        return np.stack([np.rot90(s, k, axes) for s, k in zip(x, ks, strict=True)])
    return xp.stack([xp.rot90(s, k, axes) for s, k in zip(x, ks, strict=True)])


# -------------------------------------------------------------- numpy twins (they draw with rng)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def hed_jitter(
    image: NDArray[Any], *, sigma: float | None = 0.05, alpha: tuple[float, float] | None = None,
    beta: tuple[float, float] | None = None, units: HedUnits = "od", tissue_only: bool = False,
    rng: np.random.Generator | int | None = None,
) -> NDArray[Any]:
    """HED jitter with random parameters: ``alpha_c ~ U(1 - sigma, 1 + sigma)``,
    ``beta_c ~ U(-sigma, sigma)`` per image and stain (or the explicit ranges ``alpha``, ``beta``).

    Parameters
    ----------
    image : (H, W, 3) or (N, H, W, 3) uint8, or float in [0, 1]
    sigma : float in [0, 1)
        Tellez et al.'s strength: 0.05 "HED-light", 0.2 "HED-strong" (:data:`PRESETS`).
    units : {"od", "skimage"}
        Unit of ``beta``: natural-log optical density (default), or scikit-image's HED unit
        (``rgb2hed``: OD / ln 10^6, so its 0.05 is 0.69 OD).
    tissue_only : bool
        Glass untouched (smooth hand-over over :data:`GLASS_BAND`).
    rng : numpy Generator or seed

    Returns
    -------
    Same shape and dtype as ``image``.

    Raises
    ------
    ValueError
        sigma outside [0, 1), a range with low > high, float input outside [0, 1] or NaN, not RGB.
    """
    (a_lo, a_hi), (b_lo, b_hi) = hed_ranges(sigma, alpha=alpha, beta=beta)
    check_image(image, channel_axis=-1)
    n = _batch_size(image)
    gen = _rng(rng)
    a = gen.uniform(a_lo, a_hi, (n, 3))
    b = gen.uniform(b_lo, b_hi, (n, 3))
    return apply_hed(image, a, b, units=units, tissue_only=tissue_only)  # type: ignore[no-any-return]


def brightness_contrast(
    image: NDArray[Any], *, brightness: tuple[float, float] = (0.75, 1.25), contrast: tuple[float, float] = (0.75, 1.25),
    tissue_only: bool = False, rng: np.random.Generator | int | None = None,
) -> NDArray[Any]:
    """Brightness and contrast factors drawn uniformly per image (StainNet's BR: both in [0.75, 1.25])."""
    b_lo, b_hi = check_range("brightness", brightness, lo=0.0)
    c_lo, c_hi = check_range("contrast", contrast, lo=0.0)
    check_image(image, channel_axis=-1)
    n = _batch_size(image)
    gen = _rng(rng)
    b, c = gen.uniform(b_lo, b_hi, n), gen.uniform(c_lo, c_hi, n)
    return apply_brightness_contrast(image, b, c, tissue_only=tissue_only)  # type: ignore[no-any-return]


def channel_scale(
    image: NDArray[Any], *, scale: tuple[float, float] = (0.3, 1.5), tissue_only: bool = False,
    rng: np.random.Generator | int | None = None,
) -> NDArray[Any]:
    """Per-channel RGB scaling, ``a_c ~ U(scale)`` per image and channel (the histogram-matching
    blog's 0.3-1.5; :func:`suggest_channel_scale` derives a range from data)."""
    lo, hi = check_range("scale", scale, lo=0.0)
    check_image(image, channel_axis=-1)
    n = _batch_size(image)
    a = _rng(rng).uniform(lo, hi, (n, 3))
    return apply_channel_scale(image, a, tissue_only=tissue_only)  # type: ignore[no-any-return]


def rot90(image: NDArray[Any], *, rng: np.random.Generator | int | None = None) -> NDArray[Any]:
    """A random quarter-turn count (0-3, uniform) per image."""
    check_image(image, channel_axis=-1)
    n = _batch_size(image)
    return apply_rot90(image, _rng(rng).integers(0, 4, n))  # type: ignore[no-any-return]


def _tissue_mask_hw3(image: NDArray[Any]) -> NDArray[np.bool_]:
    v = image.astype(np.float64) * (1.0 if image.dtype == np.uint8 else 255.0)
    weighted = np.rint(v) @ np.array([299.0, 587.0, 114.0])
    return np.asarray(weighted < BACKGROUND_WEIGHTED_MIN)


def mean_center(image: NDArray[Any], *, to: tuple[float, float, float] | None = None, tissue_only: bool = False) -> NDArray[Any]:
    """Per-patch mean-centering: subtract each image's per-channel mean (over its tissue, gray <= 200,
    with ``tissue_only``; over every pixel otherwise, or when an image has no tissue).

    Parameters
    ----------
    image : (H, W, 3) or (N, H, W, 3) uint8 or float in [0, 1]
    to : (3,) floats in [0, 1], optional
        Re-centre on this mean instead of 0: the result is then an image again (clipped, the
        input's dtype). Without it the result is signed float32 (float64 for float64 input).
    """
    check_image(image, channel_axis=-1)
    batch = image if image.ndim == 4 else image[None]
    x = batch.astype(np.float64) / (255.0 if batch.dtype == np.uint8 else 1.0)
    means = np.empty((len(batch), 1, 1, 3))
    for i, (img, xi) in enumerate(zip(batch, x, strict=True)):
        mask = _tissue_mask_hw3(img) if tissue_only else None
        means[i, 0, 0] = xi[mask].mean(axis=0) if mask is not None and mask.any() else xi.reshape(-1, 3).mean(axis=0)
    centred = x - means
    if to is not None:
        target = np.asarray(to, np.float64)
        if target.shape != (3,) or not np.all((target >= 0) & (target <= 1)):
            raise ValueError(f"to must be three values in [0, 1], got {to!r}")
        out = np.clip(centred + target, 0.0, 1.0)
        out = np.rint(out * 255).astype(np.uint8) if image.dtype == np.uint8 else out.astype(image.dtype)
    else:
        out = centred.astype(np.float64 if image.dtype == np.float64 else np.float32)
    return out if image.ndim == 4 else out[0]


def suggest_channel_scale(train: Iterable[NDArray[Any]], test: Iterable[NDArray[Any]]) -> tuple[float, float]:
    """A range for :func:`channel_scale` from data: per channel, the ratio of the test set's mean
    tissue colour to the training set's (tissue: gray <= 200, every tissue pixel of a set
    weighted alike); the range spans the three ratios and 1.

    Scaling training tiles by factors drawn from it reaches the test site's mean colour on every
    channel, and the training colour itself.

    Parameters
    ----------
    train, test : iterables of (H, W, 3) uint8 or float [0, 1] images (tiles of each set)

    Returns
    -------
    (low, high) : floats, ``low <= 1 <= high``

    Raises
    ------
    ValueError
        A set holds no tissue pixel, or an image is not RGB in range.
    """

    def tissue_mean(images: Iterable[NDArray[Any]], name: str) -> NDArray[np.float64]:
        total, count = np.zeros(3), 0
        for img in images:
            check_image(img, channel_axis=-1)
            flat = img.reshape(-1, 3).astype(np.float64) / (255.0 if img.dtype == np.uint8 else 1.0)
            mask = _tissue_mask_hw3(img).reshape(-1)
            total += flat[mask].sum(axis=0)
            count += int(mask.sum())
        if count == 0:
            raise ValueError(f"{name}: no image holds tissue (gray <= 200)")
        return total / count

    ratios = tissue_mean(test, "test") / np.maximum(tissue_mean(train, "train"), 1e-6)
    return min(1.0, float(ratios.min())), max(1.0, float(ratios.max()))
