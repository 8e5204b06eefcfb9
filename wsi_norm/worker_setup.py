"""Settings of the ``distributed`` worker processes that run wsi-norm's tasks.

:func:`wsi_norm.cluster.dask_client` registers :class:`WorkerMalloc` and :class:`WorkerWarmup`
with every existing cluster it joins (``--scheduler tcp://...``, ``WSI_NORM_SCHEDULER``), so each
worker process, also one that joins later, applies :func:`wsi_norm.runtime.return_freed_memory`
as the ``wsi-norm`` command does in its own process, and loads wsi-norm's compiled kernels while
the command fits. This module imports ``distributed``; only the client side of a cluster run and
the workers import it. A program that makes its own ``distributed.Client`` can register them the
same way: ``client.register_plugin(WorkerMalloc(), name=PLUGIN_NAME)``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from wsi_norm.runtime import return_freed_memory

__all__ = ["PLUGIN_NAME", "WARMUP_PLUGIN_NAME", "WorkerMalloc", "WorkerWarmup"]

#: The names the plugins are registered under (a second client's registration is then a no-op).
PLUGIN_NAME = "wsi-norm-malloc"
WARMUP_PLUGIN_NAME = "wsi-norm-warmup"

log = logging.getLogger(__name__)


class _InWorkerProcesses(WorkerPlugin):
    """A plugin that acts only in worker processes other than the one that registered it: an
    in-process worker shares the client's process, whose settings its entry point chose."""

    idempotent = True

    def __init__(self) -> None:
        self.client_pid = os.getpid()

    def setup(self, worker: Any) -> None:
        if os.getpid() != self.client_pid:
            self.in_worker_process()

    def in_worker_process(self) -> None:
        raise NotImplementedError


class WorkerMalloc(_InWorkerProcesses):
    """glibc's malloc settings of :mod:`wsi_norm.runtime`, in each worker process.

    The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which keeps glibc's mmap
    threshold at 128 KiB: every chunk-sized temporary is then a fresh ``mmap`` whose pages the
    kernel zeroes. Measured on two one-thread workers (``bench/bench_cluster.py``, 1.07 GP): the
    colour table took 1.8 s to build on a worker instead of 0.3 s. A value of the user's in the
    worker's environment still wins.
    """

    def in_worker_process(self) -> None:
        return_freed_memory(in_worker=True)


def _warm_up() -> None:
    import numpy as np

    from wsi_norm.colormap.maps import load_kernels
    from wsi_norm.pyramid import downsample_2x
    from wsi_norm.writers import tiff  # noqa: F401 - the writer's encoders (imagecodecs)

    try:
        downsample_2x(np.zeros((2, 2, 3), np.uint8), compiled=True)
        load_kernels()
    except Exception as exc:  # noqa: BLE001 - a head start only: the first block compiles instead
        log.debug("wsi-norm warm-up failed: %s", exc)


class WorkerWarmup(_InWorkerProcesses):
    """Imports wsi-norm's modules and loads its compiled kernels (numba's cache) in each worker
    process as it joins, in a background thread: while the command samples and fits the slide,
    not in the worker's first block."""

    def in_worker_process(self) -> None:
        threading.Thread(target=_warm_up, name="wsi-norm-warmup", daemon=True).start()
