"""Prefect flow ``normalize-archive``: normalize every slide of a manifest that is not current.

One run: validate the manifest (nothing starts on an invalid one), render missing generated
slides, prepare the target template (fitted once and cached under
``<output_root>/templates/``), then per slide ``fit -> normalize+write -> QC`` as task runs,
``concurrency`` slides at a time.  A slide is skipped only when its outputs record the same
request (source identity, method, parameters, sampling, template, writer options), pass a
metadata check (every level, chunk/shard or tile present) and its completion record, written
after the QC, still matches them; so a second run does no work, and a slide whose run was
killed before its QC, or whose output was damaged since, is done again.  Every slide holds
the claims on its outputs (``OUT.lock``, :func:`wsi_norm.writers.atomic.claim_output`) from
the skip decision to the completion record: a slide another run is writing is reported
"skipped (busy)" and left alone (neither failed nor written).  A
slide that fails (unreadable, no tissue) is marked Failed with its reason; a slide whose fit
or colour map fails the QC gate (:mod:`wsi_norm.stain.qc`) is marked "needs review" with the numbers
and nothing of it is written (unless the manifest says ``force: true``); the others go on, and
the flow run ends Failed.  A summary table artifact lists every slide.

Array work runs on one shared dask ``distributed`` client when one is asked for
(``--scheduler`` / ``WSI_NORM_SCHEDULER``, or ``--dashboard``: a local in-process cluster);
otherwise in this process, as the CLI runs a slide: a slide too large to hold in memory is
computed block by block on plain threads (:class:`wsi_norm.pyramid.LazyLevel`), the rest on
dask's threaded scheduler (:class:`ArrayWork`); no ``distributed`` cluster is started. BLAS is
limited to the run's share of the cores (``cores // concurrency`` threads). Prefect threads only
track slides.

Run::

    python -m flows.normalize_archive --manifest data_manifest.yaml [--scheduler tcp://host:8786]
    python -m flows.normalize_archive --serve        # long-running deployment for a Prefect server
"""

from __future__ import annotations

if __name__ == "__main__":  # a program: Prefect's temporary API starts while the rest imports
    from flows._api import start as start_prefect_api

    start_prefect_api()

import argparse
import functools
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, TypeVar, cast

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed
from prefect.utilities.annotations import quote

from flows import configure_process
from flows._api import prefect_api
from flows._artifacts import ProgressArtifact, artifact_key, markdown_table
from flows._common import (
    RunFailed,
    SlideOutcome,
    fetch_samples,
    generate_missing,
    quiet_thread_timeout_notice,
    resolve_template,
    scheduler_address,
    state_rows,
    untagged,
)
from flows._completion import completion_path, is_complete, write_completion
from flows._qc import publish_slide_qc, summary_numbers
from flows.manifest import Manifest, OutputFormatName, SlideEntry, load_manifest
from wsi_norm.errors import (
    ManifestError,
    OutputBusyError,
    OutputError,
    QCError,
    SlideOpenError,
    WsiNormError,
)
from wsi_norm.pipeline import FitOptions
from wsi_norm.runtime import return_freed_memory

__all__ = ["ArrayWork", "main", "normalize_archive", "prepare_target", "process_slide"]

FLOW_NAME = "normalize-archive"
SUMMARY_KEY = "normalize-archive-summary"
PROGRESS_KEY = "normalize-archive-progress"
#: Outcome of a slide whose outputs another run is writing (not a failure, nothing written).
BUSY = "skipped (busy)"
T = TypeVar("T")


def _retry_unless_permanent(task: Any, task_run: Any, state: State) -> bool:
    """Retry I/O failures, not errors that will recur (a corrupt slide, no tissue, bad input),
    nor a slide's timeout (a TimeoutError is an OSError)."""
    try:
        state.result()
    except OutputBusyError:
        return False  # another run holds the output: reported as busy, not retried
    except TimeoutError:
        return False
    except SlideOpenError:
        return False  # missing, unreadable or unsupported: it will fail the same way again
    except WsiNormError as exc:
        return isinstance(exc, OSError)  # a read or write that failed (network storage, disk full)
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - any other exception is a bug: do not retry it
        return False
    return False


@task(name="load-manifest", cache_policy=NO_CACHE)
def load_manifest_task(path: str) -> Manifest:
    """Validate the manifest (before any work) and resolve its slides."""
    return load_manifest(path)


