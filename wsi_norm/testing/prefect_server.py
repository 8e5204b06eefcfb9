"""A throwaway local Prefect server for the end-to-end tests and the benchmarks.

``prefect server start`` on a free 127.0.0.1 port with its own ``PREFECT_HOME`` (SQLite), run as
its own process group so that stopping it stops its workers too. Nothing here imports Prefect:
the server is the ``prefect`` command beside this interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["client_env", "free_port", "local_prefect_server", "stop_process_group"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_env(home: Path, api_url: str, *, python_path: Sequence[Path] = ()) -> dict[str, str]:
    """This process's environment for a client (or the server) of ``api_url`` with PREFECT_HOME
    ``home``: the UI's API address set (needed off the default port), no analytics, a patient
    ephemeral start-up, and ``python_path`` put first on PYTHONPATH."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_UI_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path), env.get("PYTHONPATH", "")])
    return env


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started with ``start_new_session=True`` and its children: SIGTERM to its
    group, SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextmanager
def local_prefect_server(home: Path, *, timeout_s: float = 180.0,
                         python_path: Sequence[Path] = ()) -> Iterator[dict[str, str]]:
    """Start a server with PREFECT_HOME ``home`` (its log: ``home/server.log``), wait for its
    health endpoint, yield its clients' environment (:func:`client_env`), stop it on exit.

    Raises
    ------
    RuntimeError
        The server exited, or did not answer within ``timeout_s`` (with its log's tail).
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = client_env(home, f"http://127.0.0.1:{port}/api", python_path=python_path)
    log = home / "server.log"
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not up after {timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        stop_process_group(proc)
