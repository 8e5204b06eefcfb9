"""Histogram matching per RGB channel over tissue pixels (luma <= 200).

The fitted statistics are each channel's normalised histogram of tissue
pixels.  The colour map is one 256-entry table per channel: a source value
``v`` goes to the target value at the same mid-rank quantile,
``F_src(v) = (cdf(v) - p(v) / 2)``, interpolated linearly between the
target's occupied values and rounded.

Cohort aggregation averages the *normalised* histograms (a mixture in which
every slide weighs the same, whatever its number of sampled pixels); a median
of histograms is not itself a distribution, and pooling raw counts would let
the largest slide dominate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import NDArray

from wsi_norm.errors import FitError
from wsi_norm.stain.base import StainParams, tissue_pixels

__all__ = ["HistMatchStats", "aggregate_histmatch", "fit_histmatch", "match_tables"]


@dataclass(frozen=True)
class HistMatchStats:
    """Normalised per-channel histograms of tissue pixels.

    Parameters
    ----------
    hist : (3, 256) float64, >= 0, each row sums to 1 (R, G, B)
    """

    method: ClassVar[str] = "histmatch"
    hist: NDArray[np.float64] = field()

    def __post_init__(self) -> None:
        h = np.array(self.hist, dtype=np.float64)
        if h.shape != (3, 256):
            raise ValueError(f"hist must have shape (3, 256), got {h.shape}")
        if not np.all(np.isfinite(h)) or np.any(h < 0):
            raise ValueError("hist must be finite and >= 0")
        sums = h.sum(axis=1)
        if np.any(sums <= 0):
            raise ValueError("every channel histogram needs a positive total")
        h = h / sums[:, None]
        h.flags.writeable = False
        object.__setattr__(self, "hist", h)

    def to_dict(self) -> dict[str, Any]:
        """``{"histograms": [[256 floats] x 3]}``."""
        return {"histograms": self.hist.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`."""
        return cls(hist=np.asarray(d["histograms"], dtype=np.float64))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, HistMatchStats)
        return bool(np.array_equal(self.hist, other.hist))

    __hash__ = None  # type: ignore[assignment]


def fit_histmatch(pixels: NDArray[np.uint8], params: StainParams | None = None) -> HistMatchStats:
    """Per-channel histograms of tissue pixels.

    Parameters
    ----------
    pixels : (N, 3) uint8
    params : StainParams, optional
        Only ``min_pixels`` is used.

    Returns
    -------
    HistMatchStats

    Raises
    ------
    FitError
        Fewer than ``min_pixels`` tissue pixels.
    """
    p = params or StainParams()
    tissue = tissue_pixels(pixels)
    if len(tissue) < p.min_pixels:
        raise FitError(
            f"histmatch: only {len(tissue)} tissue pixels (luma <= 200) of {len(pixels)} given; "
            f"need at least {p.min_pixels}"
        )
    hist = np.stack([np.bincount(tissue[:, c], minlength=256) for c in range(3)]).astype(np.float64)
    return HistMatchStats(hist=hist)


def aggregate_histmatch(stats_list: list[HistMatchStats]) -> HistMatchStats:
    """Cohort template: mean of the normalised histograms (every slide weighs the same)."""
    if not stats_list:
        raise FitError("histmatch: cannot aggregate an empty list of stats")
    return HistMatchStats(hist=np.mean(np.stack([s.hist for s in stats_list]), axis=0))


def match_tables(source: HistMatchStats, target: HistMatchStats) -> NDArray[np.uint8]:
    """Per-channel lookup tables mapping source values to target values.

    Parameters
    ----------
    source, target : HistMatchStats

    Returns
    -------
    tables : (3, 256) uint8; ``out[..., c] = tables[c][rgb[..., c]]``
    """
    values = np.arange(256, dtype=np.float64)
    tables = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        src_q = np.cumsum(source.hist[c]) - source.hist[c] / 2.0
        tgt = target.hist[c]
        occupied = tgt > 0
        tgt_q = (np.cumsum(tgt) - tgt / 2.0)[occupied]
        mapped = np.interp(src_q, tgt_q, values[occupied])
        tables[c] = np.clip(np.rint(mapped), 0, 255).astype(np.uint8)
    return tables