@task(name="fetch-sample", cache_policy=NO_CACHE)
def fetch_sample_task(manifest: Manifest) -> Manifest:
    """Fetch or generate the public sample slide a site names, when missing (I/O)."""
    m = fetch_samples(manifest)
    for entry in m.slides:
        if entry.sample:
            get_run_logger().info("sample slide of site %s: %s", entry.site, entry.source)
    return m


@task(name="generate-slides", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_retry_unless_permanent)
def generate_slides_task(manifest: Manifest) -> list[str]:
    """Render the manifest's generated slides that are missing (I/O)."""
    made = generate_missing(manifest)
    get_run_logger().info("generated %d slide(s)", len(made))
    return [str(p) for p in made]


@task(name="prepare-target", cache_policy=NO_CACHE)
def prepare_target(manifest: Manifest, name: str | None) -> Any:
    """The target :class:`~wsi_norm.stain.template.Template` of ``name`` (None: the method's default)."""
    if name is None:
        return None
    return resolve_template(manifest, name)


# Task-run names are templates of the tasks' own parameters: a per-slide ``with_options`` copies
# the task, and each copy re-reads the function's source (~50 ms a slide on these machines).
@task(name="fit-slide", cache_policy=NO_CACHE, task_run_name="fit {label}")
def fit_task(label: str, source: str, method: str, params: dict[str, Any], n_pixels: int, seed: int) -> Any:
    """Slide-wide fit of the source statistics (``wsi_norm.pipeline.fit_slide``); ``label`` names
    the task run (``site/slide``)."""
    from wsi_norm.pipeline import fit_slide

    return fit_slide(source, method=method, params=params, n_pixels=n_pixels, seed=seed)


@task(name="normalize-slide", cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_permanent,
      task_run_name="write {entry.site}/{entry.source.name} ({fmt})")
