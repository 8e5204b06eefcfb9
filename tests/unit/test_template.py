"""Template JSON: round trips and TemplateError cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from wsi_norm.errors import TemplateError
from wsi_norm.stain import METHODS, StainParams, fit_stats, stats_from_dict
from wsi_norm.stain.base import order_stains
from wsi_norm.stain.macenko import MacenkoStats
from wsi_norm.stain.template import (
    MAX_TEMPLATE_BYTES,
    SCHEMA_VERSION,
    Template,
    load_template,
    save_template,
)
from wsi_norm.tissue.whitepoint import WhitePoint


def _pixels() -> NDArray[np.uint8]:
    rng = np.random.default_rng(0)
    return rng.integers(40, 200, (3000, 3), dtype=np.uint8)


def _macenko_template() -> Template:
    stats = MacenkoStats(stain_matrix=order_stains(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])), max_conc=np.array([1.9, 1.1]))
    return Template("macenko", stats, slides=[{"path": "a.svs"}], n_pixels=3000, seed=1)


def test_macenko_template_round_trip_and_schema(tmp_path: Path) -> None:
    t = _macenko_template()
    path = tmp_path / "t.json"
    save_template(t, path)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["method"] == "macenko"
    assert np.array(doc["stain_matrix"]).shape == (2, 3) and len(doc["max_concentrations"]) == 2
    assert load_template(path, method="macenko") == t


@pytest.mark.parametrize("method", ["reinhard", "histmatch"])
def test_other_methods_round_trip(tmp_path: Path, method: str) -> None:
    stats = fit_stats(method, _pixels())
    # Template converts StainParams to its dict at runtime; its annotation names only the dict
    t = Template(method, stats, params=StainParams(alpha=2.0, min_pixels=500),  # type: ignore[arg-type]
                 white=WhitePoint((236.5, 241.0, 249.0), "glass", 812))
    save_template(t, tmp_path / "t.json")
    back = load_template(tmp_path / "t.json")
    # only the fields the method reads are kept: Macenko's alpha is not a Reinhard/histmatch knob
    assert back.stats == stats and back.params == {"white_point": None, "min_pixels": 500}
    assert back.white == WhitePoint((236.5, 241.0, 249.0), "glass", 812)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=6, max_size=6), st.floats(0.1, 5), st.floats(0.1, 5))
def test_stats_dict_round_trip(vals: list[float], h: float, e: float) -> None:
    m = np.array(vals).reshape(2, 3)
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    if np.degrees(np.arccos(min(1.0, abs(float(m[0] @ m[1]))))) < 1.0:  # one direction twice
        with pytest.raises(ValueError, match="parallel"):
            MacenkoStats(stain_matrix=m, max_conc=np.array([h, e]))
        return
    stats = MacenkoStats(stain_matrix=m, max_conc=np.array([h, e]))
    back = stats_from_dict("macenko", json.loads(json.dumps(stats.to_dict())))
    assert back == stats


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_errors_name_the_file(tmp_path: Path) -> None:
    good = _macenko_template().to_dict()
    cases = [
        ("{not json", "not valid JSON"),
        ({k: v for k, v in good.items() if k != "schema_version"}, "missing 'schema_version'"),
        ({**good, "schema_version": 99}, "unsupported schema_version 99"),
        ({**good, "method": "magic"}, "unknown method 'magic'"),
        ({k: v for k, v in good.items() if k != "max_concentrations"}, "lacks field 'max_concentrations'"),
        ({**good, "stain_matrix": [[1, 0, 0]]}, r"shape \(2, 3\)"),
        ({**good, "white_point": {"rgb": [300, 240, 240], "source": "glass"}}, r"white point must be in \(0, 255\]"),
        ({**good, "white_point": {"rgb": [240, 240, 240], "source": "guess"}}, "unknown white point source 'guess'"),
        ([1, 2], "must be a JSON object"),
    ]
    for doc, msg in cases:
        p = _write(tmp_path, doc)
        with pytest.raises(TemplateError, match=msg) as info:
            load_template(p)
        assert str(p) in str(info.value)
    p = _write(tmp_path, good)
    with pytest.raises(TemplateError, match="for method 'macenko', but 'reinhard' was requested"):
        load_template(p, method="reinhard")
    with pytest.raises(TemplateError, match="cannot read"):
        load_template(tmp_path / "missing.json")


def test_an_image_given_as_a_template_is_named_as_one(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.full((8, 8, 3), 200, np.uint8)
    for fmt, kind in (("PNG", "PNG"), ("JPEG", "JPEG"), ("TIFF", "TIFF"), ("BMP", "BMP"), ("WEBP", "WebP")):
        p = tmp_path / f"target.{fmt.lower()}"
        Image.fromarray(rgb).save(p, format=fmt)
        with pytest.raises(TemplateError, match=f"a {kind} image, not a template.*--reference") as info:
            load_template(p)
        assert str(p) in str(info.value)
    big = tmp_path / "slide.tiff"  # a slide is larger than any template: named as an image all the same
    big.write_bytes(b"II*\x00" + bytes(MAX_TEMPLATE_BYTES + 16))
    with pytest.raises(TemplateError, match="a TIFF image, not a template"):
        load_template(big)
    text = _write(tmp_path, "BMW is not JSON")  # a text starting like no image: the JSON error
    with pytest.raises(TemplateError, match="not valid JSON"):
        load_template(text)
    # JSON whose bytes 128-131 read "DICM" (a DICOM file's marker) is still read as JSON
    doc = _macenko_template().to_dict()
    head = '{"slides": [{"path": "'
    path_text = "x" * (128 - len(head)) + "DICM.svs"
    document = json.dumps({"slides": [{"path": path_text}], **{k: v for k, v in doc.items() if k != "slides"}})
    assert document.encode()[128:132] == b"DICM"
    assert load_template(_write(tmp_path, document)).slides == [{"path": path_text}]


def test_all_methods_known() -> None:
    assert METHODS == ("macenko", "vahadane", "reinhard", "histmatch", "gmm")
