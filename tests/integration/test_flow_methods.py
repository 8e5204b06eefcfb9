"""Every method through ``normalize-archive``, the per-slide timeout, and loopback-only services.

Small generated slides (512-1024 px) against Prefect's local test API (its own PREFECT_HOME).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import psutil
import pytest

from flows._common import state_rows

if TYPE_CHECKING:
    # the flows return Any, so Flow.__call__(return_state=True) picks the async overload
    from prefect import State

REPO_ROOT = Path(__file__).resolve().parents[2]
STAINNET_WEIGHTS = "StainNet-Public_layer3_ch32.pth"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with (
        temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield home


FIXED_MAP = """
version: 1
roots: {shared: SHARED}
output_root: out
method: METHOD
formats: [ome-zarr, tiff]
generate:
  - {path: gen/a-1.tiff, stain: site-a, width: 1024, height: 768, seed: 1, tile_px: 256}
  - {path: gen/b-1.tiff, stain: site-b, width: 512, height: 512, seed: 2, tile_px: 256}
sites:
  site-a: {slides: ['gen/a-*.tiff']}
  site-b: {slides: ['gen/b-*.tiff']}
concurrency: 2
retry_delay_s: 0
"""


@pytest.mark.parametrize("method", ["none", "stainnet"])
def test_fixed_map_methods_run_through_normalize_archive(prefect_api: Path, tmp_path: Path, shared_data: Path,
                                                         method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``none`` (identity) and ``stainnet`` (the published weights) fit nothing: the flow writes
    both formats and QC for every slide, and a second run skips them as current. The OME-Zarr
    outputs are computed block by block on plain threads (as the CLI computes a slide too large
    to hold in memory): no dask cluster starts, and the flow's process listens on nothing."""
    import threading

    from flows.normalize_archive import normalize_archive
    from wsi_norm.slide import open_slide
    from wsi_norm.writers import read_level, read_provenance

    text = FIXED_MAP.replace("SHARED", str(shared_data)).replace("METHOD", method)
    if method == "stainnet":
        text += f"weights: {shared_data / 'stainnet' / STAINNET_WEIGHTS}\n"
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(text), encoding="utf-8")

    monkeypatch.delenv("WSI_NORM_SCHEDULER", raising=False)
    me, seen, running = psutil.Process(), set(), threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            seen.update(_listening(me))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        state = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    finally:
        running.clear()
        sampler.join()
    rows = {r["slide"]: r for r in state_rows(state)}
    assert state.is_completed(), (state.message, rows)
    assert seen == set(), seen
    assert {s: r["outcome"] for s, r in rows.items()} == {"a-1.tiff": "normalized", "b-1.tiff": "normalized"}
    for site, stem, shape in (("site-a", "a-1", (768, 1024, 3)), ("site-b", "b-1", (512, 512, 3))):
        for suffix in (".ome.zarr", ".tiff"):
            out = tmp_path / "out" / site / (stem + suffix)
            prov = read_provenance(out)
            assert prov["method"] == method and prov["source_fit"] is None and prov["target"] is None
            level0 = read_level(out, 0)
            assert level0.shape == shape
        with open_slide(tmp_path / "gen" / f"{stem}.tiff") as slide:
            source = slide.read_region(0, x=0, y=0, width=shape[1], height=shape[0])
        zarr0 = read_level(tmp_path / "out" / site / f"{stem}.ome.zarr", 0)
        if method == "none":
            np.testing.assert_array_equal(zarr0, source)  # the identity, through the same read/write path
        else:
            assert prov["weights"]["sha256"] and np.abs(zarr0.astype(int) - source).mean() > 2.0  # recoloured
        assert (tmp_path / "out" / "qc" / site / stem / "metrics.json").is_file()

    again = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    assert {r["slide"]: r["outcome"] for r in state_rows(again)} == {
        "a-1.tiff": "skipped (current)", "b-1.tiff": "skipped (current)"}


TIMEOUT = """
version: 1
output_root: out
method: none
formats: [tiff]
generate:
  - {path: gen/fast.tiff, stain: site-a, width: 512, height: 512, seed: 1, tile_px: 256}
  - {path: gen/slow.tiff, stain: site-a, width: 512, height: 512, seed: 2, tile_px: 256}
sites:
  site-a: {slides: [gen/fast.tiff, gen/slow.tiff]}
concurrency: 2
retries: 1
retry_delay_s: 0
slide_timeout_s: 30
"""


