"""Benchmark ``normalize-archive`` at archive scale against a real Prefect server.

What it measures, per archive size N (``--sizes``):

* **wall_s**: the flow call in a fresh child process, from ``normalize_archive(...)`` to its
  return (flow-run creation, manifest validation, the in-process dask cluster, every slide,
  the summary artifacts).  Slide generation and interpreter start-up are not timed.
* **work_s**: the slides' own work: the sum of the run times (``total_run_time``, the time a
  task run spent Running, as the server recorded it) of the leaf task runs ``fit-slide``,
  ``normalize-slide`` (the write) and ``qc-slide`` (by task key).  Process-slide task runs, which wrap them,
  are not counted.
* **overhead_s_per_slide** = ``(wall_s - work_s / concurrency) / N``: what Prefect
  orchestration (task-run creation, state events, artifact calls, logs) and the flow's own
  bookkeeping add per slide, constants included.  With ``--concurrency 1`` (the default) it is
  simply ``(wall - work) / N``.  **marginal_s_per_slide** is the least-squares slope of
  ``wall - work / concurrency`` against N over all sizes run: the per-slide cost with the
  constants (server round trips at start, dask cluster start, summary) removed.
* **peak_rss_mib**: ``VmHWM`` of the flow's child process (``/proc/self/status``, so the
  parent's peak does not leak in), and ``rss_end_mib`` (``VmRSS`` after the flow returned).
* **http**: every HTTP request of the flow process to the server, by route: count and seconds
  (blocking calls of the slide threads and the background log and event batches alike).
* **artifacts**: every artifact of the flow run read back from the server (``POST
  /api/artifacts/filter`` page by page), total and per-slide.

Slides are small generated ones (``--slide-px`` square, procedural texture, JPEG, one tile),
rendered once into ``--workdir/slides`` and shared by every size; each size gets its own
manifest and output folder, ``method: none`` by default (a decode and re-encode: the per-slide
work is tiny, so orchestration dominates) and TIFF output, half the slides in each of two sites.

The server is ``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME
under ``--workdir`` (or ``--api-url`` to use a running one).  ``--profile`` runs the flow of the
first size under cProfile in every thread (``threading.setprofile``) and prints the top entries
by cumulative time; ``--trace-memory`` runs every flow under ``tracemalloc`` and prints
the source lines whose allocations are still alive after the flow returned, largest first
(compare two sizes to see what grows with N).

Example::

    python bench/bench_archive_scale.py --sizes 50 100 200 500 --workdir /tmp/archive-scale \
        --json bench-out/archive-scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from wsi_norm.testing.prefect_server import client_env, local_prefect_server

__all__ = ["generate_slides", "measure", "prefect_server", "read_run", "slope", "write_manifest"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-a", "site-b")
PAGE = 200


# ----------------------------------------------------------------------------- the server


def server_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment of a process that talks to the server at ``api_url``."""
    return client_env(home, api_url, python_path=[REPO_ROOT])


@contextmanager
def prefect_server(home: Path, *, timeout_s: float = 180.0) -> Iterator[dict[str, str]]:
    """``prefect server start`` on a free 127.0.0.1 port with PREFECT_HOME ``home``; yields the
    environment of its clients, and stops the server (its process group) on exit."""
    with local_prefect_server(home, timeout_s=timeout_s, python_path=[REPO_ROOT]) as env:
        yield env


# ----------------------------------------------------------------------------- slides and manifests


def generate_slides(folder: Path, n: int, *, slide_px: int, tile_px: int | None = None) -> list[Path]:
    """``n`` small procedural slides ``s-0000.tiff`` ... in ``folder`` (existing ones are kept),
    each stored as one tile (``tile_px`` None) or in tiles of ``tile_px``, with a pyramid then."""
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    stains = sorted(SITE_STAINS)
    for i in range(n):
        path = folder / f"s-{i:04d}.tiff"
        if not path.exists():
            generate_slide(path, width=slide_px, height=slide_px, seed=i, tile_px=tile_px or slide_px,
                           stain_matrix=SITE_STAINS[stains[i % len(stains)]], texture="procedural",
                           min_level_px=slide_px if tile_px is None else 1024)
        paths.append(path)
    return paths


