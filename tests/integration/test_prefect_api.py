"""Prefect's temporary API started with a flow program (:mod:`flows._api`): the same server Prefect
starts, used by the flow runs, stopped at exit; and left alone whenever Prefect would not use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from flows._api import SERVER_ENV, server_command

REPO_ROOT = Path(__file__).resolve().parents[2]


def _child(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (a program's process: its own start, its own exit)."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    run_env.update(env or {})
    run_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), run_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False,
                          timeout=timeout, env=run_env, cwd=REPO_ROOT)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie not yet reaped by init still answers; its state says it has exited
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z"


def test_the_server_started_early_is_the_one_prefect_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command and environment are Prefect's own (``SubprocessASGIServer``): a Prefect release
    that changes them fails here, not in a user's run."""
    import prefect.server.api.server as prefect_server

    seen: dict[str, Any] = {}

    def popen(args: list[str], env: dict[str, str], **kwargs: Any) -> None:
        seen.update(args=args, env=env, kwargs=kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)  # the module prefect_server uses
    prefect_server.SubprocessASGIServer(port=8765)._run_uvicorn_command()
    assert seen["args"] == server_command(8765)
    assert {k: seen["env"][k] for k in SERVER_ENV} == SERVER_ENV
    assert not seen["kwargs"]  # no other Popen options (stdout, stderr: inherited)


def test_flow_runs_use_the_server_started_with_the_program() -> None:
    """A flow run inside ``prefect_api()`` is recorded on the early server (Prefect starts none of
    its own), and the server is gone once the program has exited."""
    done = _child("""
        import logging, sys
        logging.basicConfig(level=logging.INFO)
        from flows._api import prefect_api, start
        api = start()
        assert api is not None and api.process is not None
        print("pid", api.process.pid)
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        @flow
        def answer() -> int:
            return 42

        with prefect_api() as url:
            assert url == api.api_url == PREFECT_API_URL.value(), (url, PREFECT_API_URL.value())
            state = answer(return_state=True)
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(state.state_details.flow_run_id)
        assert PREFECT_API_URL.value() is None  # the settings are back as they were
        print("result", state.result(), run.state.name)
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result 42 Completed" in done.stdout
    assert "Starting temporary server" not in done.stdout + done.stderr  # Prefect's own never started
    assert "a temporary server on 127.0.0.1" in done.stderr
    pid = int(done.stdout.split("pid ")[1].split()[0])
    assert _gone(pid)


def test_an_api_named_in_a_profile_is_used_and_the_early_server_stopped(tmp_path: Path) -> None:
    """Only the environment can be read before Prefect is imported: a profile's API URL is found
    afterwards, and the server started meanwhile is stopped unused."""
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "remote"\n\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    done = _child("""
        from flows._api import prefect_api, start
        api = start()
        assert api is not None and api.process is not None
        process = api.process
        from prefect.settings import PREFECT_API_URL
        with prefect_api() as url:
            print("url", url, PREFECT_API_URL.value())
        print("exited", process.poll() is not None)
    """, env={"PREFECT_PROFILES_PATH": str(profiles)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "url None http://127.0.0.1:9/api" in done.stdout
    assert "exited True" in done.stdout


def test_no_server_is_started_when_the_environment_names_an_api() -> None:
    done = _child("""
        from flows._api import start
        print("started", start() is not None)
    """, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started False" in done.stdout


def test_a_server_that_does_not_answer_is_left_to_prefect() -> None:
    """The early server gone before it answered: the runs go to the server Prefect starts itself
    (the settings left unchanged), with a warning."""
    done = _child("""
        from flows._api import prefect_api, start
        api = start()
        api.process.kill()
        api.process.wait()
        from prefect.settings import PREFECT_API_URL
        with prefect_api() as url:
            print("url", url, PREFECT_API_URL.value())
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "url None None" in done.stdout
    assert "did not answer; Prefect starts its own" in done.stderr


def test_no_server_is_started_for_a_program_that_only_prints_its_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows._api as api

    monkeypatch.setattr(api, "_STARTED", None)
    monkeypatch.setattr(sys, "argv", ["flows.normalize_archive", "--help"])
    assert api.start() is None
    assert api._STARTED is None
