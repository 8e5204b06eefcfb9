"""The QC gate: a fit and its compiled colour map are checked before any pixel is written.

A normalization can go wrong while looking complete: an eosin vector estimated 30 deg off turns
stroma navy, a mistaken template paints every slide purple, a white point read from a pen mark
tints the whole output. The gate refuses such a result with a :class:`~wsi_norm.errors.QCError`
that names the slide and the numbers, unless the caller forces it (``--force``, the manifest's
``force: true``); either way the report goes into the output's provenance.

Two checks
----------
:func:`check_fit`, on the source slide (and on a template's reference):

* each stain vector lies inside a cone of plausible H&E optical-density directions:
  within :attr:`QCBounds.max_cone_deg` of Ruifrok & Johnston's hematoxylin / eosin;
* hematoxylin and eosin are at least :attr:`QCBounds.min_separation_deg` apart;
* no stain absorbs negatively: every optical-density component of a unit stain vector is at
  least :attr:`QCBounds.min_od_component` (-0.10: eosin's red OD is near 0, and correct fits on
  the benchmark, 5-8 deg off, reached -0.063);
* the maximum concentrations (99th percentile, OD units) lie in :attr:`QCBounds.max_conc_range`;
* the white point is plausible: every channel at least :attr:`QCBounds.min_white`, and the
  channels within :attr:`QCBounds.max_white_spread` of each other.

:func:`check_mapped`, on the source's sampled tissue pixels pushed through the compiled map:

* their CIE Lab mean lies within :attr:`QCBounds.max_lab_distance` of the target's tissue
  (generous: tissue composition alone moves it, by up to 19 units on the benchmark);
* (Macenko, Vahadane) they stay inside the target's stain cone: in the plane of the target's
  stain vectors (optical density against the target's white point), the 2nd and 98th percentile
  angles of the mapped pixels (OD norm >= 0.3) overshoot the target's hematoxylin and eosin
  directions by at most :attr:`QCBounds.max_overshoot_deg`. A correct map can only put pixels *inside* the cone (pure
  stains on its edges, mixtures between), give or take noise; a source stain estimated too close
  to the other stain (the "navy" failure: eosin fitted near hematoxylin) leaves the real
  pure-stain pixels outside the estimated cone, and the map throws them outside the target's.
  Re-estimating the mapped pixels' stain vectors instead was tried and rejected: it depends on
  tissue composition (up to 56 deg on correct maps in the benchmark).

The bounds (the defaults of :class:`QCBounds`) were set from the fidelity benchmark's
distributions (``bench/fidelity.py``; BENCHMARKS.md): over its 240 seeded cases, whose true stain
vectors lie up to 15 deg from Ruifrok's, no correct fit or map trips them, and each holds a margin
over the worst value seen; a planted wrong template or a stain vector 25 deg off trips them.

Everything here is pure: arrays in, a :class:`QCReport` out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_norm.color import rgb_to_lab, rgb_to_od64
from wsi_norm.errors import FitError
from wsi_norm.metrics import stain_matrix_angles_deg
from wsi_norm.stain.base import RUIFROK_HE, StainParams, tissue_pixels
from wsi_norm.tissue.whitepoint import WhitePoint

__all__ = [
    "ColourReference",
    "QCBounds",
    "QCReport",
    "check_fit",
    "check_mapped",
    "check_model_output",
    "colour_reference",
    "gate_verdict",
]

MODEL_GATE = "measured, not gated: a model's output is written as the model computes it"
"""The ``gate`` measure of :func:`check_model_output`'s report."""

_QC_PIXELS = 200_000


