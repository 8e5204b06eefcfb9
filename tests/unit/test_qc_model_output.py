"""The plausibility check of a model's output (wsi_norm.stain.qc.check_model_output)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from wsi_norm.stain.base import RUIFROK_HE
from wsi_norm.stain.qc import MODEL_GATE, check_model_output, gate_verdict

WHITE = np.array([240.0, 238.0, 236.0])
DAB = np.array([0.27, 0.57, 0.78]) / np.linalg.norm([0.27, 0.57, 0.78])


def _rendered(stains: NDArray[np.float64], n: int = 40_000, seed: int = 0) -> NDArray[np.uint8]:
    """Tissue pixels of two stains in ``stains`` (2, 3), pure and mixed, against ``WHITE``."""
    rng = np.random.default_rng(seed)
    conc = rng.gamma(2.0, 0.35, size=(n, 2)) * rng.choice([(1, 0.05), (0.05, 1), (1, 1)], size=n)
    rgb = (WHITE + 1.0) * np.exp(-conc @ stains) - 1.0
    out: NDArray[np.uint8] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def test_h_and_e_output_passes_with_its_measures() -> None:
    report = check_model_output(_rendered(RUIFROK_HE), white=WHITE)
    assert report.passed, report.problems
    assert report.measures["gate"] == MODEL_GATE
    assert max(report.measures["output_stain_angles_to_ruifrok_deg"]) < 3.0
    assert report.measures["output_white_point"] == [240.0, 238.0, 236.0]


def test_an_output_of_other_stains_is_flagged_with_the_numbers() -> None:
    """Hematoxylin and DAB (a brown second stain, 40 deg from eosin): the second vector is named."""
    report = check_model_output(_rendered(np.stack([RUIFROK_HE[0], DAB])), white=WHITE)
    assert not report.passed
    assert any(p.startswith("output: eosin vector") and "deg from Ruifrok's eosin (bound 30.0 deg)" in p
               for p in report.problems), report.problems


def test_an_output_without_colour_is_flagged_not_raised() -> None:
    """Grey tissue (R = G = B): no stain fit at all is a finding, not an exception."""
    grey = np.repeat(np.random.default_rng(1).integers(40, 190, size=(20_000, 1), dtype=np.uint8), 3, axis=1)
    report = check_model_output(grey, white=WHITE)
    assert not report.passed and report.measures["gate"] == MODEL_GATE
    assert report.problems[0].startswith("output:"), report.problems


def test_the_flows_report_tells_a_measured_finding_from_a_refusal() -> None:
    """The QC verdict (``wsi-norm info``, the flows' per-slide report) from an output's provenance."""
    brown = {"passed": False, "forced": False, "problems": ["output: eosin vector 36.8 deg"],
             "measures": {"gate": MODEL_GATE}}
    assert gate_verdict(brown) == "⚠ measured, not gated: output: eosin vector 36.8 deg"
    assert gate_verdict({"problems": [], "measures": {"gate": MODEL_GATE}}) == "✓ plausible H&E (measured, not gated)"
    assert gate_verdict({"problems": ["source: x"], "forced": True, "measures": {}}) == "✗ forced past: source: x"
    assert gate_verdict({"problems": ["source: x"], "measures": {}}) == "✗ failed: source: x"
    assert gate_verdict({"problems": [], "measures": {"gate": "not applicable (no fitted statistics)"}}) \
        == "n/a (no fitted statistics)"
    assert gate_verdict({"problems": [], "measures": {"source_white_point": [240, 240, 240]}}) == "✓ passed"
