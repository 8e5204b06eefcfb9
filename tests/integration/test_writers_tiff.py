"""Pyramidal BigTIFF writer: OpenSlide / tiffslide / tifffile open it, pixels, MPP, provenance."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray

from wsi_norm.pyramid import reference_pyramid
from wsi_norm.testing.data import data_dir
from wsi_norm.writers import read_level, read_provenance, write_pyramid

SHARED_DATA = data_dir()
SLIDE = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
MPP = (0.499, 0.5)  # x and y differ on purpose, to catch a swap
PROVENANCE = {"method": "none", "source": {"name": "CMU-1-Small-Region.svs", "sha256": "ab" * 32}}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def slide_pixels() -> NDArray[np.uint8]:
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(SLIDE) as slide:
        pixels: NDArray[np.uint8] = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
        return pixels


@pytest.fixture(scope="module")
def slide_tiff(tmp_path_factory: pytest.TempPathFactory, slide_pixels: np.ndarray) -> Path:
    out = tmp_path_factory.mktemp("tiff") / "cmu.tif"
    return write_pyramid(
        da.from_array(slide_pixels, chunks=(960, 960, 3)), out, mpp=MPP, provenance=PROVENANCE  # type: ignore[no-untyped-call]  # dask is unannotated
    )


_COUNTS: dict[str, Counter[tuple[int, int]]] = {}
_LOCK = threading.Lock()


def _count_chunk(
    block: NDArray[np.uint8], block_info: dict[int, dict[str, Any]] | None = None, *, tag: str
) -> NDArray[np.uint8]:
    loc = block_info[0]["chunk-location"]  # type: ignore[index]
    with _LOCK:
        _COUNTS[tag][(loc[0], loc[1])] += 1
    return block.copy()


def test_openslide_opens_every_level_with_mpp(slide_tiff: Path, slide_pixels: np.ndarray) -> None:
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(slide_tiff) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == 3
        assert slide.level_dimensions == ((2220, 2967), (1110, 1484), (555, 742))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-6)
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0), rel=2e-3)
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3]
        assert json.loads(slide.properties["tiff.ImageDescription"])["wsi_norm"]["method"] == "none"
    psnr = _psnr(level0, slide_pixels)
    assert psnr >= 40.0, f"level-0 PSNR {psnr:.2f} dB"


def test_every_level_close_to_reference(slide_tiff: Path, slide_pixels: np.ndarray) -> None:
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    reference = reference_pyramid(slide_pixels)
    with openslide.OpenSlide(slide_tiff) as o_slide, tiffslide.TiffSlide(slide_tiff) as t_slide:
        assert t_slide.level_dimensions == o_slide.level_dimensions
        assert t_slide.properties["tiffslide.mpp-x"] == pytest.approx(0.499, rel=1e-6)
        for level, expected in enumerate(reference):
            mine = read_level(slide_tiff, level)
            assert mine.shape == expected.shape
            size = o_slide.level_dimensions[level]
            via_openslide = np.asarray(o_slide.read_region((0, 0), level, size))[..., :3]
            via_tiffslide = t_slide.read_region((0, 0), level, size, as_array=True)
            np.testing.assert_array_equal(via_openslide, mine)
            np.testing.assert_array_equal(via_tiffslide, mine)
            # Level 0 of a real H&E slide: >= 40 dB at q90; halved levels carry more
            # detail per pixel and lose more to JPEG (measured ~35.5 dB).
            assert _psnr(mine, expected) >= (40.0 if level == 0 else 34.0)


def test_tiff_structure(slide_tiff: Path) -> None:
    with tifffile.TiffFile(slide_tiff) as tif:
        assert tif.is_bigtiff
        assert len(tif.series) == 1 and len(tif.series[0].levels) == 3
        pages = tif.pages
        assert len(pages) == 3  # levels in the main IFD chain, no SubIFDs
        for k, page in enumerate(pages):
            assert isinstance(page, tifffile.TiffPage)
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (1 if k else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            x_res = page.tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1e4 / (0.499 * 2**k), rel=1e-6)
            assert page.tags["YCbCrSubSampling"].value == (1, 1)  # no chroma subsampling at q90
        assert not pages.first.description.startswith("Aperio")


def test_provenance_round_trip(slide_tiff: Path) -> None:
    record = read_provenance(slide_tiff)
    assert record["source"] == PROVENANCE["source"]
    written = record["written"]
    assert written["format"] == "tiff" and written["options"]["quality"] == 90
    assert written["mpp"] == [0.499, 0.5]
    assert written["software"]["tifffile"] == tifffile.__version__


def test_deflate_uneven_chunks_exact_one_pass(tmp_path: Path) -> None:
    # 650 x 400 chunks never line up with 512-px tiles: blocks of 4550 x 1200 px leave
    # 454 rows and 176 columns to carry into the next band and block
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (9100, 2500, 3), dtype=np.uint8)
    tag = "tiff-deflate"
    _COUNTS[tag] = Counter()
    array = da.from_array(image, chunks=(650, 400, 3)).map_blocks(  # type: ignore[no-untyped-call]  # dask is unannotated
        _count_chunk, dtype=np.uint8, tag=tag
    )
    out = write_pyramid(
        array, tmp_path / "syn.tiff", mpp=None, provenance={}, compression="deflate", tile_px=512
    )
    assert set(_COUNTS[tag].values()) == {1} and len(_COUNTS[tag]) == 14 * 7
    reference = reference_pyramid(image)
    assert len(reference) == 5
    for level, expected in enumerate(reference):
        np.testing.assert_array_equal(read_level(out, level), expected)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.tilewidth == 512
        assert tif.pages.first.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert (
            "XResolution" not in tif.pages.first.tags
            or tif.pages.first.tags["ResolutionUnit"].value == 1
        )
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(out) as slide:
        assert "openslide.mpp-x" not in slide.properties
        assert slide.level_count == 5
        region = np.asarray(slide.read_region((300, 2000), 1, (200, 150)))[..., :3]
        np.testing.assert_array_equal(region, reference[1][1000:1150, 150:350])
    assert read_provenance(out)["written"]["mpp"] is None


def test_lower_quality_is_smaller_and_subsampled(tmp_path: Path, slide_pixels: np.ndarray) -> None:
    crop = slide_pixels[:1024, :1024]
    q90 = write_pyramid(crop, tmp_path / "q90.tif", mpp=MPP, provenance={})
    q60 = write_pyramid(crop, tmp_path / "q60.tif", mpp=MPP, provenance={}, quality=60)
    assert q60.stat().st_size < 0.6 * q90.stat().st_size
    with tifffile.TiffFile(q60) as tif:
        assert tif.pages.first.tags["YCbCrSubSampling"].value == (2, 2)
    assert 30.0 <= _psnr(read_level(q60, 0), crop) < _psnr(read_level(q90, 0), crop)


def test_non_ascii_provenance_is_escaped(tmp_path: Path) -> None:
    out = write_pyramid(
        np.full((300, 200, 3), 240, np.uint8),
        tmp_path / "ü.tif",
        mpp=MPP,
        provenance={"name": "Gewebe-µ-ü.svs"},
    )
    assert read_provenance(out)["name"] == "Gewebe-µ-ü.svs"
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.description.isascii()


def test_rejects_bad_options(tmp_path: Path) -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="compression"):
        write_pyramid(image, tmp_path / "a.tif", mpp=None, provenance={}, compression="lzw")
    with pytest.raises(ValueError, match="quality"):
        write_pyramid(image, tmp_path / "a.tif", mpp=None, provenance={}, quality=0)
    with pytest.raises(ValueError, match="suffix"):
        write_pyramid(image, tmp_path / "a.png", mpp=None, provenance={})
    with pytest.raises(ValueError, match="mpp"):
        write_pyramid(image, tmp_path / "a.tif", mpp=(0.0, 0.5), provenance={})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_pyramid(image, tmp_path / "a.tif", mpp=None, provenance={"x": object()})
    assert not list(tmp_path.iterdir())


def _tile_bytes(path: Path) -> list[list[bytes]]:
    """Every level's encoded tiles, as stored."""
    with tifffile.TiffFile(path) as tif:
        levels = []
        for page in tif.pages:
            tiles = []
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                tif.filehandle.seek(offset)
                tiles.append(tif.filehandle.read(count))
            levels.append(tiles)
        return levels


