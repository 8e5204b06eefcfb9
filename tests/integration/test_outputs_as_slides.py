"""wsi-norm's outputs are slides: the tool reads what it writes (issue 14).

OME-Zarr outputs (and other NGFF 0.4/0.5 images) open through the ``ome-zarr`` backend, TIFF
outputs through OpenSlide/tiffslide; ``info``, ``mask``, ``fit`` and ``normalize`` run on both
through the console script; the source's scanner metadata (CMU-1-Small-Region: Aperio, 20x)
travels into the provenance and back out through ``info``; templates hold file names, content
hashes and only their method's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_norm import SlideOpenError, UnsupportedFormatError, open_slide
from wsi_norm.pipeline import fit_slide, template_from_fits
from wsi_norm.stain import REGISTRY, StainParams, fit_stats
from wsi_norm.stain.template import load_template
from wsi_norm.writers import read_level, read_provenance, write_pyramid

REPO_ROOT = Path(__file__).resolve().parents[2]
CMU_SIZE = [2220, 2967]
CMU_MPP = 0.499


def _wsi_norm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the ``wsi-norm`` console script (importing this checkout's package)."""
    script = Path(sys.executable).parent / "wsi-norm"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
           "PYTHONWARNINGS": "ignore:Port:UserWarning"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300, check=False)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path) -> dict[str, Path]:
    """CMU-1-Small-Region written by ``wsi-norm normalize --method none`` as OME-Zarr and TIFF."""
    folder = tmp_path_factory.mktemp("outputs")
    made = {}
    for fmt, name in (("ome-zarr", "cmu.ome.zarr"), ("tiff", "cmu.tiff")):
        _ok(_wsi_norm("normalize", str(sample_svs), "--method", "none", "-o", name, "-q", cwd=folder))
        made[fmt] = folder / name
    return made


def _mask_fraction(stdout: str) -> float:
    """The tissue fraction of ``wsi-norm mask``'s line ("... tissue 31.4% of the slide ...")."""
    match = re.search(r"tissue (\d+(?:\.\d+)?)% of the slide", stdout)
    assert match, stdout
    return float(match.group(1)) / 100


@pytest.mark.parametrize("fmt", ["ome-zarr", "tiff"])
def test_info_mask_fit_normalize_on_an_output(
    fmt: str, outputs: dict[str, Path], sample_svs: Path, tmp_path: Path
) -> None:
    out = outputs[fmt]
    facts = json.loads(_ok(_wsi_norm("info", str(out), "--json", cwd=tmp_path)))
    assert facts["dimensions"] == CMU_SIZE
    assert facts["mpp"] == pytest.approx([CMU_MPP, CMU_MPP])
    assert facts["level_dimensions"] == [[2220, 2967], [1110, 1484], [555, 742]]
    assert facts["backend"] == ("ome-zarr" if fmt == "ome-zarr" else "openslide")
    # the source's metadata comes back out of the output
    assert facts["objective_power"] == 20
    assert facts["scanner"]["vendor"] == "aperio"
    assert facts["scanner"]["properties"]["aperio.AppMag"] == "20"
    assert facts["provenance"]["source"]["name"] == sample_svs.name
    source_facts = json.loads(_ok(_wsi_norm("info", str(sample_svs), "--json", cwd=tmp_path)))
    assert facts["tissue_fraction"] == pytest.approx(source_facts["tissue_fraction"], abs=0.01)

    text = _ok(_wsi_norm("info", str(out), "--no-tissue", cwd=tmp_path))
    assert "objective  20x" in text
    assert f"source     {sample_svs.name}  (aperio, 20x, 0.499 um/px)" in text
    assert "qc         n/a (no fitted statistics)" in text  # --method none: nothing fitted

    source_mask = _mask_fraction(_ok(_wsi_norm("mask", str(sample_svs), "-o", "src.png", cwd=tmp_path)))
    out_mask = _mask_fraction(_ok(_wsi_norm("mask", str(out), "-o", "out.png", cwd=tmp_path)))
    assert out_mask == pytest.approx(source_mask, abs=0.01)
    assert (tmp_path / "out.png").stat().st_size > 0

    _ok(_wsi_norm("fit", str(out), "--method", "reinhard", "-o", "t.json", "-q", cwd=tmp_path))
    template = json.loads((tmp_path / "t.json").read_text())
    assert [s["name"] for s in template["slides"]] == [out.name]
    assert str(out.parent) not in json.dumps(template)

    _ok(_wsi_norm("normalize", str(out), "--method", "reinhard", "--target", "t.json",
                  "-o", "again.tiff", "-q", cwd=tmp_path))
    again = open_slide(tmp_path / "again.tiff")
    assert list(again.dimensions) == CMU_SIZE
    assert again.mpp == pytest.approx((CMU_MPP, CMU_MPP))
    record = read_provenance(tmp_path / "again.tiff")
    assert record["source"]["name"] == out.name
    # two runs on, the scanner that made the slide is still known
    assert record["source"]["scanner"]["vendor"] == "aperio"
    assert record["source"]["objective_power"] == 20


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_reader_equals_the_writers_levels(sample_svs: Path, tmp_path: Path, zarr_format: int) -> None:
    source = open_slide(sample_svs)
    out = write_pyramid(source.to_dask(0), tmp_path / "cmu.ome.zarr", mpp=source.mpp,
                        provenance={"method": "none"}, zarr_format=zarr_format, chunk_px=512)
    slide = open_slide(out)
    assert slide.backend == "ome-zarr"
    assert slide.mpp == pytest.approx((CMU_MPP, CMU_MPP))
    assert slide.level_count == 3 and slide.tile_size(0) == (512, 512)
    assert slide.provenance is not None and slide.provenance["method"] == "none"
    for level, (x, y, w, h) in enumerate([(117, 931, 613, 287), (5, 700, 1100, 99), (0, 0, 555, 742)]):
        expected = read_level(out, level)[y : y + h, x : x + w]
        np.testing.assert_array_equal(slide.read_region(level, x=x, y=y, width=w, height=h), expected)
    # zarr is lossless: level 0 is the source pixel for pixel, and the dask chunks are whole
    # store chunks
    level0 = slide.to_dask(0)
    assert level0.chunksize[:2] == (1024, 1024)
    np.testing.assert_array_equal(level0[1000:1600, 300:900].compute(),
                                  source.read_region(0, x=300, y=1000, width=600, height=600))
    # outside the image is white, as for the other backends
    edge = slide.read_region(2, x=500, y=700, width=100, height=100)
    np.testing.assert_array_equal(edge[:42, :55], read_level(out, 2)[700:742, 500:555])
    assert (edge[42:] == 255).all() and (edge[:, 55:] == 255).all()


