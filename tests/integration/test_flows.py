"""The Prefect flows on generated slides, against Prefect's local test API.

One test API (``prefect_test_harness``, its own PREFECT_HOME) serves the module.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import yaml

from flows._common import state_rows

if TYPE_CHECKING:
    # the flows return Any, so Flow.__call__(return_state=True) picks the async overload
    from prefect import State

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )

    return asyncio.run(read())


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    from flows._common import read_flow_run_artifacts

    async def read() -> list[Any]:
        async with get_client() as client:
            return await read_flow_run_artifacts(client, flow_run_id)

    return {a.key: a for a in asyncio.run(read()) if a.key}


ARCHIVE = """
version: 1
output_root: out
method: macenko
formats: [ome-zarr]
fit: {n_pixels: 40000}
generate:
  - {path: gen/a-1.tiff, stain: site-a, width: 2048, height: 2048, seed: 1, tile_px: 512}
  - {path: gen/b-1.tiff, stain: site-b, width: 2048, height: 2048, seed: 2, tile_px: 512}
sites:
  site-a: {slides: ['gen/a-*.tiff']}
  site-b: {slides: ['gen/b-*.tiff', broken/bad.svs]}
templates:
  ref: {site: site-a}
target: ref
concurrency: 2
retries: 1
retry_delay_s: 0
"""


def test_archive_flow_fails_one_slide_completes_others_and_is_idempotent(
    prefect_api: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_norm.cluster
    from flows._common import state_rows
    from flows.normalize_archive import PROGRESS_KEY, SUMMARY_KEY, normalize_archive

    # every distributed client the run would start or join goes through dask_client
    clients: list[Any] = []
    real_client = wsi_norm.cluster.dask_client

    def spy(*args: Any, **kwargs: Any) -> Any:
        clients.append((args, kwargs))
        return real_client(*args, **kwargs)

    monkeypatch.setattr(wsi_norm.cluster, "dask_client", spy)
    monkeypatch.delenv("WSI_NORM_SCHEDULER", raising=False)

    (tmp_path / "broken").mkdir()
    rng = np.random.default_rng(0)
    (tmp_path / "broken" / "bad.svs").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(ARCHIVE), encoding="utf-8")

    state = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    assert state.is_failed() and state.message == "1 of 3 slides failed"
    assert clients == []  # 2048^2 slides run on dask's threaded scheduler, as the CLI runs them
    rows = {r["slide"]: r for r in state_rows(state)}
    assert [rows[s]["outcome"] for s in ("a-1.tiff", "b-1.tiff", "bad.svs")] == ["normalized", "normalized", "failed"]
    assert "bad.svs" in rows["bad.svs"]["reason"] and "Error" in rows["bad.svs"]["reason"]
    outs = [tmp_path / "out" / "site-a" / "a-1.ome.zarr", tmp_path / "out" / "site-b" / "b-1.ome.zarr"]
    assert all(o.is_dir() for o in outs) and not (tmp_path / "out" / "site-b" / "bad.ome.zarr").exists()

    run_id = state.state_details.flow_run_id
    artifacts = _artifacts(run_id)
    summary = artifacts[SUMMARY_KEY]
    assert summary.type == "table"
    assert {"a-1.tiff", "b-1.tiff", "bad.svs"} <= {r["slide"] for r in yaml.safe_load(summary.data)}
    for slide in ("a-1", "b-1"):
        site = "site-" + slide[0]
        report = artifacts[f"qc-{site}-{slide}"]
        assert report.type == "markdown" and "ssim_source" in report.data and "✓ passed" in report.data
        assert "![before | after](data:image/png;base64," in report.data
        assert "![stain vectors](data:image/png;base64," in report.data
        assert len(report.data) < 250_000  # a readable report, not a dump
        progress = artifacts[f"progress-{site}-{slide}"]
        assert progress.type == "progress" and float(progress.data) == 100.0
        # at most two artifacts per slide: its progress and its report
        assert sorted(k for k in artifacts if k.endswith(f"-{site}-{slide}")) == [
            f"progress-{site}-{slide}", f"qc-{site}-{slide}"]
        assert rows[f"{slide}.tiff"]["qc_gate"] == "✓ passed" and 0.5 < rows[f"{slide}.tiff"]["ssim_source"] <= 1
    assert float(artifacts[PROGRESS_KEY].data) == 100.0
    assert artifacts[PROGRESS_KEY].description.startswith("3 of 3 slides done (1 failed, 2 normalized)")
    assert len(artifacts) <= 2 * 3 + 3  # two per slide, the run's table, summary and progress
    names = [t.name for t in _task_runs(run_id)]
    assert sorted(n for n in names if n.startswith("normalize ")) == [
        "normalize site-a/a-1.tiff", "normalize site-b/b-1.tiff", "normalize site-b/bad.svs"]
    assert sorted(n for n in names if n.startswith("write ")) == [
        "write site-a/a-1.tiff (ome-zarr)", "write site-b/b-1.tiff (ome-zarr)"]
    # the one run that stands for a slide carries its site's tag and the method's; every other
    # task run none (each tagged run costs an update of the tags' concurrency limits)
    tags_of = {t.name: set(t.tags) for t in _task_runs(run_id)}
    assert tags_of["normalize site-a/a-1.tiff"] == {"site:site-a", "method:macenko"}
    assert tags_of["normalize site-b/b-1.tiff"] == {"site:site-b", "method:macenko"}
    assert {n for n, t in tags_of.items() if t} == {
        "normalize site-a/a-1.tiff", "normalize site-b/b-1.tiff", "normalize site-b/bad.svs"}
    assert {"fit site-a/a-1.tiff", "write site-a/a-1.tiff (ome-zarr)", "qc site-a/a-1.tiff"} <= set(tags_of)
    mtimes = [o.stat().st_mtime_ns for o in outs]

    # Second run: the two finished slides are current, the broken one fails again.
    again = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    rows2 = {r["slide"]: r["outcome"] for r in state_rows(again)}
    assert rows2 == {"a-1.tiff": "skipped (current)", "b-1.tiff": "skipped (current)", "bad.svs": "failed"}
    names2 = [t.name for t in _task_runs(again.state_details.flow_run_id)]
    assert not any(n.startswith(("write ", "qc ")) for n in names2)
    assert [n for n in names2 if n.startswith("fit ")] == ["fit site-b/bad.svs"]  # only it is tried again
    assert [o.stat().st_mtime_ns for o in outs] == mtimes


REVIEW = """
version: 1
output_root: out
method: macenko
formats: [tiff]
fit: {n_pixels: 40000}
generate:
  - {path: gen/a-1.tiff, stain: site-a, width: 2048, height: 2048, seed: 1, tile_px: 512}
