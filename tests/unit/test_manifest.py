"""The data manifest: schema, path rules and error messages that name the line."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.manifest import FORMAT_SUFFIXES, load_manifest
from wsi_norm.errors import ManifestError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write(tmp: Path, text: str, name: str = "data_manifest.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with two slide files in site folders and one outside it."""
    root = tmp_path / "project"
    (root / "slides" / "a").mkdir(parents=True)
    (root / "slides" / "b").mkdir(parents=True)
    (root / "slides" / "a" / "s1.svs").write_bytes(b"x")
    (root / "slides" / "a" / "s2.svs").write_bytes(b"x")
    (root / "slides" / "b" / "s1.tiff").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.svs").write_bytes(b"x")
    return root


GOOD = """
version: 1
output_root: out
method: macenko
formats: [ome-zarr, tiff]
sites:
  site-a:
    slides:
      - slides/a/*.svs
  site-b:
    slides: [slides/b/s1.tiff]
templates:
  ref: {site: site-a}
target: ref
concurrency: 3
"""


def test_good_manifest_resolves_globs_outputs_and_templates(project: Path) -> None:
    m = load_manifest(_write(project, GOOD))
    assert [(s.site, s.source.name) for s in m.slides] == [("site-a", "s1.svs"), ("site-a", "s2.svs"), ("site-b", "s1.tiff")]
    first = m.slides[0]
    assert first.outputs == {
        "ome-zarr": project.resolve() / "out" / "site-a" / "s1.ome.zarr",
        "tiff": project.resolve() / "out" / "site-a" / "s1.tiff",
    }
    assert first.line == 8  # the glob's line
    assert m.templates["ref"].slides == tuple(s.source for s in m.slides[:2])
    assert m.model.concurrency == 3 and m.model.retries == 1
    assert set(FORMAT_SUFFIXES) == {"ome-zarr", "tiff"}


@pytest.mark.parametrize(
    ("edit", "line", "match"),
    [
        # unknown key, nested: names the key and its line
        (lambda t: t.replace("    slides: [slides/b/s1.tiff]", "    slides: [slides/b/s1.tiff]\n    colour: blue"), 11,
         r"sites\.site-b\.colour: unknown key"),
        # unknown top-level key
        (lambda t: t + "workers: 4\n", 15, r"workers: unknown key"),
        # missing slide path
        (lambda t: t.replace("slides/b/s1.tiff", "slides/b/nope.tiff"), 10, r"sites\.site-b\.slides\[0\]: no file matches 'slides/b/nope.tiff'"),
        # glob matching nothing
        (lambda t: t.replace("slides/a/*.svs", "slides/a/*.ndpi"), 8, r"sites\.site-a\.slides\[0\]: no file matches 'slides/a/\*\.ndpi'"),
        # '..' escape
        (lambda t: t.replace("slides/b/s1.tiff", "../outside/secret.svs"), 10, r"sites\.site-b\.slides\[0\]: path '\.\./outside/secret\.svs' escapes"),
        # unknown method
        (lambda t: t.replace("method: macenko", "method: magic"), 3, r"method: unknown method 'magic'"),
        # output root outside the manifest's directory
        (lambda t: t.replace("output_root: out", "output_root: ../elsewhere"), 2, r"output_root: path '\.\./elsewhere' escapes"),
        # bad format
        (lambda t: t.replace("[ome-zarr, tiff]", "[ome-zarr, png]"), 4, r"formats\[1\]: Input should be 'ome-zarr' or 'tiff'"),
        # wrong version
        (lambda t: t.replace("version: 1", "version: 2"), 1, r"version: Input should be 1"),
        # template of an unknown site, and one giving two sources
        (lambda t: t.replace("ref: {site: site-a}", "ref: {site: site-z}"), 12, r"templates\.ref\.site: unknown site 'site-z'"),
        (lambda t: t.replace("ref: {site: site-a}", "ref: {site: site-a, path: t.json}"), 12, r"templates\.ref: give exactly one of site, slides, path"),
        (lambda t: t.replace("target: ref", "target: other"), 13, r"target: unknown template 'other'"),
        (lambda t: t.replace("concurrency: 3", "concurrency: 0"), 14, r"concurrency: Input should be greater than or equal to 1"),
        # a sample smaller than the fewest tissue pixels a fit takes
        (lambda t: t.replace("concurrency: 3", "concurrency: 3\nfit: {n_pixels: 500}"), 15,
         r"fit\.n_pixels: Input should be greater than or equal to 1000"),
        # duplicate key (yaml.safe_load would silently keep the last one)
        (lambda t: t.replace("method: macenko", "method: macenko\nmethod: reinhard"), 4, r"method: duplicate key"),
        # missing required key
        (lambda t: t.replace("output_root: out\n", ""), 1, r"output_root: required key is missing"),
    ],
)
def test_manifest_errors_name_key_and_line(
    project: Path, edit: Callable[[str], str], line: int, match: str
) -> None:
    path = _write(project, edit(GOOD))
    with pytest.raises(ManifestError, match=rf"^{path}:{line}: {match}"):
        load_manifest(path)


