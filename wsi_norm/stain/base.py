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

from wsi_norm.color import (
    BACKGROUND_WEIGHTED_MIN,
    DEFAULT_WHITE,
    _check_rgb_uint8,
    luma_x1000,
    rgb_where,
)
from wsi_norm.errors import FitError

__all__ = [
    "RUIFROK_HE",
    "StainMatrixStats",
    "StainParams",
    "Stats",
    "order_stains",
    "stain_angles_deg",
    "tissue_pixels",
]

RUIFROK_HE: NDArray[np.float64] = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]) / np.linalg.norm(
    np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]), axis=1, keepdims=True
)
"""(2, 3) float64: Ruifrok & Johnston's hematoxylin (row 0) and eosin (row 1) OD vectors, unit norm."""
RUIFROK_HE.setflags(write=False)

MacenkoVariant = Literal["strong", "textbook"]
FitOn = Literal["blocks", "pixels"]

#: Variant defaults of ``alpha`` (percent) and ``beta`` (OD) when they are left as None.
_VARIANT_DEFAULTS: dict[str, tuple[float, float]] = {"strong": (2.0, 0.3), "textbook": (1.0, 0.15)}


@dataclass(frozen=True)
class StainParams:
    """Knobs of every stain method, in one place (unused fields are ignored by a method).

    The defaults were chosen on the fidelity benchmark (``bench/fidelity.py``, BENCHMARKS.md):
    the 95th percentile and the worst stain-vector error over 240 seeded cases (stain vectors
    turned up to 15 deg, strength ratios 0.5-2, densities 0.6-1.6, white points 220-255 per
    channel, JPEG q70-95 in 4:2:0 and 4:4:4, five tissue compositions, real texture).

    Parameters
    ----------
    white_point : float or None
        Glass intensity used for the optical density of every slide (one value for R, G and
        B). None (the default) measures each slide's white point from its glass
        (:mod:`wsi_norm.tissue.whitepoint`). ``239`` reproduces Macenko et al.'s and torchstain's
        fixed ``Io = 240``.
    macenko_variant : {"strong", "textbook"}
        ``strong`` (default): per side of the stain plane, the extreme angle of the
        strongest pixels near that side; ``textbook``: Macenko et al. 2009 as published
        (and as torchstain implements it). See :mod:`wsi_norm.stain.macenko`.
    alpha : float or None
        Percentile (percent) of the extreme angles. None: 2 (strong) or 1 (textbook).
    beta : float or None
        Optical-density threshold of transparent pixels. None: 0.3 on the OD norm (strong)
        or 0.15 on every OD component (textbook).
    edge_band : float
        Strong variant: the outer share (percent) of angles on each side that is searched
        for the side's stain; 20.
    edge_strong : float
        Strong variant: within that band, only pixels whose OD norm is at least this
        percentile of the band's are used; 80.
    max_od : float
        Pixels with an OD component above this are saturated or artefacts (pen, dust,
        folds) and are ignored by the strong variant and Vahadane; 2.5.
    l1_penalty : float
        Vahadane: lambda of the L1 penalty on concentrations; 0.01 (the benchmark's best;
        0.1, the paper's value, tilted the dictionary by 5-7 deg at the median).
    debias : bool
        Vahadane: refit each stain vector on the pixels the sparse code assigns to that stain
        alone, removing the L1 penalty's bias; True.
    max_conc_percentile : float
        Percentile (in percent) of each stain's concentration used as its maximum; 99.
    min_pixels : int
        Fewer usable pixels than this raises :class:`~wsi_norm.errors.FitError`; 1000.
    min_stain_angle_deg : float
        Stain vectors closer than this (degrees) are degenerate: FitError; 5.
    seed : int
        Seed of any random choice (Vahadane's pixel subsample); 0.
    max_fit_pixels : int
        Vahadane: pixels used by the dictionary learning (a seeded subsample); 30000.
    iterations : int
        Vahadane: alternating iterations of the dictionary learning; 60.
    device : str
        Vahadane: where the solver runs: "cpu" (numpy) or a torch device ("cuda", ...).
    codec_correction : bool
        Macenko and Vahadane on a slide whose JPEG tiles are read directly (Aperio SVS, generic
        tiled TIFF): remove the bias the slide's own coding puts into the stain vectors by
        simulating that coding (:mod:`wsi_norm.stain.codec`); False. Opt-in: it brings the stain
        vectors much closer to the truth, but the written colour no closer (ΔE2000 against the
        truth unchanged at the median) and a JPEG-coded target site's own slides up to 0.8 Lab
        units further (BENCHMARKS.md, "Codec-aware fit").
    fit_on : {"blocks", "pixels"}
        Macenko and Vahadane: what the stain vectors are read from. ``blocks`` (default): the
        sample's 2 x 2 block means, which average out JPEG's chroma noise (JPEG slides: the
        95th percentile of the worse stain's error 12.7 -> 9.3 deg). ``pixels``: the single
        sampled pixels, for slides coded losslessly from the scanner on (deflate, LZW, PNG with
        no JPEG in their past): on the benchmark's 36 lossless cases hematoxylin's error falls
        from 1.12 / 5.96 deg (median / 95th percentile) to 0.28 / 2.84 and PSNR over tissue
        rises by 1.45 dB (median of cases); on JPEG 4:4:4 slides it costs 0.7 dB and on 4:2:0 more,
        and a lossless file cut from a JPEG slide keeps the JPEG's noise, so it is opt-in
        (BENCHMARKS.md, "Pixels or blocks"). The maximum concentrations are read from the
        same data.
    """

    white_point: float | None = None
    macenko_variant: MacenkoVariant = "strong"
    alpha: float | None = None
    beta: float | None = None
    edge_band: float = 20.0
    edge_strong: float = 80.0
    max_od: float = 2.5
    l1_penalty: float = 0.01
    debias: bool = True
    max_conc_percentile: float = 99.0
    min_pixels: int = 1000
    min_stain_angle_deg: float = 5.0
    seed: int = 0
    max_fit_pixels: int = 30_000
    iterations: int = 60
    device: str = "cpu"
    codec_correction: bool = False
    fit_on: FitOn = "blocks"

    def __post_init__(self) -> None:
        if self.white_point is not None and not 0.0 < self.white_point <= 255.0:
            raise ValueError(f"white_point must be in (0, 255] or None, got {self.white_point}")
        variant: str = self.macenko_variant  # any string at run time (manifests, old templates)
        if variant not in _VARIANT_DEFAULTS:
            raise ValueError(
                f"macenko_variant must be one of {sorted(_VARIANT_DEFAULTS)}, got {variant!r}"
                + (" (the 'robust' variant of wsi-norm 0.1 was removed: it put eosin 22-33 deg off on "
                   "hematoxylin-heavy slides)" if variant == "robust" else "")
            )
        if not 0.0 <= self.alpha_ < 50.0:
            raise ValueError(f"alpha must be in [0, 50) percent, got {self.alpha}")
        if self.beta_ < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 < self.edge_band <= 50.0 or not 0.0 <= self.edge_strong < 100.0:
            raise ValueError(f"edge_band must be in (0, 50] and edge_strong in [0, 100), got "
                             f"{self.edge_band} and {self.edge_strong}")
        if self.max_od <= self.beta_:
            raise ValueError(f"max_od must be > beta, got {self.max_od}")
        if self.l1_penalty < 0.0:
            raise ValueError(f"l1_penalty must be >= 0, got {self.l1_penalty}")
        if not 50.0 < self.max_conc_percentile <= 100.0:
            raise ValueError(f"max_conc_percentile must be in (50, 100], got {self.max_conc_percentile}")
        fit_on: str = self.fit_on  # any string at run time (manifests, --param)
        if fit_on not in ("blocks", "pixels"):
            raise ValueError(f"fit_on must be 'blocks' or 'pixels', got {fit_on!r}")
        if fit_on == "pixels" and self.codec_correction:
            raise ValueError("codec_correction models a JPEG slide's 2 x 2 block fit; fit_on='pixels' is for "
                             "lossless slides: use one or the other")
        if self.min_pixels < 2 or self.max_fit_pixels < 2 or self.iterations < 1:
            raise ValueError("min_pixels, max_fit_pixels must be >= 2 and iterations >= 1")

    @property
    def alpha_(self) -> float:
        """``alpha`` with the variant default filled in."""
        return _VARIANT_DEFAULTS[self.macenko_variant][0] if self.alpha is None else float(self.alpha)

    @property
    def beta_(self) -> float:
        """``beta`` with the variant default filled in."""
        return _VARIANT_DEFAULTS[self.macenko_variant][1] if self.beta is None else float(self.beta)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainParams:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them and the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            hint = " ('io' became 'white_point': io=240 is white_point=239)" if "io" in unknown else ""
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}; known: {sorted(names)}{hint}")
        return cls(**d)


