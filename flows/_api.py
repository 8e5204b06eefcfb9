"""Prefect's temporary local API, started as a flow program starts rather than when its first
flow run asks for it.

With no Prefect API configured, Prefect starts a temporary local server on a flow run's first
client call: uvicorn serving ``prefect.server.api.server:create_app`` in a subprocess
(``SubprocessASGIServer``), which it waits for and stops at exit. By then the process has
imported Prefect and, only to start that subprocess, Prefect's server modules (~3 CPU-s the
client never uses); the server then takes another ~5-7 s to answer, so on two cores a run's
first task began ~14 s after the program started (BENCHMARKS.md, "Prefect's temporary API").

:func:`start` launches the same server (the same command and environment) the moment a program
starts, before Prefect is imported, so its start-up overlaps the program's imports and whatever
the program does first; :func:`prefect_api` then hands it to the flow runs (``PREFECT_API_URL``
for their duration) once Prefect's settings confirm Prefect would have started its own. Anything
else stops it and leaves Prefect to do as it always does: an API configured in a profile or a
``prefect.toml`` (only the environment can be read before Prefect is imported), ephemeral mode
turned off, or a server that does not answer in time. Like Prefect's, the server is stopped at
the process's exit, after Prefect's own exit handlers have sent their last logs and events.

Only program entry points call :func:`start` (``python -m flows.normalize_archive``,
``flows.harmonize_sites``, ``flows.train_stainnet``, ``flows.demo``); importing a flow module
starts nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TemporaryAPI", "prefect_api", "start"]

log = logging.getLogger("wsi_norm.flows")

#: Prefect's own choice of ports for its temporary server (``SubprocessASGIServer._port_range``).
PORTS = range(8000, 9000)

#: The environment Prefect gives its temporary server (``SubprocessASGIServer._run_uvicorn_command``):
#: no UI, and the app built as an ephemeral one (its background services limited accordingly).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}

_FALSE = ("0", "false", "f", "n", "no", "off")


class TemporaryAPI:
    """A temporary Prefect API server in a subprocess of this process, on 127.0.0.1:``port``."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process: subprocess.Popen[bytes] | None = process
        self.port = port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the server answers ``/health`` within ``timeout_s`` (False at once if it exited)."""
        deadline = time.monotonic() + timeout_s
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never a proxy
        while self.process is not None and self.process.poll() is None:
            try:
                with direct.open(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate the server; safe to call again. It is killed only if it has not exited after
        30 s: uvicorn finishes a start-up it has begun (the first start migrates a new database,
        ~10 s) before it exits, and a migration cut short could leave the database unusable."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        log.info("stopping the temporary Prefect server on 127.0.0.1:%d", self.port)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_STARTED: TemporaryAPI | None = None


def server_command(port: int) -> list[str]:
    """The command Prefect runs for its temporary server on ``port`` (uvicorn, this Python)."""
    spec = importlib.util.find_spec("prefect")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("prefect is not installed")
    app_dir = Path(next(iter(spec.submodule_search_locations))).parent
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def _free_port() -> int | None:
    for port in random.sample(PORTS, 10):
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


def start() -> TemporaryAPI | None:
    """Start Prefect's temporary API server now, unless the environment names an API
    (``PREFECT_API_URL``) or turns ephemeral mode off; None when none was started. Once a
    process: a second call returns the first call's server. Call it before importing Prefect."""
    global _STARTED
    if _STARTED is not None:
        return _STARTED
    if {"-h", "--help"} & set(sys.argv[1:]):  # the program only prints its usage
        return None
    if os.environ.get("PREFECT_API_URL") or (
            os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "").strip().lower() in _FALSE):
        return None
    from flows import configure_process

    configure_process()  # the server's settings (start-up timeout, no telemetry) come from the environment
    port = _free_port()
    if port is None:
        return None
    try:
        command = server_command(port)
    except ModuleNotFoundError:
        return None
    process = subprocess.Popen(command, env={**os.environ, **SERVER_ENV})
    _STARTED = TemporaryAPI(process, port)
    # registered before Prefect is imported, so it runs after Prefect's exit handlers (LIFO)
    atexit.register(_STARTED.stop)
    return _STARTED


def _startup_timeout_s() -> float:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    return float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Flow runs inside use the server :func:`start` started, when Prefect would otherwise
    start its own; yields its API URL, or None where Prefect decides (nothing started, an API
    configured, or the server not answering: then it is stopped, and Prefect starts its own)."""
    server = _STARTED
    if server is None or server.process is None:
        yield None
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        server.stop()  # a profile names an API (or forbids a temporary one): Prefect's to use
        yield None
        return
    if not server.wait_ready(_startup_timeout_s()):
        log.warning("the temporary Prefect server on 127.0.0.1:%d did not answer; Prefect starts its own",
                    server.port)
        server.stop()
        yield None
        return
    log.info("Prefect API: a temporary server on 127.0.0.1:%d, started with the program", server.port)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url
