"""Make glibc return large freed buffers to the operating system.

Streaming a slide allocates and frees the same few block-sized buffers (megabytes
each) thousands of times from several threads.  glibc serves a freed buffer's
successor from its heap arenas once its dynamic mmap threshold has risen past the
buffer size, and its per-thread arenas then hold on to the memory: peak RSS of an
OME-Zarr copy grew 35 % for 4x the slide area (509 -> 689 MiB) although Python's own
allocations (traced with :mod:`tracemalloc`) stayed flat.  With two arenas, buffers of
1 MiB or more served by ``mmap`` and the heap trimmed above 4 MiB it grew 3 %
(316 -> 327 MiB) and ran 1.4x faster (37 s instead of 51 s for 1.07 gigapixels).
Once reading got faster, that 1 MiB threshold cost the most: every chunk-sized buffer
(3 MiB) was a fresh ``mmap`` whose pages the kernel zeroes on first touch, about a third
of a plain copy's CPU time in system time (8.2 s of 23.7 s for a 1.07-GP TIFF copy). From
16 MiB, chunk buffers are reused from the heap and only block-sized ones (12 MiB and up)
are mapped: system time 1.8 s, and peak RSS still flat in area (TIFF copy 299 -> 315 MiB,
OME-Zarr 383 -> 434 MiB for 4x the pixels; 268 MP -> 1.07 GP, BENCHMARKS.md).
Setting ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment as well (only
possible before the process starts) saves another 8 % of time.
``distributed``'s nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in the environment of every
worker process it starts (``distributed.nanny.pre-spawn-environ``). glibc then keeps its mmap
threshold at 128 KiB for good, so every chunk-sized temporary of a task is a fresh ``mmap``: on
such a worker the 256^3 colour table took 1.8 s to build instead of 0.3 s, and a 1.07-GP
normalization on two one-thread workers used 1.4 x the CPU time of the same run in one process.
Workers of a cluster that wsi-norm joins therefore apply these settings too
(:class:`wsi_norm.worker_setup.WorkerMalloc`, ``return_freed_memory(in_worker=True)``), over
the nanny's value but not over a value of the user's (each setting on its own).

Only entry points call :func:`return_freed_memory` (the ``wsi-norm`` command, the
Prefect flows, the benchmarks, and the worker plugin in each worker process); it changes a
process-wide setting.

:func:`single_threaded_blas` is the command's other process-wide choice: dask's threads already
fill the cores, and the BLAS calls of the fits and the QC gate are on ``(N, 3)`` arrays, where
more BLAS threads only spin. With another process busy on the same two cores, OpenBLAS's
waiting threads made a small slide's run take 1.9-2.0 s instead of 1.45-1.5 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["memory_settings_applied", "return_freed_memory", "single_threaded_blas", "usable_cpus"]

#: Environment variables that set a BLAS thread count: any of them set, the user's choice wins.
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>, and the values set
_SETTINGS = (
    (-8, 2, "MALLOC_ARENA_MAX"),  # M_ARENA_MAX
    (-3, 16 << 20, "MALLOC_MMAP_THRESHOLD_"),  # M_MMAP_THRESHOLD
    (-1, 32 << 20, "MALLOC_TRIM_THRESHOLD_"),  # M_TRIM_THRESHOLD
)


_APPLIED: set[str] = set()  # the settings (their environment names) made in this process


def _set_by_distributed(env: str) -> bool:
    """The environment's ``env`` is the value ``distributed``'s nanny puts in every worker's
    environment (``distributed.nanny.pre-spawn-environ``), not a choice of the user's."""
    if "dask" not in sys.modules:
        return False
    import dask

    value = (dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}).get(env)
    return value is not None and os.environ.get(env) == str(value)


def return_freed_memory(*, in_worker: bool = False) -> bool:
    """Use two malloc arenas, ``mmap`` for 16 MiB or more, and trim the heap above 32 MiB.

    Each setting the environment makes itself (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``) is the user's choice and is left alone; the others are still
    made. Setting the trim threshold alone (as ``distributed``'s nanny does) would otherwise
    leave glibc's mmap threshold at 128 KiB for good (mallopt(3): setting it disables the
    threshold's dynamic adjustment), so that every chunk-sized temporary is a fresh ``mmap``.

    Parameters
    ----------
    in_worker : bool, keyword-only
        The caller is a ``distributed`` worker process: a ``MALLOC_TRIM_THRESHOLD_`` equal to the
        one the nanny puts in every worker's environment (65536 by default) is the nanny's, not
        the user's, and is overridden.

    Returns
    -------
    bool
        True if glibc accepted every setting made; False on other C libraries or platforms, or
        when the environment makes all three settings.
    """
    if not sys.platform.startswith("linux"):
        return False
    todo = [(param, value, env) for param, value, env in _SETTINGS
            if env not in os.environ or (in_worker and _set_by_distributed(env))]
    if not todo:
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    accepted = {env for param, value, env in todo if mallopt(param, value) == 1}
    _APPLIED.update(accepted)
    log.debug("mallopt %s: %s", ", ".join(env for _, _, env in todo),
              "ok" if len(accepted) == len(todo) else "refused")
    return len(accepted) == len(todo)


def memory_settings_applied() -> frozenset[str]:
    """The settings :func:`return_freed_memory` made in this process, by their environment names
    (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``)."""
    return frozenset(_APPLIED)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[bool]:
    """BLAS libraries loaded so far limited to one thread while active (threadpoolctl).

    Yields
    ------
    bool
        True if limited; False when the environment sets a BLAS thread count (the user's choice
        wins) or threadpoolctl is missing. Results are the same bytes either way (the fits'
        products are ``(3, N) @ (N, 3)``, whose three-by-three output BLAS does not split).
    """
    if any(env in os.environ for env in _BLAS_ENV):
        yield False
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency
        yield False
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield True


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
