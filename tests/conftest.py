"""Shared fixtures: the real sample data beside the repository, and marker handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import configure_process
from wsi_norm.testing.data import data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_dir()

# The test session is an entry point: the flows' process settings (Prefect's ephemeral API start-up
# timeout on a busy machine, no telemetry) apply to the flow runs the tests start.
configure_process()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests on machines without CUDA, saying why."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a core dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder (``$WSI_NORM_DATA``, else ``../shared/data``): real slide, H&E patches,
    StainNet weights."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_svs(shared_data: Path) -> Path:
    """The real Aperio SVS (CMU-1-Small-Region, 2220 x 2967 px, MPP 0.499)."""
    return shared_data / "slides" / "CMU-1-Small-Region.svs"
