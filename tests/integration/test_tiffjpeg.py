"""Direct JPEG-tile reads (:mod:`wsi_norm.tiffjpeg`): OpenSlide's pixels, bit for bit, or not used."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from numpy.typing import NDArray

from wsi_norm.errors import SlideReadError
from wsi_norm.slide import Backend, open_slide
from wsi_norm.testing.synthetic import generate_slide
from wsi_norm.tiffjpeg import JpegTiles


def _openslide_region(path: Path, level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
    """OpenSlide's own read, composited over white, independently of wsi_norm.slide."""
    with openslide.OpenSlide(str(path)) as slide:
        ds = slide.level_downsamples[level]
        rgba = np.asarray(slide.read_region((round(x * ds), round(y * ds)), level, (w, h))).astype(np.int32)
    rgb: NDArray[np.uint8] = np.minimum(rgba[..., :3] + (255 - rgba[..., 3:]), 255).astype(np.uint8)
    return rgb


def _open_tiles(path: Path) -> JpegTiles:
    with openslide.OpenSlide(str(path)) as slide:
        dims = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
    tiles = JpegTiles.open(path, dims, lambda level, x, y, w, h: _openslide_region(path, level, x, y, w, h))
    assert tiles is not None
    return tiles


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 3-level JPEG (YCbCr 4:2:0) pyramid whose sides are not whole tiles."""
    path = tmp_path_factory.mktemp("tiffjpeg") / "pyramid.tiff"
    generate_slide(path, width=2300, height=1700, seed=3, tile_px=256, texture="procedural", min_level_px=512)
    return path


def test_every_tile_of_the_real_aperio_slide_is_openslides(sample_svs: Path) -> None:
    tiles = _open_tiles(sample_svs)
    try:
        assert tiles.levels == (0,)  # the sample's one level, RGB JPEG tiles with shared tables
        with openslide.OpenSlide(str(sample_svs)) as slide:
            w, h = slide.dimensions
        assert np.array_equal(tiles.read(0, 0, 0, w, h), _openslide_region(sample_svs, 0, 0, 0, w, h))
    finally:
        tiles.close()


def test_every_level_of_a_generated_pyramid_is_openslides_in_any_region(pyramid: Path) -> None:
    tiles = _open_tiles(pyramid)
    rng = np.random.default_rng(0)
    try:
        with openslide.OpenSlide(str(pyramid)) as slide:
            dims = slide.level_dimensions
        assert tiles.levels == tuple(range(len(dims))) and len(dims) >= 3
        for level, (w, h) in enumerate(dims):
            assert np.array_equal(tiles.read(level, 0, 0, w, h), _openslide_region(pyramid, level, 0, 0, w, h))
            if dims[0][0] % w or dims[0][1] % h:
                continue  # OpenSlide interpolates regions at fractional level-0 positions (tiffjpeg)
            for _ in range(6):  # unaligned regions, some past the right or bottom edge (white there)
                x, y = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
                rw, rh = int(rng.integers(1, 700)), int(rng.integers(1, 700))
                assert np.array_equal(tiles.read(level, x, y, rw, rh), _openslide_region(pyramid, level, x, y, rw, rh))
    finally:
        tiles.close()


def test_both_backends_read_through_it_and_agree(pyramid: Path) -> None:
    with open_slide(pyramid, backend="openslide") as a, open_slide(pyramid, backend="tiffslide") as b:
        for slide in (a, b):
            assert slide._reader._tiles is not None and slide._reader._tiles.levels == (0, 1, 2, 3)  # type: ignore[attr-defined]
        assert np.array_equal(a.read_region(0, x=100, y=50, width=900, height=800),
                              b.read_region(0, x=100, y=50, width=900, height=800))


def test_rgb_jpeg_written_by_tifffile_reads_as_tiffslide(tmp_path: Path) -> None:
    path = tmp_path / "rgb.tif"
    y, x = np.mgrid[0:600, 0:520]
    image = np.stack([(x * 255 // 519), (y * 255 // 599), ((x + y) % 256)], axis=-1).astype(np.uint8)
    tifffile.imwrite(path, image, tile=(256, 256), compression="jpeg", photometric="rgb")
    with open_slide(path, backend="tiffslide") as slide:
        direct = slide.read_region(0, x=0, y=0, width=520, height=600)
        reference = slide._reader._read_region(0, 0, 0, 520, 600)  # type: ignore[attr-defined]
        assert slide._reader._tiles is not None  # type: ignore[attr-defined]
    assert np.array_equal(direct, reference)


def test_a_level_that_decodes_differently_stays_on_the_backend(pyramid: Path) -> None:
    with openslide.OpenSlide(str(pyramid)) as slide:
        dims = tuple((int(w), int(h)) for w, h in slide.level_dimensions)

    def shifted(level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        region = _openslide_region(pyramid, level, x, y, w, h)
        return region if level != 1 else region ^ np.uint8(1)  # level 1 "decodes" one level apart

    tiles = JpegTiles.open(pyramid, dims, shifted)
    assert tiles is not None
    try:
        assert tiles.levels == (0, 2, 3)
    finally:
        tiles.close()


def test_a_tile_without_bytes_is_read_by_the_backend(pyramid: Path) -> None:
    tiles = _open_tiles(pyramid)
    calls: list[tuple[int, int, int, int, int]] = []

    def backend(level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        calls.append((level, x, y, w, h))
        return np.full((h, w, 3), 7, np.uint8)

    try:
        assert tiles.covers(0)
        layout = tiles._levels[0]
        counts = list(layout.counts)
        counts[1] = 0  # tile column 1, row 0: recorded with no bytes, as in a sparse TIFF
        tiles._levels[0] = dataclasses.replace(layout, counts=tuple(counts))
        tiles._reference = backend
        region = tiles.read(0, 200, 0, 400, 300)
    finally:
        tiles.close()
    assert calls == [(0, 256, 0, 256, 256)]
    assert (region[:256, 56:312] == 7).all() and not (region[:256, :56] == 7).all()


def test_layouts_it_does_not_know_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "zlib.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), compression="zlib")
    assert JpegTiles.open(path, ((512, 512),), lambda *a: np.zeros((1, 1, 3), np.uint8)) is None


def test_a_truncated_tile_names_file_level_and_tile(pyramid: Path, tmp_path: Path) -> None:
    tiles = _open_tiles(pyramid)
    try:
        assert tiles.covers(0)
        layout = tiles._levels[0]
        offsets = list(layout.offsets)
        offsets[0] = pyramid.stat().st_size - 10  # the tile would run past the end of the file
        tiles._levels[0] = dataclasses.replace(layout, offsets=tuple(offsets))
        with pytest.raises(SlideReadError, match=rf"^{pyramid}: cannot read level 0 region x=0 y=0 10x10: "
                                                 r"the file ends inside tile column 0, row 0"):
            tiles.read(0, 0, 0, 10, 10)
    finally:
        tiles.close()


def test_a_corrupt_first_tile_does_not_keep_a_level_off_the_direct_path(pyramid: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.tiff"
    data = bytearray(pyramid.read_bytes())
    with tifffile.TiffFile(pyramid) as tif:
        offset = int(tif.pages[0].dataoffsets[0])
    data[offset : offset + 64] = b"\xff" * 64  # the JPEG header of tile column 0, row 0 of level 0
    damaged.write_bytes(bytes(data))
    tiles = _open_tiles(damaged)
    try:
        assert tiles.covers(0)  # judged on the middle tile instead
        with pytest.raises(SlideReadError, match=r"corrupt JPEG tile column 0, row 0"):
            tiles.read(0, 0, 0, 64, 64)
        assert np.array_equal(tiles.read(0, 256, 256, 300, 300), _openslide_region(damaged, 0, 256, 256, 300, 300))
    finally:
        tiles.close()


def test_a_slide_opened_again_is_not_checked_again_until_its_file_changes(
    pyramid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import collections
    import os
    import shutil

    from wsi_norm import tiffjpeg

    monkeypatch.setattr(tiffjpeg, "_verdicts", collections.OrderedDict())
    checks: list[tuple[str, int]] = []
    agrees = JpegTiles._agrees

    def counted(self: JpegTiles, level: int, layout: Any, whole: bool) -> bool:
        checks.append((Path(self._path).name, level))
        return agrees(self, level, layout, whole)

    monkeypatch.setattr(JpegTiles, "_agrees", counted)
    copy = tmp_path / "copy.tiff"
    shutil.copyfile(pyramid, copy)

    def read_twice(path: Path, backend: Backend) -> NDArray[np.uint8]:
        with open_slide(path, backend=backend) as slide:
            first = slide.read_region(1, x=10, y=20, width=300, height=200)
        with open_slide(path, backend=backend) as slide:
            second = slide.read_region(1, x=10, y=20, width=300, height=200)
        assert np.array_equal(first, second)
        return first

    region = read_twice(copy, "openslide")
    assert checks == [("copy.tiff", 1)]  # the second opening trusts the first one's verdict
    assert np.array_equal(region, _openslide_region(copy, 1, 10, 20, 300, 200))
    read_twice(copy, "tiffslide")
    assert checks == [("copy.tiff", 1)] * 2  # another backend: its own check
    # the same bytes written again (a new modification time): checked again
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 1_000_000_000))
    read_twice(copy, "openslide")
    assert checks == [("copy.tiff", 1)] * 3
    # a reader of unknown make (no backend named) checks at every opening
    for _ in range(2):
        tiles = _open_tiles(copy)
        try:
            assert tiles.covers(1)
        finally:
            tiles.close()
    assert checks == [("copy.tiff", 1)] * 5
