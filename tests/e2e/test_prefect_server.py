"""End to end: a real Prefect server, the archive flow served as a deployment, and the UI in Chromium.

The test starts ``prefect server start`` on a free port of 127.0.0.1 with its own
PREFECT_HOME, serves ``normalize-archive`` from a subprocess (``python -m
flows.normalize_archive --serve``), triggers a run through the API client, reads its state,
task runs and artifacts back, then opens ``/runs/flow-run/<id>`` in headless Chromium
(Playwright driving Debian's ``/usr/bin/chromium``) and saves a screenshot under
``tests/artifacts/``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


async def _run_deployment(env: dict[str, str], name: str, timeout_s: float) -> tuple[Any, list[Any], list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows._common import read_flow_run_artifacts

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        async with get_client() as client:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    deployment = await client.read_deployment_by_name(name)
                    break
                except ObjectNotFound:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            while True:
                flow_run = await client.read_flow_run(flow_run.id)
                if flow_run.state is not None and flow_run.state.is_final():
                    break
                assert time.monotonic() < deadline, f"flow run still {flow_run.state}"
                await asyncio.sleep(1.0)
            # Task-run states arrive through events; wait until all are final.
            while True:
                task_runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200,
                )
                if all(t.state_type is not None and t.state_type.value in ("COMPLETED", "FAILED") for t in task_runs):
                    break
                assert time.monotonic() < deadline, [(t.name, t.state_type) for t in task_runs]
                await asyncio.sleep(0.5)
            artifacts = await read_flow_run_artifacts(client, flow_run.id)
            return flow_run, task_runs, artifacts


def test_served_archive_flow_runs_on_a_real_server_and_shows_in_the_ui(
    prefect_server: dict[str, str], tmp_path: Path, chromium: dict[str, Any], evidence_dir: Path,
    stop_process: Callable[[subprocess.Popen[bytes]], None],
) -> None:
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(textwrap.dedent("""
        version: 1
        output_root: out
        method: macenko
        formats: [tiff]
        fit: {n_pixels: 20000}
        generate:
          - {path: gen/s-1.tiff, stain: site-b, width: 1536, height: 1536, seed: 3, tile_px: 512}
        sites:
          site-b: {slides: [gen/s-1.tiff]}
        templates:
          ref: {site: site-b}
        target: ref
        concurrency: 1
    """).lstrip(), encoding="utf-8")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.normalize_archive", "--manifest", str(manifest), "--serve", "e2e"],
            cwd=REPO_ROOT, env=prefect_server, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        flow_run, task_runs, artifacts = asyncio.run(_run_deployment(prefect_server, "normalize-archive/e2e", 240))
    finally:
        stop_process(serve)
    assert flow_run.state.is_completed(), log.read_text()[-4000:]
    assert (tmp_path / "out" / "site-b" / "s-1.tiff").is_file()
    names = sorted(t.name for t in task_runs)
    for expected in ("fit site-b/s-1.tiff", "write site-b/s-1.tiff (tiff)", "qc site-b/s-1.tiff",
                     "normalize site-b/s-1.tiff"):
        assert expected in names, names
    assert any(n.startswith("load-manifest") for n in names) and any(n.startswith("generate-slides") for n in names)
    keys = {a.key: a for a in artifacts}
    assert keys["normalize-archive-summary"].type == "table"
    assert "![before | after](data:image/png;base64," in keys["qc-site-b-s-1"].data

    from playwright.sync_api import sync_playwright

    ui = prefect_server["PREFECT_API_URL"].removesuffix("/api")
    shot = evidence_dir / "prefect-ui-flow-run.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(**chromium)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/runs/flow-run/{flow_run.id}")
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.get_by_text(flow_run.name).first.wait_for(timeout=60_000)
            page.get_by_text("normalize-archive").first.wait_for(timeout=60_000)
            header = page.inner_text("body")
            assert flow_run.name in header and "normalize-archive" in header and "e2e" in header
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("normalize-archive-summary").first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert "Can't connect" not in text
    for key in ("normalize-archive-summary", "normalize-archive-progress", "qc-site-b-s-1", "progress-site-b-s-1"):
        assert key in text, key
    assert shot.stat().st_size > 20_000
    shutil.copy(log, evidence_dir / "serve.log")
