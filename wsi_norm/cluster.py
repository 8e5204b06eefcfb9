"""Where the array work runs: dask's threaded scheduler, an embedded local cluster, or an existing one.

``scheduler="tcp://host:8786"`` (or ``WSI_NORM_SCHEDULER``) joins an existing cluster:
dask-jobqueue on SLURM, the dask Kubernetes operator, or any ``dask scheduler`` with workers
(see ``deploy/``). GPU workers declare a ``GPU`` resource. Joining, it registers two worker
plugins (:mod:`wsi_norm.worker_setup`): each worker process uses the same malloc settings as the
``wsi-norm`` command (:mod:`wsi_norm.runtime`) and loads wsi-norm's kernels as it joins. ``scheduler="local"`` (:data:`LOCAL`)
starts an embedded ``distributed`` cluster in this process (in-process threads: no pickling of
slides or 48 MiB lookup tables between processes; the hot loops release the GIL), with its
dashboard when asked for.

Without either, :func:`dask_scheduler` lets the ``wsi-norm`` command run on dask's threaded
scheduler: the same threads in this process, no sockets, no ``distributed`` import (~0.5 s), and
no scheduler round trips. A plain copy of a 268-MP slide took ~1.2 x the CPU time on the embedded
cluster (BENCHMARKS.md, "Normalization against libvips"). The results are the same whatever the
scheduler. The flows do the same (``flows.normalize_archive.ArrayWork``).

Local services listen on loopback only. The local cluster talks ``inproc://`` (no socket), but
``distributed`` always starts an HTTP server for the scheduler and one per worker, by default on
every interface (the scheduler's on port 8787, with the dashboard); here both are bound to
``127.0.0.1`` on a free port, and the dashboard is served only when asked for
(``dashboard=True``, ``wsi-norm ... --dashboard``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "LOCAL",
    "SCHEDULER_ENV",
    "active_client",
    "dashboard_url",
    "dask_client",
    "dask_scheduler",
    "has_gpu_workers",
]

log = logging.getLogger(__name__)

SCHEDULER_ENV = "WSI_NORM_SCHEDULER"
#: The ``scheduler`` value that asks for an embedded local ``distributed`` cluster
LOCAL = "local"
LOOPBACK = "127.0.0.1"


def active_client() -> Client | None:
    """The ``distributed`` client active in this process, or None; never imports ``distributed``
    (a process that has not imported it has no client)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_client

    try:
        return get_client()
    except ValueError:
        return None


@contextlib.contextmanager
def dask_scheduler(
    scheduler: str | None = None, *, threads: int | None = None, dashboard: bool = False,
    log_level: int = logging.WARNING, embedded_cluster: bool = True,
) -> Iterator[Client | None]:
    """Where a command's array work runs, for the duration of a ``with`` block.

    As :func:`dask_client` (same parameters), except that with ``embedded_cluster=False`` and
    nothing asking for a cluster (no ``scheduler``, no ``WSI_NORM_SCHEDULER``, no ``dashboard``,
    no client already active) no cluster is started: the block runs on dask's threaded
    scheduler (``threads`` threads, default: the number of CPUs), imports no ``distributed``
    and opens no socket, and None is yielded. The ``wsi-norm`` command passes
    ``embedded_cluster=False``; ``scheduler="local"`` asks for the embedded cluster.

    Yields
    ------
    distributed.Client or None
        None on the threaded scheduler.
    """
    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if embedded_cluster or address or dashboard or active_client() is not None:
        with dask_client(scheduler, threads=threads, dashboard=dashboard, log_level=log_level) as client:
            yield client
        return
    import dask
    import dask.threaded

    # the scheduler as a function, not the name "threads": dask resolves a name (or no setting)
    # by importing distributed to look for a client
    settings: dict[str, object] = {"scheduler": dask.threaded.get}
    if threads is not None:
        settings["num_workers"] = threads
    with dask.config.set(settings):
        log.info("dask threaded scheduler, %s threads", threads or "default")
        yield None


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None, *, threads: int | None = None, dashboard: bool = False,
    log_level: int = logging.WARNING,
) -> Iterator[Client]:
    """A dask ``distributed`` client for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``), or ``"local"``. Default: the
        ``WSI_NORM_SCHEDULER`` environment variable. Without an address (or with ``"local"``): a
        client that is already active in this process, else a new in-process local cluster
        (closed on exit).
    threads : int, optional
        Worker threads of a new local cluster (default: the number of CPUs).
    dashboard : bool, keyword-only
        Serve the dask dashboard of a new local cluster, on ``127.0.0.1`` (port 8787, or a free
        one when that is taken; :func:`dashboard_url` says which). Default: no dashboard.
    log_level : int, keyword-only
        ``distributed``'s loggers are raised to at least this level (its import sets them to
        INFO). An entry point that reports errors itself passes ``logging.CRITICAL``: a failed
        task's traceback ("Compute Failed") and, when Ctrl-C closes the cluster, the running
        tasks' ``CancelledError`` are then not logged.

    Yields
    ------
    distributed.Client
    """
    from distributed import Client, get_client

    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if address and address != LOCAL:
        log.info("connecting to dask scheduler %s", address)
        with Client(address) as client:  # type: ignore[no-untyped-call]  # distributed: unannotated
            _set_up_workers(client)
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
    # quieter distributed loggers while this cluster runs (LocalCluster's silence_logs sets
    # them too); the caller's levels are restored when it closes
    loggers = [logging.getLogger(name) for name in _DISTRIBUTED_LOGGERS]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < log_level:
            logger.setLevel(log_level)
    try:
        yield from _local_client(n, dashboard, log_level)
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