def normalize_task(
    entry: SlideEntry, fmt: OutputFormatName, manifest: Manifest, target: Any, source_fit: Any,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Normalize one slide and write one output format (``wsi_norm.pipeline.normalize_slide``; I/O,
    retried); ``progress(done, total)`` hears of its level-0 chunks."""
    from wsi_norm.pipeline import normalize_slide

    out = manifest.confine(entry.outputs[fmt])  # no link planted under output_root since validation
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # the manifest's output layout
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot create the output folder: {exc}") from exc
    result = normalize_slide(
        entry.source,
        out,
        method=manifest.method,
        target=target,
        params=manifest.params,
        weights=manifest.weights,
        overwrite=True,  # only reached when the output is missing or stale
        progress=progress,
        source_fit=source_fit,
        glass="keep" if manifest.model.keep_glass else "target",
        force=manifest.model.force,
        fit=FitOptions(n_pixels=manifest.model.fit.n_pixels, seed=manifest.model.fit.seed),
        writer=manifest.writer(fmt),
    )
    get_run_logger().info("%s: wrote %s", entry.source.name, out)
    return result


@task(name="qc-slide", cache_policy=NO_CACHE, task_run_name="qc {entry.site}/{entry.source.name}")
def qc_task(entry: SlideEntry, manifest: Manifest, target: Any, results: list[Any], seconds: float) -> dict[str, Any]:
    """QC metrics and artifacts of one normalized slide."""
    return publish_slide_qc(entry, manifest=manifest, target=target, results=results, seconds=seconds)


def _is_current(entry: SlideEntry, manifest: Manifest, target: Any) -> bool:
    """Every output current and undamaged, and the completion record (written after QC) matching."""
    from wsi_norm.pipeline import output_is_current

    return all(
        output_is_current(
            out,
            source=entry.source,
            method=manifest.method,
            params=manifest.params,
            target=target,
            weights=manifest.weights,
            glass="keep" if manifest.model.keep_glass else "target",
            fit=FitOptions(n_pixels=manifest.model.fit.n_pixels, seed=manifest.model.fit.seed),
            writer=manifest.writer(fmt),
        )
        for fmt, out in entry.outputs.items()
    ) and is_complete(manifest, entry)


@contextmanager
def _claim_outputs(entry: SlideEntry) -> Iterator[None]:
    """Hold the claims on every output of ``entry`` (raises OutputBusyError if one is taken)."""
    from wsi_norm.writers.atomic import claim_output

    with ExitStack() as claims:
        for out in entry.outputs.values():
            try:
                out.parent.mkdir(parents=True, exist_ok=True)  # the manifest's output layout
            except OSError as exc:
                raise OutputError(f"{out.parent}: cannot create the output folder: {exc}") from exc
            claims.enter_context(claim_output(out))
        yield


def _unvisited(value: T) -> T:
    """``value`` wrapped in Prefect's ``quote``: passed to a task as it is, without Prefect walking
    it for futures (typed as the value: the task receives the value itself)."""
    return cast(T, quote(value))


@functools.cache
def _normalize_with_retries(retries: int, delay_s: float) -> Any:
    """``normalize_task`` with a manifest's retries: one copy per setting and process."""
    return normalize_task.with_options(retries=retries, retry_delay_seconds=delay_s)


@task(name="process-slide", cache_policy=NO_CACHE, task_run_name="normalize {entry.site}/{entry.source.name}")
def process_slide(entry: SlideEntry, manifest: Manifest, target: Any) -> SlideOutcome:
    """Skip a current slide, or run fit -> normalize -> QC as nested task runs, then record it complete.

    The slide's output claims are held throughout: a slide another run holds is "skipped (busy)".
    A slide that is worked on gets two artifacts: its progress (every output's tiles, reaching
    100 %) and its QC report.
    """
    logger = get_run_logger()
    outputs = [str(p) for p in entry.outputs.values()]
    label = f"{entry.site}/{entry.source.name}"
    try:
        with _claim_outputs(entry), untagged():  # this run carries the slide's tags, its nested runs none
            if _is_current(entry, manifest, target):
                logger.info("%s: outputs and QC are current, skipped", entry.source.name)
                return SlideOutcome(entry.site, entry.source.name, "skipped (current)", outputs=outputs)
            completion_path(manifest, entry).unlink(missing_ok=True)  # no longer true from here on
            start = time.perf_counter()
            m = manifest.model
            progress = ProgressArtifact(
                artifact_key("progress", entry.site, entry.name),
                description=f"{label}: level-0 tiles written, {len(entry.outputs)} output(s)",
            )
            source_fit = None  # none and stainnet fit nothing: a fixed (identity or learned) map
            if manifest.method not in ("none", "stainnet"):
                source_fit = fit_task(label, str(entry.source), manifest.method, _unvisited(manifest.params), m.fit.n_pixels,
                                      m.fit.seed)
            results = []
            normalize = _normalize_with_retries(m.retries, m.retry_delay_s)
            for k, fmt in enumerate(entry.outputs):
                results.append(normalize(entry, fmt, _unvisited(manifest), _unvisited(target), _unvisited(source_fit),
                                         progress.part(k, len(entry.outputs))))
            seconds = time.perf_counter() - start
            metrics = qc_task(entry, _unvisited(manifest), _unvisited(target), _unvisited(results), seconds)
            write_completion(manifest, entry, qc_dir=metrics["qc_dir"])  # last: outputs and QC are done
    except OutputBusyError as exc:
        logger.warning("%s: skipped: %s", entry.source.name, exc)
        return SlideOutcome(entry.site, entry.source.name, BUSY, reason=str(exc), outputs=outputs)
    return SlideOutcome(entry.site, entry.source.name, "normalized", outputs=outputs, seconds=seconds,
                        qc=summary_numbers(metrics))


def _run_progress(done: int, total: int, counts: dict[str, int], elapsed_s: float) -> tuple[float, str]:
    """The run's progress: percentage and a line (done, by outcome, remaining, ETA)."""
    parts = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()) if n)
    line = f"{done} of {total} slides done" + (f" ({parts})" if parts else "")
    if 0 < done < total:
        eta = elapsed_s / done * (total - done)
        line += f"; {total - done} remaining, ETA {_duration(eta)}"
    return (100.0 if total == 0 else 100.0 * done / total), line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ArrayWork:
    """Where a run's array work goes: a ``distributed`` client, or this process's threads.

    With ``address`` (a scheduler to join) or ``dashboard`` (a local cluster to watch), the
    client starts at once. Otherwise nothing is started: dask's threaded scheduler
    (:func:`wsi_norm.cluster.dask_scheduler` with ``embedded_cluster=False``: no ``distributed``
    import, no sockets; a client already active in the process is used instead) serves the
    computations that use dask, each on at most ``threads`` threads, and a slide too large to
    hold in memory is computed on plain threads (:func:`wsi_norm.pipeline.runs_on_threads`), as
    the ``wsi-norm`` command computes it: the same bytes as on a cluster, without its start-up
    and its scheduler round trips.

    Everything started is closed with ``stack``.
    """

    def __init__(self, stack: ExitStack, address: str | None, *, dashboard: bool, threads: int) -> None:
        from wsi_norm.cluster import dask_client, dask_scheduler

        self.client: Any = None
        if address or dashboard:
            self.client = stack.enter_context(dask_client(address, dashboard=dashboard))
        else:
            self.client = stack.enter_context(dask_scheduler(None, threads=threads, embedded_cluster=False))