@dataclass(frozen=True)
class QCBounds:
    """Bounds of the QC gate (see the module docstring for how they were chosen).

    Attributes
    ----------
    max_cone_deg : float
        Largest angle of a stain vector from Ruifrok's vector of that stain, degrees.
    min_separation_deg : float
        Smallest angle between the hematoxylin and eosin vectors, degrees.
    min_od_component : float
        Smallest optical-density component of a unit stain vector (absorbance is not negative).
    max_conc_range : (float, float)
        Plausible 99th-percentile concentration of each stain, OD units.
    min_white : float
        Smallest plausible white-point channel, grey levels.
    max_white_spread : float
        Largest difference between white-point channels, grey levels.
    max_lab_distance : float
        Largest distance (CIE76 Delta E) of the mapped tissue's Lab mean from the target's.
    max_overshoot_deg : float
        Largest angle by which the mapped tissue reaches past a target stain direction; 12.5
        (correct fits reach 11.1 deg on the benchmark: a pale case at q95 whose codec-corrected
        Vahadane fit is within 3 and 8 deg; the grossly wrong fit it refuses, eosin 20 deg off,
        reaches 15.1).
    """

    max_cone_deg: float = 30.0
    min_separation_deg: float = 8.0
    min_od_component: float = -0.10
    max_conc_range: tuple[float, float] = (0.2, 10.0)
    min_white: float = 150.0
    max_white_spread: float = 60.0
    max_lab_distance: float = 25.0
    max_overshoot_deg: float = 12.5


