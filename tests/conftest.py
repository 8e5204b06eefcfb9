"""Shared fixtures: the real sample data beside the repository, marker handling, and for the
end-to-end tests a real Prefect server and Chromium's launch options.

The server is ``prefect server start`` on a free port of 127.0.0.1 with its own PREFECT_HOME
(one per test module that asks for it); the browser is Debian's ``/usr/bin/chromium`` driven by
Playwright (never ``playwright install``: it downloads browsers).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flows import configure_process
from wsi_norm.testing.data import data_dir
from wsi_norm.testing.prefect_server import local_prefect_server, stop_process_group

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


# ---------------------------------------------------------------- end to end: Prefect server, Chromium

ARTIFACTS_DIR = REPO_ROOT / "tests" / "artifacts"
"""Test evidence (screenshots, logs) kept as CI artifacts; git-ignored, never committed."""
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server on a free 127.0.0.1 port with its own PREFECT_HOME; yields its environment."""
    with local_prefect_server(tmp_path_factory.mktemp("prefect-server-home"), timeout_s=120,
                              python_path=[REPO_ROOT]) as env:
        yield env


@pytest.fixture
def stop_process() -> Callable[[subprocess.Popen[bytes]], None]:
    """Stops a process the test started with ``start_new_session=True`` (its whole group)."""
    return stop_process_group


def _cli_imports(argv: list[str], modules: tuple[str, ...]) -> tuple[int, list[bool]]:
    """Run ``wsi_norm.cli.main(argv)`` in a fresh interpreter; its exit code and, for each of
    ``modules``, whether the run had imported it."""
    import sys

    code = (f"import sys; from wsi_norm.cli import main; rc = main({argv!r}); "
            f"print(rc, *(m in sys.modules for m in {modules!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    words = done.stdout.split()[-(len(modules) + 1):]
    assert len(words) == len(modules) + 1, done.stdout + done.stderr
    return int(words[0]), [w == "True" for w in words[1:]]


@pytest.fixture
def cli_imports() -> Callable[[list[str], tuple[str, ...]], tuple[int, list[bool]]]:
    """``(argv, modules) -> (exit code, [imported?])``: a CLI run in a fresh interpreter, and which
    of ``modules`` it imported (start-up cost a run must not pay)."""
    return _cli_imports


@pytest.fixture
def chromium() -> dict[str, Any]:
    """Keyword arguments of ``playwright``'s ``chromium.launch`` for Debian's Chromium (fails,
    saying how to install it, when it is missing)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium (never `playwright install`)")
    return {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture
def evidence_dir() -> Path:
    """``tests/artifacts/``: where screenshots and logs are saved (git-ignored)."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR
