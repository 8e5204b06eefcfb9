"""The manifest refuses what would overwrite sources, escape the output folder or exhaust memory.

Sources are read-only (no output among them), outputs and QC never go through a symbolic link,
YAML anchors and aliases are refused before anything expands, and method parameters are checked
with the manifest, before any slide is generated or fitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TypedDict

import pytest

from flows.manifest import MAX_MANIFEST_BYTES, load_manifest
from wsi_norm.errors import ManifestError, OutputError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write(folder: Path, text: str, name: str = "data_manifest.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with slides in ``slides/a``, and a folder outside it."""
    root = tmp_path / "project"
    (root / "slides" / "a").mkdir(parents=True)
    (root / "slides" / "a" / "s1.svs").write_bytes(b"source one")
    (root / "slides" / "a" / "s2.svs").write_bytes(b"source two")
    (tmp_path / "outside").mkdir()
    return root


BASE = """
version: 1
output_root: out
method: none
formats: [ome-zarr, tiff]
sites:
  site-a: {slides: ['slides/a/*.svs']}
"""


# ------------------------------------------------------------------ sources are read-only


def test_output_root_holding_the_sources_is_refused(project: Path) -> None:
    # output_root: slides -> outputs would be written among (and, for a slide named like its
    # output, over) the sources
    text = BASE.replace("output_root: out", "output_root: slides")
    with pytest.raises(ManifestError, match=r"data_manifest\.yaml:\d+: sites\.site-a\.slides: slide .*s1\.svs "
                       r"lies inside output_root .*slides: sources are read-only"):
        load_manifest(_write(project, text))


def test_output_root_equal_to_the_manifest_folder_with_sources_in_it_is_refused(project: Path) -> None:
    text = BASE.replace("output_root: out", "output_root: .")
    with pytest.raises(ManifestError, match=r"lies inside output_root"):
        load_manifest(_write(project, text))


def test_an_output_that_would_replace_a_source_is_refused(project: Path) -> None:
    # a source slide that is itself named like an output: <output_root>/site-a/s.tiff
    (project / "out" / "site-a").mkdir(parents=True)
    (project / "out" / "site-a" / "s.tiff").write_bytes(b"a source")
    text = BASE.replace("'slides/a/*.svs'", "out/site-a/s.tiff")
    with pytest.raises(ManifestError, match=r"slide .*out/site-a/s\.tiff lies inside output_root"):
        load_manifest(_write(project, text))
    assert (project / "out" / "site-a" / "s.tiff").read_bytes() == b"a source"


def test_output_root_inside_a_declared_read_only_root_is_refused(project: Path) -> None:
    text = BASE.replace("output_root: out", "roots: {data: slides}\noutput_root: slides/out")
    with pytest.raises(ManifestError, match=r"output_root: output_root .*slides/out overlaps the read-only root 'data'"):
        load_manifest(_write(project, text))


@pytest.mark.parametrize("site", ["qc", "templates"])
def test_site_names_that_collide_with_qc_and_templates_are_refused(project: Path, site: str) -> None:
    text = BASE.replace("site-a:", f"{site}:")
    with pytest.raises(ManifestError, match=rf"sites\.{site}: '{site}' is no site name"):
        load_manifest(_write(project, text))


def test_sources_outside_output_root_are_accepted(project: Path) -> None:
    m = load_manifest(_write(project, BASE))
    assert [s.source.name for s in m.slides] == ["s1.svs", "s2.svs"]
    assert m.qc_dir(m.slides[0]) == project.resolve() / "out" / "qc" / "site-a" / "s1"


# ------------------------------------------------------------------ symbolic links under output_root


@pytest.mark.parametrize("link", ["out/site-a", "out/qc/site-a", "out/site-a/s1.ome.zarr", "out/templates"])
def test_a_symlink_planted_under_output_root_is_refused(project: Path, link: str) -> None:
    outside = project.parent / "outside"
    planted = project / link
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ManifestError, match=rf"{planted} is a symbolic link \(to {outside}\); outputs and QC are "
                       "never written through links"):
        load_manifest(_write(project, BASE))
    assert list(outside.iterdir()) == []


