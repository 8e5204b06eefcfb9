"""OME-Zarr compression choices (``WriterOptions.zarr_codec``, ``--zarr-codec``, the manifest's
``zarr_codec``): pixel-exact round trips, the codec named in the array metadata, outputs that
ome-zarr-py and ome-zarr-models still read, clear errors, and a codec change that makes an
output stale."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_norm.pyramid import reference_pyramid
from wsi_norm.testing.data import data_dir
from wsi_norm.writers import (
    DEFAULT_ZARR_CODEC,
    WriterOptions,
    parse_zarr_codec,
    read_level,
    read_provenance,
    write_pyramid,
)

SLIDE = data_dir() / "slides" / "CMU-1-Small-Region.svs"
WSI_NORM = Path(sys.executable).with_name("wsi-norm")


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A 1100 x 900 px crop of the real slide (uneven against 256-px chunks: edge chunks are partial)."""
    tiffslide = pytest.importorskip("tiffslide")
    if not SLIDE.is_file():
        pytest.skip(f"real sample data not found at {SLIDE}")
    with tiffslide.TiffSlide(SLIDE) as slide:
        return np.asarray(slide.read_region((600, 900), 0, (900, 1100), as_array=True))


def _codec_in_metadata(out: Path, zarr_format: int) -> dict[str, Any]:
    """The blosc settings level 0's metadata names (zarr.json inside the sharding codec, or .zarray)."""
    if zarr_format == 3:
        meta = json.loads((out / "0" / "zarr.json").read_text())
        (sharding,) = meta["codecs"]
        assert sharding["name"] == "sharding_indexed"
        (blosc,) = [c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc"]
        return dict(blosc["configuration"])
    compressor = json.loads((out / "0" / ".zarray").read_text())["compressor"]
    assert compressor["id"] == "blosc"
    return dict(compressor)


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("codec", ["lz4:1", "lz4:5", "zstd:1", "zstd:5", "zstd:9"])
def test_codec_round_trips_every_level_and_is_named_in_metadata(
    tmp_path: Path, crop: np.ndarray, codec: str, zarr_format: int
) -> None:
    out = write_pyramid(crop, tmp_path / "c.ome.zarr", mpp=(0.5, 0.5), provenance={"m": 1},
                        chunk_px=256, zarr_format=zarr_format, zarr_codec=codec)
    reference = reference_pyramid(crop)
    assert len(reference) == 2
    for k, expected in enumerate(reference):
        np.testing.assert_array_equal(read_level(out, k), expected)
    cname, clevel = codec.split(":")
    blosc = _codec_in_metadata(out, zarr_format)
    assert (blosc["cname"], blosc["clevel"]) == (cname, int(clevel))
    assert read_provenance(out)["written"]["options"]["compression"] == f"blosc-{cname}-{clevel}"


def test_stronger_codec_stores_fewer_bytes(tmp_path: Path, crop: np.ndarray) -> None:
    sizes = {}
    for codec in ("lz4:1", "zstd:9"):
        out = write_pyramid(crop, tmp_path / f"{codec[:3]}.ome.zarr", mpp=None, provenance={},
                            chunk_px=256, zarr_codec=codec)
        sizes[codec] = sum(p.stat().st_size for p in (out / "0").rglob("c/*/*/*"))
    assert 0 < sizes["zstd:9"] < 0.95 * sizes["lz4:1"], sizes


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_zstd_output_is_valid_ngff_for_ome_zarr_py_and_models(
    tmp_path: Path, crop: np.ndarray, zarr_format: int
) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = write_pyramid(crop, tmp_path / "z.ome.zarr", mpp=(0.5, 0.5), provenance={}, chunk_px=256,
                        zarr_format=zarr_format, zarr_codec="zstd:5")
    group = zarr.open_group(out, mode="r", zarr_format=zarr_format)  # type: ignore[arg-type]
    if zarr_format == 3:
        from ome_zarr_models.v05.image import Image as Image05

        image05 = Image05.from_zarr(group)
        assert [d.path for d in image05.attributes.ome.multiscales[0].datasets] == ["0", "1"]
    else:
        from ome_zarr_models.v04.image import Image as Image04

        image04 = Image04.from_zarr(group)
        assert [d.path for d in image04.attributes.multiscales[0].datasets] == ["0", "1"]
    location = parse_url(str(out))
    assert location is not None and location.version == ("0.5" if zarr_format == 3 else "0.4")
    (node, *_) = list(Reader(location)())
    for data, expected in zip(node.data, reference_pyramid(crop), strict=True):
        np.testing.assert_array_equal(np.asarray(data).transpose(1, 2, 0), expected)


def test_codec_strings_are_canonical() -> None:
    assert str(parse_zarr_codec("zstd")) == "zstd:5"
    assert str(parse_zarr_codec(" LZ4:9 ")) == "lz4:9"
    assert WriterOptions(zarr_codec="ZSTD:3").zarr_codec == "zstd:3"
    assert WriterOptions().zarr_codec == DEFAULT_ZARR_CODEC == str(parse_zarr_codec(DEFAULT_ZARR_CODEC))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("jpeg", r"zarr_codec: unknown zarr codec 'jpeg': use lz4 or zstd.*no lossy codec"),
        ("imagecodecs_jpeg", r"unknown zarr codec 'imagecodecs_jpeg'"),
        ("zstd:0", r"zarr_codec: zarr codec 'zstd:0': the level must be an integer in 1\.\.9"),
        ("zstd:10", r"'zstd:10': the level must be an integer in 1\.\.9"),
        ("lz4:fast", r"'lz4:fast': the level"),
        ("", r"unknown zarr codec ''"),
    ],
)
def test_bad_codec_is_a_value_error_naming_it(tmp_path: Path, crop: np.ndarray, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WriterOptions(zarr_codec=value)
    out = tmp_path / "bad.ome.zarr"
    with pytest.raises(ValueError, match=message):
        write_pyramid(crop, out, mpp=None, provenance={}, zarr_codec=value)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_codec_that_is_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"zarr_codec: zarr codec must be a string.*got 5"):
        WriterOptions(zarr_codec=5)  # type: ignore[arg-type]


