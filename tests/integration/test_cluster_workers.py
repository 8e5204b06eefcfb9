"""Worker processes of a cluster wsi-norm joins use wsi-norm's malloc settings (wsi_norm.worker_setup)."""

from __future__ import annotations

import platform
import sys

import dask
import pytest

from wsi_norm.cluster import dask_client
from wsi_norm.runtime import memory_settings_applied

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="mallopt is glibc's"
)

_ALL = frozenset({"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"})


def _trim_env() -> str | None:
    import os

    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_joining_a_cluster_sets_up_its_workers_and_those_that_join_later() -> None:
    """Nanny-started workers get ``MALLOC_TRIM_THRESHOLD_`` from distributed, which pins glibc's
    mmap threshold at 128 KiB; joining registers the plugin, which overrides it in each worker
    process, also in one started after the client joined."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                 dashboard_address=None) as cluster,
        dask_client(cluster.scheduler_address) as client,
    ):
        env = client.run(_trim_env)
        nanny = dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]
        assert set(env.values()) == {str(nanny)}, env
        assert set(client.run(memory_settings_applied).values()) == {_ALL}
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        applied = client.run(memory_settings_applied)
        assert len(applied) == 2 and set(applied.values()) == {_ALL}


def test_an_in_process_worker_leaves_the_clients_process_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin changes nothing in the process that registered it (in-process workers share it),
    and applies the settings, as a worker's, in any other process."""
    from wsi_norm import worker_setup

    calls: list[bool] = []

    def record(*, in_worker: bool = False) -> bool:
        calls.append(in_worker)
        return True

    monkeypatch.setattr(worker_setup, "return_freed_memory", record)
    plugin = worker_setup.WorkerMalloc()
    plugin.setup(worker=None)
    assert calls == []
    plugin.client_pid = -1  # as unpickled in a worker process
    plugin.setup(worker=None)
    assert calls == [True]


def _gather_loaded() -> bool:
    from wsi_norm.colormap import maps

    return maps._GATHER_WORDS is not None


def test_joined_workers_load_the_kernels_before_the_first_block() -> None:
    """The warm-up plugin loads the table gather (numba) in each worker process as it joins, in
    a background thread, before any block runs there."""
    import time

    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                 dashboard_address=None) as cluster,
        distributed.Client(cluster) as plain,
    ):
        assert set(plain.run(_gather_loaded).values()) == {False}  # nothing loads it by itself
        with dask_client(cluster.scheduler_address) as client:
            deadline = time.monotonic() + 120
            while set(client.run(_gather_loaded).values()) != {True} and time.monotonic() < deadline:
                time.sleep(0.2)
            assert set(client.run(_gather_loaded).values()) == {True}
