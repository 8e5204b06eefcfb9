"""A learnable Lab normalization layer whose learned target exports as a Reinhard template.

:class:`LabNorm` is a ``torch.nn.Module`` placed in front of a network (LabPreNorm, Ke et al.
2025): each tile is converted to CIE Lab, its per-channel statistics ``mu_s, sigma_s`` are
matched to a target ``mu_t, sigma_t``,

    y = (x - mu_s) / sigma_s * sigma_t + mu_t,

and the result goes back to RGB.  Only the target is learned, by the task loss:
``mu_t = mu_0 + delta_mu`` and ``sigma_t = sigma_0 * exp(delta_log_sigma)``; both deltas start
at 0, so the layer starts exactly at ``mu_0, sigma_0`` (a template's statistics, or the mean
per-image Lab mean and standard deviation of a training set, :meth:`LabNorm.from_loader`).

How it differs from the paper, and why
--------------------------------------
* ``sigma_t > 0`` by construction (the paper adds an unconstrained ``delta_sigma``).
* ``stats="tissue"`` (default): a tile's statistics come from its tissue pixels only (gray <= 200,
  :func:`wsi_norm.color.is_background`), as the pipeline's Reinhard fit does; ``"all"`` is the
  paper's (every pixel).  ``"given"``: the caller passes each tile's **slide-wide** source
  statistics (a :class:`~wsi_norm.pipeline.SlideFit`'s, see :func:`fit_tensors`); the layer then
  computes exactly the pipeline's compiled Reinhard map (:class:`~wsi_norm.colormap.ReinhardMap`
  with its :class:`~wsi_norm.colormap.GlassBlend`), so what a network is trained on is what
  ``wsi-norm normalize --method reinhard --target learned.json`` writes (:meth:`LabNorm.to_template`).
* Every pixel is mapped by one continuous function: the gray > 200 rule picks the pixels the
  statistics are taken from, never which pixels are mapped.  Glass is handed over smoothly to the
  target's white point by the pipeline's :class:`~wsi_norm.colormap.GlassBlend` (``glass="target"``,
  default), kept (``"keep"``), or mapped like tissue (``None``, the paper).
* Tiles with little to measure are not blown up.  In the per-tile modes the source statistics are
  shrunk toward the target's (which makes the map the identity) by a weight per tile and channel

      w = min(1, tissue_fraction / min_tissue_fraction) * min(1, sigma_s / min_std)

  (the tissue factor in ``"tissue"`` mode only): ``mu_s' = mu_t + w (mu_s - mu_t)``,
  ``sigma_s' = sigma_t + w (sigma_s - sigma_t)``.  A tile with enough tissue whose channels vary
  by ``min_std`` (2 Lab units) or more (real tissue: 3-20) gets the paper's map; a glass-only or
  blank tile (glass varies by 0.2-0.8 units on CMU-1-Small-Region) is left nearly unchanged
  instead of having its noise multiplied by ``sigma_t / sigma_s``; the weight is continuous, so
  there is no switch.  ``min_std=0`` with ``min_tissue_fraction=0`` and ``stats="all"``,
  ``glass=None`` is the published layer (with its ``+ 1e-7`` in the denominator).

Precision: the Lab math runs in float32 (float64 for float64 input) even under
:func:`torch.autocast`; the output has the input's dtype.

References
----------
Ke et al., Medical Image Analysis, 2025: LStainNorm's learnable Lab pre-normalization layer
(LabPreNorm); its attention fusion of colour spaces (SA3) is not per-pixel and is not built here.
E. Reinhard et al., "Color transfer between images", IEEE CG&A 21(5), 2001, doi:10.1109/38.946629.

Examples
--------
>>> import torch
>>> from wsi_norm.labnorm import LabNorm
>>> layer = LabNorm([65.0, 25.0, -15.0], [15.0, 10.0, 8.0])
>>> y = layer(torch.rand(2, 3, 64, 64))
>>> y.shape, y.dtype
(torch.Size([2, 3, 64, 64]), torch.float32)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from wsi_norm.color import (
    BACKGROUND_WEIGHTED_MIN,
    DEFAULT_WHITE,
    _channels_from_lab,
    _lab_from_channels,
    _white_channels,
)
from wsi_norm.colormap.maps import GlassBlend, GlassMode
from wsi_norm.errors import TemplateError
from wsi_norm.pipeline import SlideFit
from wsi_norm.stain.base import StainParams
from wsi_norm.stain.qc import ColourReference
from wsi_norm.stain.reinhard import ReinhardStats
from wsi_norm.stain.template import Template, load_template, save_template
from wsi_norm.tissue.whitepoint import WhitePoint

__all__ = ["EPS", "LabNorm", "StatsMode", "fit_tensors"]

StatsMode = Literal["tissue", "all", "given"]
#: The paper's guard in the denominator, ``sigma_s + EPS`` (per-tile modes only).
EPS = 1e-7
_MODES = ("tissue", "all", "given")


def _vector3(value: ArrayLike, name: str, *, positive: bool) -> NDArray[np.float64]:
    v = np.asarray(value, dtype=np.float64)
    if v.shape != (3,):
        raise ValueError(f"{name} must have 3 values (L, a, b), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    if positive and np.any(v <= 0):
        raise ValueError(f"{name} must be > 0, got {v.tolist()}")
    return v


def _check_input(x: Any) -> torch.Tensor:
    """Validate a batch and return it as float in [0, 1] (float32 for uint8 input)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"LabNorm input must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"LabNorm input must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"LabNorm input must be float in [0, 1] or uint8, got {x.dtype}")
    if x.numel():
        values = x.detach()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = values[~finite][0].item()
            raise ValueError(f"LabNorm input must be finite, got {bad}")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"LabNorm input must lie in [0, 1] (float) or be uint8, got values in [{lo}, {hi}]")
    return x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tissue_mask(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: gray <= 200 (:func:`wsi_norm.color.is_background`'s rule, on the nearest
    8-bit value of each float)."""
    q = torch.round(x.detach() * 255.0).to(torch.int32)
    weighted = q[:, 0] * 299 + q[:, 1] * 587 + q[:, 2] * 114
    return weighted < BACKGROUND_WEIGHTED_MIN


def _per_sample(value: Any, n: int, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``value`` ((3,) or (N, 3)) as an (N, 3) tensor."""
    t = value if isinstance(value, torch.Tensor) else torch.tensor(np.asarray(value, dtype=np.float64))
    t = t.to(device=device, dtype=dtype)
    if t.shape == (3,):
        t = t.expand(n, 3)
    if t.shape != (n, 3):
        raise ValueError(f"{name} must have shape (3,) or ({n}, 3), got {tuple(t.shape)}")
    return t


def fit_tensors(
    fit: SlideFit | ReinhardStats, *, white: ArrayLike | None = None, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """A slide fit's statistics as the keyword arguments of ``LabNorm(...)(x, **kwargs)`` (``"given"``).

    Parameters
    ----------
    fit : SlideFit (method ``"reinhard"``) or ReinhardStats
        The source slide's slide-wide Reinhard statistics (:func:`wsi_norm.pipeline.fit_slide`).
    white : (3,) array_like, keyword-only, optional
        The source white point; default the fit's (a ``SlideFit``) or the layer's default.
    device : torch device, keyword-only

    Returns
    -------
    dict
        ``source_mean``, ``source_std`` (and ``source_white``): (3,) float64 tensors, which the
        layer broadcasts over the batch; stack several slides' into (N, 3) for mixed batches.
    """
    if isinstance(fit, SlideFit):
        if fit.method != "reinhard":
            raise ValueError(f"LabNorm needs a reinhard fit, got a {fit.method!r} fit")
        stats = fit.stats
        white = fit.white.array if white is None else white
    else:
        stats = fit
    if not isinstance(stats, ReinhardStats):
        raise TypeError(f"expected ReinhardStats, got {type(stats).__name__}")
    out = {
        "source_mean": torch.as_tensor(stats.mean.copy(), dtype=torch.float64, device=device),
        "source_std": torch.as_tensor(stats.std.copy(), dtype=torch.float64, device=device),
    }
    if white is not None:
        out["source_white"] = torch.tensor(_white_channels(white), dtype=torch.float64, device=device)
    return out


class LabNorm(nn.Module):
    """Learnable per-tile Lab normalization (LabPreNorm) tied to the pipeline's Reinhard map.

    Parameters
    ----------
    mean, std : (3,) array_like, Lab (D65)
        Initial target ``mu_0, sigma_0`` (finite; ``std > 0``).
    stats : {"tissue", "all", "given"}, keyword-only
        Where the source statistics come from: the tile's tissue pixels (default), all its
        pixels (the paper), or the forward call's ``source_mean`` / ``source_std`` (slide-wide;
        the pipeline's map).
    white : float or (3,) array_like, keyword-only
        The target's white point (glass intensity per channel, (0, 255]); default 240.
    source_white : float or (3,) array_like, keyword-only
        Source white point used when the forward call gives none; default 240.
    glass : {"target", "keep"} or None, keyword-only
        Glass hand-over near the source white point (the pipeline's ``--glass``; default
        ``"target"``), or None for no hand-over (the paper).
    min_std : float, keyword-only
        Lab units; per-tile channels that vary less are shrunk toward the identity (see the
        module docstring); default 2.  0 disables.
    min_tissue_fraction : float, keyword-only
        ``"tissue"`` mode: tiles with a smaller tissue share are shrunk toward the identity;
        default 0.05.  0 disables.
    reference : ColourReference, keyword-only, optional
        The target's colour reference; :meth:`to_template` exports it with the learned Lab mean.

    Attributes
    ----------
    delta_mean : (3,) Parameter, Lab units, starts at 0
    delta_log_std : (3,) Parameter, starts at 0; ``sigma_t = sigma_0 * exp(delta_log_std)``

    Notes
    -----
    ``state_dict()`` holds ``mean0``, ``std0`` (buffers) and the two deltas; the options above
    are constructor arguments, and :meth:`to_template` is the export the pipeline reads.  The
    forward pass is pure (no state changes), so one layer may serve several threads for
    inference; training follows torch's usual rules.
    """

    mean0: torch.Tensor
    std0: torch.Tensor

    def __init__(
        self,
        mean: ArrayLike,
        std: ArrayLike,
        *,
        stats: StatsMode = "tissue",
        white: ArrayLike = DEFAULT_WHITE,
        source_white: ArrayLike = DEFAULT_WHITE,
        glass: GlassMode | None = "target",
        min_std: float = 2.0,
        min_tissue_fraction: float = 0.05,
        reference: ColourReference | None = None,
    ) -> None:
        super().__init__()
        if stats not in _MODES:
            raise ValueError(f"stats must be one of {', '.join(_MODES)}, got {stats!r}")
        if glass not in ("target", "keep", None):
            raise ValueError(f"glass must be 'target', 'keep' or None, got {glass!r}")
        if not (np.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"min_std must be finite and >= 0, got {min_std}")
        if not (0.0 <= min_tissue_fraction <= 1.0):
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
        m0 = _vector3(mean, "mean", positive=False)
        s0 = _vector3(std, "std", positive=True)
        self.stats: StatsMode = stats
        self.glass: GlassMode | None = glass
        self.white = _white_channels(white)
        self.source_white = _white_channels(source_white)
        self.min_std = float(min_std)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.reference = reference
        self.register_buffer("mean0", torch.tensor(m0, dtype=torch.float32))
        self.register_buffer("std0", torch.tensor(s0, dtype=torch.float32))
        self.delta_mean = nn.Parameter(torch.zeros(3))
        self.delta_log_std = nn.Parameter(torch.zeros(3))
        # what an exported template records besides the statistics (set by from_template)
        self._white_point = WhitePoint(self.white, "fallback" if self.white == (DEFAULT_WHITE,) * 3 else "fixed")
        self._template_meta: dict[str, Any] = {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_template(cls, template: Template | str | Path, **kwargs: Any) -> LabNorm:
        """A layer starting at a Reinhard template's Lab mean and std, rendering into its white point.

        Parameters
        ----------
        template : Template or path to a template JSON (method ``"reinhard"``)
        **kwargs
            Further keyword options of :class:`LabNorm` (not ``white``).

        Raises
        ------
        TemplateError
            Unreadable or invalid file (also: non-finite or non-positive statistics), or a
            template of another method.
        """
        if not isinstance(template, Template):
            template = load_template(template, method="reinhard")
        elif template.method != "reinhard":
            raise TemplateError(f"LabNorm needs a reinhard template, got method {template.method!r}")
        if "white" in kwargs:
            raise TypeError("from_template takes the white point from the template; do not pass white")
        stats = template.stats
        layer = cls(stats.mean, stats.std, white=template.white.array, reference=template.reference, **kwargs)
        layer._white_point = template.white
        layer._template_meta = {"params": dict(template.params), "slides": list(template.slides),
                                "n_pixels": template.n_pixels, "seed": template.seed}
        return layer

    @classmethod
    def from_loader(cls, loader: Iterable[Any], *, max_batches: int | None = None, **kwargs: Any) -> LabNorm:
        """A layer starting at a training set's mean per-image Lab mean and standard deviation.

        Parameters
        ----------
        loader : iterable of batches
            Each batch an (N, 3, H, W) tensor (float in [0, 1] or uint8), or a sequence (e.g.
            ``(images, labels)``) whose first element is one.
        max_batches : int, keyword-only, optional
            Read at most this many batches.
        **kwargs
            Keyword options of :class:`LabNorm`.  Per-image statistics are taken over tissue
            pixels (gray <= 200) unless ``stats="all"``; images with no tissue pixel are skipped.

        Raises
        ------
        ValueError
            No image (with tissue) in the loader.
        """
        tissue_only = kwargs.get("stats", "tissue") != "all"
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = batch if isinstance(batch, torch.Tensor) else batch[0]
            with torch.no_grad():
                x = _check_input(images)
                lab = _lab(x.to(_compute_dtype(x)))
                weight = _tissue_mask(x) if tissue_only else torch.ones_like(lab[0], dtype=torch.bool)
                mu, sd, count = _masked_stats(lab, weight)
            keep = count > 0
            means.append(mu[keep].to(torch.float64).cpu())
            stds.append(sd[keep].to(torch.float64).cpu())
        if not means or sum(len(m) for m in means) == 0:
            raise ValueError("from_loader: the loader gave no image" + (" with tissue pixels" if tissue_only else ""))
        mean = torch.cat(means).mean(0).numpy()
        std = torch.cat(stds).mean(0).numpy()
        return cls(mean, std, **kwargs)

    # -- the learned target --------------------------------------------------------------------
    @property
    def target_mean(self) -> torch.Tensor:
        """(3,) Lab target mean ``mu_0 + delta_mean`` (differentiable)."""
        return self.mean0 + self.delta_mean

    @property
    def target_std(self) -> torch.Tensor:
        """(3,) Lab target standard deviation ``sigma_0 * exp(delta_log_std)``, > 0 (differentiable)."""
        return self.std0 * torch.exp(self.delta_log_std)

    def to_template(self, path: str | Path | None = None) -> Template:
        """The learned target as a Reinhard template (``aggregation: "learned"``), written to ``path``.

        The template holds the learned ``mu_t, sigma_t``, the layer's white point, and (when the
        layer was made from a template) that template's parameters, slides and colour reference
        (its Lab mean replaced by the learned one).  ``wsi-norm normalize --method reinhard
        --target path`` then applies the same map as the layer with ``stats="given"``.

        Raises
        ------
        ValueError
            The learned statistics are not finite (a diverged training run).
        """
        mean = self.target_mean.detach().to(torch.float64).cpu().numpy()
        std = self.target_std.detach().to(torch.float64).cpu().numpy()
        _vector3(mean, "learned mean", positive=False)
        _vector3(std, "learned std", positive=True)
        reference = None
        if self.reference is not None:
            reference = ColourReference(tuple(float(v) for v in mean), self.reference.stain_matrix)  # type: ignore[arg-type]
        meta = self._template_meta
        template = Template(
            method="reinhard",
            stats=ReinhardStats(mean=mean, std=std),
            white=self._white_point,
            reference=reference,
            params=meta.get("params", StainParams()),
            slides=meta.get("slides", []),
            n_pixels=int(meta.get("n_pixels", 0)),
            seed=int(meta.get("seed", 0)),
            aggregation="learned",
        )
        if path is not None:
            save_template(template, path)
        return template

    # -- the map ---------------------------------------------------------------------------------
    @staticmethod
    def to_lab(x: torch.Tensor) -> torch.Tensor:
        """CIE Lab (D65) of a batch, as the layer computes it (float32, or float64 for float64 input).

        Parameters
        ----------
        x : (N, 3, H, W) float in [0, 1] or uint8

        Returns
        -------
        lab : (N, 3, H, W) float32 (float64); L in [0, 100]
        """
        x = _check_input(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.stack(_lab(x.to(_compute_dtype(x))), 1)

    def source_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-tile Lab statistics as the layer measures them (``"tissue"`` or ``"all"``).

        Parameters
        ----------
        x : (N, 3, H, W) float in [0, 1] or uint8

        Returns
        -------
        mean, std : (N, 3) float32, Lab (0 where a tile has no tissue pixel)
        fraction : (N,) float32, share of pixels the statistics were taken over
        """
        x = _check_input(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(_compute_dtype(x))
            lab = _lab(xc)
            return self._tile_stats(xc, lab)

    def _tile_stats(self, x: torch.Tensor, lab: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.stats == "tissue":
            mask = _tissue_mask(x)
        else:
            mask = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
        mu, sd, count = _masked_stats(lab, mask)
        return mu, sd, count / float(max(1, x.shape[2] * x.shape[3]))

    def forward(
        self,
        x: torch.Tensor,
        source_mean: Any = None,
        source_std: Any = None,
        source_white: Any = None,
    ) -> torch.Tensor:
        """Normalize a batch.

        Parameters
        ----------
        x : (N, 3, H, W) float in [0, 1], or uint8 in [0, 255]
        source_mean, source_std : (3,) or (N, 3) array_like or tensor, Lab
            Each tile's slide-wide source statistics; required with ``stats="given"``, ignored
            otherwise (``std > 0``, finite).
        source_white : float, (3,) or (N, 3), optional
            Each tile's source white point (glass intensity, (0, 255]); default the layer's
            ``source_white``.

        Returns
        -------
        y : (N, 3, H, W), the input's dtype (float32 for uint8 input), in [0, 1]

        Raises
        ------
        ValueError
            Wrong shape, non-finite values or values outside [0, 1]; missing or invalid
            ``source_mean`` / ``source_std`` with ``stats="given"``.
        """
        out_dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.float32
        x = _check_input(x)
        n = x.shape[0]
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype).contiguous()  # planar channels: the elementwise math runs on contiguous memory
            lab = _lab(xc)
            mu_t = self.target_mean.to(dtype)
            sd_t = self.target_std.to(dtype)
            if self.stats == "given":
                if source_mean is None or source_std is None:
                    raise ValueError('stats="given" needs source_mean and source_std in the forward call')
                mu_s = _per_sample(source_mean, n, "source_mean", x.device, dtype)
                sd_s = _per_sample(source_std, n, "source_std", x.device, dtype)
                if not bool(torch.isfinite(mu_s).all() & torch.isfinite(sd_s).all()):
                    raise ValueError(f"source_mean and source_std must be finite, got {mu_s.tolist()} and {sd_s.tolist()}")
                if bool((sd_s <= 0).any()):
                    raise ValueError(f"source_std must be > 0, got {sd_s.tolist()}")
                scale = sd_t / sd_s
                offset = mu_t - mu_s * scale  # the ReinhardMap's form: lab * scale + offset
            else:
                mu_s, sd_s, fraction = self._tile_stats(xc, lab)
                w = torch.ones_like(sd_s)
                if self.stats == "tissue" and self.min_tissue_fraction > 0:
                    w = w * torch.clamp(fraction / self.min_tissue_fraction, 0.0, 1.0)[:, None]
                if self.min_std > 0:
                    w = w * torch.clamp(sd_s / self.min_std, 0.0, 1.0)
                mu_eff = mu_t + w * (mu_s - mu_t)
                sd_eff = sd_t + w * (sd_s - sd_t)
                scale = sd_t / (sd_eff + EPS)
                offset = mu_t - mu_eff * scale
            mapped_lab = [lab[c] * scale[:, c, None, None] + offset[:, c, None, None] for c in range(3)]
            rgb = _channels_from_lab(torch, *mapped_lab)
            if self.glass is not None:
                whites = self._source_whites(source_white, n)
                rgb = self._blend_glass(xc, rgb, whites)
            y = torch.stack(rgb, 1).clamp(0.0, 1.0)
        return y.to(out_dtype)

    def _source_whites(self, source_white: Any, n: int) -> list[tuple[float, float, float]]:
        if source_white is None:
            return [self.source_white] * n
        w = torch.as_tensor(source_white).detach().to(torch.float64).cpu()
        if w.ndim == 0:
            w = w.expand(3)
        if w.shape == (3,):
            return [_white_channels(w.numpy())] * n
        if w.shape != (n, 3):
            raise ValueError(f"source_white must be a number, (3,) or ({n}, 3), got {tuple(w.shape)}")
        return [_white_channels(row) for row in w.numpy()]

    def _blend_glass(
        self, x: torch.Tensor, rgb: list[torch.Tensor], whites: list[tuple[float, float, float]]
    ) -> list[torch.Tensor]:
        """The pipeline's GlassBlend, in 0-255 units, per group of tiles sharing a source white."""
        assert self.glass is not None
        groups: dict[tuple[float, float, float], list[int]] = {}
        for i, w in enumerate(whites):
            groups.setdefault(w, []).append(i)
        parts: list[torch.Tensor] = []
        order: list[int] = []
        for w, idx in groups.items():
            blend = GlassBlend.for_whites(self.glass, w, self.white)
            sel = slice(None) if len(groups) == 1 else torch.tensor(idx, device=x.device)
            src = [x[sel, c] * 255.0 for c in range(3)]
            mapped = [c[sel] * 255.0 for c in rgb]
            blended = blend.apply(torch, src[0], src[1], src[2], mapped)
            parts.append(torch.stack(blended, 1) / 255.0)
            order.extend(idx)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(torch.tensor(order, device=x.device))]
        return [out[:, c] for c in range(3)]

    def extra_repr(self) -> str:
        return (f"stats={self.stats!r}, glass={self.glass!r}, white={self.white}, "
                f"min_std={self.min_std}, min_tissue_fraction={self.min_tissue_fraction}")


def _lab(x: torch.Tensor) -> list[torch.Tensor]:
    """Planar Lab of an (N, 3, H, W) float batch in [0, 1]: three (N, H, W) tensors."""
    return _lab_from_channels(torch, x[:, 0], x[:, 1], x[:, 2])


def _masked_stats(lab: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tile mean and population std of each Lab channel over ``mask``: (N, 3), (N, 3), (N,).

    Tiles without a masked pixel get mean 0 and std ~1e-6 (finite, no NaN in any gradient)."""
    m = mask.to(lab[0].dtype)
    count = m.sum(dim=(1, 2))
    denom = count.clamp_min(1.0)
    means, stds = [], []
    for ch in lab:
        mu = (ch * m).sum(dim=(1, 2)) / denom
        var = (((ch - mu[:, None, None]) ** 2) * m).sum(dim=(1, 2)) / denom
        means.append(mu)
        stds.append(torch.sqrt(var + 1e-12))
    return torch.stack(means, 1), torch.stack(stds, 1), count