def test_record_names_the_codec_and_keeps_lz4_outputs_current() -> None:
    # outputs written before the option existed were all lz4:5 and recorded no codec: they stay current
    assert WriterOptions(zarr_codec="lz4:5").record("a.ome.zarr") == {"format": "ome-zarr", "zarr_format": 3}
    assert WriterOptions(zarr_codec="zstd:5").record("a.ome.zarr") == {
        "format": "ome-zarr", "zarr_format": 3, "zarr_codec": "zstd:5"}
    assert WriterOptions(zarr_codec="zstd:3").record("a.ome.zarr") != WriterOptions(zarr_codec="zstd:5").record("a.ome.zarr")
    # a TIFF does not depend on the zarr codec
    assert WriterOptions(zarr_codec="zstd:3").record("a.tiff") == WriterOptions().record("a.tiff")


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_norm.testing.synthetic import generate_slide

    path = tmp_path_factory.mktemp("codec-slide") / "small.tiff"
    generate_slide(path, width=1024, height=768, seed=5, tile_px=256, texture="procedural")
    return path


def test_changing_the_codec_makes_the_output_not_current(small_slide: Path, tmp_path: Path) -> None:
    from wsi_norm.pipeline import normalize_slide, output_is_current

    out = tmp_path / "n.ome.zarr"
    normalize_slide(small_slide, out, method="none", writer=WriterOptions(zarr_codec="zstd:3"))
    assert _codec_in_metadata(out, 3)["cname"] == "zstd"
    assert output_is_current(out, source=small_slide, method="none", writer=WriterOptions(zarr_codec="zstd:3"))
    for other in ("zstd:4", "lz4:5", "lz4:3"):
        assert not output_is_current(out, source=small_slide, method="none",
                                     writer=WriterOptions(zarr_codec=other)), other
    assert not output_is_current(out, source=small_slide, method="none")  # the default codec


# ------------------------------------------------------------------ command line


