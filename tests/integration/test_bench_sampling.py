"""``bench/bench_sampling.py`` runs, times each checkout and says whether the results agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", ["sample", "measure"])
def test_bench_sampling_times_both_checkouts_and_compares_the_results(sample_svs: Path, stage: str) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_sampling.py"), str(sample_svs), "--rounds", "1",
         "--repeats", "1", "--before", str(REPO), "--stage", stage],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("this ") and lines[1].startswith("before ") and f"{stage} sha256" in lines[0]
    # the same checkout twice: the same result, so the script must say so
    assert lines[-1].endswith("the same result"), out