def test_a_slide_over_its_timeout_ends_failed_while_the_others_finish(
    prefect_api: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_norm.pipeline
    from flows.normalize_archive import normalize_archive

    real = wsi_norm.pipeline.normalize_slide
    hung: list[float] = []

    def hang_on_slow(source: Any, out: Any, **kwargs: Any) -> Any:
        if Path(source).name == "slow.tiff":  # a slide that never finishes (e.g. a reader gone astray)
            start = time.monotonic()
            hung.append(start)
            while time.monotonic() - start < 300:
                time.sleep(0.05)
        return real(source, out, **kwargs)

    monkeypatch.setattr(wsi_norm.pipeline, "normalize_slide", hang_on_slow)
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(TIMEOUT), encoding="utf-8")
    start = time.monotonic()
    state = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    seconds = time.monotonic() - start
    rows = {r["slide"]: r for r in state_rows(state)}
    assert state.is_failed() and state.message == "1 of 2 slides failed", state.message
    assert rows["fast.tiff"]["outcome"] == "normalized"
    assert rows["slow.tiff"]["outcome"] == "failed"
    assert rows["slow.tiff"]["reason"] == "timed out: took longer than slide_timeout_s = 30 s"
    assert (tmp_path / "out" / "site-a" / "fast.tiff").is_file()
    assert not (tmp_path / "out" / "site-a" / "slow.tiff").exists()
    assert len(hung) == 1  # not retried: a timeout is no I/O error to try again
    assert seconds < 200, seconds  # it did not wait for the hung slide


# ------------------------------------------------------------------ services on loopback only


def _listening(proc: psutil.Process) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_local_cluster_listens_on_loopback_only_and_serves_no_dashboard() -> None:
    import urllib.error
    import urllib.request

    from wsi_norm.cluster import dashboard_url, dask_client

    me = psutil.Process()
    before = _listening(me)
    with dask_client(threads=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        opened = _listening(me) - before
        url = dashboard_url(client)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url, timeout=10)
    assert opened and {ip for ip, _ in opened} == {"127.0.0.1"}, opened
    assert 8787 not in {port for _, port in opened}
    assert url.startswith("http://127.0.0.1:")


