"""Process-wide settings of the entry points (:mod:`wsi_norm.runtime`)."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from wsi_norm.runtime import _BLAS_ENV, single_threaded_blas


def _blas_threads() -> list[int]:
    return [int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_single_threaded_blas_limits_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in _BLAS_ENV:
        monkeypatch.delenv(env, raising=False)
    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded
    before = _blas_threads()
    assert before, "no BLAS library found"
    with single_threaded_blas() as limited:
        assert limited and _blas_threads() == [1] * len(before)
    assert _blas_threads() == before


def test_single_threaded_blas_leaves_an_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    before = _blas_threads()
    with single_threaded_blas() as limited:
        assert not limited and _blas_threads() == before
