"""Shared fixtures: the real sample data beside the repository, marker handling, and for the
end-to-end tests a real Prefect server and Chromium's launch options.

The server is ``prefect server start`` on a free port of 127.0.0.1 with its own PREFECT_HOME
(one per test module that asks for it); the browser is Debian's ``/usr/bin/chromium`` driven by
Playwright (never ``playwright install``: it downloads browsers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- end to end: Prefect server, Chromium

ARTIFACTS_DIR = REPO_ROOT / "tests" / "artifacts"
"""Test evidence (screenshots, logs) kept as CI artifacts; git-ignored, never committed."""
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started here in its own session (and its children), by its group id."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_http(url: str, *, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server on a free 127.0.0.1 port with its own PREFECT_HOME; yields its environment."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_UI_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    log = home / "server.log"
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_http(f"{api}/health", timeout_s=120, proc=proc, log=log)
        yield env
    finally:
        _stop(proc)


@pytest.fixture
def stop_process() -> Callable[[subprocess.Popen[bytes]], None]:
    """Stops a process the test started with ``start_new_session=True`` (its whole group)."""
    return _stop


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