@runtime_checkable
class Stats(Protocol):
    """What every method's fitted statistics provide."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...


def tissue_pixels(pixels: NDArray[Any], *, name: str = "pixels") -> NDArray[Any]:
    """Validate ``(N, 3)`` pixels and drop background (gray > 200).

    Parameters
    ----------
    pixels : (N, 3) uint8, or float in [0, 255] (e.g. 2 x 2 block means)
    name : str, keyword-only
        Name used in error messages.

    Returns
    -------
    tissue : (M, 3), same dtype, M <= N

    Raises
    ------
    TypeError, ValueError
        Wrong dtype or shape, or float values outside [0, 255].
    """
    arr = np.asarray(pixels)
    if arr.dtype.kind == "f":
        if arr.ndim != 2 or arr.shape[-1] != 3:
            raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
        if arr.size and not (np.all(np.isfinite(arr)) and arr.min() >= 0.0 and arr.max() <= 255.0):
            raise ValueError(f"{name}: float intensities must be finite and in [0, 255]")
        weighted = arr[:, 0] * 299.0 + arr[:, 1] * 587.0 + arr[:, 2] * 114.0
        return arr[weighted < BACKGROUND_WEIGHTED_MIN]
    arr = _check_rgb_uint8(arr, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
    return rgb_where(arr, luma_x1000(arr) < BACKGROUND_WEIGHTED_MIN)


def white_of(white: Any, params: StainParams) -> NDArray[np.float64]:
    """The white point a fit uses: ``params.white_point`` when set, else ``white``, else 240.

    Parameters
    ----------
    white : None, float or (3,) array_like (a slide's measured white point)
    params : StainParams

    Returns
    -------
    (3,) float64
    """
    if params.white_point is not None:
        return np.full(3, float(params.white_point))
    if white is None:
        return np.full(3, DEFAULT_WHITE)
    w = np.broadcast_to(np.asarray(white, dtype=np.float64), (3,)).copy()
    if not np.all((w > 0) & (w <= 255)):
        raise ValueError(f"white point must be in (0, 255] per channel, got {w.tolist()}")
    return w


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


#: Stain vectors closer than this (or opposite) make a singular matrix: refused outright (fits
#: refuse anything under ``StainParams.min_stain_angle_deg``, 5 deg, with their own message).
_MIN_APART_DEG = 1.0


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
        apart = float(np.degrees(np.arccos(np.clip(abs(float(m[0] @ m[1])), 0.0, 1.0))))
        if apart < _MIN_APART_DEG:  # one direction twice: no two concentrations can be told apart
            raise ValueError(f"stain_matrix rows are only {apart:.2f} deg apart (parallel): two stains "
                             "need two directions")
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