def test_symlink_pointing_outside_is_rejected(project: Path) -> None:
    (project / "slides" / "b" / "link.svs").symlink_to(project.parent / "outside" / "secret.svs")
    path = _write(project, GOOD.replace("slides/b/s1.tiff", "slides/b/link.svs"))
    with pytest.raises(ManifestError, match=rf"^{path}:10: .*escapes .*through a symlink"):
        load_manifest(path)


def test_symlink_matched_by_glob_is_rejected(project: Path) -> None:
    (project / "slides" / "a" / "zz.svs").symlink_to(project.parent / "outside" / "secret.svs")
    path = _write(project, GOOD)
    with pytest.raises(ManifestError, match=rf"^{path}:8: sites\.site-a\.slides\[0\]: .*escapes"):
        load_manifest(path)


def test_declared_root_allows_reading_outside(project: Path) -> None:
    text = GOOD.replace("version: 1\n", "version: 1\nroots:\n  data: ../outside\n").replace(
        "slides/b/s1.tiff", "../outside/secret.svs"
    )
    m = load_manifest(_write(project, text))
    assert m.site_slides("site-b")[0].source == (project.parent / "outside" / "secret.svs").resolve()
    assert m.roots["data"] == (project.parent / "outside").resolve()


def test_missing_root_directory_is_rejected(project: Path) -> None:
    path = _write(project, GOOD.replace("version: 1\n", "version: 1\nroots:\n  data: ../nowhere\n"))
    with pytest.raises(ManifestError, match=rf"^{path}:3: roots\.data: root directory '\.\./nowhere' does not exist"):
        load_manifest(path)


def test_duplicate_output_paths_are_rejected(project: Path) -> None:
    (project / "slides" / "a" / "s1.tiff").write_bytes(b"x")  # same stem as s1.svs, same site
    path = _write(project, GOOD.replace("      - slides/a/*.svs", "      - slides/a/*.svs\n      - slides/a/s1.tiff"))
    with pytest.raises(ManifestError, match=rf"^{path}:9: sites\.site-a\.slides\[1\]: duplicate output path .*s1\.ome\.zarr"):
        load_manifest(path)


def test_generated_slides_satisfy_globs_before_they_exist(project: Path) -> None:
    text = GOOD + textwrap.dedent(
        """
        generate:
          - {path: gen/c/c-1.tiff, stain: site-a, width: 512, height: 512}
          - {path: gen/c/c-2.tiff, stain: site-b, width: 512, height: 512, seed: 3}
        """
    )
    text = text.replace("  site-b:\n", "  site-c:\n    slides: ['gen/c/*.tiff']\n  site-b:\n")
    m = load_manifest(_write(project, text))
    gen = m.site_slides("site-c")
    assert [s.source.name for s in gen] == ["c-1.tiff", "c-2.tiff"]
    assert all(s.generated for s in gen) and not any(s.generated for s in m.site_slides("site-a"))
    assert [g.spec.seed for g in m.generated] == [0, 3]


def test_generated_path_must_stay_in_manifest_dir(project: Path) -> None:
    path = _write(project, GOOD + "generate:\n  - {path: ../outside/g.tiff, stain: site-a}\n")
    with pytest.raises(ManifestError, match=rf"^{path}:16: generate\[0\]\.path: path '\.\./outside/g\.tiff' escapes"):
        load_manifest(path)


def test_invalid_yaml_and_non_mapping(project: Path) -> None:
    bad = _write(project, "version: 1\nsites: [unclosed\n", "bad.yaml")
    with pytest.raises(ManifestError, match=rf"^{bad}:\d+: invalid YAML"):
        load_manifest(bad)
    listy = _write(project, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ManifestError, match=rf"^{listy}:1: the manifest must be a mapping"):
        load_manifest(listy)
    with pytest.raises(ManifestError, match=r"missing\.yaml: cannot read manifest"):
        load_manifest(project / "missing.yaml")