def _blas_threads(threads: int) -> AbstractContextManager[object]:
    """BLAS (OpenBLAS, MKL) limited to ``threads`` threads, process-wide, while active: the run's
    slides already fill the cores, and BLAS threads on top of them spin and contend (the
    fit's and the QC measurement's ``(N, 3) @ (3, 2)`` products took ~0.3 s each at 1M pixels
    with two BLAS threads on a busy 2-core machine; the results are the same bytes)."""
    from threadpoolctl import threadpool_limits

    limits: AbstractContextManager[object] = threadpool_limits(limits=threads, user_api="blas")
    return limits


@flow(name=FLOW_NAME, log_prints=False)
def normalize_archive(manifest: str = "data_manifest.yaml", scheduler: str | None = None, dashboard: bool = False) -> Any:
    """Normalize every slide of ``manifest`` that is not current.

    Parameters
    ----------
    manifest : str
        Path of the data manifest (see :mod:`flows.manifest`).
    scheduler : str, optional
        Dask scheduler address; default ``WSI_NORM_SCHEDULER``, else this process's threads
        (:class:`ArrayWork`).
    dashboard : bool
        Start the local cluster at once and serve its dask dashboard on 127.0.0.1 (default: none).

    Returns
    -------
    list of dict, or a Failed state
        One summary row per slide; the run ends Failed when any slide failed (a slide that
        takes longer than the manifest's ``slide_timeout_s`` fails as "timed out").
    """
    return_freed_memory()  # slides stream through this process (see wsi_norm.runtime)
    quiet_thread_timeout_notice()  # the per-slide timeout is ours and documented
    logger = get_run_logger()
    with untagged():  # the run's own task runs; each slide's one run is tagged below
        return _normalize_archive(manifest, scheduler, dashboard, logger)


