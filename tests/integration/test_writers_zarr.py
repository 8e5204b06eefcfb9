"""OME-Zarr writer: round trips, NGFF validation, provenance, one pass, resume."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import zarr
from numpy.typing import NDArray

from wsi_norm.pyramid import reference_pyramid
from wsi_norm.testing.data import data_dir
from wsi_norm.writers import read_level, read_provenance, software_versions, write_pyramid

SHARED_DATA = data_dir()
SLIDE = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
MPP = (0.499, 0.499)
PROVENANCE = {"method": "none", "source": {"name": "CMU-1-Small-Region.svs", "size": 1938955}}


@pytest.fixture(scope="module")
def slide_pixels() -> NDArray[np.uint8]:
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(SLIDE) as slide:
        pixels: NDArray[np.uint8] = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
        return pixels


@pytest.fixture(scope="module")
def slide_zarr(tmp_path_factory: pytest.TempPathFactory, slide_pixels: np.ndarray) -> Path:
    out = tmp_path_factory.mktemp("zarr") / "cmu.ome.zarr"
    array = da.from_array(slide_pixels, chunks=(960, 960, 3))  # type: ignore[no-untyped-call]  # dask is unannotated; 4 x 240-px source tiles
    return write_pyramid(array, out, mpp=MPP, provenance=PROVENANCE)


_COUNTS: dict[str, Counter[tuple[int, int]]] = {}
_LOCK = threading.Lock()


def _count_chunk(
    block: NDArray[np.uint8], block_info: dict[int, dict[str, Any]] | None = None, *, tag: str
) -> NDArray[np.uint8]:
    loc = block_info[0]["chunk-location"]  # type: ignore[index]
    with _LOCK:
        _COUNTS[tag][(loc[0], loc[1])] += 1
    return block.copy()


def _counting(
    image: np.ndarray, chunks: tuple[int, int]
) -> tuple[da.Array, Counter[tuple[int, int]]]:
    tag = f"zarr-{len(_COUNTS)}"
    _COUNTS[tag] = Counter()
    array = da.from_array(image, chunks=(*chunks, 3)).map_blocks(  # type: ignore[no-untyped-call]  # dask is unannotated
        _count_chunk, dtype=np.uint8, tag=tag
    )
    return array, _COUNTS[tag]


def _synthetic(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; the root zarr.json without its creation time."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.parent == root and path.name == "zarr.json":
                doc = json.loads(data)
                del doc["attributes"]["wsi_norm"]["written"]["created"]
                data = json.dumps(doc, sort_keys=True).encode()
            files[str(path.relative_to(root))] = data
    return files


def test_real_slide_every_level_equals_reference(
    slide_zarr: Path, slide_pixels: np.ndarray
) -> None:
    reference = reference_pyramid(slide_pixels)
    assert [r.shape[:2] for r in reference] == [(2967, 2220), (1484, 1110), (742, 555)]
    for level, expected in enumerate(reference):
        np.testing.assert_array_equal(read_level(slide_zarr, level), expected)


def test_ngff_05_metadata(slide_zarr: Path) -> None:
    doc = json.loads((slide_zarr / "zarr.json").read_text())
    assert doc["zarr_format"] == 3
    ome = doc["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    assert [a.get("unit") for a in multiscale["axes"]] == [None, "micrometer", "micrometer"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert scales == [[1.0, 0.499, 0.499], [1.0, 0.998, 0.998], [1.0, 1.996, 1.996]]
    assert [c["color"] for c in ome["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert all(
        c["window"] == {"min": 0, "max": 255, "start": 0, "end": 255}
        for c in ome["omero"]["channels"]
    )
    level0 = json.loads((slide_zarr / "0" / "zarr.json").read_text())
    assert level0["dimension_names"] == ["c", "y", "x"]
    assert level0["shape"] == [3, 2967, 2220]
    (sharding,) = [c for c in level0["codecs"] if c["name"] == "sharding_indexed"]
    # chunks follow the input's 960-px dask chunks, so each block is whole shards
    assert sharding["configuration"]["chunk_shape"] == [1, 960, 960]
    assert level0["chunk_grid"]["configuration"]["chunk_shape"] == [3, 1920, 1920]
    (blosc,) = [c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc"]
    assert blosc["configuration"]["cname"] == "lz4"


def test_ome_zarr_py_reads_every_level(slide_zarr: Path, slide_pixels: np.ndarray) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(str(slide_zarr))
    assert location is not None and location.version == "0.5"
    (node, *_) = list(Reader(location)())
    assert node.metadata["channel_names"] == ["red", "green", "blue"]
    reference = reference_pyramid(slide_pixels)
    assert len(node.data) == len(reference)
    for data, expected in zip(node.data, reference, strict=True):
        np.testing.assert_array_equal(np.asarray(data).transpose(1, 2, 0), expected)


def test_ome_zarr_models_validates_ngff_05(slide_zarr: Path) -> None:
    from ome_zarr_models.v05.image import Image

    image = Image.from_zarr(zarr.open_group(slide_zarr, mode="r"))
    datasets = image.attributes.ome.multiscales[0].datasets
    assert [d.path for d in datasets] == ["0", "1", "2"]


def test_provenance_round_trip(slide_zarr: Path) -> None:
    record = read_provenance(slide_zarr)
    assert record["method"] == "none"
    assert record["source"] == PROVENANCE["source"]
    written = record["written"]
    assert written["format"] == "ome-zarr"
    assert written["mpp"] == [0.499, 0.499]
    assert written["levels"] == [[2967, 2220], [1484, 1110], [742, 555]]
    assert written["software"]["zarr"] == zarr.__version__
    assert written["software"] == {**software_versions(), **written["software"]}
    assert datetime.fromisoformat(written["created"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_uneven_chunks_one_pass_exact(tmp_path: Path) -> None:
    image = _synthetic(4500, 1301, seed=7)
    array, counts = _counting(image, (700, 450))
    calls: list[tuple[int, int]] = []
    out = write_pyramid(
        array,
        tmp_path / "syn.ome.zarr",
        mpp=(0.25, 0.26),
        provenance={"k": 1},
        chunk_px=512,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert set(counts.values()) == {1} and len(counts) == 7 * 3
    assert calls[-1] == (21, 21)
    reference = reference_pyramid(image)
    assert len(reference) == 4
    for level, expected in enumerate(reference):
        np.testing.assert_array_equal(read_level(out, level), expected)
    doc = json.loads((out / "zarr.json").read_text())
    scales = [
        d["coordinateTransformations"][0]["scale"]
        for d in doc["attributes"]["ome"]["multiscales"][0]["datasets"]
    ]
    assert scales[3] == [1.0, 0.26 * 8, 0.25 * 8]  # (c, y, x): y uses mpp_y


def test_no_mpp_gives_pixel_scales_and_a_note(tmp_path: Path) -> None:
    out = write_pyramid(_synthetic(1500, 300, 8), tmp_path / "nompp.zarr", mpp=None, provenance={})
    ome = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]
    axes = ome["multiscales"][0]["axes"]
    assert all("unit" not in a for a in axes)
    assert ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] == [
        1.0,
        2.0,
        2.0,
    ]
    written = read_provenance(out)["written"]
    assert written["mpp"] is None and "no pixel size" in written["note"]


def test_zarr_v2_ngff_04(tmp_path: Path, slide_pixels: np.ndarray) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04.image import Image

    crop = slide_pixels[:2100, :1500]
    out = write_pyramid(crop, tmp_path / "v2.ome.zarr", mpp=MPP, provenance={"m": 1}, zarr_format=2)
    attrs = json.loads((out / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4"
    Image.from_zarr(zarr.open_group(out, mode="r", zarr_format=2))
    location = parse_url(str(out))
    assert location is not None and location.version == "0.4"
    (node, *_) = list(Reader(location)())
    for data, expected in zip(node.data, reference_pyramid(crop), strict=True):
        np.testing.assert_array_equal(np.asarray(data).transpose(1, 2, 0), expected)
    assert read_provenance(out)["m"] == 1
    assert (out / "0" / "0" / "0" / "0").is_file()  # "/" chunk keys as NGFF 0.4 requires


def test_resume_after_interruption_is_bit_identical(tmp_path: Path) -> None:
    image = _synthetic(3100, 1500, seed=9)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = write_pyramid(
        image, tmp_path / "a" / "x.ome.zarr", mpp=MPP, provenance=PROVENANCE, chunk_px=512
    )

    def stop_after_two_bands(done: int, total: int) -> None:
        if done >= 2 * 2 * 3:  # a band is one shard (2 chunks) tall, 3 chunks wide
            raise KeyboardInterrupt  # as a Ctrl-C would: the .partial is kept

    out = tmp_path / "b" / "x.ome.zarr"
    first = da.from_array(image, chunks=(512, 512, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
    with pytest.raises(KeyboardInterrupt):
        write_pyramid(
            first, out, mpp=MPP, provenance=PROVENANCE, chunk_px=512, progress=stop_after_two_bands
        )
    partial = tmp_path / "b" / "x.ome.zarr.partial"
    assert not out.exists() and partial.is_dir()
    rows_done = json.loads((partial / "wsi_norm_progress.json").read_text())["level0_rows"]
    assert rows_done in (1024, 2048)  # writes run behind the computation, at most one band

    array, counts = _counting(image, (512, 512))
    write_pyramid(array, out, mpp=MPP, provenance=PROVENANCE, chunk_px=512)
    assert (
        min(row for row, _ in counts) == rows_done // 512
    )  # finished chunk rows were read back, not computed
    assert not partial.exists()
    assert _tree_bytes(out) == _tree_bytes(full)


def test_partial_from_other_inputs_is_discarded(tmp_path: Path) -> None:
    image = _synthetic(2100, 700, seed=10)
    out = tmp_path / "x.ome.zarr"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_pyramid(image, out, mpp=MPP, provenance={"method": "macenko"}, progress=stop)
    array, counts = _counting(image, (1024, 1024))
    write_pyramid(array, out, mpp=MPP, provenance={"method": "reinhard"})
    assert set(counts.values()) == {1} and len(counts) == 3  # started over
    np.testing.assert_array_equal(read_level(out, 0), image)
    assert read_provenance(out)["method"] == "reinhard"


def test_chunks_equal_to_the_fill_value_are_written(tmp_path: Path) -> None:
    # zarr skips chunks equal to the fill value by default, after scanning each one;
    # the writer turns that off (2.5x faster shard writes), so black tissue is stored
    image = np.zeros((2048, 2048, 3), dtype=np.uint8)
    out = write_pyramid(image, tmp_path / "black.ome.zarr", mpp=MPP, provenance=PROVENANCE)
    shard = out / "0" / "c" / "0" / "0" / "0"
    assert shard.is_file() and shard.stat().st_size > 16 * 12  # 12 chunks and their index
    np.testing.assert_array_equal(read_level(out, 0), image)