sites:
  site-a: {slides: ['gen/a-*.tiff']}
  other: {slides: [odd/dab.png]}
templates:
  ref: {site: site-a}
target: ref
concurrency: 2
"""


def test_archive_flow_sends_a_slide_the_qc_gate_refuses_to_review(prefect_api: Path, tmp_path: Path) -> None:
    """A slide stained with something that is not H&E (hematoxylin and a DAB-like brown) is refused by
    the QC gate: it ends "needs review" with the numbers, nothing of it is written, the other slide
    finishes."""
    from PIL import Image

    from flows.normalize_archive import normalize_archive
    from wsi_norm.testing.synthetic import (
        RUIFROK_HE,
        SyntheticParams,
        concentrations,
        render_beer_lambert,
    )

    dab = np.array([RUIFROK_HE[0], [0.27, 0.57, 0.78]])  # Ruifrok's DAB in place of eosin
    conc = concentrations(SyntheticParams(1024, 1024, seed=3, tissue_fraction=0.5, texture="real"),
                          x=0, y=0, width=1024, height=1024)
    (tmp_path / "odd").mkdir()
    Image.fromarray(render_beer_lambert(conc, dab, io=240.0)).save(tmp_path / "odd" / "dab.png")
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(REVIEW), encoding="utf-8")
    state = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    assert state.is_failed() and state.message == "0 of 2 slides failed, 1 need review", state.message
    rows = {r["slide"]: r for r in state_rows(state)}
    assert rows["a-1.tiff"]["outcome"] == "normalized"
    assert rows["dab.png"]["outcome"] == "needs review"
    assert "QC gate" in rows["dab.png"]["reason"] and "deg" in rows["dab.png"]["reason"], rows["dab.png"]
    other = tmp_path / "out" / "other"
    assert not other.exists() or not any(other.iterdir()), list(other.iterdir())
    assert (tmp_path / "out" / "site-a" / "a-1.tiff").is_file()


def test_invalid_manifest_stops_the_flow_before_any_work(prefect_api: Path, tmp_path: Path) -> None:
    from flows.normalize_archive import normalize_archive
    from wsi_norm.errors import ManifestError

    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(ARCHIVE).replace("concurrency: 2", "concurrency: 2\nwokers: 3"), encoding="utf-8")
    state = cast("State[Any]", normalize_archive(manifest=str(manifest), return_state=True))
    assert state.is_failed()
    with pytest.raises(ManifestError, match=r"data_manifest\.yaml:17: wokers: unknown key"):
        state.result()
    assert not (tmp_path / "gen").exists() and not (tmp_path / "out").exists()


HARMONIZE = """
version: 1
output_root: out
method: macenko
formats: [ome-zarr]
fit: {n_pixels: 100000}
generate:
  # the same tissue (seed) stained and scanned three ways, so colour distances measure stain, not
  # content: site-b hematoxylin-heavy on a warm scanner, site-c eosin-heavy on a cool one
  - {path: gen/a.tiff, stain: site-a, width: 2048, height: 2048, seed: 5, tile_px: 512, io: [241, 238, 244]}
  - {path: gen/b.tiff, stain: site-b, width: 2048, height: 2048, seed: 5, tile_px: 512,
     conc_scale: [1.3, 0.75], io: [252, 240, 228]}
  - {path: gen/c.tiff, stain: site-c, width: 2048, height: 2048, seed: 5, tile_px: 512,
     conc_scale: [0.75, 1.35], io: [226, 238, 252]}
