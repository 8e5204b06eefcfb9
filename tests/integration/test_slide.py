"""Reading slides: both backends, plain images, lazy dask arrays, and bad input."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image

from wsi_norm import (
    LevelError,
    SlideOpenError,
    SlideReadError,
    UnsupportedFormatError,
    WsiNormError,
    open_slide,
)
from wsi_norm.slide import Backend

CMU_SIZE = (2220, 2967)


def test_svs_facts_openslide(sample_svs: Path) -> None:
    slide = open_slide(sample_svs)
    assert slide.backend == "openslide"
    assert slide.dimensions == CMU_SIZE
    assert slide.level_count == 1
    assert slide.level_downsamples == (1.0,)
    assert slide.mpp == pytest.approx((0.499, 0.499))
    assert slide.vendor == "aperio"
    assert slide.tile_size(0) == (240, 240)
    assert slide.properties["aperio.AppMag"] == "20"


def test_svs_facts_tiffslide(sample_svs: Path) -> None:
    slide = open_slide(sample_svs, backend="tiffslide")
    assert slide.backend == "tiffslide"
    assert slide.dimensions == CMU_SIZE
    assert slide.mpp == pytest.approx((0.499, 0.499))
    assert slide.vendor == "aperio"
    assert slide.tile_size(0) == (240, 240)


@pytest.mark.parametrize("region", [(0, 0, 2220, 2967), (117, 931, 613, 287), (2000, 2900, 220, 67)])
def test_backends_agree_pixel_for_pixel(sample_svs: Path, region: tuple[int, int, int, int]) -> None:
    x, y, w, h = region
    a = open_slide(sample_svs, backend="openslide").read_region(0, x=x, y=y, width=w, height=h)
    b = open_slide(sample_svs, backend="tiffslide").read_region(0, x=x, y=y, width=w, height=h)
    assert a.shape == b.shape == (h, w, 3)
    assert a.dtype == b.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_backends_agree_on_generated_pyramid(tmp_path: Path) -> None:
    from wsi_norm.testing.synthetic import generate_slide

    path = tmp_path / "gen.tiff"
    generate_slide(path, width=3000, height=2200, seed=3, tile_px=256, mpp=0.5)
    a = open_slide(path, backend="openslide")
    b = open_slide(path, backend="tiffslide")
    assert a.level_count == b.level_count > 1
    assert a.level_dimensions == b.level_dimensions
    assert a.mpp == pytest.approx((0.5, 0.5))
    assert b.mpp == pytest.approx((0.5, 0.5))
    for level in range(a.level_count):
        w, h = a.level_dimensions[level]
        np.testing.assert_array_equal(
            a.read_region(level, x=0, y=0, width=w, height=h),
            b.read_region(level, x=0, y=0, width=w, height=h),
        )


def test_to_dask_chunks_align_with_tiles(sample_svs: Path) -> None:
    slide = open_slide(sample_svs)
    arr = slide.to_dask(0)
    assert arr.shape == (2967, 2220, 3)
    assert arr.dtype == np.uint8
    assert arr.chunksize == (960, 960, 3)  # 4 x 240-px tiles, the multiple closest to 1024
    assert all(c % 240 == 0 for c in arr.chunks[0][:-1])
    assert slide.to_dask(0, chunk_px=500).chunksize == (480, 480, 3)
    np.testing.assert_array_equal(
        arr[1000:1300, 500:900].compute(), slide.read_region(0, x=500, y=1000, width=400, height=300)
    )


def test_to_dask_reads_only_computed_chunks(sample_svs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slide = open_slide(sample_svs)
    calls: list[tuple[int, int, int, int]] = []
    original = slide.read_region

    def counting(level: int = 0, *, x: int, y: int, width: int, height: int) -> np.ndarray:
        calls.append((x, y, width, height))
        return original(level, x=x, y=y, width=width, height=height)

    monkeypatch.setattr(slide, "read_region", counting)
    arr = slide.to_dask(0)
    assert calls == []
    arr.blocks[1, 2].compute(scheduler="sync")
    assert calls == [(1920, 960, 300, 960)]


def test_slide_pickles_by_path(sample_svs: Path) -> None:
    slide = open_slide(sample_svs, backend="tiffslide")
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.backend == "tiffslide"
    assert len(pickle.dumps(slide)) < 1000
    np.testing.assert_array_equal(
        clone.read_region(0, x=10, y=10, width=20, height=20),
        slide.read_region(0, x=10, y=10, width=20, height=20),
    )


def test_identity_hashes_header(sample_svs: Path, tmp_path: Path) -> None:
    ident = open_slide(sample_svs).identity()
    assert ident["name"] == "CMU-1-Small-Region.svs"
    assert ident["size_bytes"] == sample_svs.stat().st_size
    assert len(ident["header_sha256"]) == 64
    copy = tmp_path / "copy.svs"
    shutil.copy(sample_svs, copy)
    assert open_slide(copy).identity()["header_sha256"] == ident["header_sha256"]


def test_plain_images_open_as_one_level_slides(shared_data: Path, tmp_path: Path) -> None:
    png = shared_data / "he" / "torchstain-source.png"
    slide = open_slide(png)
    assert slide.backend == "image"
    assert slide.level_count == 1
    assert slide.mpp is None
    rgba = np.asarray(Image.open(png))
    assert rgba.shape[2] == 4 and rgba[..., 3].min() == 255  # opaque alpha: the colours as they are
    rgb = slide.to_dask(0).compute()  # type: ignore[no-untyped-call]  # dask is unannotated
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    assert open_slide(png, mpp=0.25).mpp == (0.25, 0.25)

    jpeg = tmp_path / "patch.jpg"
    Image.fromarray(rgb).save(jpeg, quality=95)
    assert open_slide(jpeg).dimensions == (rgb.shape[1], rgb.shape[0])

    flat = tmp_path / "untiled.tif"
    tifffile.imwrite(flat, rgb)
    np.testing.assert_array_equal(open_slide(flat).to_dask(0).compute(), rgb)  # type: ignore[no-untyped-call]  # dask


def test_non_ascii_file_name(sample_svs: Path, tmp_path: Path) -> None:
    path = tmp_path / "Gewebe-Präparat-組織.svs"
    shutil.copy(sample_svs, path)
    assert open_slide(path).dimensions == CMU_SIZE


# ------------------------------------------------------------------ bad input
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match=r"nope\.svs: no such file"):
        open_slide(tmp_path / "nope.svs")


def test_garbage_with_slide_suffix(tmp_path: Path) -> None:
    path = tmp_path / "garbage.svs"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    with pytest.raises(UnsupportedFormatError, match=r"garbage\.svs: not a slide or image"):
        open_slide(path)
    with pytest.raises(WsiNormError, match=r"garbage\.svs"):
        open_slide(path, backend="openslide")


def test_a_template_given_as_a_slide_is_pointed_to_the_target(tmp_path: Path) -> None:
    template = tmp_path / "target.json"
    template.write_text('\n  {"schema_version": 2, "method": "macenko"}')
    with pytest.raises(UnsupportedFormatError, match=r"target\.json: not a slide .*it is JSON: a template .*--target"):
        open_slide(template)
    other = tmp_path / "notes.txt"  # not JSON: no such note
    other.write_text("[not a slide]")
    with pytest.raises(UnsupportedFormatError, match=r"not a tiled TIFF\)$"):
        open_slide(other)


@pytest.mark.parametrize("keep", [900_000, 1_700_000])
@pytest.mark.parametrize("backend", ["openslide", "tiffslide", None])
def test_truncated_svs(sample_svs: Path, tmp_path: Path, keep: int, backend: str | None) -> None:
    path = tmp_path / "truncated.svs"
    path.write_bytes(sample_svs.read_bytes()[:keep])
    with pytest.raises(SlideOpenError, match=r"truncated\.svs: .*truncated"):
        open_slide(path, backend=backend)  # type: ignore[arg-type]


def test_truncated_tiles_of_tiled_tiff(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, rgb, tile=(256, 256), compression="jpeg")
    path = tmp_path / "cut.tif"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.raises(SlideOpenError, match=r"cut\.tif: truncated: \d+ of 16 tiles"):
        open_slide(path)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupt_tile_data_fails_on_read(tmp_path: Path, backend: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[5])
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64  # destroy the JPEG header of tile 5
    path.write_bytes(bytes(data))
    slide = open_slide(path, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(SlideReadError, match=r"corrupt\.tif: cannot read level 0 region"):
        slide.to_dask(0, chunk_px=256).compute(scheduler="sync")  # type: ignore[no-untyped-call]  # dask is unannotated


def test_sixteen_bit_and_gray_images_are_refused(tmp_path: Path) -> None:
    rgb16 = tmp_path / "deep.tif"
    tifffile.imwrite(rgb16, np.zeros((64, 64, 3), np.uint16))
    with pytest.raises(UnsupportedFormatError, match=r"deep\.tif: uint16 pixels"):
        open_slide(rgb16)
    tiled16 = tmp_path / "deep_tiled.tif"
    tifffile.imwrite(tiled16, np.zeros((512, 512, 3), np.uint16), tile=(256, 256))
    with pytest.raises(UnsupportedFormatError, match=r"deep_tiled\.tif: uint16 pixels"):
        open_slide(tiled16, backend="tiffslide")
    png16 = tmp_path / "deep.png"
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(png16)
    with pytest.raises(UnsupportedFormatError, match=r"deep\.png: image mode .*16-bit"):
        open_slide(png16)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(gray)
    with pytest.raises(UnsupportedFormatError, match=r"gray\.png: image mode 'L' \(not RGB\)"):
        open_slide(gray)


def test_level_that_does_not_exist(sample_svs: Path) -> None:
    slide = open_slide(sample_svs)
    with pytest.raises(LevelError, match=r"CMU-1-Small-Region\.svs: level 3 requested, slide has 1"):
        slide.to_dask(3)
    with pytest.raises(LevelError, match="level -1 requested"):
        slide.read_region(-1, x=0, y=0, width=1, height=1)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_norm.cli import main

    path = tmp_path / "garbage.svs"
    path.write_bytes(b"not a slide at all" * 100)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("wsi-norm: error: ") and "garbage.svs" in err[0]


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_held_level0_serves_the_same_regions(sample_svs: Path, backend: str) -> None:
    # a small slide's level 0 is read once and level-0 regions are sliced from it: the same
    # pixels as reading them, at edges too; a region reaching outside the slide is read as before
    slide = open_slide(sample_svs, backend=backend)  # type: ignore[arg-type]
    w, h = slide.dimensions
    regions = [(0, 0, 256, 256), (w - 100, h - 37, 100, 37), (1000, 1200, 513, 77), (5, 2900, 2000, 67),
               (w - 10, h - 10, 50, 50)]
    expected = [slide.read_region(0, x=x, y=y, width=rw, height=rh) for x, y, rw, rh in regions]
    with slide.hold_level0() as held:
        assert held.shape == (h, w, 3) and not held.flags.writeable
        got = [slide.read_region(0, x=x, y=y, width=rw, height=rh) for x, y, rw, rh in regions]
        assert got[0].flags.writeable  # a copy, as a read is
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert slide._held is None  # released


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_tile_cache_decodes_each_large_tile_once_with_the_same_pixels(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a one-level slide stored in 2048-px JPEG tiles (2 x 2, the last ones partial): small reads
    # inside a tile cache, from four threads at once, are the reads without it, and each tile is
    # decoded once; reads of half a tile or more go to the reader as before
    from concurrent.futures import ThreadPoolExecutor

    from wsi_norm.testing.synthetic import generate_slide

    path = tmp_path / "big-tiles.tiff"
    generate_slide(path, width=3000, height=2100, seed=5, tile_px=2048, texture="procedural", min_level_px=4096)
    slide = open_slide(path, backend=backend)  # type: ignore[arg-type]
    assert slide.level_count == 1 and slide.tile_size(0) == (2048, 2048)
    rng = np.random.default_rng(1)
    regions = [(int(x), int(y), 256, 256) for x, y in zip(rng.integers(0, 2744, 40), rng.integers(0, 1844, 40),
                                                          strict=True)]
    regions += [(1900, 1900, 300, 200), (2900, 2000, 256, 256), (-20, -10, 64, 64), (0, 0, 1, 1)]
    expected = [slide.read_region(0, x=x, y=y, width=w, height=h) for x, y, w, h in regions]
    calls: list[tuple[int, int, int, int, int]] = []
    read = slide._reader.read

    def counted(level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        calls.append((level, x, y, w, h))
        return read(level, x, y, w, h)

    monkeypatch.setattr(slide._reader, "read", counted)

    def expected_at(x: int, y: int) -> NDArray[np.uint8]:
        return np.asarray(read(0, x, y, 64, 64))

    with slide.tile_cache(), ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: slide.read_region(0, x=r[0], y=r[1], width=r[2], height=r[3]), regions * 2))
        assert sorted(calls) == [(0, x, y, 2048, 2048) for x in (0, 2048) for y in (0, 2048)]  # once each
        whole = slide.read_region(0, x=0, y=0, width=2048, height=1500)  # half a tile or more: not cached
        assert calls[-1] == (0, 0, 0, 2048, 1500)
    for a, b in zip(got, expected * 2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert whole.flags.writeable and got[0].flags.writeable  # copies, as reads are
    assert slide._tiles is None  # released

    # a cache of one tile's bytes: tiles are dropped and decoded again, the pixels are the same
    calls.clear()
    with slide.tile_cache(max_bytes=2048 * 2048 * 3):
        got = [slide.read_region(0, x=x, y=y, width=w, height=h) for x, y, w, h in regions]
    assert len(calls) > 4
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)

    # a budget smaller than one tile: the tile last used is kept alone (each read of one tile's
    # parts would decode it again otherwise)
    calls.clear()
    with slide.tile_cache(max_bytes=1):
        got = [slide.read_region(0, x=x, y=y, width=64, height=64) for x, y in ((10, 10), (20, 30), (500, 700))]
    assert calls == [(0, 0, 0, 2048, 2048)]
    for a, (x, y) in zip(got, ((10, 10), (20, 30), (500, 700)), strict=True):
        np.testing.assert_array_equal(a, expected_at(x, y))

    # a tile that fails to decode is not kept: every read that needs it says so
    def broken(level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        raise SlideReadError(f"{path}: corrupt JPEG tile")

    monkeypatch.setattr(slide._reader, "read", broken)
    with slide.tile_cache():
        for _ in range(2):
            with pytest.raises(SlideReadError, match="corrupt JPEG tile"):
                slide.read_region(0, x=10, y=10, width=64, height=64)


def test_the_fit_sample_decodes_each_large_tile_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the fit's windows on a slide stored in large tiles: each tile decoded once (not once per
    # window), and the same sample as reading every window from the file
    import wsi_norm.slide as slide_module
    from wsi_norm.testing.synthetic import generate_slide
    from wsi_norm.tissue.mask import coarse_mask
    from wsi_norm.tissue.sampling import sample_tissue_pixels

    path = tmp_path / "big-tiles.tiff"
    generate_slide(path, width=3000, height=2100, seed=6, tile_px=2048, texture="procedural", min_level_px=4096)
    slide = open_slide(path)
    coarse = coarse_mask(slide)
    calls: list[tuple[int, ...]] = []
    read = slide._reader.read

    def counted(level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        calls.append((level, x, y, w, h))
        return read(level, x, y, w, h)

    monkeypatch.setattr(slide._reader, "read", counted)
    cached = sample_tissue_pixels(slide, n_pixels=50_000, coarse=coarse)
    decoded = len(calls)
    monkeypatch.setattr(slide_module, "_CACHED_TILE_PX", 1 << 40)  # no tile is large enough to keep
    direct = sample_tissue_pixels(slide, n_pixels=50_000, coarse=coarse)
    assert decoded <= 4 and len(calls) - decoded > 20, (decoded, len(calls) - decoded)
    np.testing.assert_array_equal(cached.pixels, direct.pixels)
    np.testing.assert_array_equal(cached.blocks, direct.blocks)
    assert cached.white == direct.white and len(cached.pixels) == 50_000


def test_transparency_is_composited_over_white_and_planar_tiff_is_read(tmp_path: Path) -> None:
    """A transparent background is glass, as OpenSlide's transparent areas are: PNG's straight
    alpha and a TIFF's unassociated alpha by ``(rgb a + 255 (255 - a)) / 255``, a TIFF's
    associated (premultiplied) alpha by ``rgb + 255 - a``; a planar RGB TIFF reads as RGB."""
    import tifffile

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    alpha[:10] = 0  # a transparent band: glass
    alpha[10:20] = 255  # an opaque band: its colours unchanged
    a = alpha.astype(np.int64)
    straight = ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    png = tmp_path / "straight.png"
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(png)
    unassoc = tmp_path / "unassoc.tif"
    tifffile.imwrite(unassoc, np.concatenate([rgb, alpha], axis=2), photometric="rgb", extrasamples=[2])
    for path in (png, unassoc):
        got = open_slide(path).read_region(0, x=0, y=0, width=50, height=40)
        np.testing.assert_array_equal(got, straight)
        assert (got[:10] == 255).all() and np.array_equal(got[10:20], rgb[10:20])

    premultiplied = ((rgb.astype(np.int64) * a + 127) // 255).astype(np.uint8)
    assoc = tmp_path / "assoc.tif"
    tifffile.imwrite(assoc, np.concatenate([premultiplied, alpha], axis=2), photometric="rgb", extrasamples=[1])
    want = np.minimum(premultiplied.astype(np.int64) + 255 - a, 255).astype(np.uint8)
    np.testing.assert_array_equal(open_slide(assoc).read_region(0, x=0, y=0, width=50, height=40), want)

    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(open_slide(planar).read_region(0, x=0, y=0, width=50, height=40), rgb)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("associated", [False, True])
def test_tiled_tiff_alpha_is_composited_over_white_on_both_backends(
    backend: Backend, associated: bool, tmp_path: Path
) -> None:
    """A tiled TIFF with an alpha channel, partly transparent: both readers composite it over
    white. openslide-python hands back straight (not premultiplied) RGBA, and tiffslide the
    samples as stored (so it dropped the alpha: transparent areas read black). Within 1.5
    levels of the exact, unrounded composite: the result's own rounding, and OpenSlide
    premultiplies and divides again, rounding each time (at alpha 1 of 255 a colour keeps little)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (512, 512, 1), dtype=np.uint8)
    alpha[:64] = 0
    alpha[64:128] = 255
    a = alpha.astype(np.int64)
    stored = ((rgb * a + 127) // 255).astype(np.uint8) if associated else rgb
    path = tmp_path / "alpha.tiff"
    tifffile.imwrite(path, np.concatenate([stored, alpha], axis=2), tile=(256, 256), compression="deflate",
                     photometric="rgb", extrasamples=[1 if associated else 2])
    want = (rgb * a + 255 * (255 - a)) / 255
    got = open_slide(path, backend=backend).read_region(0, x=0, y=0, width=512, height=512)
    assert np.abs(got - want).max() <= 1.5
    assert (got[:64] == 255).all() and np.array_equal(got[64:128], rgb[64:128])


@pytest.mark.parametrize("compression", ["jpeg2000", "webp"])
def test_tiled_tiff_with_tiles_openslide_cannot_decode_opens_with_tiffslide(
    compression: str, sample_svs: Path, tmp_path: Path
) -> None:
    """OpenSlide takes any tiled TIFF as generic TIFF, but its libtiff lacks JPEG 2000 and WebP
    tiles ("Unsupported TIFF compression"): the default then reads the file with tiffslide, whose
    pixels are tifffile's own decoding of the same tiles."""
    import tifffile

    rgb = open_slide(sample_svs).read_region(0, x=0, y=0, width=512, height=384)
    path = tmp_path / f"{compression}.tiff"
    tifffile.imwrite(path, rgb, tile=(256, 256), compression=compression, photometric="rgb")
    with pytest.raises(SlideOpenError, match="Unsupported TIFF compression"):
        open_slide(path, backend="openslide")
    slide = open_slide(path)
    assert slide.backend == "tiffslide"
    np.testing.assert_array_equal(slide.read_region(0, x=0, y=0, width=512, height=384),
                                  tifffile.imread(path))


def _ome_tiff(path: Path, rgb: NDArray[np.uint8], levels: int, **size: object) -> None:
    """An OME-TIFF as bfconvert and QuPath write it: OME-XML, reduced levels in SubIFDs."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(rgb, subifds=levels - 1, tile=(256, 256), compression="jpeg", photometric="rgb",
                 metadata={"axes": "YXS", **size})
        for k in range(1, levels):
            tw.write(rgb[:: 2**k, :: 2**k], subfiletype=1, tile=(256, 256), compression="jpeg", photometric="rgb")


def test_ome_tiff_pyramid_in_subifds_is_read_whole(sample_svs: Path, tmp_path: Path) -> None:
    """OpenSlide takes an OME-TIFF for generic TIFF and sees level 0 alone (it does not read
    SubIFDs), so a gigapixel OME-TIFF's mask and thumbnails decoded all of level 0. The default
    is tiffslide there: every level, the file's own pixels, the pixel size from the OME-XML."""
    rgb = open_slide(sample_svs).read_region(0, x=0, y=0, width=1536, height=1280)
    path = tmp_path / "slide.ome.tif"
    _ome_tiff(path, rgb, 3, PhysicalSizeX=250, PhysicalSizeY=251, PhysicalSizeXUnit="nm", PhysicalSizeYUnit="nm")
    assert open_slide(path, backend="openslide").level_count == 1
    slide = open_slide(path)
    assert slide.backend == "tiffslide"
    assert slide.level_dimensions == ((1536, 1280), (768, 640), (384, 320))
    assert slide.mpp == pytest.approx((0.250, 0.251))
    assert open_slide(path, backend="openslide").mpp == pytest.approx((0.250, 0.251))
    with tifffile.TiffFile(path) as tif:
        for level in range(3):
            want = tif.series[0].levels[level].asarray()
            got = slide.read_region(level, x=0, y=0, width=want.shape[1], height=want.shape[0])
            np.testing.assert_array_equal(got, want)
    assert slide.best_level_for(600) == 1


def test_ome_xml_pixel_size_needs_a_length_and_the_slides_size(tmp_path: Path) -> None:
    from wsi_norm.slide import _ome_mpp

    rgb = np.full((512, 512, 3), 200, np.uint8)
    path = tmp_path / "um.ome.tif"
    _ome_tiff(path, rgb, 2, PhysicalSizeX=0.5, PhysicalSizeY=0.5)  # the schema's default unit: µm
    assert open_slide(path).mpp == pytest.approx((0.5, 0.5))
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages.first.description
    assert _ome_mpp(xml, (512, 512)) == pytest.approx((0.5, 0.5))
    assert _ome_mpp(xml, (256, 256)) is None  # no Pixels of that size
    assert _ome_mpp(xml.replace('PhysicalSizeX="0.5"', 'PhysicalSizeX="0.5" PhysicalSizeXUnit="s"'), (512, 512)) is None
    assert _ome_mpp('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><OME/>', (512, 512)) is None
    assert _ome_mpp("<OME><Pixels", (512, 512)) is None  # not well formed
    assert _ome_mpp("Aperio Image Library", (512, 512)) is None


def test_embedded_icc_profile_is_reported_on_every_reader_and_recorded(sample_svs: Path, tmp_path: Path) -> None:
    """A scanner's ICC profile (TIFF InterColorProfile, PNG iCCP) is read by both slide backends
    and the image reader, summarized in the scanner metadata (so in an output's provenance) and
    shown by `wsi-norm info`; the stored RGB is what the methods work on."""
    import hashlib
    import subprocess
    import sys

    from PIL import ImageCms

    from wsi_norm.pipeline import fit_template, normalize_slide

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = open_slide(sample_svs).read_region(0, x=800, y=1200, width=512, height=512)
    path = tmp_path / "icc.tiff"
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="deflate", photometric="rgb", iccprofile=icc)
    png = tmp_path / "icc.png"
    Image.fromarray(rgb).save(png, icc_profile=icc)
    summary = {"description": "sRGB built-in", "bytes": len(icc), "sha256": hashlib.sha256(icc).hexdigest()}
    for slide in (open_slide(path, backend="openslide"), open_slide(path, backend="tiffslide"), open_slide(png)):
        assert slide.icc_profile == icc
        assert slide.scanner_metadata()["icc_profile"] == summary
        np.testing.assert_array_equal(slide.read_region(0, x=0, y=0, width=512, height=512), rgb)  # not applied
    plain = tmp_path / "plain.tiff"
    tifffile.imwrite(plain, rgb, tile=(256, 256), compression="deflate", photometric="rgb")
    assert open_slide(plain).icc_profile is None and open_slide(plain).scanner_metadata()["icc_profile"] is None

    out = tmp_path / "out.tiff"
    normalize_slide(path, out, method="none")
    written = open_slide(out)
    assert written.provenance is not None
    assert written.provenance["source"]["scanner"]["icc_profile"] == summary
    assert written.icc_profile == icc  # a copy keeps the source's colours and what they mean
    mapped = tmp_path / "mapped.tiff"
    normalize_slide(path, mapped, method="reinhard", target=fit_template([png], method="reinhard"))
    assert open_slide(mapped).icc_profile is None  # the target's RGB: no profile of the source describes it
    info = subprocess.run([sys.executable, "-m", "wsi_norm.cli", "info", str(out), "--no-tissue"],
                          capture_output=True, text=True, check=True).stdout
    assert f"icc        sRGB built-in ({len(icc)} bytes): not applied" in info


