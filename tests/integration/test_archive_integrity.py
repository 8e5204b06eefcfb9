"""Exclusive, verifiable outputs and honest skips (issue 13).

* One writer per output: a second writer, CLI or flow, is told "another run is writing OUT"
  while the first one finishes undisturbed; never two successes, never a mixed output.
* A skip trusts nothing it has not checked: a deleted level, a missing level-0 shard, a
  truncated TIFF, another sampling size, a same-size edit of the source, or a run killed
  between the outputs and their QC all make the next run do the slide again.

Concurrent writers are real processes; the first is held mid-write at a synchronization
point (its progress callback waits on its stdin) rather than timed with sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import tifffile

from flows._common import state_rows
from wsi_norm.errors import OutputBusyError, OutputError
from wsi_norm.pipeline import FitOptions, fit_slide, normalize_slide, output_is_current
from wsi_norm.slide import open_slide
from wsi_norm.writers import WriterOptions, read_level, read_provenance, write_pyramid
from wsi_norm.writers.verify import output_facts, verify_output

if TYPE_CHECKING:
    # the flows return Any, so Flow.__call__(return_state=True) picks the async overload
    from prefect import State

REPO = Path(__file__).resolve().parents[2]
FORMATS = ["x.ome.zarr", "x.tif"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _raw_pyramid(path: Path, rgb: np.ndarray) -> Path:
    """An uncompressed tiled two-level TIFF (so a same-size edit of pixel bytes stays valid)."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", subfiletype=0,
                 resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        tw.write(np.ascontiguousarray(rgb[::2, ::2]), tile=(256, 256), photometric="rgb", subfiletype=1)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small H&E slides: ``a``, 512 x 2048 uncompressed (3.9 MB; two pyramid levels, and two
    TIFF writer blocks, so a writer can be held between them), and ``b``, 1024 x 1024 JPEG."""
    from wsi_norm.testing.synthetic import SITE_STAINS, generate_slide

    folder = tmp_path_factory.mktemp("slides")
    b = folder / "b.tiff"
    generate_slide(b, width=1024, height=1024, seed=3, tile_px=256, stain_matrix=SITE_STAINS["site-a"])
    generate_slide(folder / "g.tiff", width=512, height=2048, seed=4, tile_px=256,
                   stain_matrix=SITE_STAINS["site-b"])
    with open_slide(folder / "g.tiff") as slide:
        rgb = slide.read_region(0, x=0, y=0, width=512, height=2048)
    return {"a": _raw_pyramid(folder / "a.tiff", rgb), "b": b}


# ------------------------------------------------------------------ a writer held mid-write
HELD_WRITER = r"""
import sys
from wsi_norm.pipeline import normalize_slide

source, out = sys.argv[1], sys.argv[2]
told = []

def hold(done, total):
    if not told:
        told.append(True)
        print("mid-write", flush=True)
        sys.stdin.readline()  # the test says when to go on

normalize_slide(source, out, method="none", overwrite=True, progress=hold, chunk_px=256)
print("committed", flush=True)
"""


@contextmanager
def _held_writer(source: Path, out: Path) -> Iterator[subprocess.Popen[str]]:
    """A real process writing ``out`` (method none), stopped after its first chunk."""
    child = subprocess.Popen(
        [sys.executable, "-c", HELD_WRITER, str(source), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "mid-write", (line, child.stderr.read() if child.stderr else "")
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def _release(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert out.strip().endswith("committed"), out


def _assert_first_writer_output(out: Path, source: Path) -> None:
    """``out`` is the held writer's complete method-none output, nothing else beside it."""
    facts = output_facts(out)
    assert read_provenance(out)["method"] == "none"
    with open_slide(source) as slide:
        width, height = slide.dimensions
        level0 = slide.read_region(0, x=0, y=0, width=width, height=height)
    assert facts["levels"][0] == [height, width]
    if out.is_dir():  # lossless: the copy is exact
        np.testing.assert_array_equal(read_level(out, 0), level0)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "fresh"])