sites:
  site-a: {slides: [gen/a.tiff]}
  site-b: {slides: [gen/b.tiff]}
  site-c: {slides: [gen/c.tiff, broken/truncated.svs]}
"""


def test_harmonize_sites_brings_every_site_to_the_target(prefect_api: Path, tmp_path: Path) -> None:
    from flows.harmonize_sites import TABLE_KEY, harmonize_sites

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "truncated.svs").write_bytes(b"II*\x00" + bytes(200))  # a TIFF header, nothing more
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent(HARMONIZE), encoding="utf-8")
    state = cast("State[Any]", harmonize_sites(manifest=str(manifest), target="site-a", return_state=True))
    # one bad slide: reported, and every other slide and site still finishes
    assert state.is_failed() and "truncated.svs" in str(state.message), state.message
    rows = {r["site"]: r for r in state_rows(state)}
    assert (tmp_path / "out" / "site-c" / "c.ome.zarr").is_dir()
    for site in ("site-b", "site-c"):
        r = rows[site]
        # before: the sites differ from the target (rotations, strengths, white points)
        assert max(r["h_angle_before_deg"], r["e_angle_before_deg"]) > 4.0, r
        assert r["lab_dist_before"] > 3.0, r
        # after, measured on the written outputs by the textbook estimator (not the fitting one):
        # within 2 degrees (each stain) and 2 Lab units of the target
        assert r["h_angle_after_deg"] < 2.0 and r["e_angle_after_deg"] < 2.0, r
        assert r["lab_dist_after"] < 2.0, r
        # the white point was carried over too
        np.testing.assert_allclose(r["white_point_after"], [241, 238, 244], atol=2.0)
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert artifacts[TABLE_KEY].type == "table"
    assert artifacts["harmonize-sites-plot"].data.startswith("data:image/png;base64,")


def test_png_data_uri_stays_small_and_keys_are_valid() -> None:
    from flows._artifacts import artifact_key, png_data_uri

    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)  # worst case for PNG
    uri = png_data_uri(noise, max_px=512, max_bytes=30_000)
    assert uri.startswith("data:image/png;base64,") and len(uri) < 30_000 * 4 / 3 + 100
    assert artifact_key("QC", "Site_A", "CMU-1 Small.svs") == "qc-site-a-cmu-1-small-svs"


def test_qc_report_says_what_the_fit_left_out() -> None:
    from flows._qc import _non_stain_note

    assert _non_stain_note(0.0) == ""
    assert "0.15%" in _non_stain_note(0.0015) and "check the slide" not in _non_stain_note(0.0015)
    assert "24.50%" in _non_stain_note(0.245) and "check the slide for pen marks or fill" in _non_stain_note(0.245)


def test_deploy_files_parse() -> None:
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    assert {"prefect-server", "prefect-worker", "dask-scheduler", "dask-worker"} <= set(compose["services"])
    deployments = yaml.safe_load((REPO_ROOT / "deploy" / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    by_name = {d["name"]: d for d in deployments}
    assert by_name["nightly"]["entrypoint"] == "flows/normalize_archive.py:normalize_archive"
    assert by_name["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert by_name["on-demand"]["entrypoint"] == "flows/harmonize_sites.py:harmonize_sites"
    assert by_name["on-demand"]["schedules"] == []
    for d in deployments:
        module, func = d["entrypoint"].split(":")
        assert f"def {func}(" in (REPO_ROOT / module).read_text(encoding="utf-8")


def test_colour_measurement_of_almost_no_tissue_is_not_an_error() -> None:
    """A slide with too few stained pixels for stain vectors (found at 500 slides: QC failed a
    slide whose output was written): the measurement says so (None), the Lab mean stays."""
    from flows._common import colour_stats
    from flows.harmonize_sites import distance_rows

    rgb = np.full((256, 256, 3), 238, np.uint8)
    rgb[:12, :12] = (150, 90, 160)  # 144 tissue pixels: fewer than the estimator needs
    stats = colour_stats(rgb)
    assert stats.stain_matrix is None and stats.conc_p99 is None
    assert stats.n_pixels == 144 and np.isfinite(stats.lab_mean).all()
    target = colour_stats(np.asarray(_he_like(), dtype=np.uint8))
    rows = distance_rows({"s": stats}, {"s": stats}, target)
    assert np.isnan(rows[0]["h_angle_before_deg"]) and np.isfinite(rows[0]["lab_dist_after"])


def _he_like() -> np.ndarray:
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 1.2, (128, 128, 1)) * np.array([0.65, 0.70, 0.29])
    e = rng.uniform(0, 1.0, (128, 128, 1)) * np.array([0.07, 0.99, 0.11])
    out: np.ndarray = np.clip(240 * np.exp(-(h + e)), 0, 255).round()
    return out


def test_qc_source_read_is_the_measured_level_and_the_slides_thumbnail(sample_svs: Path, tmp_path: Path) -> None:
    """The QC reads the source once when the thumbnail comes from the measured level (a
    single-level slide) and shrinks it as ``Slide.thumbnail`` does: the same bytes as the two
    reads; a pyramid reads its thumbnail from its own level; a level larger than the measured
    size is shrunk to it."""
    from flows._common import read_source_for_measure, read_source_for_qc
    from wsi_norm.slide import open_slide, shrink_to
    from wsi_norm.testing.synthetic import generate_slide

    pyramid = tmp_path / "pyramid.tiff"
    generate_slide(pyramid, width=2048, height=1536, seed=4, tile_px=256, min_level_px=512)
    for path, levels in ((sample_svs, 1), (pyramid, 3)):
        measured, thumb = read_source_for_qc(path, thumb_px=512)
        with open_slide(path) as slide:
            assert len(slide.level_dimensions) == levels
            expected = slide.thumbnail(512)
        assert np.array_equal(measured, read_source_for_measure(path))
        assert thumb.shape == expected.shape and thumb.tobytes() == expected.tobytes()
    # no level as small as max_side (a slide without a pyramid): its thumbnail of that size is
    # measured, as a written output's level of that scale would be, and the thumbnail shrunk from it
    measured, thumb = read_source_for_qc(sample_svs, max_side=1024, thumb_px=256)
    with open_slide(sample_svs) as slide:
        assert slide.level_count == 1 and max(slide.dimensions) > 1024
        np.testing.assert_array_equal(measured, slide.thumbnail(1024))
    assert max(measured.shape[:2]) == 1024 and np.array_equal(measured, read_source_for_measure(sample_svs, max_side=1024))
    np.testing.assert_array_equal(thumb, shrink_to(measured, 256))
