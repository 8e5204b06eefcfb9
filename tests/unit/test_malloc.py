"""Tests of wsi_norm.runtime: glibc settings that keep streaming memory flat."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from wsi_norm.runtime import return_freed_memory

_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's")
def test_glibc_accepts_the_settings() -> None:
    code = "from wsi_norm.runtime import return_freed_memory as r; print(r())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "True"


def _applied_in_child(env: dict[str, str], code: str = "r()") -> list[str]:
    """Run ``return_freed_memory`` in a fresh interpreter; the settings it made, sorted."""
    run = ("from wsi_norm.runtime import return_freed_memory as r, memory_settings_applied as a; "
           f"{code}; print(','.join(sorted(a())))")
    out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, check=True, env=env)
    return [name for name in out.stdout.strip().split(",") if name]


_NAMES = ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("name", _NAMES)
def test_user_environment_wins_setting_by_setting(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _applied_in_child({**env, name: "4194304"}) == [n for n in _NAMES if n != name]


def test_nothing_is_set_when_the_environment_sets_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _NAMES:
        monkeypatch.setenv(name, "4194304")
    assert return_freed_memory() is False


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's")
def test_a_worker_overrides_the_nannys_trim_threshold_but_not_the_users() -> None:
    import dask
    import distributed  # noqa: F401 - loads distributed's configuration

    nanny = dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    worker = "import dask, distributed; r(in_worker=True)"
    # the nanny's value is distributed's choice: overridden in a worker, kept elsewhere
    assert _applied_in_child({**env, "MALLOC_TRIM_THRESHOLD_": str(nanny)}, worker) == _NAMES
    assert _applied_in_child({**env, "MALLOC_TRIM_THRESHOLD_": str(nanny)}) == _NAMES[:2]
    # any other value is the user's
    assert _applied_in_child({**env, "MALLOC_TRIM_THRESHOLD_": str(int(nanny) + 1)}, worker) == _NAMES[:2]
