"""Reinhard colour transfer: match per-channel mean and standard deviation in CIE Lab.

Reinhard et al. matched statistics in Ruderman's l-alpha-beta space; wsi-norm
uses CIE Lab (D65), as most histology implementations do.  Statistics are
taken over tissue pixels only (luma <= 200), so the amount of glass in a slide
does not move them.

References
----------
E. Reinhard, M. Ashikhmin, B. Gooch, P. Shirley, "Color transfer between
images", IEEE Computer Graphics and Applications 21(5), 2001,
doi:10.1109/38.946629.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import rgb_to_lab
from wsi_norm.errors import FitError
from wsi_norm.stain.base import StainParams, tissue_pixels

__all__ = ["ReinhardStats", "aggregate_reinhard", "fit_reinhard"]

#: A Lab channel whose standard deviation is below this is constant: FitError.
_MIN_STD = 1e-3


@dataclass(frozen=True)
class ReinhardStats:
    """Per-channel Lab statistics of tissue pixels.

    Parameters
    ----------
    mean : (3,) float64, mean of L, a, b
    std : (3,) float64, standard deviation of L, a, b, > 0
    """

    method: ClassVar[str] = "reinhard"
    mean: NDArray[np.float64] = field()
    std: NDArray[np.float64] = field()

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64)
        std = np.array(self.std, dtype=np.float64)
        if mean.shape != (3,) or std.shape != (3,):
            raise ValueError(f"mean and std must have shape (3,), got {mean.shape} and {std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise ValueError("mean and std must be finite")
        if np.any(std <= 0):
            raise ValueError(f"std must be > 0, got {std.tolist()}")
        mean.flags.writeable = False
        std.flags.writeable = False
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """``{"lab_mean": [L, a, b], "lab_std": [L, a, b]}``."""
        return {"lab_mean": self.mean.tolist(), "lab_std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`."""
        return cls(mean=np.asarray(d["lab_mean"], dtype=np.float64), std=np.asarray(d["lab_std"], dtype=np.float64))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, ReinhardStats)
        return bool(np.array_equal(self.mean, other.mean) and np.array_equal(self.std, other.std))

    __hash__ = None  # type: ignore[assignment]


def fit_reinhard(pixels: NDArray[np.uint8], params: StainParams | None = None) -> ReinhardStats:
    """Lab mean and standard deviation of tissue pixels.

    Parameters
    ----------
    pixels : (N, 3) uint8
    params : StainParams, optional
        Only ``min_pixels`` is used.

    Returns
    -------
    ReinhardStats

    Raises
    ------
    FitError
        Fewer than ``min_pixels`` tissue pixels, or a constant Lab channel.
    """
    p = params or StainParams()
    tissue = tissue_pixels(pixels)
    if len(tissue) < p.min_pixels:
        raise FitError(
            f"reinhard: only {len(tissue)} tissue pixels (luma <= 200) of {len(pixels)} given; "
            f"need at least {p.min_pixels}"
        )
    # 8-bit tissue through rgb_to_lab's lookup of the sRGB decoding (the same Lab as v / 255)
    lab = rgb_to_lab(tissue if tissue.dtype == np.uint8 else tissue.astype(np.float64) / 255.0)
    std = lab.std(axis=0)
    if np.any(std < _MIN_STD):
        raise FitError(f"reinhard: tissue pixels have a constant Lab channel (std {std.tolist()})")
    return ReinhardStats(mean=lab.mean(axis=0), std=std)


def aggregate_reinhard(stats_list: list[ReinhardStats]) -> ReinhardStats:
    """Cohort template: median of the per-slide means and of the per-slide standard deviations."""
    if not stats_list:
        raise FitError("reinhard: cannot aggregate an empty list of stats")
    return ReinhardStats(
        mean=np.median(np.stack([s.mean for s in stats_list]), axis=0),
        std=np.median(np.stack([s.std for s in stats_list]), axis=0),
    )