def test_stainnet_needs_weights(project: Path) -> None:
    path = _write(project, GOOD.replace("method: macenko", "method: stainnet").replace("target: ref\n", ""))
    with pytest.raises(ManifestError, match=rf"^{path}:3: method: method 'stainnet' needs a 'weights' file"):
        load_manifest(path)


def test_committed_manifest_is_valid() -> None:
    """The repository's own data_manifest.yaml validates; its cmu site is the public sample."""
    m = load_manifest(REPO_ROOT / "data_manifest.yaml")
    cmu = m.site_slides("cmu")
    assert len(cmu) == 1 and cmu[0].sample
    if (REPO_ROOT.parent / "shared" / "data" / "slides").is_dir() and "WSI_NORM_DATA" not in os.environ:
        assert cmu[0].source == (REPO_ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs").resolve()
        assert cmu[0].source.is_file()
    assert {s.site for s in m.slides if s.generated} == {"site-a", "site-b"}
    assert {g.spec.texture for g in m.generated} == {"procedural"}  # renders without the data folder
    assert all(os.path.commonpath([g.path, m.base_dir]) == str(m.base_dir) for g in m.generated)
    assert m.output_root == (REPO_ROOT / "out" / "archive").resolve()


def test_sample_site_without_data_folder(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no real-data folder and nothing fetched yet, a `sample:` site resolves to the place
    the checked wheel copy will take, and is reported missing (the flows fetch it)."""
    monkeypatch.setenv("WSI_NORM_DATA", str(project / "no-such-folder"))
    path = _write(project, "version: 1\noutput_root: out\nmethod: none\n"
                           "sites:\n  cmu:\n    sample: CMU-1-Small-Region\n")
    m = load_manifest(path)
    (entry,) = m.slides
    assert entry.sample and not entry.generated
    assert entry.source == project / "data" / "samples" / "CMU-1-Small-Region.svs"
    assert m.missing_samples == (entry,)
    generated = project / "data" / "samples" / "generated-sample.tiff"
    generated.parent.mkdir(parents=True)
    generated.write_bytes(b"")  # an earlier offline run generated it: taken as it is
    (entry,) = load_manifest(path).slides
    assert entry.source == generated and entry.outputs["ome-zarr"].name == "generated-sample.ome.zarr"


def test_site_needs_slides_or_sample(project: Path) -> None:
    path = _write(project, "version: 1\noutput_root: out\nmethod: none\nsites:\n  cmu:\n    description: x\n")
    with pytest.raises(ManifestError, match=r":5: sites\.cmu: a site needs 'slides' \(a non-empty list\) or 'sample'"):
        load_manifest(path)
    bad = _write(project, "version: 1\noutput_root: out\nmethod: none\nsites:\n  cmu:\n    sample: CMU-2\n")
    with pytest.raises(ManifestError, match=r":6: sites\.cmu\.sample: "):
        load_manifest(bad)


def test_slide_folders_are_slides_explicit_or_globbed(project: Path) -> None:
    """An OME-Zarr image and a DICOM slide's folder are slides, as the reader opens them; what
    lies inside them is not one more slide, and a plain folder is still refused."""
    zarr = project / "slides" / "c" / "z1.ome.zarr"
    (zarr / "0").mkdir(parents=True)
    (zarr / "zarr.json").write_text("{}")
    (zarr / "0" / "zarr.json").write_text("{}")
    dicom = project / "slides" / "c" / "d1"
    dicom.mkdir()
    (dicom / "level0.dcm").write_bytes(b"x")
    (project / "slides" / "c" / "plain").mkdir()
    text = GOOD.replace("    slides: [slides/b/s1.tiff]", "    slides: ['slides/c/**']")
    m = load_manifest(_write(project, text))
    assert [s.source.name for s in m.slides if s.site == "site-b"] == ["d1", "z1.ome.zarr"]
    z1 = next(s for s in m.slides if s.source.name == "z1.ome.zarr")
    assert z1.outputs["tiff"].name == "z1.tiff"
    explicit = load_manifest(_write(project, GOOD.replace("slides/b/s1.tiff", "slides/c/d1")))
    assert [s.source.name for s in explicit.slides if s.site == "site-b"] == ["d1"]
    with pytest.raises(ManifestError, match=r"'slides/c/plain' is a directory, not a slide \(an OME-Zarr"):
        load_manifest(_write(project, GOOD.replace("slides/b/s1.tiff", "slides/c/plain")))