def _ngff_image(path: Path, pixels: np.ndarray, axes: list[dict[str, Any]], scale: list[float],
                *, dtype: Any = np.uint8) -> Path:
    """A one-level NGFF 0.5 image written with plain zarr (not wsi-norm's writer)."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    array = group.create_array("s0", shape=pixels.shape, chunks=pixels.shape, dtype=dtype)
    array[...] = pixels.astype(dtype)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": axes,
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}
    return path


def test_other_ngff_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    um = {"type": "space", "unit": "micrometer"}
    yxc = _ngff_image(tmp_path / "yxc.zarr", rgb,
                      [{"name": "y", **um}, {"name": "x", **um}, {"name": "c", "type": "channel"}],
                      [0.25, 0.5, 1.0])
    with open_slide(yxc) as slide:  # closed: the chunk-limit check below opens it afresh
        assert slide.dimensions == (60, 40) and slide.mpp == (0.5, 0.25)
        np.testing.assert_array_equal(slide.read_region(0, x=0, y=0, width=60, height=40), rgb)

    tczyx = rgb.transpose(2, 0, 1)[None, :, None]
    five = _ngff_image(tmp_path / "tczyx.zarr", tczyx,
                       [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                        {"name": "z", **um}, {"name": "y", "type": "space", "unit": "nanometer"},
                        {"name": "x", "type": "space", "unit": "nanometer"}],
                       [1.0, 1.0, 1.0, 250.0, 250.0])
    slide = open_slide(five)
    assert slide.mpp == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(slide.read_region(0, x=7, y=3, width=20, height=30), rgb[3:33, 7:27])

    unitless = _ngff_image(tmp_path / "px.zarr", rgb.transpose(2, 0, 1),
                           [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                            {"name": "x", "type": "space"}], [1.0, 1.0, 1.0])
    assert open_slide(unitless).mpp is None

    with pytest.raises(UnsupportedFormatError, match=r"uint16 pixels"):
        open_slide(_ngff_image(tmp_path / "u16.zarr", rgb, [{"name": "y"}, {"name": "x"}, {"name": "c"}],
                               [1.0, 1.0, 1.0], dtype=np.uint16))
    # a read decodes whole chunks: one chunk larger than an untiled image may be is refused
    monkeypatch.setattr("wsi_norm.slide.MAX_UNTILED_PIXELS", 1000)
    with pytest.raises(UnsupportedFormatError, match=r"chunks of 60 x 40 px \(2,400 pixels\) are over"):
        open_slide(yxc)
    monkeypatch.undo()
    with pytest.raises(UnsupportedFormatError, match=r"axes z=2 are not single"):
        open_slide(_ngff_image(tmp_path / "z2.zarr", np.stack([rgb, rgb]),
                               [{"name": "z"}, {"name": "y"}, {"name": "x"}, {"name": "c"}],
                               [1.0, 1.0, 1.0, 1.0]))


def test_a_folder_that_is_not_an_ngff_image_is_one_line_exit_2(tmp_path: Path) -> None:
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "a.txt").write_text("not a slide")
    group = zarr.open_group(tmp_path / "group.zarr", mode="w", zarr_format=3)
    group.attrs["note"] = "a zarr group, but no NGFF image"
    cases = {plain: r"is a directory but not an OME-Zarr image \(no zarr.json",
             tmp_path / "group.zarr": r"a zarr group without NGFF 'multiscales' metadata"}
    for folder, message in cases.items():
        proc = _wsi_norm("info", str(folder), cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"wsi-norm: error: {folder}: "), proc.stderr
        assert __import__("re").search(message, lines[0]), lines[0]
    with pytest.raises(SlideOpenError, match="is a directory; backend 'openslide' reads files"):
        open_slide(tmp_path / "group.zarr", backend="openslide")


def test_provenance_records_the_scanner_bounded(outputs: dict[str, Path]) -> None:
    for out in outputs.values():
        source = read_provenance(out)["source"]
        assert source["objective_power"] == 20
        scanner = source["scanner"]
        assert scanner["vendor"] == "aperio" and scanner["objective_power"] == 20
        assert scanner["mpp"] == pytest.approx([CMU_MPP, CMU_MPP])
        assert scanner["properties"]["aperio.ScanScope ID"] == "CPAPERIOCS"
        assert scanner["properties"]["openslide.objective-power"] == "20"
        # level geometry and associated images are the file's, not the scanner's
        assert not any("level[" in k or "associated" in k for k in scanner["properties"])


def test_scanner_metadata_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_norm.slide import MAX_SCANNER_PROPERTIES, _scanner_properties

    props = {f"philips.PIM_{i:04d}": "x" * (10_000 if i == 0 else 5) for i in range(1000)}
    props["openslide.objective-power"] = "40"
    kept, left_out = _scanner_properties(props)
    assert len(kept) == MAX_SCANNER_PROPERTIES and left_out == 1001 - MAX_SCANNER_PROPERTIES
    assert next(iter(kept)) == "openslide.objective-power"
    assert len(kept["philips.PIM_0000"]) < 600


def test_template_has_names_hashes_and_only_its_methods_params(sample_svs: Path, tmp_path: Path) -> None:
    from wsi_norm.stain.template import SLIDE_KEYS

    params = StainParams(l1_penalty=0.2, iterations=5, min_pixels=500)  # two Vahadane-only knobs
    fits = {m: fit_slide(str(sample_svs.resolve()), method=m, params=params, n_pixels=50_000)
            for m in ("macenko", "reinhard")}
    for method, fit in fits.items():
        doc = template_from_fits([fit], params=params).to_dict()
        text = json.dumps(doc)
        assert str(sample_svs.parent) not in text and '"path"' not in text
        (slide,) = doc["slides"]
        # Macenko's entry also says what the codec-aware fit did (here: off, the default)
        assert set(slide) == set(SLIDE_KEYS) | ({"codec_correction"} if method == "macenko" else set())
        if method == "macenko":
            assert slide["codec_correction"] == {"applied": False, "reason": "turned off (codec_correction: false)"}
        assert slide["name"] == sample_svs.name
        assert slide["sampled_sha256"] == open_slide(sample_svs).identity()["sampled_sha256"]
        assert list(doc["params"]) == list(REGISTRY[method].params)
        assert "l1_penalty" not in doc["params"] and "iterations" not in doc["params"]
        assert doc["params"]["min_pixels"] == 500
    assert set(fits["reinhard"].params) > {"white_point", "min_pixels"}  # the fit itself keeps all

    # templates written before (every parameter, slides with their path) load as recorded
    old = {"schema_version": 2, "method": "reinhard", "lab_mean": [60.0, 20.0, -10.0],
           "lab_std": [10.0, 5.0, 4.0], "white_point": {"rgb": [240.0, 240.0, 240.0], "source": "glass"},
           "params": StainParams().to_dict(), "slides": [{"name": "a.svs", "path": "/data/a.svs"}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    template = load_template(tmp_path / "old.json", method="reinhard")
    assert template.params == StainParams().to_dict() and template.slides[0]["path"] == "/data/a.svs"


@pytest.mark.parametrize("method", list(REGISTRY))
def test_fields_outside_a_methods_params_do_not_change_its_fit(method: str) -> None:
    """The recorded list is complete: a StainParams field a method does not record cannot change
    its fit (if it did, a template would not say how it was made)."""
    rng = np.random.default_rng(0)
    od = rng.gamma(2.0, 0.25, (20_000, 2)) @ np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    pixels = np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)
    base = StainParams(max_fit_pixels=5000, iterations=10)
    reference = fit_stats(method, pixels, base, white=np.full(3, 240.0)).to_dict()
    changed: dict[str, Any] = {"white_point": 250.0, "macenko_variant": "textbook", "alpha": 3.0, "beta": 0.2,
               "edge_band": 30.0, "edge_strong": 60.0, "max_od": 2.0, "l1_penalty": 0.05,
               "debias": False, "max_conc_percentile": 95.0, "min_pixels": 500,
               "min_stain_angle_deg": 4.0, "seed": 7, "max_fit_pixels": 4000, "iterations": 5,
               "device": "cpu", "codec_correction": True, "fit_on": "pixels"}
    assert set(changed) == {f.name for f in dataclasses.fields(StainParams)}
    for name, value in changed.items():
        if name in REGISTRY[method].params or name == "device":
            continue
        other = fit_stats(method, pixels, dataclasses.replace(base, **{name: value}),
                          white=np.full(3, 240.0)).to_dict()
        assert json.dumps(other) == json.dumps(reference), f"{method}: {name} changed the fit"