def test_embedded_cluster_keeps_short_histories_and_restores_the_config() -> None:
    """An archive run feeds one cluster thousands of graphs: the scheduler's and worker's
    histories are kept short (they grew the flow process by ~120 MiB over 600 slides)."""
    import dask

    from wsi_norm.cluster import dask_client

    default_log = dask.config.get("distributed.admin.log-length")
    with dask_client(threads=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        scheduler = client.cluster.scheduler  # type: ignore[union-attr]
        assert scheduler.computations.maxlen == 1
        worker = next(iter(client.cluster.workers.values()))  # type: ignore[union-attr]
        assert worker.transfer_incoming_log.maxlen == 10
    assert dask.config.get("distributed.admin.log-length") == default_log


def test_dask_scheduler_runs_small_work_on_threads_and_a_dashboard_on_a_cluster() -> None:
    import dask
    import dask.threaded
    from dask.base import compute
    from dask.delayed import delayed

    from wsi_norm.cluster import active_client, dask_scheduler

    with dask_scheduler(embedded_cluster=False) as client:
        assert client is None and active_client() is None
        assert dask.config.get("scheduler") is dask.threaded.get
        assert compute(delayed(sum)([1, 2])) == (3,)  # type: ignore[no-untyped-call]
    with dask_scheduler(embedded_cluster=False, dashboard=True, threads=1) as client:
        assert client is not None and active_client() is client
        assert client.submit(sum, [1, 2]).result() == 3
    assert active_client() is None


def test_archive_work_starts_no_cluster_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """normalize-archive without a scheduler: dask's threaded scheduler on the run's share of
    threads, no ``distributed`` client, whatever the slides' sizes (a large slide is computed on
    plain threads, :func:`wsi_norm.pipeline.runs_on_threads`); with ``dashboard``, one local
    cluster at once. Both are undone on exit."""
    import contextlib

    import dask
    import dask.threaded
    from dask.base import compute
    from dask.delayed import delayed

    from flows.normalize_archive import ArrayWork
    from wsi_norm.cluster import active_client
    from wsi_norm.pipeline import runs_on_threads

    monkeypatch.delenv("WSI_NORM_SCHEDULER", raising=False)
    before = dask.config.get("scheduler", None)
    with contextlib.ExitStack() as stack:
        work = ArrayWork(stack, None, dashboard=False, threads=1)
        assert work.client is None and active_client() is None and runs_on_threads(device="cpu")
        assert dask.config.get("scheduler") is dask.threaded.get and dask.config.get("num_workers") == 1
        assert compute(delayed(sum)([1, 2])) == (3,)  # type: ignore[no-untyped-call]
    assert dask.config.get("scheduler", None) == before
    with contextlib.ExitStack() as stack:
        work = ArrayWork(stack, None, dashboard=True, threads=1)
        assert work.client is not None and active_client() is work.client and not runs_on_threads(device="cpu")
        assert dask.config.get("scheduler") == "dask.distributed"
        assert compute(delayed(sum)([1, 2])) == (3,)  # type: ignore[no-untyped-call]
    assert active_client() is None and dask.config.get("scheduler", None) == before


def _watch_cli(args: list[str], cwd: Path, *, report_import: bool = False
               ) -> tuple[subprocess.CompletedProcess[str], set[tuple[str, int]]]:
    """Run ``wsi-norm ARGS`` and collect every socket it listens on while it runs.

    With ``report_import`` the command runs as ``python -c``, and its last stdout line says
    whether ``distributed`` was imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WSI_NORM_SCHEDULER", None)
    if not report_import:
        command = [shutil.which("wsi-norm") or str(Path(sys.executable).with_name("wsi-norm")), *args]
    else:
        code = ("import sys; from wsi_norm.cli import main; code = main(sys.argv[1:]); "
                "print('distributed imported:', 'distributed' in sys.modules); sys.exit(code)")
        command = [sys.executable, "-c", code, *args]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int]] = set()
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            seen |= _listening(watched)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


@pytest.fixture(scope="module")
def cli_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_norm.testing.synthetic import generate_slide

    path = tmp_path_factory.mktemp("cli") / "slide.tiff"
    generate_slide(path, width=3072, height=3072, seed=3, tile_px=512)
    return path


def test_cli_run_on_the_embedded_cluster_listens_on_loopback_only(cli_slide: Path, tmp_path: Path) -> None:
    done, seen = _watch_cli(["normalize", str(cli_slide), "--method", "none", "-o", str(tmp_path / "o.tiff"), "-q",
                             "--scheduler", "local"], tmp_path, report_import=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "distributed imported: True", done.stdout
    assert seen, "no listening socket seen: the run ended before one was sampled"
    assert {ip for ip, _ in seen} == {"127.0.0.1"}, seen
    assert "already in use" not in done.stderr and "dashboard" not in done.stderr, done.stderr


@pytest.mark.parametrize("method", ["none", "macenko"])
def test_cli_starts_no_cluster_and_listens_on_nothing(
    cli_slide: Path, tmp_path: Path, shared_data: Path, method: str
) -> None:
    target = ["--reference", str(shared_data / "he" / "torchstain-target.png")] if method != "none" else []
    done, seen = _watch_cli(["normalize", str(cli_slide), "--method", method, *target,
                             "-o", str(tmp_path / "o.tiff"), "-q"], tmp_path, report_import=True)
    assert done.returncode == 0, done.stderr
    # no distributed import: no cluster, no scheduler, no worker, no HTTP server
    assert done.stdout.splitlines()[-1] == "distributed imported: False", done.stdout
    assert seen == set(), seen
    assert "dashboard" not in done.stderr, done.stderr


def test_cli_dashboard_only_when_asked_and_on_loopback(cli_slide: Path, tmp_path: Path) -> None:
    # a small slide: --dashboard starts the embedded cluster all the same
    done, seen = _watch_cli(["normalize", str(cli_slide), "--method", "none", "-o", str(tmp_path / "o.tiff"), "-q",
                             "--dashboard"], tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("dask dashboard: "))
    port = int(line.removeprefix("dask dashboard: http://127.0.0.1:").removesuffix("/status"))
    assert ("127.0.0.1", port) in seen and {ip for ip, _ in seen} == {"127.0.0.1"}, seen


HARMONIZE_TIMEOUT = """
version: 1
output_root: out
method: macenko
formats: [ome-zarr]
fit: {n_pixels: 40000}
generate:
  - {path: gen/a.tiff, stain: site-a, width: 1024, height: 1024, seed: 5, tile_px: 256}
  - {path: gen/b.tiff, stain: site-b, width: 1024, height: 1024, seed: 5, tile_px: 256}
sites:
  site-a: {slides: [gen/a.tiff]}
  site-b: {slides: [gen/b.tiff]}
slide_timeout_s: 30
"""


def test_harmonize_sites_times_out_one_slide_and_finishes_the_others(
    prefect_api: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_norm.pipeline
    from flows.harmonize_sites import harmonize_sites

    real = wsi_norm.pipeline.normalize_slide

    def hang_on_b(source: Any, out: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        while Path(source).name == "b.tiff" and time.monotonic() - start < 300:
            time.sleep(0.05)
        return real(source, out, **kwargs)

    monkeypatch.setattr(wsi_norm.pipeline, "normalize_slide", hang_on_b)
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(HARMONIZE_TIMEOUT), encoding="utf-8")
    start = time.monotonic()
    state = cast("State[Any]", harmonize_sites(manifest=str(manifest), target="site-a", return_state=True))
    assert time.monotonic() - start < 200
    assert state.is_failed()
    assert state.message == ("1 slide(s) failed or need review: site-b/b.tiff: failed: timed out: took longer than "
                             "30 s (slide_timeout_s)"), state.message
    assert (tmp_path / "out" / "site-a" / "a.ome.zarr").is_dir()
    assert not (tmp_path / "out" / "site-b" / "b.ome.zarr").exists()


@pytest.mark.parametrize("method", ["none", "stainnet"])
def test_harmonize_sites_runs_the_methods_that_fit_nothing(
    prefect_api: Path, tmp_path: Path, shared_data: Path, method: str
) -> None:
    """``none`` and ``stainnet`` fit no template: every slide is mapped as it is and the
    distances to the target site are measured like every other method's. ``none`` is the
    baseline: after equals before."""
    from flows.harmonize_sites import harmonize_sites

    manifest = tmp_path / "data_manifest.yaml"
    text = textwrap.dedent(HARMONIZE_TIMEOUT).replace("method: macenko", f"method: {method}")
    if method == "stainnet":
        text += f"roots: {{shared: {shared_data}}}\nweights: {shared_data / 'stainnet' / STAINNET_WEIGHTS}\n"
    manifest.write_text(text, encoding="utf-8")
    state = cast("State[Any]", harmonize_sites(manifest=str(manifest), target="site-a", return_state=True))
    assert state.is_completed(), state.message
    rows = {r["site"]: r for r in state_rows(state)}
    for site in ("site-a", "site-b"):
        assert (tmp_path / "out" / site / f"{site[-1]}.ome.zarr").is_dir()
    b = rows["site-b"]
    if method == "none":
        assert b["lab_dist_after"] == pytest.approx(b["lab_dist_before"], abs=0.05), b
        assert b["lab_dist_before"] > 1.0, b  # the sites differ: the baseline shows it
    else:
        assert b["lab_dist_after"] != pytest.approx(b["lab_dist_before"], abs=0.05), b  # recoloured


# ------------------------------------------------------------------ clean shutdown


@pytest.mark.parametrize("scheduler", [[], ["--scheduler", "local"]], ids=["threads", "cluster"])
def test_cli_error_inside_the_cluster_is_one_line(cli_slide: Path, tmp_path: Path, scheduler: list[str]) -> None:
    """A tile that fails to decode mid-run: one line naming the file, no worker traceback; on the
    threaded scheduler (the default) and in the embedded cluster."""
    data = bytearray(cli_slide.read_bytes())
    for at in range(len(data) // 20, len(data) * 6 // 10, 5000):
        data[at:at + 200] = b"\xff" * 200
    corrupt = tmp_path / "corrupt.tiff"
    corrupt.write_bytes(bytes(data))
    done, _ = _watch_cli(["normalize", str(corrupt), "--method", "none", "-o", str(tmp_path / "o.tiff"), "-q",
                          *scheduler], tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsi-norm: error: {corrupt}: cannot read level 0 region"), lines


_INTERRUPTED = r"""
import sys, tempfile
import dask.array as da, numpy as np
from wsi_norm.cluster import dask_client
from wsi_norm.writers import write_pyramid

image = da.from_array(np.full((4096, 4096, 3), 200, np.uint8), chunks=(512, 512, 3)).map_blocks(lambda b: b + 1)
calls = []

def progress(done, total):
    calls.append(done)
    if len(calls) == 3:
        raise KeyboardInterrupt  # Ctrl-C while the level-0 blocks stream, futures in flight

try:
    with dask_client(threads=2):
        write_pyramid(image, tempfile.mkdtemp() + "/out" + sys.argv[1], mpp=None, provenance={}, progress=progress)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
"""


@pytest.mark.parametrize("suffix", [".tiff", ".ome.zarr"])
def test_interrupted_write_closes_without_stray_tracebacks(suffix: str) -> None:
    """Ctrl-C while writing used to print ``Exception ignored in: <generator object _prefetched>
    ... RuntimeError: IOLoop is closed`` after the cluster had closed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _INTERRUPTED, suffix], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted", done.stderr
    assert "Exception ignored" not in done.stderr and "IOLoop is closed" not in done.stderr, done.stderr
    assert "CancelledError" not in done.stderr, done.stderr