def test_without_openslide_tiff_slides_read_with_tiffslide(
    sample_svs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where OpenSlide cannot be loaded (no openslide-bin wheel for the platform, no system
    library), tiffslide, the pure-Python backend, reads the TIFF family, with one warning;
    what only OpenSlide reads fails with an error that says so, naming the file."""
    import sys

    import wsi_norm.slide as slide_module

    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` raises ImportError
    monkeypatch.setattr(slide_module, "_OPENSLIDE_ERROR", [])
    with caplog.at_level("WARNING", logger="wsi_norm.slide"):
        svs = open_slide(sample_svs)
        assert (svs.backend, svs.vendor, svs.dimensions) == ("tiffslide", "aperio", CMU_SIZE)
        svs.read_region(0, x=0, y=0, width=64, height=64)
        generic = tmp_path / "g.tiff"
        tifffile.imwrite(generic, np.full((300, 300, 3), 90, np.uint8), tile=(256, 256), photometric="rgb")
        assert open_slide(generic).backend == "tiffslide"
    assert sum("OpenSlide cannot be loaded" in r.message for r in caplog.records) == 1
    with pytest.raises(SlideOpenError, match=r"g\.tiff: reading it needs OpenSlide, which cannot be loaded \(ModuleNotFoundError"):
        open_slide(generic, backend="openslide")
    other = tmp_path / "slide.ndpi"
    other.write_bytes(b"not a TIFF at all")
    with pytest.raises(UnsupportedFormatError, match=r"slide\.ndpi: .*OpenSlide, which reads the other slide formats, cannot be loaded"):
        open_slide(other)
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "level0.dcm").write_bytes(b"DICM")
    with pytest.raises(SlideOpenError, match="dicom: reading it needs OpenSlide"):
        open_slide(tmp_path / "dicom")
