"""What the embedded cluster leaves of the process's logging after an error (wsi_norm.cluster)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_FAIL_INSIDE = r"""
import json, logging, sys
import distributed  # noqa: F401  (its import configures its loggers)
from wsi_norm.cluster import dask_client

level = int(sys.argv[1])
names = ("asyncio", "distributed", "distributed.core")
before = {name: logging.getLogger(name).level for name in names}
try:
    with dask_client(threads=1, log_level=level):
        raise RuntimeError("a tile failed")
except RuntimeError:
    pass
print(json.dumps([before, {name: logging.getLogger(name).level for name in names}]))
"""


def _levels_after_failure(level: int) -> tuple[dict[str, int], dict[str, int]]:
    done = subprocess.run([sys.executable, "-c", _FAIL_INSIDE, str(level)], capture_output=True, text=True,
                          timeout=120, check=True)
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    return before, after


@pytest.mark.parametrize("level", [10, 30, 50])
def test_an_error_inside_the_cluster_quiets_asyncio_only_for_an_entry_point_that_reports_it(level: int) -> None:
    """A caller that reports errors itself (``log_level`` CRITICAL, the CLI) gets no asyncio
    "Future exception was never retrieved" after its one-line error: a comm the closing cluster
    cut can leave such a future, collected at exit (seen once in CI under load). Its distributed
    loggers come back as they were; a library caller's asyncio logger is left alone."""
    before, after = _levels_after_failure(level)
    assert after["distributed"] == before["distributed"] and after["distributed.core"] == before["distributed.core"]
    assert before["asyncio"] == 0
    assert after["asyncio"] == (50 if level >= 50 else 0), after