_PREPARED: list[int] = []  # blocks prepared on in-process workers (module level: pickled by name)


def _counting_prepare(*args: Any) -> Any:

    _PREPARED.append(1)
    return _counting_prepare.__wrapped__(*args)  # type: ignore[attr-defined]


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_distributed_workers_encode_the_same_file(
    tmp_path: Path, slide_pixels: np.ndarray, processes: bool
) -> None:
    """On a ``distributed`` cluster the workers encode the level-0 tiles and build the lower
    levels of blocks on the tile grid (only tiles travel); the file's tiles are the same bytes
    as written in one process, on and off the grid (off it, pixels travel)."""
    distributed = pytest.importorskip("distributed")
    from wsi_norm.writers import tiff

    image = np.ascontiguousarray(np.tile(slide_pixels[1000:1700, :2200], (1, 4, 1)))  # 700 x 8800
    # 512-px chunks: blocks of 4096 columns, on the tile grid; 720-px chunks: blocks end at
    # columns 3600 and 7200, off it
    real = tiff._prepare_block
    _counting_prepare.__wrapped__ = real  # type: ignore[attr-defined]
    for chunks in ((512, 512), (700, 720)):
        array = da.from_array(image, chunks=(*chunks, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
        local = write_pyramid(array, tmp_path / f"local-{chunks[0]}.tif", mpp=MPP, provenance=PROVENANCE)
        with distributed.Client(processes=processes, n_workers=2, threads_per_worker=1,
                                dashboard_address=None):
            if not processes:  # in-process workers: count the blocks prepared there
                tiff._prepare_block = _counting_prepare  # type: ignore[assignment]
            try:
                remote = write_pyramid(array, tmp_path / f"cluster-{chunks[0]}.tif", mpp=MPP,
                                       provenance=PROVENANCE)
            finally:
                tiff._prepare_block = real
        assert _tile_bytes(remote) == _tile_bytes(local)
        if not processes:
            assert (len(_PREPARED) > 0) == (chunks == (512, 512))  # on the grid only
            _PREPARED.clear()


def test_a_block_is_one_task_on_a_cluster(tmp_path: Path, slide_pixels: np.ndarray) -> None:
    """On a ``distributed`` cluster each level-0 block is one task (its chunks' reads and maps run
    inside it), not one task per chunk and step: the scheduler's time per task had cost more than
    the work on a 1-GP slide. The file is the same bytes as written in one process."""
    distributed = pytest.importorskip("distributed")
    image = np.ascontiguousarray(np.tile(slide_pixels[1000:1700, :2200], (1, 4, 1)))  # 700 x 8800
    array = da.from_array(image, chunks=(256, 256, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
    mapped = array.map_blocks(np.flip, axis=2, dtype=np.uint8)  # a second step per chunk
    local = write_pyramid(mapped, tmp_path / "local.tif", mpp=MPP, provenance=PROVENANCE)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client, \
            distributed.get_task_stream(client) as stream:
        remote = write_pyramid(mapped, tmp_path / "cluster.tif", mpp=MPP, provenance=PROVENANCE)
    names = Counter(str(task["key"]).split("-")[0].strip("('") for task in stream.data)
    assert set(names) == {"_block_on_worker"}, names
    assert 2 <= names["_block_on_worker"] < array.npartitions
    assert _tile_bytes(remote) == _tile_bytes(local)


def test_a_blocks_task_asks_for_the_resources_of_its_chunks(tmp_path: Path, slide_pixels: np.ndarray) -> None:
    """A map annotated for GPU workers (``resources={"GPU": 1}``, as the CUDA path does) makes the
    block's task ask for it: the block runs only on a worker that declares the resource."""
    distributed = pytest.importorskip("distributed")
    from dask.base import annotate

    image = np.ascontiguousarray(np.tile(slide_pixels[1000:1700, :2200], (1, 4, 1)))  # 700 x 8800
    array = da.from_array(image, chunks=(256, 256, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
    with annotate(resources={"GPU": 1}):
        mapped = array.map_blocks(np.flip, axis=2, dtype=np.uint8)
    workers = {"plain": {"cls": distributed.Worker, "options": {"nthreads": 1}},
               "gpu": {"cls": distributed.Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": None}}
    with distributed.SpecCluster(workers=workers, scheduler=scheduler) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(2)
        gpu = {w for w, info in client.scheduler_info()["workers"].items() if info["resources"]}
        with distributed.get_task_stream(client) as stream:
            write_pyramid(mapped, tmp_path / "gpu.tif", mpp=MPP, provenance=PROVENANCE)
    assert len(gpu) == 1 and stream.data and {task["worker"] for task in stream.data} == gpu


def test_a_lazy_level_writes_the_dask_arrays_file(tmp_path: Path, slide_pixels: np.ndarray) -> None:
    """A :class:`LazyLevel` (blocks computed by a plain function on threads, no dask) writes the
    same tiles as the dask array of the same chunks, on and off the tile grid; each block is
    computed once, in one piece; an error inside a block is the writer's error and leaves no
    file; an OME-Zarr gets the same pixels through the level's dask array."""
    from wsi_norm.errors import OutputError
    from wsi_norm.pyramid import LazyLevel

    image = np.ascontiguousarray(np.tile(slide_pixels[1000:2100, :2200], (1, 3, 1)))  # 1100 x 6600
    for chunks in ((512, 512), (700, 720)):
        grid = tuple(tuple(min(c, n - s) for s in range(0, n, c)) for n, c in zip(image.shape[:2], chunks, strict=True))
        asked: list[tuple[int, int, int, int]] = []
        lock = threading.Lock()

        def compute(r0: int, r1: int, c0: int, c1: int, asked: list[Any] = asked,
                    lock: threading.Lock = lock) -> NDArray[np.uint8]:
            with lock:
                asked.append((r0, r1, c0, c1))
            return image[r0:r1, c0:c1].copy()

        lazy = LazyLevel(image.shape, grid, compute, threads=3)  # type: ignore[arg-type]
        dask_array = da.from_array(image, chunks=(*chunks, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
        by_dask = write_pyramid(dask_array, tmp_path / f"dask-{chunks[0]}.tif", mpp=MPP, provenance=PROVENANCE)
        by_lazy = write_pyramid(lazy, tmp_path / f"lazy-{chunks[0]}.tif", mpp=MPP, provenance=PROVENANCE)
        assert _tile_bytes(by_lazy) == _tile_bytes(by_dask)
        covered = np.zeros(image.shape[:2], np.int32)
        for r0, r1, c0, c1 in asked:
            covered[r0:r1, c0:c1] += 1
        assert (covered == 1).all() and len(asked) < len(grid[0]) * len(grid[1])  # blocks, not chunks
    zarr = write_pyramid(lazy, tmp_path / "lazy.ome.zarr", mpp=MPP, provenance=PROVENANCE)
    np.testing.assert_array_equal(read_level(zarr, 0), image)

    def broken(r0: int, r1: int, c0: int, c1: int) -> NDArray[np.uint8]:
        if c0 > 0:
            raise OSError("the slide went away")
        return image[r0:r1, c0:c1].copy()

    with pytest.raises(OutputError, match="the slide went away"):
        write_pyramid(LazyLevel(image.shape, grid, broken), tmp_path / "broken.tif",  # type: ignore[arg-type]
                      mpp=MPP, provenance=PROVENANCE)
    assert not (tmp_path / "broken.tif").exists()
    with pytest.raises(ValueError, match="do not tile"):
        LazyLevel((10, 10, 3), ((5,), (10,)), broken)