def test_cli_default_is_the_writers_default(capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_norm.cli import _ZARR_CODEC_DEFAULT, main

    assert _ZARR_CODEC_DEFAULT == DEFAULT_ZARR_CODEC
    assert main(["normalize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--zarr-codec NAME[:LEVEL]" in text
    described = text.rsplit("--zarr-codec NAME[:LEVEL]", 1)[1].split(" --", 1)[0]  # the option's own help
    assert described.endswith(f"(default: {DEFAULT_ZARR_CODEC})"), described


@pytest.mark.parametrize("value", ["jpeg", "zstd:12", "lz4:x"])
def test_cli_bad_codec_is_one_line_exit_2_before_any_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    import wsi_norm.pipeline
    from wsi_norm.cli import main

    reached: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        reached.append("work")
        raise AssertionError("work started")

    monkeypatch.setattr(wsi_norm.pipeline, "normalize_slide", refuse)
    monkeypatch.setattr(wsi_norm.pipeline, "fit_slide", refuse)
    monkeypatch.setattr("wsi_norm.cluster.dask_client", refuse)
    code = main(["normalize", str(SLIDE), "--method", "macenko", "--reference", str(SLIDE),
                 "-o", str(tmp_path / "o.ome.zarr"), "--zarr-codec", value])
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert (code, reached) == (2, [])
    assert line.startswith("wsi-norm normalize: error: argument --zarr-codec: ") and repr(value) in line
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_console_command_bad_codec_is_one_line(tmp_path: Path) -> None:
    if not WSI_NORM.is_file():
        pytest.skip(f"no wsi-norm console script beside {sys.executable}")
    proc = subprocess.run(
        [str(WSI_NORM), "normalize", str(SLIDE), "--method", "none", "-o", str(tmp_path / "x.ome.zarr"),
         "--zarr-codec", "jpeg"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    expected = ("wsi-norm normalize: error: argument --zarr-codec: unknown zarr codec 'jpeg': use lz4 or "
                "zstd, optionally with a level 1..9 (e.g. 'zstd:5'); lossless Blosc, no lossy codec")
    assert proc.stderr.splitlines() == [expected]


def test_cli_writes_the_chosen_codec(small_slide: Path, tmp_path: Path) -> None:
    from wsi_norm.cli import main

    out = tmp_path / "cli.ome.zarr"
    assert main(["normalize", str(small_slide), "--method", "none", "-o", str(out), "-q",
                 "--zarr-codec", "zstd", "--zarr-format", "2"]) == 0
    assert (_codec_in_metadata(out, 2)["cname"], _codec_in_metadata(out, 2)["clevel"]) == ("zstd", 5)
    from wsi_norm.slide import open_slide

    source = np.asarray(open_slide(small_slide).to_dask(0).compute())  # type: ignore[no-untyped-call]
    np.testing.assert_array_equal(read_level(out, 0), source)


# ------------------------------------------------------------------ manifest and flows


_MANIFEST = """
version: 1
output_root: out
method: none
formats: [ome-zarr]
{codec}
sites:
  site-a:
    slides: [small.tiff]
"""


def _manifest(folder: Path, slide: Path, codec_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "small.tiff"  # a small generated slide, inside the manifest's folder as sources must be
    if not copy.exists():
        shutil.copyfile(slide, copy)
    path = folder / "m.yaml"
    path.write_text(textwrap.dedent(_MANIFEST).lstrip("\n").format(codec=codec_line), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("zarr_codec: jpeg", r"m\.yaml:5: zarr_codec: unknown zarr codec 'jpeg'"),
        ("zarr_codec: 'zstd:0'", r"m\.yaml:5: zarr_codec: zarr codec 'zstd:0': the level must be"),
        ("zarr_codec: 5", r"m\.yaml:5: zarr_codec: Input should be a valid string"),
    ],
)
def test_manifest_bad_codec_names_the_line_and_key(tmp_path: Path, small_slide: Path, line: str, message: str) -> None:
    from flows.manifest import load_manifest
    from wsi_norm.errors import ManifestError

    with pytest.raises(ManifestError, match=message):
        load_manifest(_manifest(tmp_path, small_slide, line))


def test_manifest_codec_reaches_the_writer_options(tmp_path: Path, small_slide: Path) -> None:
    from flows.manifest import load_manifest

    given = load_manifest(_manifest(tmp_path / "a", small_slide, "zarr_codec: zstd"))
    assert given.model.zarr_codec == "zstd:5"
    assert given.writer("ome-zarr") == WriterOptions(fmt="ome-zarr", zarr_codec="zstd:5")
    absent = load_manifest(_manifest(tmp_path / "b", small_slide, ""))
    assert absent.model.zarr_codec is None
    assert absent.writer("tiff") == WriterOptions(fmt="tiff")
    assert absent.writer("ome-zarr").zarr_codec == DEFAULT_ZARR_CODEC


def test_harmonize_writes_the_manifest_codec_and_rewrites_when_it_changes(tmp_path: Path, small_slide: Path) -> None:
    from flows.harmonize_sites import normalize_to_target
    from flows.manifest import load_manifest

    manifest = load_manifest(_manifest(tmp_path, small_slide, "zarr_codec: 'zstd:2'"))
    (entry,) = manifest.slides
    out = entry.outputs["ome-zarr"]
    assert normalize_to_target.fn(entry, manifest, None, None) == [str(out)]
    assert (_codec_in_metadata(out, 3)["cname"], _codec_in_metadata(out, 3)["clevel"]) == ("zstd", 2)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    normalize_to_target.fn(entry, manifest, None, None)  # current: skipped
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    changed = load_manifest(_manifest(tmp_path, small_slide, "zarr_codec: 'lz4:5'"))
    normalize_to_target.fn(entry, changed, None, None)  # another codec: written again
    assert (out / "zarr.json").stat().st_mtime_ns != stamp
    assert _codec_in_metadata(out, 3)["cname"] == "lz4"