def write_manifest(run_dir: Path, slides: Sequence[Path], *, method: str, concurrency: int) -> Path:
    """A manifest in ``run_dir`` for ``slides`` (alternating between two sites), TIFF output
    under ``run_dir/out``; the slides' folder is a declared read-only root."""
    run_dir.mkdir(parents=True, exist_ok=True)
    root = slides[0].parent
    by_site: dict[str, list[str]] = {site: [] for site in SITES}
    for i, path in enumerate(slides):
        by_site[SITES[i % len(SITES)]].append(os.path.relpath(path, run_dir))
    sites = {site: {"slides": paths} for site, paths in by_site.items() if paths}
    doc: dict[str, Any] = {
        "version": 1,
        "roots": {"slides": os.path.relpath(root, run_dir)},
        "output_root": "out",
        "method": method,
        "formats": ["tiff"],
        "fit": {"n_pixels": 20000},
        "sites": sites,
        "concurrency": concurrency,
    }
    if method not in ("none", "stainnet"):
        doc["templates"] = {"ref": {"slides": [os.path.relpath(slides[0], run_dir)]}}
        doc["target"] = "ref"
    path = run_dir / "manifest.yaml"
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")  # JSON is YAML
    return path


# ----------------------------------------------------------------------------- the flow's child process


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


_UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _count_http(calls: dict[str, list[float]]) -> None:
    """Count every HTTP request of this process and its time, by method and route (UUIDs as
    ``{id}``), in ``calls`` (route -> [count, seconds]); requests of background threads (log and
    event batches) are counted too."""
    import re
    import threading

    import httpx

    lock = threading.Lock()

    def key(request: httpx.Request) -> str:
        return f"{request.method} {re.sub(_UUID_RE, '{id}', request.url.path)}"

    def add(route: str, seconds: float) -> None:
        with lock:
            entry = calls.setdefault(route, [0.0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        t0 = time.perf_counter()
        try:
            return sync_send(self, request, **kwargs)
        finally:
            add(key(request), time.perf_counter() - t0)

    async def asend(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        t0 = time.perf_counter()
        try:
            return await async_send(self, request, **kwargs)
        finally:
            add(key(request), time.perf_counter() - t0)

    httpx.Client.send = send  # type: ignore[method-assign]
    httpx.AsyncClient.send = asend  # type: ignore[method-assign]


def child_main(manifest: str, result_path: str, profile: bool, trace_memory: bool = False) -> int:
    """Run the flow once in this (fresh) process and write its figures as JSON."""
    import tracemalloc
    from typing import cast

    from prefect.client.schemas.objects import State

    from flows import configure_process
    from flows._common import state_rows
    from flows.normalize_archive import normalize_archive

    configure_process()
    http: dict[str, list[float]] = {}
    _count_http(http)
    profiler = None
    if profile:
        import cProfile
        import threading

        profiler = cProfile.Profile()
        # one profiler for every thread: Prefect runs submitted task runs in worker threads
        threading.setprofile(lambda *a: profiler.enable() if profiler is not None else None)
        profiler.enable()
    if trace_memory:
        tracemalloc.start(1)
    start = time.perf_counter()
    state = cast("State[Any]", normalize_archive(manifest=manifest, return_state=True))
    wall_s = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(result_path + ".prof")
    rows = state_rows(state)
    retained: list[str] = []
    if trace_memory:
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        retained = [f"{stat.size / 2**20:8.2f} MiB {stat.count:8d} blocks  {stat.traceback.format()[0].strip()}"
                    for stat in snapshot.statistics("lineno")[:25]]
    result = {
        "wall_s": wall_s,
        "state": state.name,
        "message": state.message,
        "flow_run_id": str(state.state_details.flow_run_id),
        "peak_rss_kib": _proc_status_kib("VmHWM"),
        "rss_end_kib": _proc_status_kib("VmRSS"),
        "outcomes": {o: sum(r["outcome"] == o for r in rows) for o in {r["outcome"] for r in rows}},
        "rows": len(rows),
        "retained_after_flow": retained,
        "http": {route: {"count": int(c), "seconds": round(t, 3)} for route, (c, t) in
                 sorted(http.items(), key=lambda item: -item[1][1])},
    }
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


def run_flow(env: dict[str, str], manifest: Path, *, profile: bool, timeout_s: float,
             trace_memory: bool = False) -> dict[str, Any]:
    """The flow run of ``manifest`` in a fresh child process; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(manifest), str(result)]
        if profile:
            cmd.append("--profile")
        if trace_memory:
            cmd.append("--trace-memory")
        log = manifest.with_name("flow.log")
        with log.open("wb") as out:
            proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"flow child failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
        figures: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
        prof = result.with_name("result.json.prof")
        if prof.exists():
            figures["profile"] = str(manifest.with_name("flow.prof"))
            prof.replace(figures["profile"])
        return figures


# ----------------------------------------------------------------------------- reading the run back


async def _filter_all(client: Any, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object a ``POST /<route>/filter`` matches, page by page."""
    found: list[dict[str, Any]] = []
    while True:
        response = await client.request("POST", f"/{route}/filter", json={**body, "limit": PAGE, "offset": len(found)})
        page = response.json()
        found.extend(page)
        if len(page) < PAGE:
            return found


async def read_run(api_url: str, flow_run_id: str, *, expected_leaf_tasks: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """Task runs and artifacts of a finished flow run, read back from the server.

    Task-run states reach the server as events, after the flow returns: wait (up to
    ``timeout_s``) until ``expected_leaf_tasks`` leaf task runs are final.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    keys = leaf_task_keys()
    run_filter = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deadline = time.monotonic() + timeout_s
            while True:
                task_runs = await _filter_all(client, "task_runs", run_filter)
                leaves = [t for t in task_runs if t["task_key"] in keys]
                final = [t for t in leaves if t["state_type"] in ("COMPLETED", "FAILED")]
                if len(final) >= expected_leaf_tasks or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            flow_run = await client.read_flow_run(UUID(flow_run_id))
            artifacts = await _filter_all(
                client, "artifacts", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "KEY_ASC"})
    by_kind: dict[str, float] = {}
    for t in final:
        kind = keys[t["task_key"]]
        by_kind[kind] = by_kind.get(kind, 0.0) + float(t["total_run_time"])
    kinds: dict[str, int] = {}
    for a in artifacts:
        kinds[a["type"]] = kinds.get(a["type"], 0) + 1
    return {
        "flow_run_name": flow_run.name,
        "task_runs": len(task_runs),
        "leaf_task_runs_final": len(final),
        "work_s": sum(by_kind.values()),
        "work_s_by_task": by_kind,
        "artifacts": len(artifacts),
        "artifacts_by_type": kinds,
        "artifact_keys": sorted({a["key"] for a in artifacts if a["key"]}),
        "artifact_ids": {a["key"]: a["id"] for a in artifacts if a["key"]},
    }


def leaf_task_keys() -> dict[str, str]:
    """Task key -> task name of the leaf tasks whose run time is a slide's own work."""
    from flows.normalize_archive import fit_task, normalize_task, qc_task

    return {t.task_key: t.name for t in (fit_task, normalize_task, qc_task)}


def leaf_tasks_per_slide(method: str) -> int:
    """Leaf task runs of one normalized slide with one output format."""
    return 2 if method in ("none", "stainnet") else 3


# ----------------------------------------------------------------------------- the benchmark


def measure(env: dict[str, str], manifest: Path, n: int, *, method: str, concurrency: int,
            profile: bool = False, trace_memory: bool = False, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``manifest`` (``n`` slides) once and return every figure of the module docstring."""
    figures = run_flow(env, manifest, profile=profile, timeout_s=timeout_s, trace_memory=trace_memory)
    figures.update(asyncio.run(read_run(env["PREFECT_API_URL"], figures["flow_run_id"],
                                        expected_leaf_tasks=n * leaf_tasks_per_slide(method))))
    figures["n"] = n
    figures["concurrency"] = concurrency
    figures["method"] = method
    figures["overhead_s_per_slide"] = (figures["wall_s"] - figures["work_s"] / concurrency) / n
    figures["artifacts_per_slide"] = figures["artifacts"] / n
    figures["peak_rss_mib"] = figures["peak_rss_kib"] / 1024
    figures["rss_end_mib"] = figures["rss_end_kib"] / 1024
    return figures


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (0 with fewer than two distinct xs)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def print_profile(path: str, top: int = 40) -> None:
    import pstats

    stats = pstats.Stats(path)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--method", default="none")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--slide-px", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/archive-scale"))
    parser.add_argument("--api-url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--profile", action="store_true", help="profile the flow of the first size")
    parser.add_argument("--trace-memory", action="store_true",
                        help="tracemalloc in the flow process: print the lines whose allocations are still alive "
                             "after the flow, for every size (slow; its timings are not comparable)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MANIFEST", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.profile, args.trace_memory)

    workdir: Path = args.workdir.resolve()
    t0 = time.perf_counter()
    slides = generate_slides(workdir / "slides", max(args.sizes), slide_px=args.slide_px)
    sys.stderr.write(f"{len(slides)} slides of {args.slide_px}² px ready in {time.perf_counter() - t0:.1f} s\n")
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as home:
        if args.api_url:
            server: Any = _given_server(Path(home), args.api_url)
        else:
            server = prefect_server(Path(home))
        with server as env:
            for k, n in enumerate(args.sizes):
                run_dir = workdir / f"{args.method}-c{args.concurrency}-n{n}-{int(time.time())}"
                manifest = write_manifest(run_dir, slides[:n], method=args.method, concurrency=args.concurrency)
                fig = measure(env, manifest, n, method=args.method, concurrency=args.concurrency,
                              profile=args.profile and k == 0,
                              trace_memory=args.trace_memory)
                results.append(fig)
                print(f"N={n:4d}  wall {fig['wall_s']:7.1f} s  work {fig['work_s']:6.1f} s  "
                      f"overhead {fig['overhead_s_per_slide']:.3f} s/slide  peak RSS {fig['peak_rss_mib']:6.0f} MiB  "
                      f"end RSS {fig['rss_end_mib']:6.0f} MiB  artifacts {fig['artifacts']} "
                      f"({fig['artifacts_per_slide']:.2f}/slide)  {fig['state']}: {fig['message']}", flush=True)
                if "profile" in fig:
                    print_profile(fig["profile"])
                for block in fig.pop("retained_after_flow", []):
                    print(block)
    ns = [float(r["n"]) for r in results]
    summary = {
        "marginal_s_per_slide": slope(ns, [r["wall_s"] - r["work_s"] / r["concurrency"] for r in results]),
        "wall_slope_s_per_slide": slope(ns, [r["wall_s"] for r in results]),
        "peak_rss_slope_mib_per_100_slides": 100 * slope(ns, [r["peak_rss_mib"] for r in results]),
        "artifacts_per_slide_slope": slope(ns, [float(r["artifacts"]) for r in results]),
    }
    print("  ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": results, "summary": summary, "argv": sys.argv[1:]}, indent=1),
                             encoding="utf-8")
    return 0


@contextmanager
def _given_server(home: Path, api_url: str) -> Iterator[dict[str, str]]:
    yield server_env(home, api_url)


if __name__ == "__main__":
    sys.exit(main())

