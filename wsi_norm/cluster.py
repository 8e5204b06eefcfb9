"""Where the array work runs: an embedded local dask cluster, or an existing one.

Library calls and the CLI run on a local ``distributed`` cluster by default (in-process
threads: no setup, no pickling of slides or 48 MiB lookup tables between processes; the hot
loops release the GIL). ``scheduler="tcp://host:8786"`` (or ``WSI_NORM_SCHEDULER``) joins an
existing cluster instead: dask-jobqueue on SLURM, the dask Kubernetes operator, or any
``dask scheduler`` with workers (see ``deploy/``). GPU workers declare a ``GPU`` resource.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["dask_client", "SCHEDULER_ENV", "has_gpu_workers"]

log = logging.getLogger(__name__)

SCHEDULER_ENV = "WSI_NORM_SCHEDULER"


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None, *, threads: int | None = None
) -> Iterator[Client]:
    """A dask ``distributed`` client for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``). Default: the
        ``WSI_NORM_SCHEDULER`` environment variable, else a client that is already active in
        this process, else a new in-process local cluster (closed on exit).
    threads : int, optional
        Worker threads of a new local cluster (default: the number of CPUs).

    Yields
    ------
    distributed.Client
    """
    from distributed import Client, LocalCluster, get_client

    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if address:
        log.info("connecting to dask scheduler %s", address)
        with Client(address) as client:
            yield client
        return
    try:
        existing = get_client()
    except ValueError:
        existing = None
    if existing is not None:
        yield existing
        return
    n = threads or os.cpu_count() or 1
    for name in ("distributed", "distributed.scheduler", "distributed.worker", "distributed.core"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=n,
            processes=False,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        log.info("local dask cluster: 1 in-process worker, %d threads", n)
        yield client


def has_gpu_workers(client: Client) -> bool:
    """True when some worker of ``client``'s cluster declares a ``GPU`` resource."""
    info = client.scheduler_info()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in info.get("workers", {}).values())
