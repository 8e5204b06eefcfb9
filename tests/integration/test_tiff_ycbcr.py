"""TIFF tiles whose decoder returns YCbCr: tiffslide reads them in OpenSlide's colours.

Aperio's compression 33003 stores Y, Cb, Cr planes in the JPEG 2000 codestream without its
colour transform (33005 stores RGB with it). OpenSlide converts 33003 itself; tifffile, under
tiffslide, returned the planes as RGB. The Aperio files here are written as Aperio's encoder lays
them out: one raw codestream a tile, the Aperio ImageDescription, TIFF photometric RGB. A TIFF
whose PhotometricInterpretation is YCbCr, stored with a lossless codec, is the other case: OpenSlide
reads it through libtiff, which converts it with the file's YCbCr tags.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray

from wsi_norm import SlideOpenError, open_slide
from wsi_norm.tiffycbcr import LibtiffYCbCr, j2k_subsampled, ycbcr_to_rgb

TILE = 256


def _ycbcr(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """JPEG's full-range BT.601 YCbCr (what Aperio's 33003 tiles hold)."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    ycc = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
                    0.5 * r - 0.418688 * g - 0.081312 * b + 128], -1)
    return np.clip(np.rint(ycc), 0, 255).astype(np.uint8)


def _lossless_444(tile: NDArray[np.uint8]) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg2k_encode(np.ascontiguousarray(tile), level=0, codecformat="J2K",
                                           mct=False, reversible=True))


def _opj_subsampled(tile: NDArray[np.uint8], dx: int, dy: int, tmp: Path) -> bytes:
    """A codestream whose chroma planes are subsampled dx x dy (OpenJPEG's opj_compress)."""
    raw, out = tmp / "tile.raw", tmp / "tile.j2k"
    planes = [tile[..., 0], tile[::dy, ::dx, 1], tile[::dy, ::dx, 2]]
    raw.write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in planes))
    h, w = tile.shape[:2]
    subprocess.run(["opj_compress", "-i", str(raw), "-o", str(out), "-F",
                    f"{w},{h},3,8,u@1x1:{dx}x{dy}:{dx}x{dy}", "-r", "10"], check=True, capture_output=True)
    return out.read_bytes()


def _write_svs(path: Path, tiles: Iterator[bytes], shape: tuple[int, int], compression: int = 33003) -> None:
    h, w = shape
    description = f"Aperio Image Library v11.0.37\r\n{w}x{h} ({TILE}x{TILE}) J2K/YUV16 Q=70|AppMag = 20|MPP = 0.499"
    tifffile.imwrite(path, tiles, shape=(h, w, 3), dtype="uint8", tile=(TILE, TILE), compression=compression,
                     photometric="rgb", description=description, metadata=None)


def _tiles(ycc: NDArray[np.uint8], encode: object) -> Iterator[bytes]:
    assert callable(encode)
    for ty in range(0, ycc.shape[0], TILE):
        for tx in range(0, ycc.shape[1], TILE):
            yield encode(ycc[ty : ty + TILE, tx : tx + TILE])


@pytest.fixture(scope="module")
def crop(sample_svs: Path) -> NDArray[np.uint8]:
    return open_slide(sample_svs).read_region(0, x=512, y=768, width=4 * TILE, height=3 * TILE)


def _triples() -> NDArray[np.uint8]:
    """Every (Cb, Cr) pair with luma at the edges and in between: a (768, 1024, 3) image."""
    lumas = np.array([0, 1, 2, 16, 64, 100, 128, 180, 235, 253, 254, 255], np.uint8)
    cb, cr = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    planes = [np.stack([np.full_like(cb, y), cb, cr], -1).reshape(TILE, TILE, 3) for y in lumas]
    return np.concatenate([np.concatenate(planes[i : i + 4], 1) for i in range(0, len(planes), 4)], 0)