def _set_up_workers(client: Client) -> None:
    """Register :class:`wsi_norm.worker_setup.WorkerMalloc` and
    :class:`~wsi_norm.worker_setup.WorkerWarmup` with an existing cluster: every worker process,
    also one that joins later, uses wsi-norm's malloc settings (:mod:`wsi_norm.runtime`) and
    loads its compiled kernels while the command fits. A cluster that refuses them still runs
    the work, as before."""
    from wsi_norm.worker_setup import PLUGIN_NAME, WARMUP_PLUGIN_NAME, WorkerMalloc, WorkerWarmup

    try:
        client.register_plugin(WorkerMalloc(), name=PLUGIN_NAME)
        client.register_plugin(WorkerWarmup(), name=WARMUP_PLUGIN_NAME)
    except Exception as exc:  # noqa: BLE001 - a speed setting: the work runs without it
        log.warning("could not set up the workers (wsi-norm's malloc settings and warm-up: %s: %s); "
                    "the work runs, more slowly", type(exc).__name__, exc)


_DISTRIBUTED_LOGGERS = ("distributed", "distributed.scheduler", "distributed.worker", "distributed.core")
_SHORT_HISTORIES = {
    "distributed.diagnostics.computations.max-history": 1,
    "distributed.diagnostics.erred-tasks.max-history": 1,
    "distributed.admin.low-level-log-length": 10,
    "distributed.admin.log-length": 100,
}


def _local_client(n: int, dashboard: bool, log_level: int) -> Iterator[Client]:
    import dask
    from distributed import Client, LocalCluster, Worker

    class _LoopbackWorker(Worker):
        """A worker without dashboard routes (LocalCluster enables them with any HTTP address)."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["dashboard"] = dashboard
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    # The scheduler and worker keep histories (computations, logs, transition logs) of up to
    # 10,000 entries each; an archive run feeds one cluster thousands of small graphs, and these
    # grew the flow process by ~120 MiB over 600 slides before levelling off (~20 MiB with the
    # short histories below; bench/bench_archive_scale.py). A dashboard keeps the defaults.
    histories = {} if dashboard else _SHORT_HISTORIES
    with (
        dask.config.set(histories),
        LocalCluster(  # type: ignore[no-untyped-call]  # distributed: unannotated __init__
            n_workers=1,
            threads_per_worker=n,
            processes=False,
            # The scheduler's HTTP server starts even without a dashboard, and a missing host
            # means every interface: name loopback and a free port (8787 only for a dashboard).
            dashboard_address=f"{LOOPBACK}:{8787 if dashboard else 0}",
            worker_dashboard_address=f"{LOOPBACK}:0",
            worker_class=_LoopbackWorker,
            scheduler_kwargs={"dashboard": dashboard},
            silence_logs=log_level,
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]  # distributed: unannotated
    ):
        log.info("local dask cluster: 1 in-process worker, %d threads", n)
        try:
            yield client
        except BaseException:
            # Ctrl-C or an error with tasks in flight: the cluster closes under them, and each
            # cancelled task would log "Async instruction ... ended with CancelledError". That is
            # the shutdown the caller asked for, not news; the caller's levels come back on exit.
            for name in _DISTRIBUTED_LOGGERS:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            if log_level >= logging.CRITICAL:
                # An entry point that reports the error itself: a comm the closing cluster cut
                # mid-await can leave a future whose TimeoutError nobody reads, and asyncio logs
                # "Future exception was never retrieved" when it is collected, after the cluster
                # and this function are gone (at exit, under load). Not restored, for that reason.
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise


def dashboard_url(client: Client) -> str:
    """The dashboard's address: ``http://127.0.0.1:PORT/status`` for a local cluster.

    (``client.dashboard_link`` names the machine's public address, where nothing listens.)
    """
    server = getattr(getattr(client.cluster, "scheduler", None), "http_server", None)
    if server is not None:
        return f"http://{LOOPBACK}:{server.port}/status"
    return str(client.dashboard_link)


def has_gpu_workers(client: Client) -> bool:
    """True when some worker of ``client``'s cluster declares a ``GPU`` resource."""
    info = client.scheduler_info()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in info.get("workers", {}).values())