def _normalize_archive(manifest: str, scheduler: str | None, dashboard: bool, logger: Any) -> Any:
    """The body of :func:`normalize_archive` (inside :func:`~flows._common.untagged`)."""
    from wsi_norm.cluster import dashboard_url

    m = load_manifest_task(manifest)
    if any(s.sample for s in m.slides):
        m = fetch_sample_task(m)
    if m.model.target is None and m.method not in ("none", "stainnet"):
        raise ManifestError(
            f"{m.path}: method {m.method!r} needs a target: declare a template and name it in 'target'"
        )
    if m.generated:
        generate_slides_task.with_options(retries=m.model.retries, retry_delay_seconds=m.model.retry_delay_s)(m)
    outcomes: list[SlideOutcome] = []
    with ExitStack() as stack:
        # this process's threads: each computation on its share of the cores (concurrency slides at once)
        threads = max(1, (os.cpu_count() or 1) // m.model.concurrency)
        stack.enter_context(_blas_threads(threads))
        work = ArrayWork(stack, scheduler_address(scheduler), dashboard=dashboard, threads=threads)
        if dashboard:
            logger.info("dask dashboard: %s", dashboard_url(work.client))
        target = prepare_target(m, m.model.target)
        pending = list(m.slides)
        running: dict[PrefectFuture[Any], SlideEntry] = {}
        run_progress = ProgressArtifact(PROGRESS_KEY, description=f"0 of {len(pending)} slides done",
                                        min_interval_s=2.0, min_step_pct=0.0, create_now=True)
        started = time.monotonic()
        process = process_slide.with_options(timeout_seconds=m.model.slide_timeout_s)  # once a run
        while pending or running:
            while pending and len(running) < m.model.concurrency:
                entry = pending.pop(0)
                with tags(f"site:{entry.site}", f"method:{m.method}"):  # this slide's run only
                    # quote(): Prefect would otherwise walk every parameter for futures on each
                    # task run, and the manifest holds every slide (0.1 s a slide at 40 slides,
                    # growing with the archive); the nested task runs quote theirs too
                    future = process.submit(entry, _unvisited(m), _unvisited(target))
                running[future] = entry
            done = next(as_completed(list(running)))
            entry = running.pop(done)
            try:
                outcomes.append(done.result())
            except OutputBusyError as exc:  # another run is writing it: theirs to finish
                logger.warning("%s: %s", entry.source, exc)
                outcomes.append(SlideOutcome(entry.site, entry.source.name, BUSY, reason=str(exc)))
            except QCError as exc:  # wrong colours would have been written: a person must look
                logger.error("%s: needs review: %s", entry.source, exc)
                outcomes.append(SlideOutcome(entry.site, entry.source.name, "needs review", reason=f"QC gate: {exc}"))
            except TimeoutError:  # the task's timeout (prefect's TaskRunTimeoutError)
                reason = f"timed out: took longer than slide_timeout_s = {m.model.slide_timeout_s:g} s"
                logger.error("%s: failed: %s", entry.source, reason)
                outcomes.append(SlideOutcome(entry.site, entry.source.name, "failed", reason=reason))
            except Exception as exc:  # noqa: BLE001 - a failed slide is reported, the others go on
                reason = f"{type(exc).__name__}: {exc}"
                logger.error("%s: failed: %s", entry.source, reason)
                outcomes.append(SlideOutcome(entry.site, entry.source.name, "failed", reason=reason))
            counts = Counter(o.outcome for o in outcomes)
            pct, line = _run_progress(len(outcomes), len(m.slides), counts, time.monotonic() - started)
            run_progress.report(pct, line, force=not (pending or running))
    order = {(s.site, s.source.name): i for i, s in enumerate(m.slides)}
    outcomes.sort(key=lambda o: order[(o.site, o.slide)])
    rows = [o.row() for o in outcomes]
    n_failed = sum(o.outcome == "failed" for o in outcomes)
    n_review = sum(o.outcome == "needs review" for o in outcomes)
    create_table_artifact(rows, key=SUMMARY_KEY,
                          description=f"{len(rows)} slides, {n_failed} failed, {n_review} need review ({m.path})")
    create_markdown_artifact(
        f"# normalize-archive\n\nmanifest `{m.path}`, method `{m.method}`, outputs under `{m.output_root}`\n\n"
        + markdown_table(rows),
        key=SUMMARY_KEY + "-md",
    )
    if n_failed or n_review:
        review = f", {n_review} need review" if n_review else ""
        message = f"{n_failed} of {len(rows)} slides failed{review}"
        return Failed(message=message, data=RunFailed(message, rows))
    return Completed(message=f"{len(rows)} slides done", data=rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: run once, or ``--serve`` as a deployment of a Prefect server."""
    parser = argparse.ArgumentParser(prog="python -m flows.normalize_archive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="data_manifest.yaml")
    parser.add_argument("--scheduler", default=None, help="dask scheduler address (default: WSI_NORM_SCHEDULER or local)")
    parser.add_argument("--dashboard", action="store_true", help="serve the local dask dashboard on 127.0.0.1")
    parser.add_argument("--serve", nargs="?", const="local", default=None, metavar="NAME",
                        help="serve as deployment NAME (needs PREFECT_API_URL) instead of running once")
    args = parser.parse_args(argv)
    configure_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.serve:  # with the API Prefect would use (a deployment is served to a configured one)
        with prefect_api():
            normalize_archive.serve(name=args.serve, parameters={
                "manifest": args.manifest, "scheduler": args.scheduler, "dashboard": args.dashboard})
        return 0
    try:
        m = load_manifest(args.manifest)
    except WsiNormError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # sites are tagged per slide task, not on the whole run
    with prefect_api(), tags(f"method:{m.method}"):
        # Prefect's overloads type a flow returning Any, called with return_state=True, as an
        # Awaitable; this flow is sync and returns its final State
        state = cast("State[Any]", normalize_archive(manifest=args.manifest, scheduler=args.scheduler,
                                                     dashboard=args.dashboard, return_state=True))
    for row in state_rows(state):
        print(f"{row['outcome']:>18}  {row['site']}/{row['slide']}  {row['outputs'] or row['reason']}")
    print(f"outputs:   {m.output_root}/<site>/")
    print(f"QC images and metrics: {m.output_root / 'qc'}/<site>/<slide>/ (before_after.png, "
          "stain_vectors.png, metrics.json, summary.md)")
    print(f"Prefect artifacts: {SUMMARY_KEY!r} and 'qc-<site>-<slide>*' "
          f"({'in the Prefect UI' if _has_server() else 'in the local Prefect database; `prefect server start` shows them'})")
    print(f"state:     {state.name}: {state.message}")
    return 0 if state.is_completed() else 1


def _has_server() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


if __name__ == "__main__":
    sys.exit(main())
