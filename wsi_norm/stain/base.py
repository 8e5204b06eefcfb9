"""Shared pieces of the stain methods: the parameter dataclass, the Stats protocol, helpers.

The stain-matrix helpers (ordering, validation, the stats dataclass shared by
Macenko and Vahadane) live here so both methods treat stain vectors alike:
rows are unit-norm optical-density vectors, row 0 is hematoxylin (the vector
with the larger red optical density), row 1 eosin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, Self, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import DEFAULT_IO, _check_rgb_uint8, is_background
from wsi_norm.errors import FitError

__all__ = [
    "StainMatrixStats",
    "StainParams",
    "Stats",
    "order_stains",
    "stain_angles_deg",
    "tissue_pixels",
]

MacenkoVariant = Literal["robust", "textbook"]


@dataclass(frozen=True)
class StainParams:
    """Knobs of every stain method, in one place (unused fields are ignored by a method).

    Parameters
    ----------
    io : float
        Background intensity of the optical density ``-log((I + 1) / io)``; 240.
    alpha : float
        Macenko: percentile (in percent) of the robust extreme angles; 1.
    beta : float
        Macenko: optical-density threshold of transparent pixels; 0.15.  The
        textbook variant drops a pixel when *any* OD component is below it,
        the robust variant when the OD *norm* is below it.
    max_od : float
        Macenko robust variant and Vahadane: pixels with an OD component above
        this (intensity below ``io * exp(-max_od) - 1``, 19 at the defaults) are
        saturated or artefacts (pen, dust, folds) and are ignored; 2.5.
    l1_penalty : float
        Vahadane: lambda of the L1 penalty on concentrations; 0.1.
    max_conc_percentile : float
        Percentile (in percent) of each stain's concentration used as its
        maximum; 99.
    macenko_variant : {"robust", "textbook"}
        Which Macenko estimator :func:`~wsi_norm.stain.macenko.fit_macenko` uses.
    min_pixels : int
        Fewer usable pixels than this raises :class:`~wsi_norm.errors.FitError`; 1000.
    min_stain_angle_deg : float
        Stain vectors closer than this (degrees) are degenerate: FitError; 5.
    seed : int
        Seed of any random choice (Vahadane's pixel subsample); 0.
    max_fit_pixels : int
        Vahadane: pixels used by the dictionary learning (a seeded subsample); 20000.
    iterations : int
        Vahadane: alternating iterations of the dictionary learning; 60.
    device : str
        Vahadane: torch device of the solver ("cpu", "cuda", ...).
    """

    io: float = DEFAULT_IO
    alpha: float = 1.0
    beta: float = 0.15
    max_od: float = 2.5
    l1_penalty: float = 0.1
    max_conc_percentile: float = 99.0
    macenko_variant: MacenkoVariant = "robust"
    min_pixels: int = 1000
    min_stain_angle_deg: float = 5.0
    seed: int = 0
    max_fit_pixels: int = 20_000
    iterations: int = 60
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 < self.io <= 255.0:
            raise ValueError(f"io must be in (0, 255], got {self.io}")
        if not 0.0 <= self.alpha < 50.0:
            raise ValueError(f"alpha must be in [0, 50) percent, got {self.alpha}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_od <= self.beta:
            raise ValueError(f"max_od must be > beta, got {self.max_od}")
        if self.l1_penalty < 0.0:
            raise ValueError(f"l1_penalty must be >= 0, got {self.l1_penalty}")
        if not 50.0 < self.max_conc_percentile <= 100.0:
            raise ValueError(f"max_conc_percentile must be in (50, 100], got {self.max_conc_percentile}")
        if self.macenko_variant not in ("robust", "textbook"):
            raise ValueError(f"macenko_variant must be 'robust' or 'textbook', got {self.macenko_variant!r}")
        if self.min_pixels < 2 or self.max_fit_pixels < 2 or self.iterations < 1:
            raise ValueError("min_pixels, max_fit_pixels must be >= 2 and iterations >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainParams:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown StainParams fields: {sorted(unknown)}")
        return cls(**d)


@runtime_checkable
class Stats(Protocol):
    """What every method's fitted statistics provide."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...


def tissue_pixels(pixels: NDArray[np.uint8], *, name: str = "pixels") -> NDArray[np.uint8]:
    """Validate ``(N, 3) uint8`` pixels and drop background (luma > 200).

    Parameters
    ----------
    pixels : (N, 3) uint8
    name : str, keyword-only
        Name used in error messages.

    Returns
    -------
    tissue : (M, 3) uint8, M <= N

    Raises
    ------
    TypeError, ValueError
        Wrong dtype or shape.
    """
    arr = _check_rgb_uint8(pixels, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
    return arr[~is_background(arr)]


def order_stains(vectors: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unit-normalise two OD vectors, make them point into OD >= 0, hematoxylin first.

    Parameters
    ----------
    vectors : (2, 3) float
        Two stain directions in optical-density space (any length and sign).

    Returns
    -------
    stain_matrix : (2, 3) float64, unit rows; row 0 has the larger red OD
    """
    v = np.asarray(vectors, dtype=np.float64).copy()
    for k in range(2):
        if v[k].sum() < 0:
            v[k] = -v[k]
        v[k] /= max(float(np.linalg.norm(v[k])), 1e-12)
    if v[0, 0] < v[1, 0]:
        v = v[::-1].copy()
    return v


def stain_angles_deg(m1: NDArray[np.floating[Any]], m2: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """Row-wise angles in degrees between two (K, 3) stain matrices (sign-insensitive);
    :func:`wsi_norm.metrics.stain_matrix_angles_deg`."""
    from wsi_norm.metrics import stain_matrix_angles_deg

    return stain_matrix_angles_deg(m1, m2)


def check_stain_matrix(stain_matrix: NDArray[np.float64], *, min_angle_deg: float, what: str) -> None:
    """Raise FitError when two stain vectors are (nearly) parallel or not finite."""
    if not np.all(np.isfinite(stain_matrix)):
        raise FitError(f"{what}: stain matrix is not finite: {stain_matrix.tolist()}")
    angle = float(stain_angles_deg(stain_matrix[:1], stain_matrix[1:2])[0])
    if angle < min_angle_deg:
        raise FitError(
            f"{what}: the two stain vectors are only {angle:.2f} deg apart (< {min_angle_deg} deg); "
            "the image looks single-stained or the stain matrix is singular"
        )


@dataclass(frozen=True)
class StainMatrixStats:
    """Fitted two-stain statistics (Macenko, Vahadane).

    Parameters
    ----------
    stain_matrix : (2, 3) float64
        Unit-norm optical-density rows, row 0 hematoxylin, row 1 eosin.
    max_conc : (2,) float64
        Robust maximum concentration of each stain (the ``max_conc_percentile``
        percentile over tissue pixels), > 0.
    """

    method: ClassVar[str] = "stain_matrix"
    stain_matrix: NDArray[np.float64] = field()
    max_conc: NDArray[np.float64] = field()

    def __post_init__(self) -> None:
        m = np.array(self.stain_matrix, dtype=np.float64)
        c = np.array(self.max_conc, dtype=np.float64)
        if m.shape != (2, 3):
            raise ValueError(f"stain_matrix must have shape (2, 3), got {m.shape}")
        if c.shape != (2,):
            raise ValueError(f"max_conc must have shape (2,), got {c.shape}")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(c))):
            raise ValueError("stain_matrix and max_conc must be finite")
        if not np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-6):
            raise ValueError(f"stain_matrix rows must have unit norm, got norms {np.linalg.norm(m, axis=1)}")
        if np.any(c <= 0):
            raise ValueError(f"max_conc must be > 0, got {c.tolist()}")
        m.flags.writeable = False
        c.flags.writeable = False
        object.__setattr__(self, "stain_matrix", m)
        object.__setattr__(self, "max_conc", c)

    def to_dict(self) -> dict[str, Any]:
        """``{"stain_matrix": [[...], [...]], "max_concentrations": [h, e]}``."""
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_conc.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; missing keys raise ``KeyError``, bad shapes ``ValueError``."""
        return cls(
            stain_matrix=np.asarray(d["stain_matrix"], dtype=np.float64),
            max_conc=np.asarray(d["max_concentrations"], dtype=np.float64),
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, StainMatrixStats)
        return bool(
            np.array_equal(self.stain_matrix, other.stain_matrix)
            and np.array_equal(self.max_conc, other.max_conc)
        )

    __hash__ = None  # type: ignore[assignment]


def max_concentrations(
    od: NDArray[np.float64], stain_matrix: NDArray[np.float64], *, percentile: float, what: str
) -> NDArray[np.float64]:
    """Least-squares concentrations of ``od`` and their per-stain percentile.

    Parameters
    ----------
    od : (N, 3) float64, optical density of tissue pixels
    stain_matrix : (2, 3) float64
    percentile : float, percent

    Returns
    -------
    max_conc : (2,) float64, > 0

    Raises
    ------
    FitError
        A stain has no positive concentration.
    """
    conc = od @ np.linalg.pinv(stain_matrix)
    max_conc = np.percentile(conc, percentile, axis=0)
    if not np.all(max_conc > 1e-6):
        raise FitError(
            f"{what}: the {percentile}th percentile of stain concentrations is {max_conc.tolist()}; "
            "a stain is absent from the pixels"
        )
    return np.asarray(max_conc, dtype=np.float64)


def aggregate_stain_matrix_stats(stats_list: list[StainMatrixStats], *, what: str) -> tuple[
    NDArray[np.float64], NDArray[np.float64]
]:
    """Component-wise median of stain vectors (re-normalised) and median of max concentrations."""
    if not stats_list:
        raise FitError(f"{what}: cannot aggregate an empty list of stats")
    mats = np.stack([s.stain_matrix for s in stats_list])
    concs = np.stack([s.max_conc for s in stats_list])
    matrix = order_stains(np.median(mats, axis=0))
    return matrix, np.median(concs, axis=0)