def test_ycbcr_conversion_is_openslides_for_every_triple(tmp_path: Path) -> None:
    """The triples losslessly coded as Aperio 33003, read by OpenSlide's Aperio driver: the
    conversion gives the same RGB for each."""
    ycc = _triples()
    path = tmp_path / "triples.svs"
    _write_svs(path, _tiles(ycc, _lossless_444), ycc.shape[:2])
    h, w = ycc.shape[:2]
    seen = open_slide(path, backend="openslide").read_region(0, x=0, y=0, width=w, height=h)
    np.testing.assert_array_equal(ycbcr_to_rgb(ycc), seen)
    np.testing.assert_array_equal(open_slide(path, backend="tiffslide").read_region(0, x=0, y=0, width=w, height=h), seen)


def test_aperio_j2k_ycbcr_reads_the_same_on_both_backends(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    path = tmp_path / "j2k-33003.svs"
    _write_svs(path, _tiles(_ycbcr(crop), _lossless_444), crop.shape[:2])
    h, w = crop.shape[:2]
    by_openslide = open_slide(path, backend="openslide")
    by_tiffslide = open_slide(path, backend="tiffslide")
    assert by_openslide.vendor == by_tiffslide.vendor == "aperio"
    got = by_tiffslide.read_region(0, x=0, y=0, width=w, height=h)
    np.testing.assert_array_equal(got, by_openslide.read_region(0, x=0, y=0, width=w, height=h))
    # the slide's own colours, to the rounding of one YCbCr round trip (not the planes as RGB)
    assert np.abs(got.astype(int) - crop).max() <= 2
    # a region that runs off the slide: its outside is white, its inside converted alike
    edge = by_tiffslide.read_region(0, x=w - 40, y=h - 30, width=100, height=90)
    np.testing.assert_array_equal(edge[:30, :40], got[h - 30 :, w - 40 :])
    assert (edge[30:] == 255).all() and (edge[:, 40:] == 255).all()
    # and the pipeline's chunked view of it
    np.testing.assert_array_equal(np.asarray(by_tiffslide.to_dask(0)), got)


def test_aperio_j2k_rgb_is_left_to_the_decoder(crop: NDArray[np.uint8], tmp_path: Path) -> None:
    """33005 is RGB coded with JPEG 2000's own colour transform, which the decoder undoes."""
    import imagecodecs

    def encode(tile: NDArray[np.uint8]) -> bytes:
        return bytes(imagecodecs.jpeg2k_encode(np.ascontiguousarray(tile), level=0, codecformat="J2K",
                                               mct=True, reversible=True))

    path = tmp_path / "j2k-33005.svs"
    _write_svs(path, _tiles(crop, encode), crop.shape[:2], compression=33005)
    h, w = crop.shape[:2]
    np.testing.assert_array_equal(open_slide(path, backend="tiffslide").read_region(0, x=0, y=0, width=w, height=h), crop)
    np.testing.assert_array_equal(open_slide(path, backend="openslide").read_region(0, x=0, y=0, width=w, height=h), crop)


@pytest.mark.skipif(shutil.which("opj_compress") is None,
                    reason="needs opj_compress (Debian libopenjp2-tools; .ci/run installs it)")
@pytest.mark.parametrize(("dx", "dy"), [(2, 1), (2, 2)])
def test_aperio_j2k_with_subsampled_chroma_is_not_converted_twice(
    crop: NDArray[np.uint8], tmp_path: Path, dx: int, dy: int
) -> None:
    """OpenJPEG turns a codestream with subsampled chroma into RGB itself (as sYCC): converting
    it again would be wrong. Both readers upsample and round their own way: within a level."""
    ycc = _ycbcr(crop)
    first = _opj_subsampled(ycc[:TILE, :TILE], dx, dy, tmp_path)
    assert j2k_subsampled(first) is True and j2k_subsampled(_lossless_444(ycc[:TILE, :TILE])) is False
    path = tmp_path / f"j2k-{dx}{dy}.svs"
    _write_svs(path, _tiles(ycc, lambda t: _opj_subsampled(t, dx, dy, tmp_path)), crop.shape[:2])
    h, w = crop.shape[:2]
    by_openslide = open_slide(path, backend="openslide").read_region(0, x=0, y=0, width=w, height=h)
    by_tiffslide = open_slide(path, backend="tiffslide").read_region(0, x=0, y=0, width=w, height=h)
    assert np.abs(by_tiffslide.astype(int) - by_openslide).max() <= 1


def test_j2k_tiles_without_a_siz_marker_are_refused_naming_the_level(tmp_path: Path) -> None:
    path = tmp_path / "broken.svs"
    _write_svs(path, iter([b"\xff\x4f" + bytes(64)] * 4), (2 * TILE, 2 * TILE))
    with pytest.raises(SlideOpenError, match=r"broken\.svs: level 0: JPEG 2000 YCbCr tiles .* no readable SIZ"):
        open_slide(path, backend="tiffslide")


def test_siz_marker_parsing() -> None:
    assert j2k_subsampled(b"") is None
    assert j2k_subsampled(b"\xff\x4f\xff\x51" + bytes(10)) is None  # cut short
    siz = b"\xff\x4f\xff\x51" + bytes(2 + 2 + 32) + (3).to_bytes(2, "big")
    assert j2k_subsampled(siz + bytes([7, 1, 1] * 3)) is False
    assert j2k_subsampled(siz + bytes([7, 1, 1, 7, 2, 1, 7, 2, 1])) is True
    assert j2k_subsampled(siz + bytes([7, 1, 1] * 2)) is None  # a component missing
    with pytest.raises(ValueError, match="uint8 YCbCr"):
        ycbcr_to_rgb(np.zeros((2, 2, 3), np.int16))


def _rationals(values: tuple[float, ...]) -> list[int]:
    return [v for x in values for v in (round(x * 10_000), 10_000)]


@pytest.mark.parametrize(("luma", "reference"), [
    ((0.299, 0.587, 0.114), (0, 255, 128, 255, 128, 255)),    # the TIFF defaults
    ((0.2126, 0.7152, 0.0722), (16, 235, 128, 240, 128, 240)),  # BT.709 weights, studio range
])
@pytest.mark.parametrize("compression", ["zstd", "lzw", None])
def test_lossless_ycbcr_tiff_reads_as_libtiff_converts_it(
    luma: tuple[float, ...], reference: tuple[float, ...], compression: str | None, tmp_path: Path
) -> None:
    """PhotometricInterpretation YCbCr with a lossless codec: tifffile returns the samples as
    stored (tiffslide read them as RGB); OpenSlide reads through libtiff's RGBA interface, which
    converts them with YCbCrCoefficients and ReferenceBlackWhite. Both now give the same RGB
    for every triple."""
    ycc = _triples()
    path = tmp_path / "ycbcr.tiff"
    tifffile.imwrite(path, ycc, tile=(TILE, TILE), photometric="ycbcr", subsampling=(1, 1), compression=compression,
                     extratags=[(529, 5, 3, _rationals(luma), True), (532, 5, 6, _rationals(reference), True)])
    h, w = ycc.shape[:2]
    by_openslide = open_slide(path, backend="openslide").read_region(0, x=0, y=0, width=w, height=h)
    by_tiffslide = open_slide(path, backend="tiffslide").read_region(0, x=0, y=0, width=w, height=h)
    np.testing.assert_array_equal(by_tiffslide, by_openslide)
    np.testing.assert_array_equal(LibtiffYCbCr(luma, reference)(ycc), by_openslide)
    # mid-grey is grey whatever the weights; black and white are the reference's code values
    grey = LibtiffYCbCr(luma, reference)(np.array([[128, 128, 128]], np.uint8))
    assert np.ptp(grey) == 0
    if reference[0] == 16:
        assert LibtiffYCbCr(luma, reference)(np.array([[16, 128, 128], [235, 128, 128]], np.uint8)).tolist() \
            == [[0, 0, 0], [255, 255, 255]]
