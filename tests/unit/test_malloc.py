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


@pytest.mark.parametrize(
    "name", ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
)
def test_user_environment_wins(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "4")
    assert return_freed_memory() is False
