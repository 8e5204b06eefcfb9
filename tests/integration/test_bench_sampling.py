"""``bench/bench_sampling.py`` runs, times each checkout and says whether the samples agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_sampling_times_both_checkouts_and_compares_the_samples(sample_svs: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_sampling.py"), str(sample_svs), "--rounds", "1",
         "--repeats", "1", "--before", str(REPO)],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("this ") and lines[1].startswith("before ")
    # the same checkout twice: the same sample, so the script must say so
    assert lines[-1].endswith("the same sample"), out