def test_a_symlink_planted_after_validation_is_refused_before_writing(project: Path) -> None:
    """The flows check every output and QC path again just before they write it."""
    from flows._qc import _write_qc_files
    from flows.normalize_archive import normalize_task

    m = load_manifest(_write(project, BASE))
    outside = project.parent / "outside"
    (project / "out").mkdir()
    (project / "out" / "site-a").symlink_to(outside, target_is_directory=True)
    (project / "out" / "qc").mkdir()
    (project / "out" / "qc" / "site-a").symlink_to(outside, target_is_directory=True)
    entry = m.slides[0]
    with pytest.raises(OutputError, match=r"out/site-a/s1\.ome\.zarr: refused, .*out/site-a is a symbolic link"):
        m.confine(entry.outputs["ome-zarr"])
    with pytest.raises(OutputError, match=r"out/site-a is a symbolic link"):
        normalize_task.fn(entry, "tiff", m, None, None)
    import numpy as np

    with pytest.raises(OutputError, match=r"out/qc/site-a is a symbolic link"):
        _write_qc_files(m, entry, pair=np.zeros((2, 2, 3), np.uint8), plot="data:image/png;base64,", metrics={},
                        summary=[])
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------ YAML: aliases, nesting, size

# The "billion laughs" in YAML: 9 levels of 9 aliases, 9**9 strings once expanded.
BOMB = "".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    + [f"{k}: &{k} [{','.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi", strict=True)]
)

_CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # old code: fail, not take the machine
from wsi_norm.errors import ManifestError
from flows.manifest import load_manifest
start = time.perf_counter()
try:
    load_manifest(sys.argv[1])
    error = None
except ManifestError as exc:
    error = str(exc)
except MemoryError:
    error = "MemoryError"
seconds = time.perf_counter() - start
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"error": error, "seconds": seconds, "peak_rss_bytes": hwm_kib * 1024}))
"""


class _ChildResult(TypedDict):
    error: str | None
    seconds: float
    peak_rss_bytes: int


def _load_in_child(path: Path) -> _ChildResult:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result: _ChildResult = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_yaml_alias_bomb_is_refused_at_once_with_bounded_memory(tmp_path: Path) -> None:
    assert len(BOMB) < 420
    path = tmp_path / "data_manifest.yaml"
    path.write_text(BOMB, encoding="utf-8")
    got = _load_in_child(path)
    assert got["error"] is not None and got["error"].startswith(f"{path}:1: invalid YAML: YAML anchor &a is not allowed")
    assert got["seconds"] < 0.5, got
    # the child's own peak (VmHWM: ru_maxrss would include the forking parent's)
    assert got["peak_rss_bytes"] < 1 << 30, got  # in practice tens of MB: the interpreter and pydantic


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("version: 1\nbase: &b {n_pixels: 10}\nfit: *b\n", r":2: invalid YAML: YAML anchor &b is not allowed"),
        ("version: 1\nfit:\n  <<: *b\n", r":3: invalid YAML: YAML alias \*b is not allowed"),
        ("version: 1\nx: " + "[" * 100 + "]" * 100 + "\n", r":2: invalid YAML: nesting deeper than 32 levels"),
    ],
)
def test_anchors_aliases_and_deep_nesting_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        load_manifest(_write(tmp_path, text))


def test_an_oversized_or_irregular_manifest_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_MANIFEST_BYTES + b"\n")
    with pytest.raises(ManifestError, match=rf"big\.yaml: manifest is {MAX_MANIFEST_BYTES + 3} bytes, more than"):
        load_manifest(big)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(ManifestError, match=r"fifo\.yaml: cannot read manifest: not a regular file"):
        load_manifest(fifo)


# ------------------------------------------------------------------ method parameters


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [
        ("macenko", "{alpah: 2}", r":\d+: params\.alpah: unknown parameter of method 'macenko'; known: white_point, "),
        ("vahadane", "{l1_penalty: lots}", r"params\.l1_penalty: Input should be a valid number \(got 'lots'\)"),
        ("macenko", "{macenko_variant: robust}", r"params\.macenko_variant: Input should be 'strong' or 'textbook'"),
        ("reinhard", "{debias: 'yes'}", r"params\.debias: Input should be a valid boolean"),
        ("macenko", "{alpha: 60}", r"params: alpha must be in \[0, 50\) percent, got 60"),
        ("none", "{alpha: 1}", r"params\.alpha: method 'none' takes no parameters"),
    ],
)
def test_method_parameters_are_validated_with_the_manifest(project: Path, method: str, params: str, match: str) -> None:
    text = BASE.replace("method: none", f"method: {method}\nparams: {params}")
    if method != "none":
        text += "templates:\n  ref: {site: site-a}\ntarget: ref\n"
    with pytest.raises(ManifestError, match=match):
        load_manifest(_write(project, text))


def test_known_method_parameters_pass(project: Path) -> None:
    text = BASE.replace("method: none", "method: macenko\nparams: {alpha: 2, white_point: 239, macenko_variant: textbook}")
    m = load_manifest(_write(project, text + "templates:\n  ref: {site: site-a}\ntarget: ref\n"))
    assert m.params == {"alpha": 2, "white_point": 239, "macenko_variant": "textbook"}