@pytest.mark.parametrize("name", FORMATS)
def test_second_cli_writer_is_refused_while_the_first_finishes(
    slides: dict[str, Path], tmp_path: Path, name: str, overwrite: bool
) -> None:
    out = tmp_path / name
    if overwrite:  # an older output is being replaced by the held writer
        write_pyramid(np.zeros((64, 64, 3), np.uint8), out, mpp=None, provenance={"method": "old"})
    with _held_writer(slides["a"], out) as first:
        cmd = [sys.executable, "-m", "wsi_norm.cli", "normalize", str(slides["b"]), "--method", "none",
               "-o", str(out), "-q", *(["--overwrite"] if overwrite else [])]
        second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, check=False)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        # one line of ours (distributed may add its own "port 8787 in use" warning: issue 13, item 9)
        lines = [line for line in second.stderr.splitlines() if line.startswith("wsi-norm:")]
        assert len(lines) == 1 and lines[0].startswith("wsi-norm: error: another run is writing"), lines
        assert str(out) in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
        # the first writer's work in progress was not touched
        assert (out.parent / f"{out.name}.partial").exists()
        _release(first)
    _assert_first_writer_output(out, slides["a"])


def test_library_writer_is_refused_by_a_held_claim_in_another_process(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "x.ome.zarr"
    with _held_writer(slides["a"], out) as first:
        with pytest.raises(OutputBusyError, match=rf"another run is writing {out}"):
            write_pyramid(np.zeros((64, 64, 3), np.uint8), out, mpp=None, provenance={}, overwrite=True)
        _release(first)
    _assert_first_writer_output(out, slides["a"])


def test_claim_is_reentrant_in_its_context_exclusive_across_threads_and_survives_a_dead_holder(
    tmp_path: Path,
) -> None:
    import threading

    from wsi_norm.writers.atomic import claim_output, lock_path

    out = tmp_path / "x.tif"
    lock_path(out).write_text("pid 999999 on gone since 2020-01-01T00:00:00Z\n")  # a killed run's file
    seen: list[BaseException | None] = []

    def other_thread() -> None:
        try:
            with claim_output(out):
                seen.append(None)
        except OutputBusyError as exc:
            seen.append(exc)

    with claim_output(out):  # the dead holder's file does not block: its flock died with it
        assert f"pid {os.getpid()}" in lock_path(out).read_text()
        with claim_output(out):  # a nested call in the same context reuses the claim
            pass
        thread = threading.Thread(target=other_thread)  # a new thread has its own context
        thread.start()
        thread.join()
    assert isinstance(seen[0], OutputBusyError) and f"pid {os.getpid()}" in str(seen[0])
    assert not lock_path(out).exists()  # removed on release
    other_thread()  # free again
    assert seen[1] is None


def test_commit_never_replaces_an_output_that_changed_meanwhile(tmp_path: Path) -> None:
    """A writer that does not take the claim (an older version, a copy) put an output in place
    while this one was writing: it is kept, and this run says so instead of replacing it."""
    out = tmp_path / "x.tif"
    other = write_pyramid(np.full((64, 64, 3), 7, np.uint8), tmp_path / "other.tif", mpp=None,
                          provenance={"run": "other"})
    moved: list[bool] = []

    def lockless_writer(done: int, total: int) -> None:
        if not moved:
            moved.append(True)
            os.replace(other, out)

    image = np.random.default_rng(0).integers(0, 256, (2048, 512, 3), dtype=np.uint8)  # two blocks
    with pytest.raises(OutputBusyError, match=rf"another run replaced {out} while this one was writing"):
        write_pyramid(image, out, mpp=None, provenance={"run": "mine"}, overwrite=True, chunk_px=256,
                      progress=lockless_writer)
    assert moved, "the lockless writer never ran"
    assert read_provenance(out)["run"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]


# ------------------------------------------------------------------ damaged or stale outputs
def _normalize(source: Path, out: Path, **kw: Any) -> None:
    normalize_slide(source, out, method="none", overwrite=True, chunk_px=256, **kw)


def test_each_damage_makes_the_output_not_current(slides: dict[str, Path], tmp_path: Path) -> None:
    zarr_out, tiff_out = tmp_path / "x.ome.zarr", tmp_path / "x.tif"

    def current(out: Path) -> bool:
        return output_is_current(out, source=slides["a"], method="none")

    for out in (zarr_out, tiff_out):
        _normalize(slides["a"], out)
        assert current(out)
    assert (zarr_out / "1" / "zarr.json").is_file()

    shutil.rmtree(zarr_out / "1")  # a deleted level
    assert not current(zarr_out)
    with pytest.raises(OutputError, match=r"x\.ome\.zarr/1/zarr\.json: array metadata missing"):
        output_facts(zarr_out)

    _normalize(slides["a"], zarr_out)
    assert current(zarr_out)
    (zarr_out / "0" / "c" / "0" / "0" / "0").unlink()  # a missing level-0 shard
    assert not current(zarr_out)
    with pytest.raises(OutputError, match=r"level 0 is incomplete: 1 of \d+ chunk/shard files .*c/0/0/0"):
        output_facts(zarr_out)

    size = tiff_out.stat().st_size
    os.truncate(tiff_out, size // 2)  # a TIFF truncated to half
    assert not current(tiff_out)
    with pytest.raises(OutputError, match=r"x\.tif: level \d"):
        output_facts(tiff_out)


def test_a_shard_truncated_in_place_differs_from_the_recorded_facts(slides: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "x.ome.zarr"
    _normalize(slides["a"], out)
    facts = verify_output(out)
    shard = out / "0" / "c" / "0" / "1" / "0"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(OutputError, match=r"changed since it was recorded complete: stored"):
        verify_output(out, expected=facts)


def test_fit_settings_and_writer_options_are_part_of_the_request(slides: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    from wsi_norm.pipeline import fit_template

    template = fit_template([slides["b"]], method="reinhard", n_pixels=20_000)
    out = tmp_path / "x.tif"
    normalize_slide(slides["a"], out, method="reinhard", target=template, chunk_px=256, fit=FitOptions(n_pixels=20_000))
    assert output_is_current(out, source=slides["a"], method="reinhard", target=template, fit=FitOptions(n_pixels=20_000))
    assert not output_is_current(out, source=slides["a"], method="reinhard", target=template, fit=FitOptions(n_pixels=30_000))
    assert not output_is_current(
        out,
        source=slides["a"],
        method="reinhard",
        target=template,
        fit=FitOptions(n_pixels=20_000, seed=1),
    )
    assert not output_is_current(
        out,
        source=slides["a"],
        method="reinhard",
        target=template,
        fit=FitOptions(n_pixels=20_000),
        writer=WriterOptions(quality=80),
    )


def _edit_in_place(path: Path, *, keep_mtime: bool) -> None:
    """Invert the bytes of level 0's last tile (in the file's last MiB, past its first MiB): same size."""
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    assert offset > 1 << 20, "the edit must lie past the first MiB to show the sampled hash at work"
    before = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(255 - b for b in data))
    assert path.stat().st_size == before.st_size
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-changed", "mtime-restored"])
def test_same_size_edit_of_the_source_is_detected(slides: dict[str, Path], tmp_path: Path,
                                                  keep_mtime: bool) -> None:
    source = shutil.copy2(slides["a"], tmp_path / "a.tiff")
    out = tmp_path / "x.ome.zarr"
    _normalize(Path(source), out)
    assert output_is_current(out, source=source, method="none")
    _edit_in_place(Path(source), keep_mtime=keep_mtime)
    assert not output_is_current(out, source=source, method="none")


def test_a_source_fit_of_another_slide_or_sampling_is_refused(slides: dict[str, Path],
                                                               tmp_path: Path) -> None:
    from wsi_norm.pipeline import fit_template

    template = fit_template([slides["b"]], method="reinhard", n_pixels=20_000)
    foreign = fit_slide(slides["b"], method="reinhard", n_pixels=20_000)
    with pytest.raises(ValueError, match=rf"a\.tiff: source_fit does not belong.*fitted on '{slides['b']}'"):
        normalize_slide(
            slides["a"],
            tmp_path / "x.tif",
            method="reinhard",
            target=template,
            source_fit=foreign,
            fit=FitOptions(n_pixels=20_000),
        )
    own = fit_slide(slides["a"], method="reinhard", n_pixels=20_000)
    with pytest.raises(ValueError, match=r"it sampled n_pixels=20000, this request asks for 30000"):
        normalize_slide(
            slides["a"],
            tmp_path / "x.tif",
            method="reinhard",
            target=template,
            source_fit=own,
            fit=FitOptions(n_pixels=30_000),
        )
    assert not (tmp_path / "x.tif").exists()


# ------------------------------------------------------------------ the archive flow
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


ARCHIVE = """
version: 1
output_root: out
method: macenko
formats: [ome-zarr, tiff]
fit: {n_pixels: 20000}
sites:
  site-a: {slides: [src/a.tiff]}
templates:
  ref: {slides: [src/b.tiff]}
target: ref
concurrency: 1
retries: 0
"""


def _archive(tmp_path: Path, slides: dict[str, Path], n_pixels: int = 20_000) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    for key in ("a", "b"):
        if not (tmp_path / "src" / f"{key}.tiff").exists():
            shutil.copy2(slides[key], tmp_path / "src" / f"{key}.tiff")
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(ARCHIVE).replace("n_pixels: 20000", f"n_pixels: {n_pixels}"),
                        encoding="utf-8")
    return manifest


def _run(manifest: Path) -> tuple[Any, str]:
    from flows.normalize_archive import normalize_archive

    state = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    rows = state_rows(state)
    assert isinstance(rows, list) and len(rows) == 1, rows
    return state, rows[0]["outcome"]


def test_archive_redoes_every_damaged_or_stale_slide(prefect_api: Path, slides: dict[str, Path],
                                                      tmp_path: Path) -> None:
    manifest = _archive(tmp_path, slides)
    zarr_out = tmp_path / "out" / "site-a" / "a.ome.zarr"
    tiff_out = tmp_path / "out" / "site-a" / "a.tiff"
    record = tmp_path / "out" / "qc" / "site-a" / "a" / "complete.json"

    assert _run(manifest)[1] == "normalized"
    assert _run(manifest)[1] == "skipped (current)"  # the skip works: what follows is the damage

    shutil.rmtree(zarr_out / "1")
    assert _run(manifest)[1] == "normalized"
    assert _run(manifest)[1] == "skipped (current)"

    (zarr_out / "0" / "c" / "0" / "0" / "0").unlink()
    assert _run(manifest)[1] == "normalized"

    os.truncate(tiff_out, tiff_out.stat().st_size // 2)
    assert _run(manifest)[1] == "normalized"
    output_facts(tiff_out)

    manifest = _archive(tmp_path, slides, n_pixels=30_000)
    assert _run(manifest)[1] == "normalized"
    assert read_provenance(zarr_out)["source_fit"]["n_pixels_requested"] == 30_000
    assert _run(manifest)[1] == "skipped (current)"

    _edit_in_place(tmp_path / "src" / "a.tiff", keep_mtime=True)
    assert _run(manifest)[1] == "normalized"
    assert _run(manifest)[1] == "skipped (current)"
    # the completion record holds what the skip compares: here the TIFF's committed size
    assert json.loads(record.read_text())["outputs"]["tiff"]["facts"]["size_bytes"] == tiff_out.stat().st_size


KILLED_IN_QC = r"""
import os, signal, sys
import flows.normalize_archive as archive

def killed(*args, **kwargs):
    print("outputs written, killed before QC", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

archive.publish_slide_qc = killed
archive.normalize_archive(manifest=sys.argv[1])
"""


def test_a_kill_between_outputs_and_qc_is_redone(prefect_api: Path, slides: dict[str, Path],
                                                  tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    manifest = _archive(tmp_path, slides)
    env = {**_env(), "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_QC, str(manifest)], capture_output=True,
                            text=True, env=env, timeout=600, cwd=tmp_path, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "killed before QC" in killed.stdout
    outs = [tmp_path / "out" / "site-a" / "a.ome.zarr", tmp_path / "out" / "site-a" / "a.tiff"]
    for out in outs:  # the outputs are complete and current: only the QC is missing
        output_facts(out)
    assert not (tmp_path / "out" / "qc" / "site-a" / "a" / "complete.json").exists()

    state, outcome = _run(manifest)
    assert outcome == "normalized" and state.is_completed()
    assert (tmp_path / "out" / "qc" / "site-a" / "a" / "metrics.json").is_file()
    assert (tmp_path / "out" / "qc" / "site-a" / "a" / "complete.json").is_file()
    assert _run(manifest)[1] == "skipped (current)"


def test_archive_reports_a_slide_another_run_is_writing_as_busy(prefect_api: Path, slides: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    manifest = _archive(tmp_path, slides)
    out = tmp_path / "out" / "site-a" / "a.ome.zarr"
    out.parent.mkdir(parents=True)
    with _held_writer(tmp_path / "src" / "a.tiff", out) as first:
        state, outcome = _run(manifest)
        assert outcome == "skipped (busy)"
        assert state.is_completed(), state.message  # busy is not a failure
        row = state_rows(state)[0]
        assert f"another run is writing {out}" in row["reason"] and f"pid {first.pid}" in row["reason"]
        assert not (out.parent / "a.tiff").exists()  # the flow wrote none of the slide's outputs
        assert (out.parent / "a.ome.zarr.partial").exists()  # and left the other run's work alone
        _release(first)
    assert read_provenance(out)["method"] == "none"  # the first writer's output, complete
    output_facts(out)
    assert _run(manifest)[1] == "normalized"  # not current for this manifest: done now