@dataclass(frozen=True)
class ColourReference:
    """Colour statistics of tissue that the gate compares with: Lab mean and stain vectors.

    Parameters
    ----------
    lab_mean : (3,) float, CIE Lab (D65) mean of the tissue pixels
    stain_matrix : (2, 3) float, the default Macenko estimate of the tissue (H, E rows)
    """

    lab_mean: tuple[float, float, float]
    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]

    def __post_init__(self) -> None:
        lab = np.asarray(self.lab_mean, dtype=np.float64)
        m = np.asarray(self.stain_matrix, dtype=np.float64)
        if lab.shape != (3,) or m.shape != (2, 3) or not (np.all(np.isfinite(lab)) and np.all(np.isfinite(m))):
            raise ValueError(f"a colour reference needs a finite (3,) lab_mean and (2, 3) stain_matrix, "
                             f"got {lab.shape} and {m.shape}")
        object.__setattr__(self, "lab_mean", tuple(float(v) for v in lab))
        object.__setattr__(self, "stain_matrix", tuple(tuple(float(v) for v in row) for row in m))

    @property
    def matrix(self) -> NDArray[np.float64]:
        """``(2, 3) float64`` stain matrix."""
        return np.array(self.stain_matrix, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """``{"lab_mean": [...], "stain_matrix": [[...], [...]]}``."""
        return {"lab_mean": [round(v, 4) for v in self.lab_mean],
                "stain_matrix": [[round(v, 6) for v in row] for row in self.stain_matrix]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColourReference:
        """Inverse of :meth:`to_dict`; missing keys raise ``KeyError``."""
        return cls(tuple(d["lab_mean"]), tuple(tuple(r) for r in d["stain_matrix"]))  # type: ignore[arg-type]

    @classmethod
    def median(cls, refs: list[ColourReference]) -> ColourReference:
        """Cohort reference: component-wise medians (stain rows re-normalised)."""
        from wsi_norm.stain.base import order_stains

        if not refs:
            raise ValueError("cannot take the median of no references")
        lab = np.median(np.array([r.lab_mean for r in refs]), axis=0)
        m = order_stains(np.median(np.stack([r.matrix for r in refs]), axis=0))
        return cls(tuple(lab), tuple(map(tuple, m)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class QCReport:
    """What the gate measured and what it found.

    Attributes
    ----------
    problems : list of str
        One line per failed check, with the number and its bound; empty when passed.
    measures : dict
        Every number checked (JSON-ready).
    forced : bool
        The caller wrote the result although ``problems`` is not empty.
    """

    problems: list[str] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)
    forced: bool = False

    @property
    def passed(self) -> bool:
        """No check failed."""
        return not self.problems

    def merged(self, other: QCReport) -> QCReport:
        """Both reports' problems and measures."""
        return QCReport([*self.problems, *other.problems], {**self.measures, **other.measures},
                        self.forced or other.forced)

    def to_dict(self) -> dict[str, Any]:
        """``{"passed": ..., "forced": ..., "problems": [...], "measures": {...}}``."""
        return {"passed": self.passed, "forced": self.forced, "problems": list(self.problems),
                "measures": dict(self.measures)}


def _r(values: ArrayLike, nd: int = 2) -> list[Any]:
    return np.round(np.asarray(values, dtype=np.float64), nd).tolist()  # type: ignore[no-any-return]


def check_fit(
    stain_matrix: ArrayLike | None,
    *,
    white: WhitePoint,
    max_conc: ArrayLike | None = None,
    bounds: QCBounds | None = None,
) -> QCReport:
    """Check that a fit is plausible H&E and that its white point is plausible.

    Parameters
    ----------
    stain_matrix : (2, 3) float or None
        Hematoxylin and eosin OD vectors (for Reinhard and histogram matching: the colour
        reference's Macenko estimate); None checks the white point only.
    white : WhitePoint
    max_conc : (2,) float, optional
        Maximum concentrations (Macenko / Vahadane fits).
    bounds : QCBounds, optional

    Returns
    -------
    QCReport
    """
    b = bounds or QCBounds()
    w = white.array
    measures: dict[str, Any] = {"white_point": _r(w, 1), "white_point_source": white.source}
    problems = []
    if stain_matrix is not None:
        m = np.asarray(stain_matrix, dtype=np.float64)
        cone = stain_matrix_angles_deg(m, RUIFROK_HE)
        separation = float(stain_matrix_angles_deg(m[:1], m[1:])[0])
        measures["stain_matrix"] = _r(m, 4)
        measures["stain_angles_to_ruifrok_deg"] = _r(cone)
        measures["stain_separation_deg"] = round(separation, 2)
        for name, angle in zip(("hematoxylin", "eosin"), cone, strict=True):
            if angle > b.max_cone_deg:
                problems.append(f"{name} vector {angle:.1f} deg from Ruifrok's {name} "
                                f"(bound {b.max_cone_deg} deg): not a plausible H&E stain")
        if separation < b.min_separation_deg:
            problems.append(f"hematoxylin and eosin only {separation:.1f} deg apart "
                            f"(bound {b.min_separation_deg} deg)")
        for name, row in zip(("hematoxylin", "eosin"), m, strict=True):
            if row.min() < b.min_od_component:
                problems.append(f"{name} vector {_r(row, 3)} has a negative optical density "
                                f"({row.min():.3f} < {b.min_od_component}): no stain absorbs negatively")
    if max_conc is not None:
        c = np.asarray(max_conc, dtype=np.float64)
        measures["max_concentrations"] = _r(c, 3)
        lo, hi = b.max_conc_range
        for name, value in zip(("hematoxylin", "eosin"), c, strict=True):
            if not lo <= value <= hi:
                problems.append(f"{name} max concentration {value:.3f} outside [{lo}, {hi}]")
    if w.min() < b.min_white:
        problems.append(f"white point {_r(w, 1)} has a channel below {b.min_white}")
    if w.max() - w.min() > b.max_white_spread:
        problems.append(f"white point {_r(w, 1)}: channels {w.max() - w.min():.1f} apart (bound {b.max_white_spread})")
    return QCReport(problems, measures)


def colour_reference(
    pixels: NDArray[np.uint8],
    *,
    white: WhitePoint | ArrayLike,
    blocks: NDArray[Any] | None = None,
    stain_matrix: ArrayLike | None = None,
    lab_mean: tuple[float, float, float] | None = None,
) -> ColourReference:
    """Lab mean and default-Macenko stain vectors of tissue.

    Parameters
    ----------
    pixels : (N, 3) uint8, tissue pixels (a seeded subsample of 200,000 is used)
    white : WhitePoint or (3,) float, the white point of the pixels' slide
    blocks : (M, 3) float, optional
        2 x 2 block means for the stain estimate (default: the pixels).
    stain_matrix : (2, 3) float, optional
        The default Macenko estimate when the caller already has it (not estimated again).
    lab_mean : (3,) float, optional
        :func:`tissue_lab_mean` of ``pixels`` when the caller already has it.

    Returns
    -------
    ColourReference

    Raises
    ------
    FitError
        Too little tissue for a stain estimate.
    """
    from wsi_norm.stain.macenko import fit_macenko

    w = white.array if isinstance(white, WhitePoint) else np.asarray(white, dtype=np.float64)
    if stain_matrix is None:
        tissue = _qc_tissue(pixels)
        matrix = fit_macenko(tissue if blocks is None else blocks, StainParams(), white=w).stain_matrix
    else:
        matrix = np.asarray(stain_matrix, dtype=np.float64)
    lab = tissue_lab_mean(pixels) if lab_mean is None else lab_mean
    return ColourReference(lab, tuple(map(tuple, matrix)))  # type: ignore[arg-type]


def _qc_tissue(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The tissue pixels, a seeded subsample of ``_QC_PIXELS`` when there are more."""
    tissue = tissue_pixels(pixels)
    if len(tissue) > _QC_PIXELS:
        tissue = tissue[np.random.default_rng(0).choice(len(tissue), _QC_PIXELS, replace=False)]
    if len(tissue) == 0:
        raise FitError("colour reference: no tissue pixels")
    return tissue


def tissue_lab_mean(pixels: NDArray[np.uint8]) -> tuple[float, float, float]:
    """The CIE Lab mean of tissue pixels (a seeded subsample of 200,000), the colour reference's
    ``lab_mean``; needs nothing fitted, so the pipeline computes it beside the stain fit.

    Raises
    ------
    FitError
        No tissue pixels.
    """
    lab = np.asarray(rgb_to_lab(_qc_tissue(pixels)), dtype=np.float64).mean(axis=0)
    return (float(lab[0]), float(lab[1]), float(lab[2]))


def cone_overshoot_deg(
    mapped: NDArray[np.uint8], *, stain_matrix: ArrayLike, white: WhitePoint | ArrayLike, percentile: float = 2.0
) -> tuple[float, float]:
    """How far mapped tissue reaches past the target's hematoxylin and eosin directions.

    Parameters
    ----------
    mapped : (N, 3) uint8, tissue pixels after the colour map
    stain_matrix : (2, 3) float, the target's stain vectors (H, E)
    white : the target's white point
    percentile : float
        The robust extreme: this percentile of the angles on each side (percent).

    Returns
    -------
    (h_deg, e_deg) : float
        Degrees beyond each stain direction, in the stains' plane (0 when inside).
    """
    m = np.asarray(stain_matrix, dtype=np.float64)
    w = white.array if isinstance(white, WhitePoint) else np.asarray(white, dtype=np.float64)
    od = np.asarray(rgb_to_od64(tissue_pixels(mapped), white=w), dtype=np.float64)
    od = od[(np.linalg.norm(od, axis=1) >= 0.3) & np.all(od <= 2.5, axis=1)]
    if len(od) < 100:
        return 0.0, 0.0
    q, _ = np.linalg.qr(m.T)  # orthonormal basis of the stains' plane
    h_xy, e_xy = m @ q
    phi = np.angle((od @ q) @ np.array([1.0, 1.0j]) * np.exp(-1j * np.angle(complex(*h_xy))))
    phi_e = float(np.angle(complex(*e_xy) * np.exp(-1j * np.angle(complex(*h_xy)))))
    sign = 1.0 if phi_e > 0 else -1.0  # orient so that eosin lies at a positive angle from hematoxylin
    phi, phi_e = phi * sign, phi_e * sign
    lo, hi = np.percentile(phi, [percentile, 100.0 - percentile])
    return float(np.degrees(max(0.0, -lo))), float(np.degrees(max(0.0, hi - phi_e)))


def check_mapped(
    mapped: NDArray[np.uint8],
    target: ColourReference,
    *,
    target_white: WhitePoint,
    target_stains: ArrayLike | None = None,
    gate_overshoot: bool = True,
    bounds: QCBounds | None = None,
) -> QCReport:
    """Check that the mapped source tissue lands near the target's colours and inside its stain cone.

    Parameters
    ----------
    mapped : (N, 3) uint8
        The source's sampled tissue pixels after the colour map.
    target : ColourReference
        The template's colour reference (its Lab mean).
    target_white : WhitePoint
        The template's white point.
    target_stains : (2, 3) float, optional
        The target's stain vectors (default: the reference's).
    gate_overshoot : bool
        Fail on overshoot (stain-vector maps); otherwise only measure it (Reinhard and histogram
        matching have no stain model: on the benchmark their correct maps overshot by up to 25 deg).
    bounds : QCBounds, optional

    Returns
    -------
    QCReport
    """
    b = bounds or QCBounds()
    tissue = tissue_pixels(mapped)
    if len(tissue) > _QC_PIXELS:
        tissue = tissue[np.random.default_rng(0).choice(len(tissue), _QC_PIXELS, replace=False)]
    if len(tissue) == 0:
        return QCReport(["normalized tissue: every sampled tissue pixel became glass (gray > 200)"])
    lab = np.asarray(rgb_to_lab(tissue), dtype=np.float64).mean(axis=0)
    distance = float(np.linalg.norm(lab - np.asarray(target.lab_mean)))
    stains = target.matrix if target_stains is None else np.asarray(target_stains, dtype=np.float64)
    over = cone_overshoot_deg(tissue, stain_matrix=stains, white=target_white)
    measures = {
        "mapped_lab_mean": _r(lab),
        "target_lab_mean": _r(target.lab_mean),
        "mapped_lab_distance": round(distance, 2),
        "mapped_overshoot_deg": _r(over),
    }
    problems = []
    if distance > b.max_lab_distance:
        problems.append(f"normalized tissue Lab mean {_r(lab, 1)} is {distance:.1f} from the "
                        f"target's {_r(target.lab_mean, 1)} (bound {b.max_lab_distance})")
    for name, angle in zip(("hematoxylin", "eosin"), over, strict=True):
        if gate_overshoot and angle > b.max_overshoot_deg:
            problems.append(f"normalized tissue reaches {angle:.1f} deg past the target's {name} "
                            f"(bound {b.max_overshoot_deg} deg): the source's stains were misjudged")
    return QCReport(problems, measures)


def check_model_output(
    mapped: NDArray[np.uint8], *, white: ArrayLike, bounds: QCBounds | None = None
) -> QCReport:
    """Whether a model's output (StainNet: no fitted statistics, no template) looks like H&E.

    The sampled tissue pixels after the model are fitted with the default Macenko estimate, in
    optical density against the model's output for the slide's glass, and that fit goes through
    :func:`check_fit`'s bounds (stain cone, separation, white point). The report is measured, not
    gated (its ``gate`` measure says so): the caller writes the output as the model computes it
    and warns. A model trained for other stains or tissue (the published cytopathology StainNet
    on H&E sections: eosin 31-39 deg from Ruifrok's, a dark brown slide) is flagged; the
    published histopathology checkpoints measured 4-29 deg on the real sample slide and patches
    (``bench/model_output_check.py``; why it does not refuse: ``docs/decisions/0003``).

    Parameters
    ----------
    mapped : (N, 3) uint8
        The source's sampled tissue pixels through the model.
    white : (3,) float
        The model's output for the source's white point (its glass colour).
    bounds : QCBounds, optional

    Returns
    -------
    QCReport
        Problems prefixed ``output:``, measures prefixed ``output_``, and ``gate``.
    """
    w = np.asarray(white, dtype=np.float64)
    try:
        reference = colour_reference(mapped, white=w)
    except FitError as exc:
        return QCReport([f"output: no H&E stain fit on the model's output ({exc})"],
                        {"gate": MODEL_GATE, "output_white_point": _r(w, 1)})
    report = check_fit(reference.matrix, white=WhitePoint.fixed(w), bounds=bounds)
    measures = {f"output_{k}": v for k, v in report.measures.items() if k != "white_point_source"}
    measures["output_lab_mean"] = _r(reference.lab_mean)
    return QCReport([f"output: {p}" for p in report.problems], {"gate": MODEL_GATE, **measures})


def gate_verdict(qc: dict[str, Any]) -> str:
    """One line for an output's provenance ``qc`` (:meth:`QCReport.to_dict`): ✓ passed, ✗ failed
    or forced past (with the reasons), ⚠ for a model's output that does not look like H&E
    (measured, not gated), n/a where nothing was fitted. ``wsi-norm info`` and the flows' QC
    report print it."""
    measured = qc.get("measures", {}).get("gate")
    if qc.get("problems"):
        verdict = ("⚠ measured, not gated: " if measured == MODEL_GATE
                   else "✗ forced past: " if qc.get("forced") else "✗ failed: ")
        return verdict + "; ".join(qc["problems"])
    if measured == MODEL_GATE:
        return "✓ plausible H&E (measured, not gated)"
    if measured is not None:
        return "n/a (no fitted statistics)"
    return "✓ passed"
